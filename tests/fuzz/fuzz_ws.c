/* fuzz_ws: libFuzzer driver for the WebSocket frame parser, the UTF-8 validator and the
 * encoders.
 *
 * The one idea: the parser must not care how the stream is cut. The first input byte picks a
 * mode (server or client side, how to chunk, whether a callback stops the parse); the rest
 * is fed once whole and once in chunks derived from the input, and both runs must produce
 * the same callbacks (hashed) and the same result. Callbacks check what the header promises
 * (TEXT is valid UTF-8, close codes are valid, limits hold). The same bytes also drive the
 * incremental UTF-8 validator against the whole-string one and an arithmetic reference,
 * round-trip through the encoders, and reach the handshake key check.
 */
#include "ws/ws.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_MAX_MESSAGE 4096

#define ASSERT(c)                                                            \
    do {                                                                     \
        if (!(c)) {                                                          \
            fprintf(stderr, "fuzz_ws: %s:%d: %s\n", __FILE__, __LINE__, #c); \
            abort();                                                         \
        }                                                                    \
    } while (0)

typedef struct run {
    uint64_t hash;
    unsigned events;
    unsigned stop_at; /* stop on this event (1-based); 0 = never */
    bool free_on_stop;
    ws_parser_t *p;
    /* the expected single message of a round trip, or NULL */
    const uint8_t *want;
    size_t want_len;
} run_t;

static void mix(run_t *r, const void *p, size_t n) {
    const uint8_t *b = p;
    for (size_t i = 0; i < n; i++) r->hash = (r->hash ^ b[i]) * 1099511628211ull;
}

static int event(run_t *r) {
    if (++r->events == r->stop_at) {
        if (r->free_on_stop) ws_parser_free(r->p);
        return 1;
    }
    return 0;
}

static int on_message(void *ud, int op, uint8_t *d, size_t n) {
    run_t *r = ud;
    ASSERT(d != NULL);
    ASSERT(op == WS_OP_TEXT || op == WS_OP_BINARY);
    ASSERT(n <= FUZZ_MAX_MESSAGE);
    if (op == WS_OP_TEXT) ASSERT(utf8_valid(d, n));
    if (r->want) {
        ASSERT(n == r->want_len);
        ASSERT(n == 0 || memcmp(d, r->want, n) == 0);
    }
    uint8_t tag[2] = {'M', (uint8_t)op};
    mix(r, tag, 2);
    mix(r, &n, sizeof n);
    mix(r, d, n);
    return event(r);
}

static int on_control(void *ud, int op, uint16_t code, uint8_t *d, size_t n) {
    run_t *r = ud;
    ASSERT(d != NULL);
    ASSERT(n <= 125);
    if (op == WS_OP_CLOSE) {
        ASSERT(code == WS_CLOSE_NO_STATUS ? n == 0 : ws_close_code_valid(code));
        ASSERT(n <= 123);
        ASSERT(utf8_valid(d, n));
    } else {
        ASSERT(op == WS_OP_PING || op == WS_OP_PONG);
        ASSERT(code == 0);
    }
    uint8_t tag[4] = {'C', (uint8_t)op, (uint8_t)(code >> 8), (uint8_t)code};
    mix(r, tag, 4);
    mix(r, &n, sizeof n);
    mix(r, d, n);
    return event(r);
}

static const ws_parser_cb_t CB = {on_message, on_control};

typedef struct result {
    int rc;
    uint16_t code;
    const char *reason;
    uint64_t hash;
    unsigned events;
} result_t;

/* A tiny deterministic generator for chunk sizes. */
static uint32_t next_rand(uint32_t *s) {
    *s = *s * 1103515245u + 12345u;
    return *s >> 16;
}

/* Feed in[0..n) to a fresh parser. chunk_seed 0: in one call; else in chunks of 1..max_chunk
 * bytes drawn from the seed (max_chunk 1 = one byte at a time). */
static result_t feed(const uint8_t *in, size_t n, uint8_t mode, uint32_t chunk_seed,
                     size_t max_chunk) {
    run_t r = {.hash = 1469598103934665603ull};
    ws_parser_t *p = malloc(sizeof *p);
    ASSERT(p);
    ws_parser_init(p, &CB, &r);
    p->max_message = FUZZ_MAX_MESSAGE;
    if (mode & 0x80) {
        p->require_mask = false;
        p->expect_unmasked = true;
    }
    if (mode & 0x40) {
        r.stop_at = 1 + (mode & 3);
        r.free_on_stop = (mode & 4) != 0;
    }
    r.p = p;
    /* a private copy per run: the parser unmasks in place, and ASan sees any overread */
    uint8_t *copy = malloc(n ? n : 1);
    ASSERT(copy);
    if (n) memcpy(copy, in, n);
    int rc = 0;
    size_t at = 0;
    if (!chunk_seed) {
        rc = ws_parser_feed(p, copy, n);
    } else {
        while (at < n && rc == 0) {
            size_t c = 1 + next_rand(&chunk_seed) % max_chunk;
            if (c > n - at) c = n - at;
            rc = ws_parser_feed(p, copy + at, c);
            at += c;
        }
    }
    result_t res = {rc, p->error_code, p->error_reason, r.hash, r.events};
    if (rc != 0 && rc != CHAT_ECLOSED) {
        ASSERT(p->error_code == 1002 || p->error_code == 1007 || p->error_code == 1009);
        ASSERT(p->error_reason != NULL);
        /* sticky */
        ASSERT(ws_parser_feed(p, copy, n) == rc);
    }
    if (rc == CHAT_ECLOSED) ASSERT(r.events == r.stop_at);
    ws_parser_free(p);
    free(p);
    free(copy);
    return res;
}

static void same(result_t a, result_t b) {
    ASSERT(a.rc == b.rc);
    ASSERT(a.events == b.events);
    ASSERT(a.hash == b.hash);
    if (a.rc != 0 && a.rc != CHAT_ECLOSED) {
        ASSERT(a.code == b.code);
        ASSERT(a.reason == b.reason);
    }
}

/* Arithmetic reference for UTF-8, independent of the DFA. */
static bool ref_utf8(const uint8_t *s, size_t n) {
    for (size_t i = 0; i < n;) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t k = c >= 0xC2 && c <= 0xDF   ? 1
                   : c >= 0xE0 && c <= 0xEF ? 2
                   : c >= 0xF0 && c <= 0xF4 ? 3
                                            : 0;
        if (!k) return false;
        uint32_t cp = c & (0x3F >> k);
        for (size_t j = 1; j <= k; j++) {
            if (i + j >= n || (s[i + j] & 0xC0) != 0x80) return false;
            cp = cp << 6 | (s[i + j] & 0x3F);
        }
        if ((k == 2 && cp < 0x800) || (k == 3 && (cp < 0x10000 || cp > 0x10FFFF))) return false;
        if (cp >= 0xD800 && cp <= 0xDFFF) return false;
        i += k + 1;
    }
    return true;
}

