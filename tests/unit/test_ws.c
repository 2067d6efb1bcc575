/* Unit tests for src/ws: handshake key, frame parser and encoder (the UTF-8 validator is
 * core's: test_core.c).
 *
 * The one idea: every parser case is run through expect(), which feeds the same bytes whole,
 * one byte at a time, at every single split point and in a few odd chunkings, and requires
 * the same callbacks (recorded as a log with a hash of each payload) and the same final
 * error in every case. A parser that only works when reads line up with frames fails here.
 */
#include "ws/ws.h"

#include "test.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>

/* ---- helpers ------------------------------------------------------------------------------ */

static const uint8_t MASK[4] = {0x37, 0xfa, 0x21, 0x3d}; /* the RFC 6455 section 5.7 mask */

static uint64_t fnv(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* One event as text; payloads are summarised by length and hash. */
static size_t ev_fmt(char *out, size_t cap, char kind, int op, unsigned code, const uint8_t *d,
                     size_t n) {
    int k = snprintf(out, cap, "%c%d/%u/%zu/%016llx;", kind, op, code, n,
                     (unsigned long long)fnv(d, n));
    return k < 0 ? 0 : (size_t)k;
}

/* Expected-log builder. */
typedef struct {
    char s[4096];
    size_t n;
} elog_t;

static void e_msg(elog_t *e, int op, const void *d, size_t n) {
    e->n += ev_fmt(e->s + e->n, sizeof e->s - e->n, 'M', op, 0, d, n);
}
static void e_ctl(elog_t *e, int op, unsigned code, const void *d, size_t n) {
    e->n += ev_fmt(e->s + e->n, sizeof e->s - e->n, 'C', op, code, d, n);
}

typedef struct rec {
    char log[4096];
    size_t n;
    const uint8_t *in; /* the buffer of the current feed */
    size_t in_len;
    int in_place; /* deliveries whose data pointed into the input */
    int events;
    int stop_at;       /* return non-zero from the stop_at-th event (1-based); 0 = never */
    bool free_on_stop; /* call ws_parser_free from the stopping callback */
    bool null_data;    /* a callback got a NULL data pointer */
    ws_parser_t *p;
} rec_t;

static int rec_event(rec_t *r, char kind, int op, unsigned code, uint8_t *d, size_t n) {
    if (!d) r->null_data = true;
    if (d && r->in && d >= r->in && d + n <= r->in + r->in_len && n > 0) r->in_place++;
    const uint8_t *dd = d ? d : (const uint8_t *)"";
    r->n += ev_fmt(r->log + r->n, sizeof r->log - r->n, kind, op, code, dd, n);
    if (++r->events == r->stop_at) {
        if (r->free_on_stop) ws_parser_free(r->p);
        return 1;
    }
    return 0;
}

static int on_msg(void *ud, int op, uint8_t *d, size_t n) {
    return rec_event(ud, 'M', op, 0, d, n);
}
static int on_ctl(void *ud, int op, uint16_t code, uint8_t *d, size_t n) {
    return rec_event(ud, 'C', op, code, d, n);
}
static const ws_parser_cb_t CB = {on_msg, on_ctl};

typedef struct cfg {
    bool client;   /* expect_unmasked, require_mask false */
    size_t max;    /* 0: the default */
    ws_zip_t *zip; /* permessage-deflate negotiated, with this inflater */
} cfg_t;

/* Feed in[0..n) cut at cuts[0..nc) (increasing). Returns the first non-zero feed result;
 * *code gets p->error_code. The parser is freed. */
static int run(const uint8_t *in, size_t n, const size_t *cuts, size_t nc, cfg_t c, rec_t *r,
               uint16_t *code, const char **reason) {
    ws_parser_t p;
    ws_parser_init(&p, &CB, r);
    if (c.client) {
        p.require_mask = false;
        p.expect_unmasked = true;
    }
    if (c.max) p.max_message = c.max;
    p.zip = c.zip;
    r->p = &p;
    uint8_t *copy = malloc(n ? n : 1);
    memcpy(copy, in, n);
    int rc = 0;
    size_t at = 0;
    for (size_t k = 0; k <= nc && rc == 0; k++) {
        size_t end = k < nc ? cuts[k] : n;
        r->in = copy + at;
        r->in_len = end - at;
        rc = ws_parser_feed(&p, copy + at, end - at);
        at = end;
    }
    *code = p.error_code;
    if (reason) *reason = p.error_reason;
    ws_parser_free(&p);
    free(copy);
    return rc;
}

/* want_reason: the error_reason every run must report (NULL: not checked). */
static const char *want_reason_;

static bool same_run(const char *what, const uint8_t *in, size_t n, const size_t *cuts, size_t nc,
                     cfg_t c, const char *want_log, int want_rc, uint16_t want_code) {
    rec_t r = {0};
    uint16_t code = 0;
    const char *reason = NULL;
    int rc = run(in, n, cuts, nc, c, &r, &code, &reason);
    bool ok = rc == want_rc && strcmp(r.log, want_log) == 0 && !r.null_data &&
              (want_rc == 0 || want_rc == CHAT_ECLOSED || code == want_code) &&
              (!want_reason_ || reason == want_reason_);
    if (!ok) {
        fprintf(stderr, "  %s (cuts:", what);
        for (size_t k = 0; k < nc; k++) fprintf(stderr, " %zu", cuts[k]);
        fprintf(stderr, ")\n    rc %d want %d, code %u want %u (%s / %s)\n", rc, want_rc, code,
                want_code, reason ? reason : "-", want_reason_ ? want_reason_ : "-");
        fprintf(stderr, "    log  %s\n    want %s\n", r.log, want_log);
    }
    return ok;
}

/* The core property: whole, byte by byte, every split point, odd chunk sizes: same result. */
static void expect(const uint8_t *in, size_t n, cfg_t c, const char *want_log, int want_rc,
                   uint16_t want_code) {
    /* the whole run fixes the reason string; every other cut must give the same one */
    want_reason_ = NULL;
    rec_t r0 = {0};
    uint16_t code0;
    run(in, n, NULL, 0, c, &r0, &code0, &want_reason_);
    if (want_rc != CHAT_EPROTO && want_rc != CHAT_EUTF8 && want_rc != CHAT_ETOOBIG)
        want_reason_ = NULL;
    CHECK(same_run("whole", in, n, NULL, 0, c, want_log, want_rc, want_code));
    size_t *cuts = calloc(n + 1, sizeof *cuts);
    for (size_t k = 1; k < n; k++) cuts[k - 1] = k;
    bool ok = same_run("bytewise", in, n, cuts, n ? n - 1 : 0, c, want_log, want_rc, want_code);
    for (size_t k = 1; ok && k < n; k++)
        ok = same_run("split", in, n, &k, 1, c, want_log, want_rc, want_code);
    static const size_t steps[] = {2, 3, 5, 7, 13};
    for (size_t s = 0; ok && s < sizeof steps / sizeof *steps; s++) {
        size_t nc = 0;
        for (size_t k = steps[s]; k < n; k += steps[s]) cuts[nc++] = k;
        ok = same_run("chunks", in, n, cuts, nc, c, want_log, want_rc, want_code);
    }
    free(cuts);
    want_reason_ = NULL;
    CHECK(ok);
}
#define EXPECT(...)                                          \
    do {                                                     \
        expect(__VA_ARGS__);                                 \
        if (test_cur_failed_) {                              \
            fprintf(stderr, "  (from line %d)\n", __LINE__); \
            return;                                          \
        }                                                    \
    } while (0)

static const cfg_t SERVER = {false, 0, NULL};
static const cfg_t CLIENT = {true, 0, NULL};

/* A client (masked) frame into out; returns its length. */
static size_t cframe(uint8_t *out, int op, bool fin, const void *d, size_t n) {
    size_t h = ws_frame_header(out, op, fin, n, MASK);
    if (n) memcpy(out + h, d, n);
    ws_mask(out + h, n, MASK, 0);
    return h + n;
}
/* A server (unmasked) frame. */
static size_t sframe(uint8_t *out, int op, bool fin, const void *d, size_t n) {
    size_t h = ws_frame_header(out, op, fin, n, NULL);
    if (n) memcpy(out + h, d, n);
    return h + n;
}

#define U8(s) ((const uint8_t *)(s))

/* ---- handshake ---------------------------------------------------------------------------- */

static void test_accept_key(void) {
    char out[29];
    memset(out, 'x', sizeof out);
    const char *k = "dGhlIHNhbXBsZSBub25jZQ==";
    CHECK_INT(ws_accept_key(k, strlen(k), out), 0);
    CHECK_STR(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    /* vectors computed with Python's hashlib/base64 */
    CHECK_INT(ws_accept_key("AAECAwQFBgcICQoLDA0ODw==", 24, out), 0);
    CHECK_STR(out, "Bz3qJYTGdOe8gUSpLosEdiLKDrk=");
    CHECK_INT(ws_accept_key("/////////////////////w==", 24, out), 0);
    CHECK_STR(out, "XXpj4jYzLM2yUE0C7TIgMwTQh2g=");
    /* the length is taken from key_len, not from a NUL */
    CHECK_INT(ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==trailing", 24, out), 0);
    CHECK_STR(out, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
}

static void test_accept_key_invalid(void) {
    char out[29];
    static const char *bad[] = {
        "",
        "dGhlIHNhbXBsZSBub25jZQ=",   /* 23 chars */
        "dGhlIHNhbXBsZSBub25jZQ===", /* 25 chars */
        "dGhlIHNhbXBsZSBub25jZQAA",  /* 18 bytes, no padding */
        "dGhlIHNhbXBsZSBub25jZ===",  /* 15 bytes + padding */
        "dGhlIHNhbXBsZSBub25j*Q==",  /* bad alphabet */
        "dGhlIHNhbXBsZSBub25jZ-==",  /* base64url is not base64 */
        "dGhlIHNhbXBs=SBub25jZQ==",  /* padding inside */
        "dGhlIHNhbXBsZSBub25jZQ= ",
        " dGhlIHNhbXBsZSBub25jZQ==",
        "dGhlIHNhbXBsZSBub25jZ\x80==",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        CHECK_INT(ws_accept_key(bad[i], strlen(bad[i]), out), CHAT_EINVAL);
    }
    CHECK_INT(ws_accept_key(NULL, 24, out), CHAT_EINVAL);
    CHECK_INT(ws_accept_key("dGhlIHNhbXBsZSBub25jZQ==", 23, out), CHAT_EINVAL);
}

/* ---- encoder ------------------------------------------------------------------------------ */

static void test_frame_header(void) {
    uint8_t h[14];
    CHECK_INT(ws_frame_header(h, WS_OP_TEXT, true, 5, NULL), 2);
    CHECK_MEM(h, "\x81\x05", 2);
    CHECK_INT(ws_frame_header(h, WS_OP_TEXT, false, 0, NULL), 2);
    CHECK_MEM(h, "\x01\x00", 2);
    CHECK_INT(ws_frame_header(h, WS_OP_BINARY, true, 125, NULL), 2);
    CHECK_MEM(h, "\x82\x7d", 2);
    CHECK_INT(ws_frame_header(h, WS_OP_BINARY, true, 126, NULL), 4);
    CHECK_MEM(h, "\x82\x7e\x00\x7e", 4);
    CHECK_INT(ws_frame_header(h, WS_OP_BINARY, true, 256, NULL), 4);
    CHECK_MEM(h, "\x82\x7e\x01\x00", 4);
    CHECK_INT(ws_frame_header(h, WS_OP_BINARY, true, 65535, NULL), 4);
    CHECK_MEM(h, "\x82\x7e\xff\xff", 4);
    CHECK_INT(ws_frame_header(h, WS_OP_BINARY, true, 65536, NULL), 10);
    CHECK_MEM(h, "\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00", 10);
    CHECK_INT(ws_frame_header(h, WS_OP_CONT, true, 0x0102030405060708ull, NULL), 10);
    CHECK_MEM(h, "\x80\x7f\x01\x02\x03\x04\x05\x06\x07\x08", 10);
    CHECK_INT(ws_frame_header(h, WS_OP_PING, true, 5, MASK), 6);
    CHECK_MEM(h, "\x89\x85\x37\xfa\x21\x3d", 6);
    CHECK_INT(ws_frame_header(h, WS_OP_BINARY, true, 300, MASK), 8);
    CHECK_MEM(h, "\x82\xfe\x01\x2c\x37\xfa\x21\x3d", 8);
    CHECK_INT(ws_frame_header(h, WS_OP_BINARY, false, 70000, MASK), 14);
    CHECK_MEM(h, "\x02\xff\x00\x00\x00\x00\x00\x01\x11\x70\x37\xfa\x21\x3d", 14);
}

static void test_mask(void) {
    /* the RFC example */
    uint8_t hello[5] = {'H', 'e', 'l', 'l', 'o'};
    ws_mask(hello, 5, MASK, 0);
    CHECK_MEM(hello, "\x7f\x9f\x4d\x51\x58", 5);
    /* every length, offset and alignment against the per-byte definition */
    uint8_t buf[200], want[200];
    for (size_t align = 0; align < 8; align++) {
        for (size_t n = 0; n + align <= 150; n++) {
            for (uint64_t off = 0; off < 9; off++) {
                for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)(i * 7 + n);
                memcpy(want, buf, sizeof buf);
                for (size_t i = 0; i < n; i++) want[align + i] ^= MASK[(off + i) % 4];
                ws_mask(buf + align, n, MASK, off);
                CHECK_MEM(buf, want, sizeof buf);
            }
        }
    }
    /* a payload unmasked in three pieces equals one pass */
    uint8_t a[100], b[100];
    for (size_t i = 0; i < 100; i++) a[i] = b[i] = (uint8_t)i;
    ws_mask(a, 100, MASK, 0);
    ws_mask(b, 13, MASK, 0);
    ws_mask(b + 13, 50, MASK, 13);
    ws_mask(b + 63, 37, MASK, 63);
    CHECK_MEM(a, b, 100);
    /* a huge offset only matters modulo 4 */
    uint8_t c[3] = {0, 0, 0};
    ws_mask(c, 3, MASK, (1ull << 40) + 2);
    CHECK_MEM(c, "\x21\x3d\x37", 3);
}

static void test_frame_new(void) {
    buf_t *b = ws_frame_new(WS_OP_TEXT, "Hello", 5);
    CHECK(b);
    CHECK_INT(b->refs, 1);
    CHECK_INT(b->len, 7);
    CHECK_MEM(b->data, "\x81\x05\x48\x65\x6c\x6c\x6f", 7);
    buf_unref(b);

    b = ws_frame_new(WS_OP_BINARY, NULL, 0);
    CHECK(b);
    CHECK_INT(b->len, 2);
    CHECK_MEM(b->data, "\x82\x00", 2);
    buf_unref(b);

    uint8_t *big = malloc(65536);
    for (size_t i = 0; i < 65536; i++) big[i] = (uint8_t)(i * 31);
    b = ws_frame_new(WS_OP_BINARY, big, 256);
    CHECK(b);
    CHECK_INT(b->len, 260);
    CHECK_MEM(b->data, "\x82\x7e\x01\x00", 4);
    CHECK_MEM(b->data + 4, big, 256);
    buf_unref(b);
    b = ws_frame_new(WS_OP_BINARY, big, 65536);
    CHECK(b);
    CHECK_INT(b->len, 65546);
    CHECK_MEM(b->data, "\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00", 10);
    CHECK_MEM(b->data + 10, big, 65536);
    buf_unref(b);
    free(big);
}

/* Parse a server close frame back, in client mode. */
static void parse_close(buf_t *b, uint16_t *code, char *reason, size_t *rlen, int *rc) {
    rec_t r = {0};
    ws_parser_t p;
    ws_parser_init(&p, &CB, &r);
    p.require_mask = false;
    p.expect_unmasked = true;
    *rc = ws_parser_feed(&p, b->data, b->len);
    ws_parser_free(&p);
    *rlen = b->len - 2 - (b->len > 2 ? 2 : 0);
    *code = 0;
    if (b->len >= 4) *code = (uint16_t)(b->data[2] << 8 | b->data[3]);
    if (*rlen) memcpy(reason, b->data + 4, *rlen);
    reason[*rlen] = 0;
    if (r.events != 1) *rc = -100;
}

static void test_close_frame_new(void) {
    uint16_t code;
    char reason[200];
    size_t rl;
    int rc;
    buf_t *b = ws_close_frame_new(0, "ignored");
    CHECK(b);
    CHECK_INT(b->len, 2);
    CHECK_MEM(b->data, "\x88\x00", 2);
    buf_unref(b);

    b = ws_close_frame_new(1000, "bye");
    CHECK_INT(b->len, 7);
    CHECK_MEM(b->data,
              "\x88\x05\x03\xe8"
              "bye",
              7);
    buf_unref(b);

    b = ws_close_frame_new(1009, NULL);
    CHECK_INT(b->len, 4);
    CHECK_MEM(b->data, "\x88\x02\x03\xf1", 4);
    buf_unref(b);

    /* ASCII: cut at exactly 123 bytes of reason (125 of payload) */
    char longr[400];
    memset(longr, 'r', 300);
    longr[300] = 0;
    b = ws_close_frame_new(4000, longr);
    CHECK_INT(b->len, 127);
    CHECK_MEM(b->data, "\x88\x7d\x0f\xa0", 4);
    parse_close(b, &code, reason, &rl, &rc);
    CHECK_INT(rc, 0);
    CHECK_INT(code, 4000);
    CHECK_INT(rl, 123);
    buf_unref(b);

    /* multi-byte: never cut inside a character */
    struct {
        const char *ch;
        size_t clen;
    } t[] = {
        {"\xc3\xa9", 2},         /* é */
        {"\xe2\x82\xac", 3},     /* € */
        {"\xf0\x9f\x92\xac", 4}, /* 💬 */
    };
    for (size_t i = 0; i < 3; i++) {
        for (size_t lead = 0; lead < 4; lead++) {
            size_t n = 0;
            for (size_t k = 0; k < lead; k++) longr[n++] = 'a';
            while (n + t[i].clen < 300) {
                memcpy(longr + n, t[i].ch, t[i].clen);
                n += t[i].clen;
            }
            longr[n] = 0;
            b = ws_close_frame_new(1001, longr);
            CHECK(b);
            parse_close(b, &code, reason, &rl, &rc);
            CHECK_INT(rc, 0);
            CHECK_INT(code, 1001);
            size_t want = lead + (123 - lead) / t[i].clen * t[i].clen;
            CHECK_INT(rl, want);
            CHECK(utf8_valid(U8(reason), rl));
            CHECK_MEM(reason, longr, rl);
            CHECK_INT(b->data[1], 2 + want);
            buf_unref(b);
        }
    }

    /* an invalid reason is cut before the first bad byte */
    b = ws_close_frame_new(1011, "ab\xff"
                                 "cd");
    CHECK_INT(b->len, 6);
    CHECK_MEM(b->data,
              "\x88\x04\x03\xf3"
              "ab",
              6);
    buf_unref(b);
    b = ws_close_frame_new(1000, "ok\xe2\x82");
    CHECK_INT(b->len, 6);
    CHECK_MEM(b->data + 4, "ok", 2);
    buf_unref(b);
}

static void test_close_code_valid(void) {
    static const uint16_t ok[] = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010,
                                  1011, 1012, 1013, 1014, 3000, 3999, 4000, 4999};
    static const uint16_t bad[] = {0,    1,    999,  1004, 1005, 1006, 1015,
                                   1016, 1100, 2000, 2999, 5000, 6000, 65535};
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) CHECK(ws_close_code_valid(ok[i]));
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) CHECK(!ws_close_code_valid(bad[i]));
    unsigned n = 0;
    for (unsigned c = 0; c < 65536; c++) n += ws_close_code_valid((uint16_t)c);
    CHECK_INT(n, 4 + 8 + 2000);
}

