/* ws/ws: the streaming RFC 6455 frame parser.
 *
 * One idea: the common case costs nothing extra. When a whole unfragmented frame sits in the
 * bytes just read, it is unmasked where it lies and handed to the callback by pointer; only a
 * frame cut by a read boundary, or a fragmented message, is copied into p->msg (control
 * frames into p->ctl). Every check that can fail is made at the first byte that decides it:
 * a frame header is validated byte by byte (so a 1009 is refused before any payload is
 * buffered), and text is validated chunk by chunk, so feeding a stream in one piece or one
 * byte at a time gives the same callbacks and the same error.
 *
 * Callbacks may close the connection and even free the parser's buffers: the parser updates
 * its own state before each callback and never touches p after one returns non-zero.
 *
 * A compressed message (permessage-deflate, RSV1) travels the same paths as its wire bytes,
 * in place or reassembled, bounded a little above max_message (deflate may grow what does
 * not compress); it is inflated whole through p->zip at its end, bounded by max_message of
 * output, and its text checked then.
 */
#include "ws.h"

#include <stdlib.h>
#include <string.h>

#define WS_DEFAULT_MAX 65536
/* Smallest reassembly buffer for a fragmented message: avoids a realloc per tiny fragment. */
#define WS_MSG_MIN_CAP 1024

void ws_parser_init(ws_parser_t *p, const ws_parser_cb_t *cb, void *ud) {
    memset(p, 0, sizeof *p);
    p->max_message = WS_DEFAULT_MAX;
    p->require_mask = true;
    p->cb = cb;
    p->ud = ud;
    p->hdr_need = 2;
}

void ws_parser_free(ws_parser_t *p) {
    free(p->msg);
    p->msg = NULL;
    p->msg_len = 0;
    p->msg_cap = 0;
}

static int code_to_err(uint16_t code) {
    switch (code) {
    case WS_CLOSE_INVALID_DATA: return CHAT_EUTF8;
    case WS_CLOSE_TOO_BIG: return CHAT_ETOOBIG;
    case WS_CLOSE_INTERNAL: return CHAT_ENOMEM;
    default: return CHAT_EPROTO;
    }
}

/* The stream is bad: remember why (sticky) and drop the reassembly buffer at once. */
static int fail(ws_parser_t *p, uint16_t code, const char *reason) {
    p->failed = true;
    p->error_code = code;
    p->error_reason = reason;
    ws_parser_free(p);
    return code_to_err(code);
}

/* Back to "expecting a frame header". */
static inline void next_frame(ws_parser_t *p) {
    p->hdr_len = 0;
    p->hdr_need = 2;
    p->payload_len = 0;
    p->payload_got = 0;
    p->ctl_len = 0;
}

/* ---- header, checked at the byte that decides each rule --------------------------------- */

static int check_b0(ws_parser_t *p, uint8_t b0) {
    uint8_t op = b0 & 0x0F;
    bool fin = (b0 & 0x80) != 0;
    bool rsv1 = (b0 & 0x40) != 0;
    if (b0 & 0x30) return fail(p, WS_CLOSE_PROTOCOL, "reserved bits set");
    if (rsv1 && !p->zip) return fail(p, WS_CLOSE_PROTOCOL, "reserved bits set");
    if (rsv1 && op != WS_OP_TEXT && op != WS_OP_BINARY)
        return fail(p, WS_CLOSE_PROTOCOL, "RSV1 set on a frame other than a message's first");
    switch (op) {
    case WS_OP_CONT:
        if (!p->msg_opcode) return fail(p, WS_CLOSE_PROTOCOL, "continuation without a message");
        break;
    case WS_OP_TEXT:
    case WS_OP_BINARY:
        if (p->msg_opcode) return fail(p, WS_CLOSE_PROTOCOL, "new message inside a fragmented one");
        p->msg_opcode = op;
        p->msg_zipped = rsv1;
        p->utf8 = UTF8_ACCEPT;
        break;
    case WS_OP_CLOSE:
    case WS_OP_PING:
    case WS_OP_PONG:
        if (!fin) return fail(p, WS_CLOSE_PROTOCOL, "fragmented control frame");
        break;
    default: return fail(p, WS_CLOSE_PROTOCOL, "unknown opcode");
    }
    p->opcode = op;
    p->fin = fin;
    return 0;
}