static void check_utf8(const uint8_t *s, size_t n, uint8_t seed) {
    bool whole = utf8_valid(s, n);
    ASSERT(whole == ref_utf8(s, n));
    uint32_t rs = seed | 1u;
    uint32_t st = UTF8_ACCEPT;
    bool rejected_early = false;
    for (size_t at = 0; at < n;) {
        size_t c = 1 + next_rand(&rs) % 17;
        if (c > n - at) c = n - at;
        st = utf8_feed(st, s + at, c);
        at += c;
        /* once rejected, nothing after can make it valid */
        if (st == UTF8_REJECT) rejected_early = true;
    }
    ASSERT((st == UTF8_ACCEPT) == whole);
    if (rejected_early) ASSERT(!whole && st == UTF8_REJECT);
}

/* Encoder round trips: a server frame and a masked client frame of (part of) the input. */
static void check_encoders(const uint8_t *s, size_t n, uint8_t mode) {
    size_t len = n < FUZZ_MAX_MESSAGE ? n : FUZZ_MAX_MESSAGE;
    int op = (mode & 1) && utf8_valid(s, len) ? WS_OP_TEXT : WS_OP_BINARY;

    buf_t *b = ws_frame_new(op, s, len);
    ASSERT(b);
    run_t r = {.want = s, .want_len = len};
    ws_parser_t p;
    ws_parser_init(&p, &CB, &r);
    p.max_message = FUZZ_MAX_MESSAGE;
    p.require_mask = false;
    p.expect_unmasked = true;
    ASSERT(ws_parser_feed(&p, b->data, b->len) == 0);
    ASSERT(r.events == 1);
    ws_parser_free(&p);
    buf_unref(b);

    uint8_t *f = malloc(len + 14);
    ASSERT(f);
    uint8_t mask[4] = {mode, (uint8_t)(n), (uint8_t)(n >> 8), 0x5a};
    size_t h = ws_frame_header(f, op, true, len, mask);
    if (len) memcpy(f + h, s, len);
    /* mask in two pieces, as a client writing a split payload would */
    size_t half = len / 3;
    ws_mask(f + h, half, mask, 0);
    ws_mask(f + h + half, len - half, mask, half);
    memset(&r, 0, sizeof r);
    r.want = s;
    r.want_len = len;
    ws_parser_init(&p, &CB, &r);
    p.max_message = FUZZ_MAX_MESSAGE;
    ASSERT(ws_parser_feed(&p, f, h + len) == 0);
    ASSERT(r.events == 1);
    ws_parser_free(&p);
    free(f);

    /* a close frame with the input as its reason */
    char reason[200];
    size_t rl = n < sizeof reason - 1 ? n : sizeof reason - 1;
    memcpy(reason, s, rl);
    reason[rl] = 0;
    uint16_t code =
        ws_close_code_valid((uint16_t)(1000 + mode % 16)) ? (uint16_t)(1000 + mode % 16) : 1000;
    b = ws_close_frame_new(code, reason);
    ASSERT(b);
    ASSERT(b->len <= 127);
    memset(&r, 0, sizeof r);
    ws_parser_init(&p, &CB, &r);
    p.require_mask = false;
    p.expect_unmasked = true;
    ASSERT(ws_parser_feed(&p, b->data, b->len) == 0);
    ASSERT(r.events == 1);
    ws_parser_free(&p);
    buf_unref(b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    uint8_t mode = data[0];
    const uint8_t *in = data + 1;
    size_t n = size - 1;

    result_t whole = feed(in, n, mode, 0, 0);
    /* chunks of 1..K bytes, K from the mode byte */
    result_t chunked = feed(in, n, mode, 0x9e3779b9u ^ mode, 1 + (mode >> 3 & 7) * 5);
    same(whole, chunked);
    if (n <= 2048) same(whole, feed(in, n, mode, 1, 1));

    check_utf8(in, n, mode);
    check_encoders(in, n, mode);

    /* the handshake key check, on a key-sized slice of the input */
    char accept[29];
    size_t kl = n < 24 + (mode & 3) ? n : 24 + (mode & 3);
    if (ws_accept_key((const char *)in, kl, accept) == 0) {
        ASSERT(kl == 24 && in[22] == '=' && in[23] == '=');
        ASSERT(strlen(accept) == 28);
    }
    return 0;
}