/* ---- parser: RFC 6455 section 5.7 --------------------------------------------------------- */

static void test_rfc_examples(void) {
    elog_t e = {0};
    /* single-frame unmasked text, client side */
    static const uint8_t t1[] = {0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f};
    e_msg(&e, WS_OP_TEXT, "Hello", 5);
    EXPECT(t1, sizeof t1, CLIENT, e.s, 0, 0);
    /* the same on the server side: unmasked is refused */
    EXPECT(t1, sizeof t1, SERVER, "", CHAT_EPROTO, 1002);

    /* single-frame masked text, server side */
    static const uint8_t t2[] = {0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58};
    EXPECT(t2, sizeof t2, SERVER, e.s, 0, 0);
    /* and a masked frame on the client side is refused */
    EXPECT(t2, sizeof t2, CLIENT, "", CHAT_EPROTO, 1002);

    /* fragmented unmasked text */
    static const uint8_t t3[] = {0x01, 0x03, 0x48, 0x65, 0x6c, 0x80, 0x02, 0x6c, 0x6f};
    EXPECT(t3, sizeof t3, CLIENT, e.s, 0, 0);

    /* unmasked ping, masked pong (each on its proper side) */
    static const uint8_t t4[] = {0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f};
    elog_t e4 = {0};
    e_ctl(&e4, WS_OP_PING, 0, "Hello", 5);
    EXPECT(t4, sizeof t4, CLIENT, e4.s, 0, 0);
    static const uint8_t t5[] = {0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58};
    elog_t e5 = {0};
    e_ctl(&e5, WS_OP_PONG, 0, "Hello", 5);
    EXPECT(t5, sizeof t5, SERVER, e5.s, 0, 0);
}