static int check_b1(ws_parser_t *p, uint8_t b1) {
    bool masked = (b1 & 0x80) != 0;
    uint8_t len7 = b1 & 0x7F;
    if (masked && p->expect_unmasked) return fail(p, WS_CLOSE_PROTOCOL, "masked server frame");
    if (!masked && p->require_mask) return fail(p, WS_CLOSE_PROTOCOL, "unmasked client frame");
    if (p->opcode >= 0x8 && len7 > 125) return fail(p, WS_CLOSE_PROTOCOL, "control frame too long");
    p->masked = masked;
    p->hdr_need = (uint8_t)(2 + (len7 == 126 ? 2 : len7 == 127 ? 8 : 0) + (masked ? 4 : 0));
    return 0;
}

/* The most wire bytes a message may take: max_message, and for a compressed one what
 * deflate adds to data that does not compress (5 bytes a 16 KiB stored block) with room
 * to spare; its output is bounded by max_message when it is inflated. */
static size_t msg_limit(const ws_parser_t *p) {
    size_t max = p->max_message ? p->max_message : WS_DEFAULT_MAX;
    if (!p->msg_zipped) return max;
    size_t slack = max / 1024 + 64;
    return max > SIZE_MAX - slack ? SIZE_MAX : max + slack;
}

/* Bytes up to the end of the length field (the mask key follows). */
static inline size_t len_end(const ws_parser_t *p) { return p->hdr_need - (p->masked ? 4u : 0u); }

static int check_len(ws_parser_t *p, const uint8_t *h) {
    uint8_t len7 = h[1] & 0x7F;
    uint64_t n;
    if (len7 < 126) {
        n = len7;
    } else if (len7 == 126) {
        n = (uint64_t)h[2] << 8 | h[3];
    } else {
        n = 0;
        for (int i = 0; i < 8; i++) n = n << 8 | h[2 + i];
        if (n >> 63) return fail(p, WS_CLOSE_PROTOCOL, "invalid frame length");
    }
    if (p->opcode < 0x8) {
        size_t max = msg_limit(p);
        /* msg_len <= max always holds, so this cannot wrap. */
        if (n > max - p->msg_len) return fail(p, WS_CLOSE_TOO_BIG, "message too big");
    }
    p->payload_len = n;
    return 0;
}

static inline void start_payload(ws_parser_t *p, const uint8_t *h) {
    if (p->masked) memcpy(p->mask, h + p->hdr_need - 4, 4);
    p->hdr_need = 0;
    p->payload_got = 0;
}

/* ---- delivery ----------------------------------------------------------------------------- */

/* A whole data message (wire bytes): inflated if compressed, its text checked if not done
 * on the way, then delivered. The frame state is already reset and msg_opcode cleared;
 * after the callback p is not touched. */
static int deliver_message(ws_parser_t *p, uint8_t op, bool zipped, uint8_t *data, size_t n,
                           bool text_checked) {
    if (zipped) {
        size_t max = p->max_message ? p->max_message : WS_DEFAULT_MAX;
        int rc = ws_zip_inflate(p->zip, data, n, max, &data, &n);
        if (rc == CHAT_ETOOBIG) return fail(p, WS_CLOSE_TOO_BIG, "message too big (inflated)");
        if (rc == CHAT_ENOMEM) return fail(p, WS_CLOSE_INTERNAL, "out of memory");
        if (rc < 0) return fail(p, WS_CLOSE_INVALID_DATA, "invalid compressed data");
        text_checked = false;
    }
    if (op == WS_OP_TEXT && !text_checked) {
        uint32_t st = utf8_feed(UTF8_ACCEPT, data, n);
        /* the same reason as the reassembly path would give, for the logs */
        if (st == UTF8_REJECT) return fail(p, WS_CLOSE_INVALID_DATA, "invalid utf-8");
        if (st != UTF8_ACCEPT) return fail(p, WS_CLOSE_INVALID_DATA, "truncated utf-8");
    }
    const ws_parser_cb_t *cb = p->cb;
    if (cb && cb->on_message && cb->on_message(p->ud, op, data, n)) return CHAT_ECLOSED;
    return 0;
}

