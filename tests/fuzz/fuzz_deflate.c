/* fuzz_deflate: libFuzzer driver for permessage-deflate: the Sec-WebSocket-Extensions
 * negotiation, the bounded inflater, and the frame parser with the extension on.
 *
 * The one idea: untrusted bytes reach three places, and each has a property to hold beyond
 * "no crash". The negotiation's answer, offered back, gets the same answer. The inflater
 * never returns more than its bound, and what it returns survives a round trip through the
 * compressor. The parser with deflate on gives the same callbacks however the stream is cut,
 * and every message it delivers is within max_message and, as text, valid UTF-8. The first
 * input byte picks the bound and the cutting.
 */
#include "ws/ws.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ASSERT(c)                                                                 \
    do {                                                                          \
        if (!(c)) {                                                               \
            fprintf(stderr, "fuzz_deflate: %s:%d: %s\n", __FILE__, __LINE__, #c); \
            abort();                                                              \
        }                                                                         \
    } while (0)

static ws_zip_t *zip; /* one per process, as a server has one per loop */

static void check_negotiate(const uint8_t *in, size_t n) {
    char out[WS_DEFLATE_RESPONSE_MAX];
    if (!ws_deflate_negotiate((const char *)in, n, out)) return;
    size_t len = strnlen(out, sizeof out);
    ASSERT(len < sizeof out);
    static const char head[] = "permessage-deflate; server_no_context_takeover; "
                               "client_no_context_takeover; server_max_window_bits=";
    ASSERT(strncmp(out, head, sizeof head - 1) == 0);
    char again[WS_DEFLATE_RESPONSE_MAX];
    ASSERT(ws_deflate_negotiate(out, len, again));
    ASSERT(strcmp(out, again) == 0);
}

static void check_inflate(const uint8_t *in, size_t n, size_t max) {
    uint8_t *out;
    size_t out_len;
    int rc = ws_zip_inflate(zip, in, n, max, &out, &out_len);
    ASSERT(rc == 0 || rc == CHAT_ETOOBIG || rc == CHAT_EINVAL || rc == CHAT_ENOMEM);
    if (rc) return;
    ASSERT(out_len <= max);
    if (!out_len) return;
    /* round trip: the compressor's frame inflates back to the same bytes */
    buf_t *plain = ws_frame_new(WS_OP_BINARY, out, out_len);
    ASSERT(plain);
    uint8_t *copy = malloc(out_len);
    ASSERT(copy);
    memcpy(copy, out, out_len);
    buf_t *z = ws_zip_frame(zip, plain);
    if (z) {
        ASSERT(z->data[0] == (0x80 | 0x40 | WS_OP_BINARY));
        ASSERT(z->len < plain->len);
        size_t l7 = z->data[1] & 0x7F, hl = l7 < 126 ? 2 : l7 == 126 ? 4 : 10;
        ASSERT(ws_zip_inflate(zip, z->data + hl, z->len - hl, out_len, &out, &out_len) == 0);
        ASSERT(memcmp(out, copy, out_len) == 0);
        buf_unref(z);
    }
    free(copy);
    buf_unref(plain);
}

typedef struct run {
    uint64_t hash;
    size_t max;
} run_t;

static void mix(run_t *r, const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) r->hash = (r->hash ^ b[i]) * 1099511628211ull;
}

static int on_message(void *ud, int op, uint8_t *d, size_t n) {
    run_t *r = ud;
    ASSERT(d != NULL);
    ASSERT(n <= r->max);
    if (op == WS_OP_TEXT) ASSERT(utf8_valid(d, n));
    mix(r, &op, sizeof op);
    mix(r, &n, sizeof n);
    mix(r, d, n);
    return 0;
}

static int on_control(void *ud, int op, uint16_t code, uint8_t *d, size_t n) {
    run_t *r = ud;
    mix(r, &op, sizeof op);
    mix(r, &code, sizeof code);
    mix(r, d, n);
    return 0;
}

static const ws_parser_cb_t CB = {on_message, on_control};

/* Feed in[0..n) as client frames; chunk 0: whole. Returns the result and the hash. */
static int feed(const uint8_t *in, size_t n, size_t max, size_t chunk, uint64_t *hash,
                uint16_t *code) {
    run_t r = {.hash = 1469598103934665603ull, .max = max};
    ws_parser_t p;
    ws_parser_init(&p, &CB, &r);
    p.max_message = max;
    p.require_mask = false; /* masked or not: more of the input reaches the payload paths */
    p.zip = zip;
    uint8_t *copy = malloc(n ? n : 1);
    ASSERT(copy);
    if (n) memcpy(copy, in, n);
    int rc = 0;
    for (size_t at = 0; at < n && rc == 0;) {
        size_t c = chunk ? chunk : n;
        if (c > n - at) c = n - at;
        rc = ws_parser_feed(&p, copy + at, c);
        at += c;
    }
    if (rc) {
        ASSERT(p.error_code == 1002 || p.error_code == 1007 || p.error_code == 1009 ||
               p.error_code == 1011);
    }
    *hash = r.hash;
    *code = p.error_code;
    ws_parser_free(&p);
    free(copy);
    return rc;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!zip) zip = ws_zip_new();
    ASSERT(zip);
    if (size < 1) return 0;
    uint8_t mode = data[0];
    const uint8_t *in = data + 1;
    size_t n = size - 1;
    size_t max = (size_t)64 << (mode & 7); /* 64 B .. 8 KiB */

    check_negotiate(in, n);
    check_inflate(in, n, max);

    uint64_t h1, h2;
    uint16_t c1, c2;
    int r1 = feed(in, n, max, 0, &h1, &c1);
    int r2 = feed(in, n, max, 1 + (mode >> 3), &h2, &c2);
    ASSERT(r1 == r2);
    ASSERT(h1 == h2);
    if (r1) ASSERT(c1 == c2);
    return 0;
}