static void test_rfc_binary_lengths(void) {
    uint8_t *f = malloc(65536 + 14);
    uint8_t *payload = malloc(65536);
    for (size_t i = 0; i < 65536; i++) payload[i] = (uint8_t)(i ^ (i >> 8));

    /* 256 bytes: 82 7E 01 00 */
    memcpy(f, "\x82\x7e\x01\x00", 4);
    memcpy(f + 4, payload, 256);
    elog_t e = {0};
    e_msg(&e, WS_OP_BINARY, payload, 256);
    EXPECT(f, 260, CLIENT, e.s, 0, 0);

    /* 64 KiB: 82 7F 00 00 00 00 00 01 00 00, exactly the default max_message. Split feeds
     * only at a few points: 64 KiB byte by byte per split point would be slow. */
    memcpy(f, "\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00", 10);
    memcpy(f + 10, payload, 65536);
    elog_t e2 = {0};
    e_msg(&e2, WS_OP_BINARY, payload, 65536);
    static const size_t cuts[][3] = {{1, 5, 9}, {10, 11, 65545}, {3, 30000, 60000}, {9, 10, 12}};
    CHECK(same_run("whole", f, 65546, NULL, 0, CLIENT, e2.s, 0, 0));
    for (size_t k = 0; k < 4; k++) CHECK(same_run("cut", f, 65546, cuts[k], 3, CLIENT, e2.s, 0, 0));

    /* one more byte is refused from the header alone */
    memcpy(f, "\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x01", 10);
    EXPECT(f, 10, CLIENT, "", CHAT_ETOOBIG, 1009);

    /* masked 64 KiB, server side */
    size_t n = cframe(f, WS_OP_BINARY, true, payload, 65536);
    CHECK_INT(n, 65536 + 14);
    CHECK(same_run("whole", f, n, NULL, 0, SERVER, e2.s, 0, 0));
    for (size_t k = 0; k < 4; k++) CHECK(same_run("cut", f, n, cuts[k], 3, SERVER, e2.s, 0, 0));
    free(f);
    free(payload);
}

/* ---- parser: errors ----------------------------------------------------------------------- */

static void test_err_mask_rules(void) {
    uint8_t f[32];
    size_t n = sframe(f, WS_OP_BINARY, true, "abc", 3);
    EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
    n = cframe(f, WS_OP_BINARY, true, "abc", 3);
    EXPECT(f, n, CLIENT, "", CHAT_EPROTO, 1002);
    /* neither rule set: both accepted */
    elog_t e = {0};
    e_msg(&e, WS_OP_BINARY, "abc", 3);
    ws_parser_t p;
    rec_t r = {0};
    for (int masked = 0; masked < 2; masked++) {
        memset(&r, 0, sizeof r);
        ws_parser_init(&p, &CB, &r);
        p.require_mask = false;
        n = masked ? cframe(f, WS_OP_BINARY, true, "abc", 3)
                   : sframe(f, WS_OP_BINARY, true, "abc", 3);
        CHECK_INT(ws_parser_feed(&p, f, n), 0);
        CHECK_STR(r.log, e.s);
        ws_parser_free(&p);
    }
    /* masked ping on the client side */
    n = cframe(f, WS_OP_PING, true, "", 0);
    EXPECT(f, n, CLIENT, "", CHAT_EPROTO, 1002);
}

static void test_err_rsv_and_opcodes(void) {
    uint8_t f[32];
    for (int rsv = 1; rsv < 8; rsv++) {
        size_t n = cframe(f, WS_OP_TEXT, true, "hi", 2);
        f[0] |= (uint8_t)(rsv << 4);
        EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
        n = cframe(f, WS_OP_PING, true, "hi", 2);
        f[0] |= (uint8_t)(rsv << 4);
        EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
    }
    static const int bad_ops[] = {3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF};
    for (size_t i = 0; i < sizeof bad_ops / sizeof *bad_ops; i++) {
        size_t n = cframe(f, bad_ops[i], true, "hi", 2);
        EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
        n = cframe(f, bad_ops[i], false, "", 0);
        EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
    }
    /* a bad first byte fails without waiting for the rest of the header */
    rec_t r = {0};
    ws_parser_t p;
    ws_parser_init(&p, &CB, &r);
    uint8_t b = 0xC1; /* FIN + RSV1 + TEXT */
    CHECK_INT(ws_parser_feed(&p, &b, 1), CHAT_EPROTO);
    CHECK_INT(p.error_code, 1002);
    CHECK(p.error_reason != NULL);
    ws_parser_free(&p);
}