/* The frame state is already reset; after the callback p is not touched. */
static int deliver_control(ws_parser_t *p, uint8_t op, uint8_t *data, size_t n) {
    uint16_t code = 0;
    if (op == WS_OP_CLOSE) {
        code = WS_CLOSE_NO_STATUS;
        if (n == 1) return fail(p, WS_CLOSE_PROTOCOL, "close frame with a 1-byte body");
        if (n >= 2) {
            code = (uint16_t)(data[0] << 8 | data[1]);
            if (!ws_close_code_valid(code)) return fail(p, WS_CLOSE_PROTOCOL, "invalid close code");
            data += 2;
            n -= 2;
            if (!utf8_valid(data, n))
                return fail(p, WS_CLOSE_INVALID_DATA, "invalid utf-8 in close reason");
        }
    }
    const ws_parser_cb_t *cb = p->cb;
    if (cb && cb->on_control && cb->on_control(p->ud, op, code, data, n)) return CHAT_ECLOSED;
    return 0;
}

/* A whole frame inside the input: unmask and deliver in place. */
static int frame_in_place(ws_parser_t *p, uint8_t *data, size_t n) {
    uint8_t op = p->opcode;
    if (p->masked) ws_mask(data, n, p->mask, 0);
    next_frame(p);
    if (op >= 0x8) return deliver_control(p, op, data, n);
    bool zipped = p->msg_zipped;
    p->msg_opcode = 0;
    p->msg_zipped = false;
    return deliver_message(p, op, zipped, data, n, false);
}

/* The current frame's payload is complete (in p->msg or p->ctl). here: a non-NULL pointer
 * to stand for an empty message. */
static int frame_end(ws_parser_t *p, uint8_t *here) {
    uint8_t op = p->opcode;
    bool fin = p->fin;
    size_t ctl_len = p->ctl_len;
    next_frame(p);
    if (op >= 0x8) return deliver_control(p, op, p->ctl, ctl_len);
    if (!fin) return 0;
    bool zipped = p->msg_zipped;
    if (!zipped && p->msg_opcode == WS_OP_TEXT && p->utf8 != UTF8_ACCEPT)
        return fail(p, WS_CLOSE_INVALID_DATA, "truncated utf-8");
    /* Detach the buffer before the callback: it may free the parser, and an idle connection
     * should hold no reassembly memory anyway. */
    uint8_t *m = p->msg;
    size_t mlen = p->msg_len;
    uint8_t mop = p->msg_opcode;
    p->msg = NULL;
    p->msg_len = 0;
    p->msg_cap = 0;
    p->msg_opcode = 0;
    p->msg_zipped = false;
    /* the text was checked chunk by chunk unless it is compressed */
    int rc = deliver_message(p, mop, zipped, m ? m : here, mlen, true);
    free(m);
    return rc;
}

/* Room for the rest of the current data frame in p->msg. */
static int msg_reserve(ws_parser_t *p) {
    size_t need = p->msg_len + (size_t)(p->payload_len - p->payload_got);
    if (need <= p->msg_cap) return 0;
    size_t max = msg_limit(p);
    size_t cap = need;
    if (!(p->fin && p->msg_len == 0)) {
        /* A fragmented message: more may follow, so grow geometrically (bounded by max,
         * which need never exceeds) to keep the copying linear. */
        cap = p->msg_cap * 2;
        if (cap < WS_MSG_MIN_CAP) cap = WS_MSG_MIN_CAP;
        if (cap > max) cap = max;
        if (cap < need) cap = need;
    }
    uint8_t *m = realloc(p->msg, cap);
    if (!m) return fail(p, WS_CLOSE_INTERNAL, "out of memory");
    p->msg = m;
    p->msg_cap = cap;
    return 0;
}

