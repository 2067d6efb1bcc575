/* ws/frame: building frames (headers, masking, whole server frames, close frames).
 *
 * One idea: a broadcast frame is encoded once, header and payload in a single buf_t, so
 * every recipient's queue can hold a reference to the same bytes and writev them as is.
 * Masking is the one per-byte loop here and in the parser's payload path: it works a word at
 * a time, with memcpy for the loads so any alignment is fine.
 */
#include "ws.h"

#include <string.h>

size_t ws_frame_header(uint8_t *out, int opcode, bool fin, uint64_t len, const uint8_t *mask) {
    size_t n;
    uint8_t mbit = mask ? 0x80 : 0;
    out[0] = (uint8_t)((fin ? 0x80 : 0) | (opcode & 0x0F));
    if (len < 126) {
        out[1] = (uint8_t)(mbit | len);
        n = 2;
    } else if (len <= 0xFFFF) {
        out[1] = mbit | 126;
        out[2] = (uint8_t)(len >> 8);
        out[3] = (uint8_t)len;
        n = 4;
    } else {
        out[1] = mbit | 127;
        for (int i = 0; i < 8; i++) out[2 + i] = (uint8_t)(len >> (56 - 8 * i));
        n = 10;
    }
    if (mask) {
        memcpy(out + n, mask, 4);
        n += 4;
    }
    return n;
}

void ws_mask(uint8_t *p, size_t n, const uint8_t mask[4], uint64_t offset) {
    /* m[k] is the mask byte for payload position offset + k; it repeats every 4 bytes, so
     * the same 8 bytes serve every aligned-to-start word below. */
    uint8_t m[8];
    for (unsigned k = 0; k < 8; k++) m[k] = mask[(offset + k) & 3];
    uint64_t w;
    memcpy(&w, m, 8);
    size_t i = 0;
    for (; n - i >= 32; i += 32) {
        uint64_t a, b, c, d;
        memcpy(&a, p + i, 8);
        memcpy(&b, p + i + 8, 8);
        memcpy(&c, p + i + 16, 8);
        memcpy(&d, p + i + 24, 8);
        a ^= w;
        b ^= w;
        c ^= w;
        d ^= w;
        memcpy(p + i, &a, 8);
        memcpy(p + i + 8, &b, 8);
        memcpy(p + i + 16, &c, 8);
        memcpy(p + i + 24, &d, 8);
    }
    for (; n - i >= 8; i += 8) {
        uint64_t a;
        memcpy(&a, p + i, 8);
        a ^= w;
        memcpy(p + i, &a, 8);
    }
    for (; i < n; i++) p[i] ^= m[i & 3];
}

buf_t *ws_frame_new(int opcode, const void *payload, size_t len) {
    uint8_t hdr[14];
    size_t hl = ws_frame_header(hdr, opcode, true, len, NULL);
    if (len > SIZE_MAX - hl) return NULL;
    buf_t *b = buf_new(hl + len);
    if (!b) return NULL;
    memcpy(b->data, hdr, hl);
    if (len) memcpy(b->data + hl, payload, len);
    b->len = hl + len;
    return b;
}

buf_t *ws_close_frame_new(uint16_t code, const char *reason) {
    uint8_t body[125];
    size_t n = 0;
    if (code) {
        body[0] = (uint8_t)(code >> 8);
        body[1] = (uint8_t)code;
        n = 2;
        /* Keep the longest valid UTF-8 prefix that fits: a peer fails the connection on an
         * invalid close reason (1007), and a cut inside a character would be one. */
        size_t ok = 0;
        uint32_t st = UTF8_ACCEPT;
        for (size_t i = 0; reason && reason[i] && i < sizeof body - 2; i++) {
            st = utf8_feed(st, (const uint8_t *)reason + i, 1);
            if (st == UTF8_REJECT) break;
            if (st == UTF8_ACCEPT) ok = i + 1;
        }
        if (ok) memcpy(body + 2, reason, ok);
        n += ok;
    }
    return ws_frame_new(WS_OP_CLOSE, body, n);
}

bool ws_close_code_valid(uint16_t code) {
    return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
           (code >= 3000 && code <= 4999);
}