static void test_err_control_frames(void) {
    uint8_t f[300];
    uint8_t big[126];
    memset(big, 'p', sizeof big);
    elog_t e = {0};
    /* 125 is the limit */
    size_t n = cframe(f, WS_OP_PING, true, big, 125);
    e_ctl(&e, WS_OP_PING, 0, big, 125);
    EXPECT(f, n, SERVER, e.s, 0, 0);
    n = cframe(f, WS_OP_PING, true, big, 126); /* 16-bit length form */
    EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
    EXPECT(f, 2, SERVER, "", CHAT_EPROTO, 1002); /* known at the second byte */
    /* 64-bit length form of a small payload is still over the control limit */
    memcpy(f, "\x89\xff\x00\x00\x00\x00\x00\x00\x00\x05", 10);
    EXPECT(f, 10, SERVER, "", CHAT_EPROTO, 1002);
    /* fragmented control frames */
    for (int op = WS_OP_CLOSE; op <= WS_OP_PONG; op++) {
        n = cframe(f, op, false, "", 0);
        EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
        EXPECT(f, 1, SERVER, "", CHAT_EPROTO, 1002);
    }
}

static void test_err_fragment_sequence(void) {
    uint8_t f[64];
    size_t n;
    /* continuation with nothing in progress, FIN or not */
    n = cframe(f, WS_OP_CONT, true, "x", 1);
    EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
    n = cframe(f, WS_OP_CONT, false, "x", 1);
    EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
    /* a continuation after a complete message */
    n = cframe(f, WS_OP_TEXT, true, "a", 1);
    n += cframe(f + n, WS_OP_CONT, true, "b", 1);
    elog_t e = {0};
    e_msg(&e, WS_OP_TEXT, "a", 1);
    EXPECT(f, n, SERVER, e.s, CHAT_EPROTO, 1002);
    /* a new TEXT or BINARY inside a fragmented message */
    for (int op1 = WS_OP_TEXT; op1 <= WS_OP_BINARY; op1++) {
        for (int op2 = WS_OP_TEXT; op2 <= WS_OP_BINARY; op2++) {
            for (int fin2 = 0; fin2 < 2; fin2++) {
                n = cframe(f, op1, false, "a", 1);
                n += cframe(f + n, op2, fin2, "b", 1);
                EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
            }
        }
    }
}