/* n bytes of the current frame's payload (n <= what is left of it), copied aside. */
static int payload_chunk(ws_parser_t *p, const uint8_t *src, size_t n) {
    uint64_t off = p->payload_got;
    uint8_t *dst;
    if (p->opcode >= 0x8) {
        dst = p->ctl + off;
        memcpy(dst, src, n);
        p->ctl_len = (uint8_t)(off + n);
    } else {
        if (off == 0) {
            int rc = msg_reserve(p);
            if (rc) return rc;
        }
        dst = p->msg + p->msg_len;
        memcpy(dst, src, n);
        p->msg_len += n;
    }
    p->payload_got = off + n;
    if (p->masked) ws_mask(dst, n, p->mask, off);
    /* msg_opcode is that of the message in progress, which a control frame may interrupt. */
    if (p->opcode < 0x8 && p->msg_opcode == WS_OP_TEXT && !p->msg_zipped) {
        p->utf8 = utf8_feed(p->utf8, dst, n);
        if (p->utf8 == UTF8_REJECT) return fail(p, WS_CLOSE_INVALID_DATA, "invalid utf-8");
    }
    return 0;
}

/* ---- the feed loop ------------------------------------------------------------------------ */

int ws_parser_feed(ws_parser_t *p, uint8_t *data, size_t len) {
    if (p->failed) return code_to_err(p->error_code);
    size_t i = 0;
    int rc;
    while (i < len) {
        if (p->hdr_need) {
            size_t avail = len - i;
            uint8_t *h = data + i;
            if (p->hdr_len == 0 && avail >= 2) {
                /* The usual case: the header starts in this read; parse it where it lies. */
                if ((rc = check_b0(p, h[0])) || (rc = check_b1(p, h[1]))) return rc;
                size_t need = p->hdr_need;
                if (avail >= len_end(p) && (rc = check_len(p, h))) return rc;
                if (avail < need) {
                    memcpy(p->hdr, h, avail);
                    p->hdr_len = (uint8_t)avail;
                    return 0;
                }
                start_payload(p, h);
                i += need;
            } else {
                /* A header split across reads: one byte at a time, checking as it fills. */
                uint8_t k = p->hdr_len;
                p->hdr[k++] = data[i++];
                p->hdr_len = k;
                if (k == 1) {
                    if ((rc = check_b0(p, p->hdr[0]))) return rc;
                    continue;
                }
                if (k == 2 && (rc = check_b1(p, p->hdr[1]))) return rc;
                if (k == len_end(p) && (rc = check_len(p, p->hdr))) return rc;
                if (k < p->hdr_need) continue;
                start_payload(p, p->hdr);
            }
            /* Header complete. A whole control frame, or a whole unfragmented data frame,
             * that is entirely in this read goes out in place. */
            if (p->payload_len <= len - i &&
                (p->opcode >= 0x8 || (p->fin && p->opcode != WS_OP_CONT))) {
                size_t n = (size_t)p->payload_len;
                uint8_t *pl = data + i;
                i += n;
                if ((rc = frame_in_place(p, pl, n))) return rc;
                continue;
            }
            if (p->payload_len == 0) {
                if ((rc = frame_end(p, data + i))) return rc;
                continue;
            }
            if (i == len) return 0;
        }
        uint64_t left = p->payload_len - p->payload_got;
        size_t n = left < len - i ? (size_t)left : len - i;
        if ((rc = payload_chunk(p, data + i, n))) return rc;
        i += n;
        if (p->payload_got == p->payload_len && (rc = frame_end(p, data + i))) return rc;
    }
    return 0;
}
