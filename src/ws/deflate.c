/* ws/deflate: permessage-deflate (RFC 7692): the negotiation of the offer, and one zlib
 * compressor and decompressor per thread.
 *
 * One idea: compression costs no state per connection. We answer every offer with
 * server_no_context_takeover, so a broadcast frame is compressed once, from a fresh
 * context, and the same bytes go to every compressing member; and with
 * client_no_context_takeover, so each client message inflates alone, from its reassembled
 * payload, through the thread's one inflater. An idle connection holds a flag, nothing more.
 * Inflated output is bounded: at most max + 1 bytes are ever produced, so a zip bomb is
 * refused (1009) after costing that much.
 */
#include "ws.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

/* ---- the offer ----------------------------------------------------------------------------- */

/* RFC 7230 tchar */
static bool tchar(unsigned char c) {
    if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')) return true;
    return c && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

typedef struct cursor {
    const char *p, *end;
} cursor_t;

static void ows(cursor_t *c) {
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t')) c->p++;
}

static size_t token(cursor_t *c, const char **start) {
    *start = c->p;
    while (c->p < c->end && tchar((unsigned char)*c->p)) c->p++;
    return (size_t)(c->p - *start);
}

/* A parameter's value, token or quoted-string, unquoted into v (cap bytes); its length, or
 * cap when it did not fit or was not a token once unquoted (a bad value, still parsed past).
 * -1: malformed. */
static long value(cursor_t *c, char *v, size_t cap) {
    size_t n = 0;
    bool bad = false;
    if (c->p < c->end && *c->p == '"') {
        c->p++;
        for (;;) {
            if (c->p == c->end) return -1;
            unsigned char ch = (unsigned char)*c->p++;
            if (ch == '"') break;
            if (ch == '\\') {
                if (c->p == c->end) return -1;
                ch = (unsigned char)*c->p++;
            }
            if (ch < 0x20 && ch != '\t') return -1;
            if (ch == 0x7f) return -1;
            if (!tchar(ch) || n == cap) bad = true;
            else v[n++] = (char)ch;
        }
        if (n == 0) bad = true;
    } else {
        const char *s;
        n = token(c, &s);
        if (n == 0) return -1;
        if (n >= cap) bad = true;
        else memcpy(v, s, n);
    }
    return bad ? (long)cap : (long)n;
}

/* "8".."15" exactly (no sign, no leading zero), else 0. */
static unsigned window_bits(const char *v, long n) {
    if (n == 1 && v[0] >= '8' && v[0] <= '9') return (unsigned)(v[0] - '0');
    if (n == 2 && v[0] == '1' && v[1] >= '0' && v[1] <= '5') return 10u + (unsigned)(v[1] - '0');
    return 0;
}

static bool is(const char *s, size_t n, const char *lit) {
    return n == strlen(lit) && memcmp(s, lit, n) == 0;
}

bool ws_deflate_negotiate(const char *hdr, size_t len, char out[WS_DEFLATE_RESPONSE_MAX]) {
    cursor_t c = {hdr, hdr + len};
    bool accepted = false;
    for (;;) {
        ows(&c);
        if (c.p == c.end) break;
        if (*c.p == ',') { /* an empty list element, which HTTP allows */
            c.p++;
            continue;
        }
        const char *name;
        size_t nlen = token(&c, &name);
        if (!nlen) return false;
        bool ours = is(name, nlen, "permessage-deflate"), ok = ours;
        bool snct = false, cnct = false;
        unsigned smwb = 0, cmwb = 0; /* 0: not offered */
        bool cmwb_seen = false;
        for (;;) {
            ows(&c);
            if (c.p == c.end || *c.p != ';') break;
            c.p++;
            ows(&c);
            const char *pn;
            size_t plen = token(&c, &pn);
            if (!plen) return false;
            ows(&c);
            char v[8];
            long vlen = -2; /* no value */
            if (c.p < c.end && *c.p == '=') {
                c.p++;
                ows(&c);
                vlen = value(&c, v, sizeof v);
                if (vlen == -1) return false;
            }
            if (!ours) continue; /* another extension's parameters are its own */
            if (is(pn, plen, "server_no_context_takeover")) {
                ok = ok && !snct && vlen == -2;
                snct = true;
            } else if (is(pn, plen, "client_no_context_takeover")) {
                ok = ok && !cnct && vlen == -2;
                cnct = true;
            } else if (is(pn, plen, "server_max_window_bits")) {
                unsigned b = vlen >= 0 ? window_bits(v, vlen) : 0;
                ok = ok && !smwb && b;
                smwb = b ? b : 1;
            } else if (is(pn, plen, "client_max_window_bits")) {
                unsigned b = vlen >= 0 ? window_bits(v, vlen) : 0;
                ok = ok && !cmwb_seen && (vlen == -2 || b);
                cmwb_seen = true;
                cmwb = vlen == -2 ? 15 : b;
            } else {
                ok = false; /* a parameter we do not know: RFC 7692 says decline */
            }
        }
        if (c.p < c.end && *c.p != ',') return false;
        /* A client limiting our window below what we compress with cannot be served by the
         * shared compressor: it gets plain frames (unless a later offer fits). */
        if (ok && smwb && smwb < WS_DEFLATE_WINDOW_BITS) ok = false;
        if (ok && !accepted) {
            accepted = true;
            int n = snprintf(out, WS_DEFLATE_RESPONSE_MAX,
                             "permessage-deflate; server_no_context_takeover; "
                             "client_no_context_takeover; server_max_window_bits=%d",
                             WS_DEFLATE_WINDOW_BITS);
            if (cmwb_seen)
                snprintf(out + n, WS_DEFLATE_RESPONSE_MAX - (size_t)n,
                         "; client_max_window_bits=%u",
                         cmwb < WS_DEFLATE_WINDOW_BITS ? cmwb : WS_DEFLATE_WINDOW_BITS);
        }
    }
    return accepted;
}

/* ---- zlib ---------------------------------------------------------------------------------- */

struct ws_zip {
    z_stream def, inf;
    uint8_t *out; /* inflated messages, up to max + 1 bytes */
    size_t out_cap;
};

/* Level 1: on chat events (bench/zip_bench) it compresses within 1-3% of the default level
 * 6 up to 1 KB of text, in up to a third less time on larger ones; at these sizes most of
 * the cost is per call, not per byte. */
#define ZIP_LEVEL 1

ws_zip_t *ws_zip_new(void) {
    ws_zip_t *z = calloc(1, sizeof *z);
    if (!z) return NULL;
    if (deflateInit2(&z->def, ZIP_LEVEL, Z_DEFLATED, -WS_DEFLATE_WINDOW_BITS, 8,
                     Z_DEFAULT_STRATEGY) != Z_OK) {
        free(z);
        return NULL;
    }
    /* any window a client may use: 15 bits covers all */
    if (inflateInit2(&z->inf, -15) != Z_OK) {
        deflateEnd(&z->def);
        free(z);
        return NULL;
    }
    return z;
}

void ws_zip_free(ws_zip_t *z) {
    if (!z) return;
    deflateEnd(&z->def);
    inflateEnd(&z->inf);
    free(z->out);
    free(z);
}

buf_t *ws_zip_frame(ws_zip_t *z, const buf_t *plain) {
    if (!z || !plain || plain->len < 2) return NULL;
    int op = plain->data[0] & 0x0F;
    uint8_t len7 = plain->data[1] & 0x7F;
    size_t hl = len7 < 126 ? 2 : len7 == 126 ? 4 : 10;
    if (op >= 0x8 || (plain->data[0] & 0x70) || (plain->data[1] & 0x80) || plain->len < hl)
        return NULL;
    size_t n = plain->len - hl;
    if (n < WS_DEFLATE_MIN_BYTES || n > UINT32_MAX / 2) return NULL;
    if (deflateReset(&z->def) != Z_OK) return NULL;
    /* the sync flush adds an empty stored block (at most 6 bytes) to what the bound covers */
    size_t room = deflateBound(&z->def, (uLong)n) + 16;
    buf_t *b = buf_new(10 + room);
    if (!b) return NULL;
    z->def.next_in = (Bytef *)(plain->data + hl);
    z->def.avail_in = (uInt)n;
    z->def.next_out = b->data + 10;
    z->def.avail_out = (uInt)room;
    int rc = deflate(&z->def, Z_SYNC_FLUSH);
    size_t made = room - z->def.avail_out;
    static const uint8_t tail[4] = {0, 0, 0xff, 0xff};
    if (rc != Z_OK || z->def.avail_in || !z->def.avail_out || made < 4 ||
        memcmp(b->data + 10 + made - 4, tail, 4) != 0 || made - 4 >= n) {
        buf_unref(b);
        return NULL;
    }
    size_t clen = made - 4; /* RFC 7692 7.2.1: the tail is left out */
    uint8_t hdr[14];
    size_t nh = ws_frame_header(hdr, op, true, clen, NULL);
    hdr[0] |= 0x40; /* RSV1: compressed */
    memmove(b->data + nh, b->data + 10, clen);
    memcpy(b->data, hdr, nh);
    b->len = nh + clen;
    return b;
}

/* Room for at least want bytes of output (want <= limit). */
static int out_grow(ws_zip_t *z, size_t want, size_t limit) {
    if (want <= z->out_cap) return 0;
    size_t cap = z->out_cap ? z->out_cap * 2 : 4096;
    if (cap < want) cap = want;
    if (cap > limit) cap = limit;
    uint8_t *o = realloc(z->out, cap);
    if (!o) return CHAT_ENOMEM;
    z->out = o;
    z->out_cap = cap;
    return 0;
}

int ws_zip_inflate(ws_zip_t *z, const uint8_t *in, size_t n, size_t max, uint8_t **out,
                   size_t *out_len) {
    static const uint8_t tail[4] = {0, 0, 0xff, 0xff};
    if (max == SIZE_MAX) max--;
    size_t limit = max + 1; /* one byte past max tells "too big" */
    if (inflateReset(&z->inf) != Z_OK) return CHAT_ENOMEM;
    z_stream *s = &z->inf;
    bool tail_fed = false;
    size_t got = 0;
    s->next_in = (Bytef *)in;
    /* a message is at most max_message (plus slack) bytes: it fits in uInt, but feed it in
     * pieces anyway so that the type's width is never a question */
    size_t in_left = n;
    s->avail_in = 0;
    for (;;) {
        if (!s->avail_in && in_left) {
            s->avail_in = in_left > (1u << 30) ? (1u << 30) : (uInt)in_left;
            in_left -= s->avail_in;
        }
        if (!s->avail_in && !in_left && !tail_fed) {
            s->next_in = (Bytef *)tail;
            s->avail_in = 4;
            tail_fed = true;
        }
        if (got == z->out_cap) {
            if (got >= limit) return CHAT_ETOOBIG;
            if (out_grow(z, got + 1, limit)) return CHAT_ENOMEM;
        }
        size_t room = z->out_cap - got;
        if (room > (1u << 30)) room = 1u << 30;
        s->next_out = z->out + got;
        s->avail_out = (uInt)room;
        int rc = inflate(s, Z_SYNC_FLUSH);
        got += room - s->avail_out;
        if (got > max) return CHAT_ETOOBIG;
        if (rc == Z_STREAM_END) {
            /* a final block: only the implied tail may follow it */
            if (in_left || (!tail_fed && s->avail_in)) return CHAT_EINVAL;
            break;
        }
        if (rc == Z_MEM_ERROR) return CHAT_ENOMEM;
        if (rc != Z_OK && rc != Z_BUF_ERROR) return CHAT_EINVAL;
        if (s->avail_out) {
            /* output to spare: every input byte was taken */
            if (s->avail_in || in_left) {
                if (rc == Z_BUF_ERROR) return CHAT_EINVAL;
                continue;
            }
            if (tail_fed) break;
        }
    }
    *out = z->out;
    *out_len = got;
    return 0;
}