static void test_err_length(void) {
    /* 64-bit length with the top bit set */
    static const uint8_t f1[] = {0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 5, 1, 2, 3, 4};
    EXPECT(f1, sizeof f1, SERVER, "", CHAT_EPROTO, 1002);
    EXPECT(f1, 10, SERVER, "", CHAT_EPROTO, 1002); /* before the mask key arrives */
    static const uint8_t f2[] = {0x82, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    EXPECT(f2, sizeof f2, SERVER, "", CHAT_EPROTO, 1002);
    /* non-minimal encodings are accepted */
    uint8_t f[64];
    memcpy(f, "\x81\xfe\x00\x05", 4);
    memcpy(f + 4, MASK, 4);
    memcpy(f + 8, "\x7f\x9f\x4d\x51\x58", 5);
    elog_t e = {0};
    e_msg(&e, WS_OP_TEXT, "Hello", 5);
    EXPECT(f, 13, SERVER, e.s, 0, 0);
    memcpy(f, "\x81\xff\x00\x00\x00\x00\x00\x00\x00\x05", 10);
    memcpy(f + 10, MASK, 4);
    memcpy(f + 14, "\x7f\x9f\x4d\x51\x58", 5);
    EXPECT(f, 19, SERVER, e.s, 0, 0);
}

static void test_err_too_big(void) {
    uint8_t *f = malloc(4096);
    uint8_t pl[200];
    memset(pl, 'z', sizeof pl);
    cfg_t c = {false, 100, NULL};
    size_t n;
    elog_t e = {0};
    /* exactly max in one frame */
    n = cframe(f, WS_OP_BINARY, true, pl, 100);
    e_msg(&e, WS_OP_BINARY, pl, 100);
    EXPECT(f, n, c, e.s, 0, 0);
    /* max + 1: refused at the header, before any payload */
    n = cframe(f, WS_OP_BINARY, true, pl, 101);
    EXPECT(f, n, c, "", CHAT_ETOOBIG, 1009);
    EXPECT(f, 2, c, "", CHAT_ETOOBIG, 1009); /* 82 e5: the length byte alone decides */
    /* across fragments: 60 + 40 = max is fine, 60 + 41 is not */
    n = cframe(f, WS_OP_TEXT, false, pl, 60);
    n += cframe(f + n, WS_OP_CONT, false, pl, 0);
    n += cframe(f + n, WS_OP_CONT, true, pl, 40);
    elog_t e2 = {0};
    e_msg(&e2, WS_OP_TEXT, pl, 100);
    EXPECT(f, n, c, e2.s, 0, 0);
    n = cframe(f, WS_OP_TEXT, false, pl, 60);
    size_t h2 = n;
    n += cframe(f + n, WS_OP_CONT, true, pl, 41);
    EXPECT(f, n, c, "", CHAT_ETOOBIG, 1009);
    EXPECT(f, h2 + 2, c, "", CHAT_ETOOBIG, 1009);
    /* many small fragments summing past max */
    n = cframe(f, WS_OP_BINARY, false, pl, 30);
    for (int k = 0; k < 3; k++) n += cframe(f + n, WS_OP_CONT, false, pl, 30);
    EXPECT(f, n, c, "", CHAT_ETOOBIG, 1009);
    /* a control frame between fragments does not count */
    n = cframe(f, WS_OP_BINARY, false, pl, 90);
    n += cframe(f + n, WS_OP_PING, true, pl, 100);
    n += cframe(f + n, WS_OP_CONT, true, pl, 10);
    elog_t e3 = {0};
    e_ctl(&e3, WS_OP_PING, 0, pl, 100);
    e_msg(&e3, WS_OP_BINARY, pl, 100);
    EXPECT(f, n, c, e3.s, 0, 0);
    /* after a delivered max-size message, the next one starts from zero */
    n = cframe(f, WS_OP_BINARY, true, pl, 100);
    n += cframe(f + n, WS_OP_BINARY, false, pl, 50);
    n += cframe(f + n, WS_OP_CONT, true, pl, 50);
    elog_t e4 = {0};
    e_msg(&e4, WS_OP_BINARY, pl, 100);
    e_msg(&e4, WS_OP_BINARY, pl, 100);
    EXPECT(f, n, c, e4.s, 0, 0);
    free(f);

    /* a 1 GiB announcement is refused at once, with nothing buffered */
    rec_t r = {0};
    ws_parser_t p;
    ws_parser_init(&p, &CB, &r);
    uint8_t h[14];
    size_t hl = ws_frame_header(h, WS_OP_BINARY, true, 1u << 30, MASK);
    CHECK_INT(ws_parser_feed(&p, h, hl), CHAT_ETOOBIG);
    CHECK_INT(p.error_code, 1009);
    CHECK(p.msg == NULL);
    ws_parser_free(&p);
    /* max_message 0 means the 64 KiB default */
    ws_parser_init(&p, &CB, &r);
    p.max_message = 0;
    hl = ws_frame_header(h, WS_OP_BINARY, true, 65537, MASK);
    CHECK_INT(ws_parser_feed(&p, h, hl), CHAT_ETOOBIG);
    ws_parser_free(&p);
}

static void test_err_utf8(void) {
    uint8_t f[256];
    size_t n;
    elog_t e = {0};
    n = cframe(f, WS_OP_TEXT, true, "\xed\xa0\x80", 3);
    EXPECT(f, n, SERVER, "", CHAT_EUTF8, 1007);
    n = cframe(f, WS_OP_TEXT, true, "ab\xc0\xaf", 4);
    EXPECT(f, n, SERVER, "", CHAT_EUTF8, 1007);
    /* truncated at the end of the message */
    n = cframe(f, WS_OP_TEXT, true, "ab\xce", 3);
    EXPECT(f, n, SERVER, "", CHAT_EUTF8, 1007);
    /* binary is not checked */
    n = cframe(f, WS_OP_BINARY, true, "\xed\xa0\x80", 3);
    e_msg(&e, WS_OP_BINARY, "\xed\xa0\x80", 3);
    EXPECT(f, n, SERVER, e.s, 0, 0);
    /* a character split across fragments is fine... */
    n = cframe(f, WS_OP_TEXT, false, "x\xce", 2);
    n += cframe(f + n, WS_OP_CONT, false, "\xba\xe1", 2);
    n += cframe(f + n, WS_OP_PING, true, "\xff", 1); /* ping payload is not text */
    n += cframe(f + n, WS_OP_CONT, true, "\xbd\xb9", 2);
    elog_t e2 = {0};
    e_ctl(&e2, WS_OP_PING, 0, "\xff", 1);
    e_msg(&e2, WS_OP_TEXT, "x\xce\xba\xe1\xbd\xb9", 6);
    EXPECT(f, n, SERVER, e2.s, 0, 0);
    /* ...but not one that is never finished, or broken by the next fragment */
    n = cframe(f, WS_OP_TEXT, false, "x\xce", 2);
    n += cframe(f + n, WS_OP_CONT, true, "", 0);
    EXPECT(f, n, SERVER, "", CHAT_EUTF8, 1007);
    n = cframe(f, WS_OP_TEXT, false, "x\xce", 2);
    n += cframe(f + n, WS_OP_CONT, true, "A", 1);
    EXPECT(f, n, SERVER, "", CHAT_EUTF8, 1007);

    /* detected as soon as the bad byte arrives: the frame's rest is not needed */
    uint8_t pl[100];
    memset(pl, 'a', sizeof pl);
    pl[10] = 0xff;
    n = cframe(f, WS_OP_TEXT, true, pl, sizeof pl);
    size_t hl = n - sizeof pl;
    EXPECT(f, hl + 11, SERVER, "", CHAT_EUTF8, 1007);
    /* and in a later fragment too */
    n = cframe(f, WS_OP_TEXT, false, "ok", 2);
    size_t at = n;
    n += cframe(f + n, WS_OP_CONT, true, pl, sizeof pl);
    EXPECT(f, at + hl + 11, SERVER, "", CHAT_EUTF8, 1007);
    /* the bad byte not yet arrived: no error yet */
    rec_t r = {0};
    uint16_t code;
    CHECK_INT(run(f, at + hl + 10, NULL, 0, SERVER, &r, &code, NULL), 0);
    CHECK_INT(r.events, 0);
}

static void test_close_frames(void) {
    uint8_t f[256];
    size_t n;
    /* empty close: code 1005 */
    n = cframe(f, WS_OP_CLOSE, true, "", 0);
    elog_t e = {0};
    e_ctl(&e, WS_OP_CLOSE, 1005, "", 0);
    EXPECT(f, n, SERVER, e.s, 0, 0);
    /* code and reason */
    n = cframe(f, WS_OP_CLOSE, true,
               "\x03\xe8"
               "bye \xce\xba",
               8);
    elog_t e2 = {0};
    e_ctl(&e2, WS_OP_CLOSE, 1000, "bye \xce\xba", 6);
    EXPECT(f, n, SERVER, e2.s, 0, 0);
    /* 1-byte body */
    n = cframe(f, WS_OP_CLOSE, true, "\x03", 1);
    EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
    /* codes */
    static const uint16_t bad[] = {0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        uint8_t body[2] = {(uint8_t)(bad[i] >> 8), (uint8_t)bad[i]};
        n = cframe(f, WS_OP_CLOSE, true, body, 2);
        EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
    }
    static const uint16_t good[] = {1000, 1003, 1007, 1014, 3000, 4999};
    for (size_t i = 0; i < sizeof good / sizeof *good; i++) {
        uint8_t body[2] = {(uint8_t)(good[i] >> 8), (uint8_t)good[i]};
        n = cframe(f, WS_OP_CLOSE, true, body, 2);
        elog_t e3 = {0};
        e_ctl(&e3, WS_OP_CLOSE, good[i], "", 0);
        EXPECT(f, n, SERVER, e3.s, 0, 0);
    }
    /* invalid UTF-8 reason */
    n = cframe(f, WS_OP_CLOSE, true,
               "\x03\xe8"
               "a\xed\xa0\x80",
               6);
    EXPECT(f, n, SERVER, "", CHAT_EUTF8, 1007);
    n = cframe(f, WS_OP_CLOSE, true,
               "\x03\xe8"
               "a\xce",
               4);
    EXPECT(f, n, SERVER, "", CHAT_EUTF8, 1007);
    /* a 125-byte close */
    uint8_t body[125];
    memset(body, 'c', sizeof body);
    body[0] = 0x0b, body[1] = 0xb8; /* 3000 */
    n = cframe(f, WS_OP_CLOSE, true, body, 125);
    elog_t e4 = {0};
    e_ctl(&e4, WS_OP_CLOSE, 3000, body + 2, 123);
    EXPECT(f, n, SERVER, e4.s, 0, 0);
    /* a close between fragments */
    n = cframe(f, WS_OP_TEXT, false, "frag", 4);
    n += cframe(f + n, WS_OP_CLOSE, true, "\x03\xe9", 2);
    elog_t e5 = {0};
    e_ctl(&e5, WS_OP_CLOSE, 1001, "", 0);
    EXPECT(f, n, SERVER, e5.s, 0, 0);
}

/* After an error every later call fails the same way and delivers nothing. */
static void test_error_is_sticky(void) {
    uint8_t f[64];
    rec_t r = {0};
    ws_parser_t p;
    ws_parser_init(&p, &CB, &r);
    size_t n = cframe(f, WS_OP_TEXT, true, "\xff", 1);
    CHECK_INT(ws_parser_feed(&p, f, n), CHAT_EUTF8);
    const char *why = p.error_reason;
    CHECK(why != NULL);
    n = cframe(f, WS_OP_TEXT, true, "fine", 4);
    for (int k = 0; k < 3; k++) {
        CHECK_INT(ws_parser_feed(&p, f, n), CHAT_EUTF8);
        CHECK_INT(ws_parser_feed(&p, f, 0), CHAT_EUTF8);
        CHECK_INT(p.error_code, 1007);
        CHECK(p.error_reason == why);
    }
    CHECK_INT(r.events, 0);
    ws_parser_free(&p);

    memset(&r, 0, sizeof r);
    ws_parser_init(&p, &CB, &r);
    p.max_message = 10;
    static const uint8_t eleven[11];
    n = cframe(f, WS_OP_BINARY, true, eleven, sizeof eleven);
    CHECK_INT(ws_parser_feed(&p, f, n), CHAT_ETOOBIG);
    CHECK_INT(ws_parser_feed(&p, f, 1), CHAT_ETOOBIG);
    CHECK_INT(p.error_code, 1009);
    ws_parser_free(&p);

    memset(&r, 0, sizeof r);
    ws_parser_init(&p, &CB, &r);
    f[0] = 0x83;
    CHECK_INT(ws_parser_feed(&p, f, 1), CHAT_EPROTO);
    n = cframe(f, WS_OP_TEXT, true, "fine", 4);
    CHECK_INT(ws_parser_feed(&p, f, n), CHAT_EPROTO);
    CHECK_INT(p.error_code, 1002);
    CHECK_INT(r.events, 0);
    ws_parser_free(&p);
}

/* ---- parser: behaviour -------------------------------------------------------------------- */

static void test_interleaved_control(void) {
    uint8_t f[256];
    size_t n = 0;
    n += cframe(f + n, WS_OP_TEXT, false, "He", 2);
    n += cframe(f + n, WS_OP_PING, true, "p1", 2);
    n += cframe(f + n, WS_OP_CONT, false, "l", 1);
    n += cframe(f + n, WS_OP_PONG, true, "", 0);
    n += cframe(f + n, WS_OP_PING, true, "p2", 2);
    n += cframe(f + n, WS_OP_CONT, false, "", 0);
    n += cframe(f + n, WS_OP_CONT, true, "lo", 2);
    n += cframe(f + n, WS_OP_BINARY, true, "\x00\x01", 2);
    n += cframe(f + n, WS_OP_PING, true, "p3", 2);
    elog_t e = {0};
    e_ctl(&e, WS_OP_PING, 0, "p1", 2);
    e_ctl(&e, WS_OP_PONG, 0, "", 0);
    e_ctl(&e, WS_OP_PING, 0, "p2", 2);
    e_msg(&e, WS_OP_TEXT, "Hello", 5);
    e_msg(&e, WS_OP_BINARY, "\x00\x01", 2);
    e_ctl(&e, WS_OP_PING, 0, "p3", 2);
    EXPECT(f, n, SERVER, e.s, 0, 0);
}

static void test_zero_length(void) {
    uint8_t f[64];
    size_t n = 0;
    n += cframe(f + n, WS_OP_TEXT, true, "", 0);
    n += cframe(f + n, WS_OP_BINARY, true, "", 0);
    n += cframe(f + n, WS_OP_TEXT, false, "", 0);
    n += cframe(f + n, WS_OP_CONT, true, "", 0);
    n += cframe(f + n, WS_OP_BINARY, false, "", 0);
    n += cframe(f + n, WS_OP_CONT, false, "", 0);
    n += cframe(f + n, WS_OP_CONT, true, "", 0);
    n += cframe(f + n, WS_OP_PING, true, "", 0);
    elog_t e = {0};
    e_msg(&e, WS_OP_TEXT, "", 0);
    e_msg(&e, WS_OP_BINARY, "", 0);
    e_msg(&e, WS_OP_TEXT, "", 0);
    e_msg(&e, WS_OP_BINARY, "", 0);
    e_ctl(&e, WS_OP_PING, 0, "", 0);
    EXPECT(f, n, SERVER, e.s, 0, 0); /* expect() also fails on a NULL data pointer */
    /* unmasked, on the client side: frames of two bytes each */
    n = 0;
    n += sframe(f + n, WS_OP_TEXT, true, "", 0);
    n += sframe(f + n, WS_OP_PONG, true, "", 0);
    CHECK_INT(n, 4);
    elog_t e2 = {0};
    e_msg(&e2, WS_OP_TEXT, "", 0);
    e_ctl(&e2, WS_OP_PONG, 0, "", 0);
    EXPECT(f, n, CLIENT, e2.s, 0, 0);
}

/* A whole frame in the input is delivered in place; a split one is reassembled; either way
 * no buffer is held between messages. */
static void test_zero_copy(void) {
    uint8_t f[512];
    size_t n = 0;
    n += cframe(f + n, WS_OP_TEXT, true, "first", 5);
    n += cframe(f + n, WS_OP_BINARY, true, "second", 6);
    n += cframe(f + n, WS_OP_PING, true, "third", 5);
    rec_t r = {0};
    ws_parser_t p;
    ws_parser_init(&p, &CB, &r);
    r.in = f;
    r.in_len = n;
    CHECK_INT(ws_parser_feed(&p, f, n), 0);
    CHECK_INT(r.events, 3);
    CHECK_INT(r.in_place, 3);
    /* unmasked where it lay */
    CHECK_MEM(f + 6, "first", 5);
    CHECK(p.msg == NULL);
    CHECK_INT(p.msg_cap, 0);

    /* a frame split across two reads: copied, then released on delivery */
    memset(&r, 0, sizeof r);
    n = cframe(f, WS_OP_TEXT, true, "split message", 13);
    r.in = f;
    r.in_len = 10;
    CHECK_INT(ws_parser_feed(&p, f, 10), 0);
    CHECK(p.msg != NULL);
    r.in = f + 10;
    r.in_len = n - 10;
    CHECK_INT(ws_parser_feed(&p, f + 10, n - 10), 0);
    CHECK_INT(r.events, 1);
    CHECK_INT(r.in_place, 0);
    CHECK(p.msg == NULL);
    CHECK_INT(p.msg_cap, 0);

    /* a header split but payload whole in the second read is still in place */
    memset(&r, 0, sizeof r);
    n = cframe(f, WS_OP_TEXT, true, "payload", 7);
    CHECK_INT(ws_parser_feed(&p, f, 3), 0);
    r.in = f + 3;
    r.in_len = n - 3;
    CHECK_INT(ws_parser_feed(&p, f + 3, n - 3), 0);
    CHECK_INT(r.in_place, 1);
    elog_t e = {0};
    e_msg(&e, WS_OP_TEXT, "payload", 7);
    CHECK_STR(r.log, e.s);
    ws_parser_free(&p);
}

/* Reassembly grows geometrically but never past max_message. */
static void test_reassembly_growth(void) {
    enum { MAX = 3000 };
    uint8_t *f = malloc(MAX * 8);
    uint8_t pl[MAX];
    for (size_t i = 0; i < MAX; i++) pl[i] = (uint8_t)('a' + i % 26);
    size_t n = cframe(f, WS_OP_TEXT, false, pl, 1);
    for (size_t i = 1; i < MAX - 1; i++) n += cframe(f + n, WS_OP_CONT, false, pl + i, 1);
    n += cframe(f + n, WS_OP_CONT, true, pl + MAX - 1, 1);
    rec_t r = {0};
    ws_parser_t p;
    ws_parser_init(&p, &CB, &r);
    p.max_message = MAX;
    size_t at = 0, grows = 0, last_cap = 0;
    bool capped = true;
    /* feed all but the last frame, watching the buffer */
    while (at < n - 7) {
        CHECK_INT(ws_parser_feed(&p, f + at, 7), 0);
        at += 7;
        if (p.msg_cap != last_cap) grows++, last_cap = p.msg_cap;
        if (p.msg_cap > MAX) capped = false;
    }
    CHECK(capped);
    CHECK(grows <= 3); /* 1024, 2048, 3000 */
    CHECK_INT(p.msg_cap, MAX);
    CHECK_INT(ws_parser_feed(&p, f + at, n - at), 0);
    elog_t e = {0};
    e_msg(&e, WS_OP_TEXT, pl, MAX);
    CHECK_STR(r.log, e.s);
    CHECK(p.msg == NULL);
    ws_parser_free(&p);
    free(f);
}

static void test_callback_stop(void) {
    uint8_t f[256];
    size_t n = 0;
    n += cframe(f + n, WS_OP_TEXT, true, "one", 3);
    n += cframe(f + n, WS_OP_PING, true, "two", 3);
    n += cframe(f + n, WS_OP_BINARY, false, "thr", 3);
    n += cframe(f + n, WS_OP_CONT, true, "ee", 2);
    n += cframe(f + n, WS_OP_TEXT, true, "four", 4);
    elog_t all = {0};
    e_msg(&all, WS_OP_TEXT, "one", 3);
    e_ctl(&all, WS_OP_PING, 0, "two", 3);
    e_msg(&all, WS_OP_BINARY, "three", 5);
    e_msg(&all, WS_OP_TEXT, "four", 4);
    for (int stop = 1; stop <= 4; stop++) {
        for (int do_free = 0; do_free < 2; do_free++) {
            for (size_t chunk = 1; chunk <= n; chunk++) {
                /* the parser on the heap, freed right after the stopping feed: ASan checks
                 * that feed did not touch it after the callback */
                ws_parser_t *p = malloc(sizeof *p);
                rec_t r = {0};
                ws_parser_init(p, &CB, &r);
                r.p = p;
                r.stop_at = stop;
                r.free_on_stop = do_free;
                uint8_t copy[256];
                memcpy(copy, f, n);
                int rc = 0;
                for (size_t at = 0; at < n && rc == 0; at += chunk)
                    rc = ws_parser_feed(p, copy + at, at + chunk <= n ? chunk : n - at);
                CHECK_INT(rc, CHAT_ECLOSED);
                CHECK_INT(r.events, stop);
                ws_parser_free(p);
                free(p);
                /* the log is a prefix of the full one */
                CHECK(strncmp(r.log, all.s, r.n) == 0);
            }
        }
    }
}

/* Frames built by the encoder come back out of the parser, for every length form. */
static void test_round_trip(void) {
    static const size_t sizes[] = {0, 1, 7, 8, 125, 126, 127, 1000, 65535, 65536, 100000};
    enum { CAP = 100000 + 14 };
    uint8_t *pl = malloc(CAP), *f = malloc(CAP);
    for (size_t i = 0; i < CAP; i++) pl[i] = (uint8_t)(i * 13 + (i >> 9));
    cfg_t server = {false, 100000, NULL}, client = {true, 100000, NULL};
    for (size_t s = 0; s < sizeof sizes / sizeof *sizes; s++) {
        size_t len = sizes[s];
        elog_t e = {0};
        e_msg(&e, WS_OP_BINARY, pl, len);
        size_t n = cframe(f, WS_OP_BINARY, true, pl, len);
        size_t cuts[3] = {1, n / 2 > 1 ? n / 2 : 1, n > 3 ? n - 1 : n};
        if (len < 200) {
            EXPECT(f, n, server, e.s, 0, 0);
        } else {
            CHECK(same_run("whole", f, n, NULL, 0, server, e.s, 0, 0));
            CHECK(same_run("cuts", f, n, cuts, 3, server, e.s, 0, 0));
        }
        buf_t *b = ws_frame_new(WS_OP_BINARY, pl, len);
        CHECK(b);
        if (len < 200) {
            EXPECT(b->data, b->len, client, e.s, 0, 0);
        } else {
            size_t bcuts[3] = {1, b->len / 2, b->len - 1};
            CHECK(same_run("whole", b->data, b->len, NULL, 0, client, e.s, 0, 0));
            CHECK(same_run("cuts", b->data, b->len, bcuts, 3, client, e.s, 0, 0));
        }
        buf_unref(b);
    }
    free(pl);
    free(f);
}

/* A realistic mixed stream, fed at every pair of split points. */
static void test_stream_all_splits(void) {
    uint8_t f[512];
    uint8_t mid[300];
    for (size_t i = 0; i < sizeof mid; i++) mid[i] = (uint8_t)i;
    size_t n = 0;
    n += cframe(f + n, WS_OP_TEXT, true, "hi \xf0\x9f\x92\xac", 7);
    n += cframe(f + n, WS_OP_TEXT, false, "\xce\xba\xe1", 3);
    n += cframe(f + n, WS_OP_PING, true, "?", 1);
    n += cframe(f + n, WS_OP_CONT, true, "\xbd\xb9\xcf\x83", 4);
    n += cframe(f + n, WS_OP_BINARY, true, mid, 130);
    n += cframe(f + n, WS_OP_CLOSE, true,
                "\x03\xe8"
                "done",
                6);
    elog_t e = {0};
    e_msg(&e, WS_OP_TEXT, "hi \xf0\x9f\x92\xac", 7);
    e_ctl(&e, WS_OP_PING, 0, "?", 1);
    e_msg(&e, WS_OP_TEXT, "\xce\xba\xe1\xbd\xb9\xcf\x83", 7);
    e_msg(&e, WS_OP_BINARY, mid, 130);
    e_ctl(&e, WS_OP_CLOSE, 1000, "done", 4);
    EXPECT(f, n, SERVER, e.s, 0, 0);
    bool ok = true;
    for (size_t a = 1; ok && a < n; a++) {
        for (size_t b = a + 1; ok && b < n; b++) {
            size_t cuts[2] = {a, b};
            ok = same_run("pair", f, n, cuts, 2, SERVER, e.s, 0, 0);
        }
    }
    CHECK(ok);
}

/* ---- permessage-deflate ------------------------------------------------------------------- */

static void test_deflate_negotiate(void) {
    static const char BASE[] = "permessage-deflate; server_no_context_takeover; "
                               "client_no_context_takeover; server_max_window_bits=11";
    static const struct {
        const char *offer;
        const char *extra; /* after BASE; NULL: declined */
    } cases[] = {
        {"permessage-deflate", ""},
        {"permessage-deflate; client_max_window_bits", "; client_max_window_bits=11"},
        {"permessage-deflate; client_max_window_bits=15", "; client_max_window_bits=11"},
        {"permessage-deflate; client_max_window_bits=9", "; client_max_window_bits=9"},
        {"permessage-deflate; client_max_window_bits=\"10\"", "; client_max_window_bits=10"},
        {"permessage-deflate;server_no_context_takeover;client_no_context_takeover", ""},
        {"permessage-deflate; server_max_window_bits=11", ""},
        {"permessage-deflate; server_max_window_bits=15", ""},
        {"  permessage-deflate\t;\tclient_max_window_bits = 12  ", "; client_max_window_bits=11"},
        {"foo, permessage-deflate", ""},
        {"foo; a=\"x,y\"; b, permessage-deflate", ""},
        {",, permessage-deflate ,", ""},
        {"permessage-deflate; server_max_window_bits=10, permessage-deflate", ""},
        {"permessage-deflate; x=1, permessage-deflate; client_max_window_bits=8",
         "; client_max_window_bits=8"},
        /* declined */
        {"", NULL},
        {"foo", NULL},
        {"x-webkit-deflate-frame", NULL},
        {"Permessage-Deflate", NULL},
        {"permessage-deflate; server_max_window_bits=10", NULL},
        {"permessage-deflate; server_max_window_bits=8", NULL},
        {"permessage-deflate; server_max_window_bits", NULL},
        {"permessage-deflate; server_max_window_bits=16", NULL},
        {"permessage-deflate; client_max_window_bits=7", NULL},
        {"permessage-deflate; client_max_window_bits=015", NULL},
        {"permessage-deflate; client_max_window_bits=+9", NULL},
        {"permessage-deflate; client_max_window_bits=\"\"", NULL},
        {"permessage-deflate; client_max_window_bits=\"1 0\"", NULL},
        {"permessage-deflate; client_max_window_bits=99999999999999999999", NULL},
        {"permessage-deflate; client_max_window_bits; client_max_window_bits", NULL},
        {"permessage-deflate; server_no_context_takeover; server_no_context_takeover", NULL},
        {"permessage-deflate; server_no_context_takeover=1", NULL},
        {"permessage-deflate; client_no_context_takeover=\"\"", NULL},
        {"permessage-deflate; mystery", NULL},
        /* malformed: every offer declined, even a good one before */
        {"permessage-deflate, ;", NULL},
        {"permessage-deflate; ", NULL},
        {"permessage-deflate; =1", NULL},
        {"permessage-deflate; a=", NULL},
        {"permessage-deflate; a=\"open", NULL},
        {"permessage-deflate; a=\"bad\\", NULL},
        {"permessage-deflate x", NULL},
        {"permessage-deflate, @", NULL},
        {"permessage-deflate; a=\"\x01\"", NULL},
        {"=", NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        char out[WS_DEFLATE_RESPONSE_MAX];
        memset(out, 'x', sizeof out);
        bool ok = ws_deflate_negotiate(cases[i].offer, strlen(cases[i].offer), out);
        if (ok != (cases[i].extra != NULL)) fprintf(stderr, "  offer: %s\n", cases[i].offer);
        CHECK(ok == (cases[i].extra != NULL));
        if (!ok) continue;
        char want[WS_DEFLATE_RESPONSE_MAX];
        snprintf(want, sizeof want, "%s%s", BASE, cases[i].extra);
        CHECK_STR(out, want);
        /* our answer, offered back, is accepted with the same answer */
        char again[WS_DEFLATE_RESPONSE_MAX];
        CHECK(ws_deflate_negotiate(out, strlen(out), again));
        CHECK_STR(again, out);
    }
    /* not NUL-terminated: only len bytes are read */
    char out[WS_DEFLATE_RESPONSE_MAX];
    CHECK(!ws_deflate_negotiate("permessage-deflate", 11, out));
    CHECK(ws_deflate_negotiate("permessage-deflate; zzz", 18, out));
}

/* data compressed as permessage-deflate sends it (raw, sync flush, the tail removed). */
static size_t zdeflate(const void *in, size_t n, uint8_t *out, size_t cap, int wbits) {
    z_stream z;
    memset(&z, 0, sizeof z);
    if (deflateInit2(&z, 6, Z_DEFLATED, -wbits, 8, Z_DEFAULT_STRATEGY) != Z_OK) return 0;
    z.next_in = (Bytef *)in;
    z.avail_in = (uInt)n;
    z.next_out = out;
    z.avail_out = (uInt)cap;
    int rc = deflate(&z, Z_SYNC_FLUSH);
    size_t made = cap - z.avail_out;
    deflateEnd(&z);
    return rc == Z_OK && made >= 4 ? made - 4 : 0;
}

static void test_zip_frame_roundtrip(void) {
    ws_zip_t *z = ws_zip_new();
    CHECK(z);
    char text[600];
    for (size_t i = 0; i < sizeof text; i++) text[i] = "chat events compress "[i % 21];
    buf_t *plain = ws_frame_new(WS_OP_TEXT, text, sizeof text);
    buf_t *zf = ws_zip_frame(z, plain);
    CHECK(zf);
    CHECK_INT(zf->data[0], 0x80 | 0x40 | WS_OP_TEXT); /* FIN, RSV1, TEXT */
    CHECK(zf->len < plain->len);
    /* a client parser with deflate reads it back as the text */
    elog_t e = {0};
    e_msg(&e, WS_OP_TEXT, text, sizeof text);
    cfg_t c = {true, 0, z};
    EXPECT(zf->data, zf->len, c, e.s, 0, 0);
    buf_unref(zf);
    buf_unref(plain);
    /* the threshold: a payload under WS_DEFLATE_MIN_BYTES stays plain */
    plain = ws_frame_new(WS_OP_TEXT, text, WS_DEFLATE_MIN_BYTES - 1);
    CHECK(ws_zip_frame(z, plain) == NULL);
    buf_unref(plain);
    plain = ws_frame_new(WS_OP_TEXT, text, WS_DEFLATE_MIN_BYTES);
    zf = ws_zip_frame(z, plain);
    CHECK(zf);
    buf_unref(zf);
    buf_unref(plain);
    /* control frames never, nor what does not shrink */
    plain = ws_frame_new(WS_OP_PING, text, 125);
    CHECK(ws_zip_frame(z, plain) == NULL);
    buf_unref(plain);
    uint8_t noise[300];
    uint32_t x = 12345;
    for (size_t i = 0; i < sizeof noise; i++)
        noise[i] = (uint8_t)((x = x * 1103515245u + 12345u) >> 23);
    plain = ws_frame_new(WS_OP_BINARY, noise, sizeof noise);
    CHECK(ws_zip_frame(z, plain) == NULL);
    buf_unref(plain);
    /* a large payload (64-bit length header) */
    size_t big = 70000;
    char *b = malloc(big);
    for (size_t i = 0; i < big; i++) b[i] = (char)('a' + (i * 7 % 26));
    plain = ws_frame_new(WS_OP_TEXT, b, big);
    zf = ws_zip_frame(z, plain);
    CHECK(zf);
    uint8_t *out;
    size_t out_len;
    size_t hl = (zf->data[1] & 0x7F) == 126 ? 4 : (zf->data[1] & 0x7F) == 127 ? 10 : 2;
    CHECK_INT(ws_zip_inflate(z, zf->data + hl, zf->len - hl, big, &out, &out_len), 0);
    CHECK_INT(out_len, big);
    CHECK_MEM(out, b, big);
    buf_unref(zf);
    buf_unref(plain);
    free(b);
    ws_zip_free(z);
}

static void test_zip_inflate_bounds(void) {
    ws_zip_t *z = ws_zip_new();
    CHECK(z);
    size_t n = 1u << 20;
    uint8_t *zeros = calloc(1, n), *c = malloc(n);
    size_t cl = zdeflate(zeros, n, c, n, 15);
    CHECK(cl > 0 && cl < 2000);
    uint8_t *out;
    size_t out_len;
    CHECK_INT(ws_zip_inflate(z, c, cl, 65536, &out, &out_len), CHAT_ETOOBIG);
    CHECK_INT(ws_zip_inflate(z, c, cl, n - 1, &out, &out_len), CHAT_ETOOBIG);
    CHECK_INT(ws_zip_inflate(z, c, cl, n, &out, &out_len), 0);
    CHECK_INT(out_len, n);
    CHECK_MEM(out, zeros, n);
    /* the bound holds however big the claim: never more than max + 1 bytes of room */
    CHECK_INT(ws_zip_inflate(z, c, cl, 10, &out, &out_len), CHAT_ETOOBIG);
    /* empty message: no bytes at all, or an empty stored block */
    CHECK_INT(ws_zip_inflate(z, (const uint8_t *)"", 0, 10, &out, &out_len), 0);
    CHECK_INT(out_len, 0);
    CHECK_INT(ws_zip_inflate(z, (const uint8_t *)"\x00", 1, 10, &out, &out_len), 0);
    CHECK_INT(out_len, 0);
    /* not deflate */
    CHECK_INT(ws_zip_inflate(z, (const uint8_t *)"\xff\xff\xff", 3, 10, &out, &out_len),
              CHAT_EINVAL);
    /* a final block followed by more bytes */
    z_stream d;
    memset(&d, 0, sizeof d);
    deflateInit2(&d, 6, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY);
    uint8_t fin[64];
    d.next_in = (Bytef *)"hello";
    d.avail_in = 5;
    d.next_out = fin;
    d.avail_out = sizeof fin;
    CHECK_INT(deflate(&d, Z_FINISH), Z_STREAM_END);
    size_t fl = sizeof fin - d.avail_out;
    deflateEnd(&d);
    CHECK_INT(ws_zip_inflate(z, fin, fl, 10, &out, &out_len), 0);
    CHECK_INT(out_len, 5);
    CHECK_MEM(out, "hello", 5);
    fin[fl] = 'x';
    CHECK_INT(ws_zip_inflate(z, fin, fl + 1, 10, &out, &out_len), CHAT_EINVAL);
    /* state does not leak from one message to the next (no context takeover) */
    cl = zdeflate("abcabcabc", 9, c, n, 15);
    CHECK_INT(ws_zip_inflate(z, c, cl, 100, &out, &out_len), 0);
    CHECK_INT(ws_zip_inflate(z, c, cl, 100, &out, &out_len), 0);
    CHECK_INT(out_len, 9);
    free(zeros);
    free(c);
    ws_zip_free(z);
}

static void test_parser_deflate(void) {
    ws_zip_t *z = ws_zip_new();
    CHECK(z);
    const cfg_t ZS = {false, 0, z};
    static const char msg[] =
        "{\"event\":\"message:message\",\"message\":\"h\u00e9llo h\u00e9llo\"}";
    uint8_t c[256], f[1024];
    size_t cl = zdeflate(msg, sizeof msg - 1, c, sizeof c, 15);
    CHECK(cl > 0);
    elog_t e = {0};
    e_msg(&e, WS_OP_TEXT, msg, sizeof msg - 1);
    size_t n = cframe(f, WS_OP_TEXT, true, c, cl);
    f[0] |= 0x40;
    EXPECT(f, n, ZS, e.s, 0, 0);
    /* the same compressed bytes without RSV1 are binary garbage as text: 1007 */
    n = cframe(f, WS_OP_TEXT, true, c, cl);
    EXPECT(f, n, ZS, "", CHAT_EUTF8, 1007);
    /* plain messages still work with deflate on */
    n = cframe(f, WS_OP_TEXT, true, msg, sizeof msg - 1);
    EXPECT(f, n, ZS, e.s, 0, 0);
    /* fragmented, with a ping in between; RSV1 only on the first frame */
    size_t half = cl / 2;
    n = cframe(f, WS_OP_TEXT, false, c, half);
    f[0] |= 0x40;
    n += cframe(f + n, WS_OP_PING, true, "p", 1);
    n += cframe(f + n, WS_OP_CONT, true, c + half, cl - half);
    elog_t e2 = {0};
    e_ctl(&e2, WS_OP_PING, 0, "p", 1);
    e_msg(&e2, WS_OP_TEXT, msg, sizeof msg - 1);
    EXPECT(f, n, ZS, e2.s, 0, 0);
    /* RSV1 on a continuation frame, on a control frame, RSV2/RSV3: 1002 */
    n = cframe(f, WS_OP_TEXT, false, c, half);
    f[0] |= 0x40;
    size_t m = cframe(f + n, WS_OP_CONT, true, c + half, cl - half);
    f[n] |= 0x40;
    EXPECT(f, n + m, ZS, "", CHAT_EPROTO, 1002);
    n = cframe(f, WS_OP_PING, true, "p", 1);
    f[0] |= 0x40;
    EXPECT(f, n, ZS, "", CHAT_EPROTO, 1002);
    n = cframe(f, WS_OP_TEXT, true, c, cl);
    f[0] |= 0x20;
    EXPECT(f, n, ZS, "", CHAT_EPROTO, 1002);
    /* RSV1 without the extension: 1002 */
    n = cframe(f, WS_OP_TEXT, true, c, cl);
    f[0] |= 0x40;
    EXPECT(f, n, SERVER, "", CHAT_EPROTO, 1002);
    /* corrupt data: 1007; invalid UTF-8 once inflated: 1007 */
    n = cframe(f, WS_OP_TEXT, true, "\xff\xfe\xfd", 3);
    f[0] |= 0x40;
    EXPECT(f, n, ZS, "", CHAT_EUTF8, 1007);
    cl = zdeflate("\xc3\x28", 2, c, sizeof c, 15);
    n = cframe(f, WS_OP_TEXT, true, c, cl);
    f[0] |= 0x40;
    EXPECT(f, n, ZS, "", CHAT_EUTF8, 1007);
    /* binary is not checked */
    n = cframe(f, WS_OP_BINARY, true, c, cl);
    f[0] |= 0x40;
    elog_t e3 = {0};
    e_msg(&e3, WS_OP_BINARY, "\xc3\x28", 2);
    EXPECT(f, n, ZS, e3.s, 0, 0);
    /* a zip bomb: small on the wire, over max once inflated: 1009 */
    static uint8_t zeros[200000], bomb[2048], bf[2100];
    cl = zdeflate(zeros, sizeof zeros, bomb, sizeof bomb, 15);
    CHECK(cl > 0 && cl < 1000);
    n = cframe(bf, WS_OP_BINARY, true, bomb, cl);
    bf[0] |= 0x40;
    const cfg_t SMALL = {false, 4096, z};
    EXPECT(bf, n, SMALL, "", CHAT_ETOOBIG, 1009);
    /* the wire limit of a compressed message leaves room for deflate's overhead */
    uint8_t noise[4096];
    uint32_t x = 7;
    for (size_t i = 0; i < sizeof noise; i++)
        noise[i] = (uint8_t)((x = x * 1103515245u + 12345u) >> 23);
    static uint8_t nz[4200], nf[4300];
    cl = zdeflate(noise, sizeof noise, nz, sizeof nz, 15);
    CHECK(cl > sizeof noise);
    n = cframe(nf, WS_OP_BINARY, true, nz, cl);
    nf[0] |= 0x40;
    elog_t e4 = {0};
    e_msg(&e4, WS_OP_BINARY, noise, sizeof noise);
    uint8_t *copy = malloc(n);
    memcpy(copy, nf, n);
    rec_t r = {0};
    uint16_t code;
    CHECK_INT(run(copy, n, NULL, 0, SMALL, &r, &code, NULL), 0);
    CHECK_STR(r.log, e4.s);
    free(copy);
    ws_zip_free(z);
}

int main(void) {
    RUN(test_accept_key);
    RUN(test_deflate_negotiate);
    RUN(test_zip_frame_roundtrip);
    RUN(test_zip_inflate_bounds);
    RUN(test_parser_deflate);
    RUN(test_accept_key_invalid);
    RUN(test_frame_header);
    RUN(test_mask);
    RUN(test_frame_new);
    RUN(test_close_frame_new);
    RUN(test_close_code_valid);
    RUN(test_rfc_examples);
    RUN(test_rfc_binary_lengths);
    RUN(test_err_mask_rules);
    RUN(test_err_rsv_and_opcodes);
    RUN(test_err_control_frames);
    RUN(test_err_fragment_sequence);
    RUN(test_err_length);
    RUN(test_err_too_big);
    RUN(test_err_utf8);
    RUN(test_close_frames);
    RUN(test_error_is_sticky);
    RUN(test_interleaved_control);
    RUN(test_zero_length);
    RUN(test_zero_copy);
    RUN(test_reassembly_growth);
    RUN(test_callback_stop);
    RUN(test_round_trip);
    RUN(test_stream_all_splits);
    return test_summary("test_ws");
}
