/* Unit tests for src/http: the request reader (splits, pipelining, upgrade, limits), the
 * header and query lookups, and the exact bytes of responses.
 *
 * The idea to keep in mind: a request must parse to the same thing however the network
 * cuts it, so most reader tests compare a canonical dump of the parsed request across
 * every way of feeding the same bytes.
 */
#include "http/http.h"
#include "test.h"

#include <stdarg.h>

/* ---- helpers -------------------------------------------------------------------------- */

static void dump_add(char *out, size_t cap, size_t *o, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(out + *o, cap - *o, fmt, ap);
    va_end(ap);
    if (n > 0) *o += (size_t)n < cap - *o ? (size_t)n : cap - *o - 1;
}

/* Everything a handler sees of a request, as one string. */
static void req_dump(const http_request_t *q, char *out, size_t cap) {
    size_t o = 0;
    out[0] = 0;
    dump_add(out, cap, &o, "%s %.*s", http_method_str((enum http_method)q->method),
             (int)q->path_len, q->path);
    if (q->query) dump_add(out, cap, &o, " ?%.*s", (int)q->query_len, q->query);
    dump_add(out, cap, &o, " HTTP/%u.%u ka=%d up=%d\n", q->http_major, q->http_minor, q->keep_alive,
             q->upgrade);
    for (size_t i = 0; i < q->n_headers; i++)
        dump_add(out, cap, &o, "[%.*s]=[%.*s]\n", (int)q->headers[i].name_len, q->headers[i].name,
                 (int)q->headers[i].value_len, q->headers[i].value);
    if (q->body) dump_add(out, cap, &o, "body=[%.*s]", (int)q->body_len, q->body);
    else dump_add(out, cap, &o, "nobody len=%zu", q->body_len);
}

/* Parse s fed in one piece; dump into out; returns the feed result. */
static int parse_whole(const char *s, size_t n, char *out, size_t cap) {
    http_reader_t r;
    http_request_t q;
    http_reader_init(&r);
    int rc = http_reader_feed(&r, s, n, &q);
    if (rc == 1) req_dump(&q, out, cap);
    http_reader_free(&r);
    return rc;
}

static bool span_is(const char *p, size_t n, const char *want) {
    return p && n == strlen(want) && memcmp(p, want, n) == 0;
}

#define CHECK_SPAN(p, n, want) CHECK(span_is((p), (n), (want)))

static const char post_req[] = "POST /api/chats/general/messages?x=1 HTTP/1.1\r\n"
                               "Host: chat.example\r\n"
                               "Content-Type: application/json\r\n"
                               "X-Empty:\r\n"
                               "Content-Length: 17\r\n"
                               "\r\n"
                               "{\"message\":\"hi\"}\n";

static const char chunked_req[] = "POST /upload HTTP/1.1\r\n"
                                  "Host: a\r\n"
                                  "Transfer-Encoding: chunked\r\n"
                                  "\r\n"
                                  "5\r\nhello\r\n"
                                  "6;name=val\r\n world\r\n"
                                  "0\r\n"
                                  "X-Trailer: t\r\n"
                                  "\r\n";

/* ---- reader: basics ------------------------------------------------------------------- */

/* Expect: 100-continue is answered once, only while the body is still to come, and only
 * for HTTP/1.1 requests that have one; the request then completes as usual. */
static void test_expect_continue(void) {
    const char head[] = "POST /api/chats/c/messages HTTP/1.1\r\nHost: x\r\n"
                        "Expect: 100-Continue \r\nContent-Length: 5\r\n\r\n";
    http_reader_t r;
    http_request_t q;
    size_t n = 0;
    http_reader_init(&r);
    CHECK_INT(http_reader_feed(&r, head, strlen(head), &q), 0);
    const char *c = http_reader_continue(&r, &n);
    CHECK(c != NULL);
    CHECK_SPAN(c, n, "HTTP/1.1 100 Continue\r\n\r\n");
    CHECK(http_reader_continue(&r, &n) == NULL); /* once */
    CHECK_INT(http_reader_feed(&r, "hello", 5, &q), 1);
    CHECK_SPAN(q.body, q.body_len, "hello");
    CHECK(http_reader_continue(&r, &n) == NULL);
    http_reader_consume(&r);
    /* the whole request at once: nothing to wait for, no 100 */
    char whole[256];
    snprintf(whole, sizeof whole, "%shello", head);
    CHECK_INT(http_reader_feed(&r, whole, strlen(whole), &q), 1);
    CHECK(http_reader_continue(&r, &n) == NULL);
    http_reader_consume(&r);
    /* no body, or HTTP/1.0, or another expectation: no 100 */
    const char *none[] = {
        "GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
        "POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
        "POST / HTTP/1.1\r\nExpect: 200-ok\r\nContent-Length: 5\r\n\r\n",
    };
    for (size_t i = 0; i < sizeof none / sizeof none[0]; i++) {
        http_reader_free(&r);
        http_reader_init(&r);
        int rc = http_reader_feed(&r, none[i], strlen(none[i]), &q);
        CHECK(rc >= 0);
        CHECK(http_reader_continue(&r, &n) == NULL);
    }
    http_reader_free(&r);
    /* chunked bodies get their 100 as well */
    const char chunked[] = "POST / HTTP/1.1\r\nExpect: 100-continue\r\n"
                           "Transfer-Encoding: chunked\r\n\r\n";
    http_reader_init(&r);
    CHECK_INT(http_reader_feed(&r, chunked, strlen(chunked), &q), 0);
    CHECK(http_reader_continue(&r, &n) != NULL);
    http_reader_free(&r);
}

static void test_get_with_query(void) {
    const char s[] = "GET /api/chats/general/messages?before=123&limit=50 HTTP/1.1\r\n"
                     "Host: chat.example:8000\r\n"
                     "User-Agent: test/1.0  \r\n"
                     "Accept: */*\r\n"
                     "\r\n";
    http_reader_t r;
    http_request_t q;
    http_reader_init(&r);
    CHECK_INT(r.max_header_bytes, 16384);
    CHECK_INT(r.max_body_bytes, 1024 * 1024);
    CHECK_INT(http_reader_feed(&r, s, strlen(s), &q), 1);
    CHECK_INT(q.method, HTTP_GET);
    CHECK_SPAN(q.path, q.path_len, "/api/chats/general/messages");
    CHECK_SPAN(q.query, q.query_len, "before=123&limit=50");
    CHECK_INT(q.http_major, 1);
    CHECK_INT(q.http_minor, 1);
    CHECK(q.keep_alive);
    CHECK(!q.upgrade);
    CHECK_INT(q.n_headers, 3);
    CHECK_SPAN(q.headers[0].name, q.headers[0].name_len, "Host");
    CHECK_SPAN(q.headers[0].value, q.headers[0].value_len, "chat.example:8000");
    CHECK_SPAN(q.headers[1].value, q.headers[1].value_len, "test/1.0"); /* OWS trimmed */
    CHECK_SPAN(q.headers[2].name, q.headers[2].name_len, "Accept");
    CHECK(q.body == NULL);
    CHECK_INT(q.body_len, 0);
    /* every pointer is inside the reader's buffer */
    CHECK(q.path >= r.buf && q.path + q.path_len <= r.buf + r.len);
    size_t n;
    const char *v = http_header(&q, "hOsT", &n);
    CHECK_SPAN(v, n, "chat.example:8000");
    CHECK(http_header(&q, "Hos", &n) == NULL);
    CHECK(http_header(&q, "Hostx", NULL) == NULL);
    char out[32];
    CHECK_INT(http_query_param(&q, "limit", out, sizeof out), 2);
    CHECK_STR(out, "50");
    CHECK_INT(http_query_param(&q, "before", out, sizeof out), 3);
    CHECK_STR(out, "123");
    const char *rest = http_reader_rest(&r, &n);
    CHECK(rest != NULL);
    CHECK_INT(n, 0);
    /* feeding again before consume keeps answering the same request */
    CHECK_INT(http_reader_feed(&r, NULL, 0, &q), 1);
    CHECK_SPAN(q.path, q.path_len, "/api/chats/general/messages");
    http_reader_consume(&r);
    CHECK_INT(r.len, 0);
    CHECK_INT(http_reader_feed(&r, NULL, 0, &q), 0);
    http_reader_free(&r);
}

static void test_target_forms(void) {
    char d[1024];
    CHECK_INT(parse_whole("GET /p#frag HTTP/1.1\r\n\r\n", 24, d, sizeof d), 1);
    CHECK_STR(d, "GET /p HTTP/1.1 ka=1 up=0\nnobody len=0");
    const char *s = "GET /p?a=1#frag HTTP/1.1\r\n\r\n";
    CHECK_INT(parse_whole(s, strlen(s), d, sizeof d), 1);
    CHECK_STR(d, "GET /p ?a=1 HTTP/1.1 ka=1 up=0\nnobody len=0");
    s = "GET /p? HTTP/1.1\r\n\r\n"; /* an empty query is still a query */
    CHECK_INT(parse_whole(s, strlen(s), d, sizeof d), 1);
    CHECK_STR(d, "GET /p ? HTTP/1.1 ka=1 up=0\nnobody len=0");
    s = "GET http://chat.example:8000/ws/chat/x?token=t HTTP/1.1\r\n\r\n";
    CHECK_INT(parse_whole(s, strlen(s), d, sizeof d), 1);
    CHECK_STR(d, "GET /ws/chat/x ?token=t HTTP/1.1 ka=1 up=0\nnobody len=0");
    s = "GET http://chat.example?a=b HTTP/1.1\r\n\r\n";
    CHECK_INT(parse_whole(s, strlen(s), d, sizeof d), 1);
    CHECK_STR(d, "GET / ?a=b HTTP/1.1 ka=1 up=0\nnobody len=0");
    s = "OPTIONS * HTTP/1.1\r\n\r\n";
    CHECK_INT(parse_whole(s, strlen(s), d, sizeof d), 1);
    CHECK_STR(d, "OPTIONS * HTTP/1.1 ka=1 up=0\nnobody len=0");
}

static void test_post_body_in_pieces(void) {
    http_reader_t r;
    http_request_t q;
    http_reader_init(&r);
    const char *head = "POST /api/chats/general/messages HTTP/1.1\r\n"
                       "Content-Length: 11\r\n\r\n";
    CHECK_INT(http_reader_feed(&r, head, strlen(head), &q), 0);
    CHECK_INT(http_reader_feed(&r, "hel", 3, &q), 0);
    CHECK_INT(http_reader_feed(&r, "lo wo", 5, &q), 0);
    CHECK_INT(http_reader_feed(&r, "rld", 3, &q), 1);
    CHECK_INT(q.method, HTTP_POST);
    CHECK_SPAN(q.body, q.body_len, "hello world");
    CHECK(q.query == NULL);
    CHECK_INT(q.query_len, 0);
    size_t n;
    const char *v = http_header(&q, "content-length", &n);
    CHECK_SPAN(v, n, "11");
    http_reader_free(&r);

    /* Content-Length: 0 means no body */
    char d[512];
    const char *s = "POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
    CHECK_INT(parse_whole(s, strlen(s), d, sizeof d), 1);
    CHECK_STR(d, "POST /x HTTP/1.1 ka=1 up=0\n[Content-Length]=[0]\nnobody len=0");
}

static void test_chunked_body(void) {
    char d[1024];
    CHECK_INT(parse_whole(chunked_req, strlen(chunked_req), d, sizeof d), 1);
    /* the trailer is not a header of the request */
    CHECK_STR(d, "POST /upload HTTP/1.1 ka=1 up=0\n[Host]=[a]\n"
                 "[Transfer-Encoding]=[chunked]\nbody=[hello world]");

    /* followed by a pipelined request: framing squeezed out must not eat into it */
    char two[512];
    snprintf(two, sizeof two, "%sGET /next HTTP/1.1\r\n\r\n", chunked_req);
    http_reader_t r;
    http_request_t q;
    http_reader_init(&r);
    CHECK_INT(http_reader_feed(&r, two, strlen(two), &q), 1);
    CHECK_SPAN(q.body, q.body_len, "hello world");
    size_t n;
    const char *rest = http_reader_rest(&r, &n);
    CHECK_SPAN(rest, n, "GET /next HTTP/1.1\r\n\r\n");
    http_reader_consume(&r);
    CHECK_INT(http_reader_feed(&r, NULL, 0, &q), 1);
    CHECK_SPAN(q.path, q.path_len, "/next");
    CHECK(q.body == NULL);
    http_reader_free(&r);
}

/* Tiny chunks must not make the buffer hold their framing. */
static void test_chunked_memory_bounded(void) {
    http_reader_t r;
    http_request_t q;
    http_reader_init(&r);
    const char *head = "POST /u HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
    CHECK_INT(http_reader_feed(&r, head, strlen(head), &q), 0);
    char block[6 * 1000];
    for (int i = 0; i < 1000; i++) memcpy(block + 6 * i, "1\r\nz\r\n", 6);
    for (int k = 0; k < 100; k++) CHECK_INT(http_reader_feed(&r, block, sizeof block, &q), 0);
    CHECK_INT(http_reader_feed(&r, "0\r\n\r\n", 5, &q), 1);
    CHECK_INT(q.body_len, 100000);
    CHECK(q.body[0] == 'z' && q.body[99999] == 'z');
    CHECK(r.cap <= 256 * 1024); /* 600000 raw bytes went through */
    http_reader_free(&r);
}

/* ---- reader: every way of cutting the same bytes -------------------------------------- */

static void check_all_splits(const char *s, size_t n) {
    char whole[4096], got[4096];
    CHECK_INT(parse_whole(s, n, whole, sizeof whole), 1);
    /* two feeds, cut at every byte position */
    for (size_t cut = 0; cut <= n; cut++) {
        http_reader_t r;
        http_request_t q;
        http_reader_init(&r);
        int rc1 = http_reader_feed(&r, s, cut, &q);
        int rc2 = http_reader_feed(&r, s + cut, n - cut, &q);
        if (cut < n) CHECK_INT(rc1, 0);
        CHECK_INT(rc2, 1);
        req_dump(&q, got, sizeof got);
        http_reader_free(&r);
        if (strcmp(got, whole) != 0) fprintf(stderr, "  cut at %zu\n", cut);
        CHECK_STR(got, whole);
    }
    /* one byte at a time */
    http_reader_t r;
    http_request_t q;
    http_reader_init(&r);
    for (size_t i = 0; i + 1 < n; i++) CHECK_INT(http_reader_feed(&r, s + i, 1, &q), 0);
    CHECK_INT(http_reader_feed(&r, s + n - 1, 1, &q), 1);
    req_dump(&q, got, sizeof got);
    http_reader_free(&r);
    CHECK_STR(got, whole);
}

static void test_splits_get(void) {
    const char s[] = "GET /ws/chat/general?token=abc%20def&since=42 HTTP/1.1\r\n"
                     "Host: localhost:8000\r\n"
                     "Connection: keep-alive, Upgrade\r\n"
                     "Upgrade: websocket\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     "Sec-WebSocket-Version: 13\r\n"
                     "X-Spaces:    padded value   \r\n"
                     "\r\n";
    char d[2048];
    CHECK_INT(parse_whole(s, strlen(s), d, sizeof d), 1);
    CHECK_STR(d, "GET /ws/chat/general ?token=abc%20def&since=42 HTTP/1.1 ka=1 up=1\n"
                 "[Host]=[localhost:8000]\n"
                 "[Connection]=[keep-alive, Upgrade]\n"
                 "[Upgrade]=[websocket]\n"
                 "[Sec-WebSocket-Key]=[dGhlIHNhbXBsZSBub25jZQ==]\n"
                 "[Sec-WebSocket-Version]=[13]\n"
                 "[X-Spaces]=[padded value]\n"
                 "nobody len=0");
    check_all_splits(s, strlen(s));
}

static void test_splits_post(void) {
    char d[2048];
    CHECK_INT(parse_whole(post_req, strlen(post_req), d, sizeof d), 1);
    CHECK_STR(d, "POST /api/chats/general/messages ?x=1 HTTP/1.1 ka=1 up=0\n"
                 "[Host]=[chat.example]\n"
                 "[Content-Type]=[application/json]\n"
                 "[X-Empty]=[]\n"
                 "[Content-Length]=[17]\n"
                 "body=[{\"message\":\"hi\"}\n]");
    check_all_splits(post_req, strlen(post_req));
}

static void test_splits_chunked(void) { check_all_splits(chunked_req, strlen(chunked_req)); }

/* ---- reader: pipelining and upgrade --------------------------------------------------- */

static void test_pipelined(void) {
    const char s[] = "GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
                     "POST /b?c=d HTTP/1.1\r\nHost: y\r\nContent-Length: 3\r\n\r\nxyz"
                     "GET /c HTT";
    http_reader_t r;
    http_request_t q;
    http_reader_init(&r);
    CHECK_INT(http_reader_feed(&r, s, strlen(s), &q), 1);
    CHECK_SPAN(q.path, q.path_len, "/a");
    CHECK(q.query == NULL);
    CHECK_INT(q.n_headers, 1);
    CHECK_SPAN(q.headers[0].value, q.headers[0].value_len, "x");
    http_reader_consume(&r);
    CHECK_INT(http_reader_feed(&r, NULL, 0, &q), 1);
    CHECK_INT(q.method, HTTP_POST);
    CHECK_SPAN(q.path, q.path_len, "/b");
    CHECK_SPAN(q.query, q.query_len, "c=d");
    CHECK_SPAN(q.headers[0].value, q.headers[0].value_len, "y");
    CHECK_SPAN(q.body, q.body_len, "xyz");
    http_reader_consume(&r);
    CHECK_INT(http_reader_feed(&r, NULL, 0, &q), 0); /* third one is partial */
    CHECK_INT(http_reader_feed(&r, "P/1.0\r\n\r\n", 9, &q), 1);
    CHECK_SPAN(q.path, q.path_len, "/c");
    CHECK_INT(q.http_minor, 0);
    CHECK(!q.keep_alive);
    http_reader_consume(&r);
    CHECK_INT(r.len, 0);
    CHECK_INT(http_reader_feed(&r, NULL, 0, &q), 0);
    /* the reader is reusable after all that */
    CHECK_INT(http_reader_feed(&r, "GET /d HTTP/1.1\r\n\r\n", 19, &q), 1);
    CHECK_SPAN(q.path, q.path_len, "/d");
    http_reader_free(&r);
}

/* More bytes fed while a request waits are appended, and pointers refreshed. */
static void test_feed_while_complete(void) {
    http_reader_t r;
    http_request_t q;
    http_reader_init(&r);
    CHECK_INT(http_reader_feed(&r, "GET /a HTTP/1.1\r\n\r\n", 19, &q), 1);
    char big[5000];
    memset(big, 'x', sizeof big);
    memcpy(big, "GET /b HTTP/1.1\r\nX-Pad: ", 24);
    memcpy(big + sizeof big - 4, "\r\n\r\n", 4);
    CHECK_INT(http_reader_feed(&r, big, sizeof big, &q), 1); /* the buffer grew */
    CHECK_SPAN(q.path, q.path_len, "/a");
    CHECK(q.path >= r.buf && q.path < r.buf + r.len);
    size_t n;
    http_reader_rest(&r, &n);
    CHECK_INT(n, sizeof big);
    http_reader_consume(&r);
    CHECK_INT(http_reader_feed(&r, NULL, 0, &q), 1);
    CHECK_SPAN(q.path, q.path_len, "/b");
    CHECK_INT(http_header(&q, "x-pad", &n) != NULL, 1);
    CHECK_INT(n, sizeof big - 28);
    http_reader_free(&r);

    /* running ahead by more than a request's worth is refused */
    http_reader_init(&r);
    r.max_header_bytes = 1024;
    r.max_body_bytes = 1024;
    CHECK_INT(http_reader_feed(&r, "GET /a HTTP/1.1\r\n\r\n", 19, &q), 1);
    char flood[64 * 1024];
    memset(flood, 'G', sizeof flood);
    CHECK_INT(http_reader_feed(&r, flood, 2048, &q), 1);
    CHECK_INT(http_reader_feed(&r, flood, sizeof flood, &q), 1); /* 1024 + 1024 + a read */
    CHECK_INT(http_reader_feed(&r, flood, 1, &q), CHAT_ETOOBIG);
    CHECK_INT(r.error_status, 413);
    http_reader_free(&r);
}

static void test_upgrade(void) {
    const char head[] = "GET /ws/chat/general?token=abc HTTP/1.1\r\n"
                        "Host: localhost:8000\r\n"
                        "Upgrade: websocket\r\n"
                        "Connection: keep-alive, Upgrade\r\n"
                        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        "Sec-WebSocket-Version: 13\r\n"
                        "\r\n";
    const char ws[] = "\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"; /* a masked "Hello" */
    char s[512];
    size_t hl = strlen(head), wl = sizeof ws - 1;
    memcpy(s, head, hl);
    memcpy(s + hl, ws, wl);
    http_reader_t r;
    http_request_t q;
    http_reader_init(&r);
    CHECK_INT(http_reader_feed(&r, s, hl + wl, &q), 1);
    CHECK(q.upgrade);
    CHECK(q.keep_alive);
    CHECK(q.body == NULL);
    CHECK_INT(q.body_len, 0);
    CHECK(http_header_has_token(&q, "connection", "upgrade"));
    CHECK(http_header_has_token(&q, "Connection", "KEEP-ALIVE"));
    CHECK(http_header_has_token(&q, "upgrade", "websocket"));
    CHECK(!http_header_has_token(&q, "connection", "close"));
    char tok[16];
    CHECK_INT(http_query_param(&q, "token", tok, sizeof tok), 3);
    CHECK_STR(tok, "abc");
    size_t n;
    const char *rest = http_reader_rest(&r, &n);
    CHECK_INT(n, wl);
    CHECK_MEM(rest, ws, wl);
    /* bytes fed after the upgrade head are kept for the new protocol as well */
    CHECK_INT(http_reader_feed(&r, "\x88\x80", 2, &q), 1);
    rest = http_reader_rest(&r, &n);
    CHECK_INT(n, wl + 2);
    CHECK_MEM(rest + wl, "\x88\x80", 2);
    http_reader_free(&r);

    /* the upgrade arriving a byte at a time completes on the head's last byte */
    http_reader_init(&r);
    for (size_t i = 0; i + 1 < hl; i++) CHECK_INT(http_reader_feed(&r, head + i, 1, &q), 0);
    CHECK_INT(http_reader_feed(&r, head + hl - 1, 1, &q), 1);
    CHECK(q.upgrade);
    http_reader_rest(&r, &n);
    CHECK_INT(n, 0);
    http_reader_free(&r);

    /* Upgrade header without Connection: upgrade is no upgrade */
    char d[512];
    const char *t = "GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n";
    CHECK_INT(parse_whole(t, strlen(t), d, sizeof d), 1);
    CHECK_STR(d, "GET / HTTP/1.1 ka=1 up=0\n[Upgrade]=[websocket]\nnobody len=0");
}

static void test_keep_alive(void) {
    static const struct {
        const char *req;
        bool keep_alive;
    } cases[] = {
        {"GET / HTTP/1.0\r\n\r\n", false},
        {"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", true},
        {"GET / HTTP/1.1\r\n\r\n", true},
        {"GET / HTTP/1.1\r\nConnection: close\r\n\r\n", false},
        {"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n", false},
        {"GET / HTTP/1.1\r\nConnection: keep-alive\r\n\r\n", true},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        http_reader_t r;
        http_request_t q;
        http_reader_init(&r);
        int rc = http_reader_feed(&r, cases[i].req, strlen(cases[i].req), &q);
        bool ka = q.keep_alive;
        http_reader_free(&r);
        CHECK_INT(rc, 1);
        if (ka != cases[i].keep_alive) fprintf(stderr, "  case %zu\n", i);
        CHECK_INT(ka, cases[i].keep_alive);
    }
}

/* ---- reader: limits and errors -------------------------------------------------------- */

/* A request whose head is exactly n bytes long (n >= 40). */
static char *head_of_size(size_t n) {
    char *s = malloc(n + 1);
    const char *pre = "GET / HTTP/1.1\r\nX-Pad: ";
    size_t pl = strlen(pre);
    memcpy(s, pre, pl);
    memset(s + pl, 'a', n - pl - 4);
    memcpy(s + n - 4, "\r\n\r\n", 4);
    s[n] = 0;
    return s;
}

static void test_head_limit(void) {
    http_reader_t r;
    http_request_t q;
    char *s = head_of_size(16384);
    http_reader_init(&r);
    CHECK_INT(http_reader_feed(&r, s, 16384, &q), 1); /* exactly the limit is fine */
    http_reader_free(&r);
    free(s);

    s = head_of_size(16385);
    http_reader_init(&r);
    CHECK_INT(http_reader_feed(&r, s, 16385, &q), CHAT_ETOOBIG);
    CHECK_INT(r.error_status, 431);
    free(s);
    /* a failed reader keeps failing the same way */
    CHECK_INT(http_reader_feed(&r, "GET / HTTP/1.1\r\n\r\n", 18, &q), CHAT_ETOOBIG);
    CHECK_INT(r.error_status, 431);
    http_reader_free(&r);

    /* an endless header is refused once the limit is buffered, without growing more */
    http_reader_init(&r);
    r.max_header_bytes = 4096;
    CHECK_INT(http_reader_feed(&r, "GET / HTTP/1.1\r\nX-Long: ", 24, &q), 0);
    char chunk[1000];
    memset(chunk, 'b', sizeof chunk);
    int rc = 0, feeds = 0;
    while (rc == 0 && feeds < 100) {
        rc = http_reader_feed(&r, chunk, sizeof chunk, &q);
        feeds++;
        CHECK(r.cap <= 8192);
    }
    CHECK_INT(rc, CHAT_ETOOBIG);
    CHECK_INT(r.error_status, 431);
    CHECK_INT(feeds, 5); /* 24 + 4 * 1000 < 4096 <= 24 + 5 * 1000 */
    http_reader_free(&r);

    /* the same limit applies to a request that follows a consumed one */
    http_reader_init(&r);
    r.max_header_bytes = 100;
    s = head_of_size(101);
    char two[256];
    memcpy(two, "GET /a HTTP/1.1\r\n\r\n", 19);
    memcpy(two + 19, s, 101);
    free(s);
    CHECK_INT(http_reader_feed(&r, two, 120, &q), 1);
    http_reader_consume(&r);
    CHECK_INT(http_reader_feed(&r, NULL, 0, &q), CHAT_ETOOBIG);
    CHECK_INT(r.error_status, 431);
    http_reader_free(&r);
}

static void test_too_many_headers(void) {
    char s[8192];
    for (int extra = 0; extra <= 1; extra++) {
        size_t o = (size_t)snprintf(s, sizeof s, "GET / HTTP/1.1\r\n");
        for (int i = 0; i < HTTP_MAX_HEADERS + extra; i++)
            o += (size_t)snprintf(s + o, sizeof s - o, "H%d: v%d\r\n", i, i);
        o += (size_t)snprintf(s + o, sizeof s - o, "\r\n");
        http_reader_t r;
        http_request_t q;
        http_reader_init(&r);
        int rc = http_reader_feed(&r, s, o, &q);
        if (extra == 0) {
            CHECK_INT(rc, 1);
            CHECK_INT(q.n_headers, HTTP_MAX_HEADERS);
            CHECK_SPAN(q.headers[63].name, q.headers[63].name_len, "H63");
            CHECK_SPAN(q.headers[63].value, q.headers[63].value_len, "v63");
        } else {
            CHECK_INT(rc, CHAT_ETOOBIG);
            CHECK_INT(r.error_status, 431);
        }
        http_reader_free(&r);
    }
}

static void test_body_limit(void) {
    http_reader_t r;
    http_request_t q;
    /* refused from Content-Length alone, before any body byte */
    http_reader_init(&r);
    const char *s = "POST / HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n";
    CHECK_INT(http_reader_feed(&r, s, strlen(s), &q), CHAT_ETOOBIG);
    CHECK_INT(r.error_status, 413);
    http_reader_free(&r);

    /* exactly the limit, handed over in one big feed */
    size_t max = 1024 * 1024;
    const char *h = "POST / HTTP/1.1\r\nContent-Length: 1048576\r\n\r\n";
    size_t hl = strlen(h);
    char *big = malloc(hl + max + 1);
    memcpy(big, h, hl);
    for (size_t i = 0; i < max; i++) big[hl + i] = (char)('a' + i % 26);
    http_reader_init(&r);
    int rc = http_reader_feed(&r, big, hl + max, &q);
    bool same = rc == 1 && q.body_len == max && memcmp(q.body, big + hl, max) == 0;
    http_reader_consume(&r);
    size_t cap_after = r.cap;
    http_reader_free(&r);
    free(big);
    CHECK_INT(rc, 1);
    CHECK(same);
    CHECK(cap_after <= 64 * 1024); /* the big buffer was given back */

    /* chunked: a chunk announcing too much is refused before its data */
    http_reader_init(&r);
    r.max_body_bytes = 10;
    s = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n";
    CHECK_INT(http_reader_feed(&r, s, strlen(s), &q), CHAT_ETOOBIG);
    CHECK_INT(r.error_status, 413);
    http_reader_free(&r);
    /* and exactly the limit in chunks is fine */
    http_reader_init(&r);
    r.max_body_bytes = 10;
    s = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5\r\nhello\r\n5\r\nworld\r\n0\r\n\r\n";
    CHECK_INT(http_reader_feed(&r, s, strlen(s), &q), 1);
    CHECK_SPAN(q.body, q.body_len, "helloworld");
    http_reader_free(&r);
    /* a zero limit forbids any body but not a request */
    http_reader_init(&r);
    r.max_body_bytes = 0;
    CHECK_INT(http_reader_feed(&r, "GET / HTTP/1.1\r\n\r\n", 18, &q), 1);
    http_reader_consume(&r);
    s = "POST / HTTP/1.1\r\nContent-Length: 1\r\n\r\n";
    CHECK_INT(http_reader_feed(&r, s, strlen(s), &q), CHAT_ETOOBIG);
    http_reader_free(&r);
}

static void check_bad(const char *s, int want_rc, int want_status) {
    http_reader_t r;
    http_request_t q;
    http_reader_init(&r);
    int rc = http_reader_feed(&r, s, strlen(s), &q);
    int st = r.error_status;
    int rc2 = http_reader_feed(&r, "GET / HTTP/1.1\r\n\r\n", 18, &q);
    http_reader_free(&r);
    if (rc != want_rc) fprintf(stderr, "  request: %s\n", s);
    CHECK_INT(rc, want_rc);
    CHECK_INT(st, want_status);
    CHECK_INT(rc2, want_rc);
}

static void test_bad_requests(void) {
    static const char *bad[] = {
        "HELLO\r\n\r\n",
        "GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        "GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        "GET / HTTP/1.1\r\nFolded: a\r\n b\r\n\r\n",
        "GET / HTTP/1.1\r\nBad Name: a\r\n\r\n",
        "GET / HTTP/1.1\r\nName : a\r\n\r\n",
        "GET / HTTP/1.1\r\n: a\r\n\r\n",
        "GET / HTTP/1.1\r\nX: a\rb\r\n\r\n",
        "GET /a b HTTP/1.1\r\n\r\n",
        "GET / HTTP/9.9x\r\n\r\n",
        "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", /* a TLS ClientHello */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        check_bad(bad[i], CHAT_EINVAL, 400);
        if (test_cur_failed_) return;
    }
}

/* ---- lookups -------------------------------------------------------------------------- */

static void test_header_tokens(void) {
    http_request_t q;
    memset(&q, 0, sizeof q);
    static const char *hv[][2] = {
        {"Connection", "keep-alive"},
        {"Accept", "text/html"},
        {"connection", " ,  , Upgrade ,x-y\t"},
        {"Upgrade", "websocketx, h2c"},
    };
    for (size_t i = 0; i < 4; i++) {
        q.headers[i].name = hv[i][0];
        q.headers[i].name_len = strlen(hv[i][0]);
        q.headers[i].value = hv[i][1];
        q.headers[i].value_len = strlen(hv[i][1]);
    }
    q.n_headers = 4;
    size_t n;
    const char *v = http_header(&q, "CONNECTION", &n);
    CHECK_SPAN(v, n, "keep-alive");                            /* the first one */
    CHECK(http_header_has_token(&q, "Connection", "upgrade")); /* the second one */
    CHECK(http_header_has_token(&q, "connection", "Keep-Alive"));
    CHECK(http_header_has_token(&q, "connection", "X-Y"));
    CHECK(!http_header_has_token(&q, "connection", ""));
    CHECK(!http_header_has_token(&q, "connection", "keep"));
    CHECK(!http_header_has_token(&q, "upgrade", "websocket"));
    CHECK(http_header_has_token(&q, "upgrade", "H2C"));
    CHECK(!http_header_has_token(&q, "accept", "text"));
    CHECK(!http_header_has_token(&q, "missing", "x"));
}

static http_request_t query_req(const char *query) {
    http_request_t q;
    memset(&q, 0, sizeof q);
    q.query = query;
    q.query_len = query ? strlen(query) : 0;
    return q;
}

static void test_query_param(void) {
    http_request_t q = query_req("token=a%20b+c%2B&empty=&flag&x=%zz&y=%4&z=%&nul=a%00b"
                                 "&long=abcdef&%74ok%65n2=v&dup=1&dup=2&bad%zzname=1&&=anon"
                                 "&utf=%C3%A9");
    char out[16];
    CHECK_INT(http_query_param(&q, "token", out, sizeof out), 6);
    CHECK_STR(out, "a b c+");
    CHECK_INT(http_query_param(&q, "empty", out, sizeof out), 0);
    CHECK_STR(out, "");
    CHECK_INT(http_query_param(&q, "flag", out, sizeof out), 0);
    CHECK_STR(out, "");
    CHECK_INT(http_query_param(&q, "x", out, sizeof out), CHAT_EINVAL);
    CHECK_STR(out, "");
    CHECK_INT(http_query_param(&q, "y", out, sizeof out), CHAT_EINVAL);
    CHECK_INT(http_query_param(&q, "z", out, sizeof out), CHAT_EINVAL);
    CHECK_INT(http_query_param(&q, "nul", out, sizeof out), CHAT_EINVAL);
    CHECK_INT(http_query_param(&q, "long", out, 6), CHAT_ETOOBIG);
    CHECK_INT(http_query_param(&q, "long", out, 7), 6);
    CHECK_STR(out, "abcdef");
    CHECK_INT(http_query_param(&q, "token2", out, sizeof out), 1); /* name decoded too */
    CHECK_STR(out, "v");
    CHECK_INT(http_query_param(&q, "dup", out, sizeof out), 1);
    CHECK_STR(out, "1");
    CHECK_INT(http_query_param(&q, "Token", out, sizeof out), CHAT_ENOTFOUND);
    CHECK_INT(http_query_param(&q, "tok", out, sizeof out), CHAT_ENOTFOUND);
    CHECK_INT(http_query_param(&q, "badname", out, sizeof out), CHAT_ENOTFOUND);
    CHECK_INT(http_query_param(&q, "", out, sizeof out), 4);
    CHECK_STR(out, "anon");
    CHECK_INT(http_query_param(&q, "utf", out, sizeof out), 2);
    CHECK_STR(out, "\xc3\xa9");

    q = query_req(NULL);
    CHECK_INT(http_query_param(&q, "token", out, sizeof out), CHAT_ENOTFOUND);
    q = query_req("");
    CHECK_INT(http_query_param(&q, "token", out, sizeof out), CHAT_ENOTFOUND);
    q = query_req("a+b=1");
    CHECK_INT(http_query_param(&q, "a b", out, sizeof out), 1);
    q = query_req("token=abc");
    CHECK_INT(http_query_param(&q, "token", out, 0), CHAT_ETOOBIG);
    CHECK_INT(http_query_param(&q, "token", out, 3), CHAT_ETOOBIG);
    CHECK_STR(out, "");
}

static void test_pct_decode(void) {
    char out[16];
    CHECK_INT(http_pct_decode("%41%62c+d", 9, out, sizeof out, false), 5);
    CHECK_STR(out, "Abc+d");
    CHECK_INT(http_pct_decode("%41%62c+d", 9, out, sizeof out, true), 5);
    CHECK_STR(out, "Abc d");
    CHECK_INT(http_pct_decode("%2f%2F", 6, out, sizeof out, false), 2);
    CHECK_STR(out, "//");
    CHECK_INT(http_pct_decode("", 0, out, sizeof out, false), 0);
    CHECK_STR(out, "");
    CHECK_INT(http_pct_decode("abc", 2, out, sizeof out, false), 2); /* n, not strlen */
    CHECK_STR(out, "ab");
    CHECK_INT(http_pct_decode("%", 1, out, sizeof out, false), CHAT_EINVAL);
    CHECK_INT(http_pct_decode("%4", 2, out, sizeof out, false), CHAT_EINVAL);
    CHECK_INT(http_pct_decode("%41", 2, out, sizeof out, false), CHAT_EINVAL);
    CHECK_INT(http_pct_decode("%4g", 3, out, sizeof out, false), CHAT_EINVAL);
    CHECK_INT(http_pct_decode("%g4", 3, out, sizeof out, false), CHAT_EINVAL);
    CHECK_INT(http_pct_decode("a%00", 4, out, sizeof out, false), CHAT_EINVAL);
    CHECK_INT(http_pct_decode("abc", 3, out, 3, false), CHAT_ETOOBIG);
    CHECK_INT(http_pct_decode("abc", 3, out, 4, false), 3);
    CHECK_INT(http_pct_decode("%41%41%41", 9, out, 4, false), 3); /* decoded size counts */
    CHECK_INT(http_pct_decode("", 0, NULL, 0, false), CHAT_ETOOBIG);
    /* a bad escape is reported as such even past the room available */
    CHECK_INT(http_pct_decode("abcdef%zz", 9, out, 3, false), CHAT_EINVAL);
}

/* ---- responses ------------------------------------------------------------------------ */

static bool buf_is(const buf_t *b, const char *want) {
    return b && b->len == strlen(want) && memcmp(b->data, want, b->len) == 0;
}

static void test_response_bytes(void) {
    buf_t *b = http_response_new(200, "text/plain; charset=utf-8", "hello", 5, true,
                                 "X-Request-Id: 42\r\nCache-Control: no-store\r\n");
    bool ok = buf_is(b, "HTTP/1.1 200 OK\r\n"
                        "Content-Type: text/plain; charset=utf-8\r\n"
                        "Content-Length: 5\r\n"
                        "Connection: keep-alive\r\n"
                        "X-Request-Id: 42\r\n"
                        "Cache-Control: no-store\r\n"
                        "\r\n"
                        "hello");
    bool exact = b && b->cap == b->len && b->refs == 1; /* one allocation of the right size */
    buf_unref(b);
    CHECK(ok);
    CHECK(exact);

    b = http_response_new(204, NULL, NULL, 0, false, NULL);
    ok = buf_is(b, "HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
    buf_unref(b);
    CHECK(ok);

    b = http_response_new(101, NULL, NULL, 0, true, "Upgrade: websocket\r\n");
    ok = buf_is(b, "HTTP/1.1 101 Switching Protocols\r\nContent-Length: 0\r\n"
                   "Connection: keep-alive\r\nUpgrade: websocket\r\n\r\n");
    buf_unref(b);
    CHECK(ok);

    /* a body with NUL bytes goes out whole */
    b = http_response_new(200, "application/octet-stream", "a\0b", 3, true, NULL);
    CHECK(b != NULL);
    ok = b->len >= 3 && memcmp(b->data + b->len - 3, "a\0b", 3) == 0;
    buf_unref(b);
    CHECK(ok);

    CHECK(http_response_new(20, NULL, NULL, 0, true, NULL) == NULL);
    CHECK(http_response_new(200, NULL, NULL, 3, true, NULL) == NULL);
}

static void test_status_text(void) {
    static const int codes[] = {101, 200, 201, 204, 301, 302, 304, 400, 401, 403, 404, 405,
                                408, 409, 413, 414, 415, 426, 429, 431, 500, 501, 503};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        CHECK(strcmp(http_status_text(codes[i]), "Unknown") != 0);
    CHECK_STR(http_status_text(200), "OK");
    CHECK_STR(http_status_text(101), "Switching Protocols");
    CHECK_STR(http_status_text(404), "Not Found");
    CHECK_STR(http_status_text(413), "Payload Too Large");
    CHECK_STR(http_status_text(426), "Upgrade Required");
    CHECK_STR(http_status_text(431), "Request Header Fields Too Large");
    CHECK_STR(http_status_text(503), "Service Unavailable");
    CHECK_STR(http_status_text(299), "Unknown");
    CHECK_STR(http_status_text(-1), "Unknown");
}

static void test_error_json(void) {
    buf_t *b = http_error_new(400, "bad_request", "chat_id \"a\\b\"\nnot\x01ok", false);
    const char *body = "{\"error\":\"bad_request\","
                       "\"detail\":\"chat_id \\\"a\\\\b\\\"\\nnot\\u0001ok\"}";
    char want[512];
    snprintf(want, sizeof want,
             "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
             "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
             strlen(body), body);
    bool ok = buf_is(b, want);
    bool exact = b && b->cap == b->len;
    buf_unref(b);
    CHECK(ok);
    CHECK(exact);

    /* UTF-8 passes, invalid bytes become U+FFFD, a NULL detail is empty */
    b = http_error_new(404, "not_found", "caf\xc3\xa9 \xff \xed\xa0\x80 \xe2\x82", true);
    body = "{\"error\":\"not_found\","
           "\"detail\":\"caf\xc3\xa9 \\ufffd \\ufffd\\ufffd\\ufffd \\ufffd\\ufffd\"}";
    snprintf(want, sizeof want,
             "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n"
             "Content-Length: %zu\r\nConnection: keep-alive\r\n\r\n%s",
             strlen(body), body);
    ok = buf_is(b, want);
    buf_unref(b);
    CHECK(ok);

    b = http_error_new(500, "internal", NULL, false);
    body = "{\"error\":\"internal\",\"detail\":\"\"}";
    ok = b && b->len > strlen(body) &&
         memcmp(b->data + b->len - strlen(body), body, strlen(body)) == 0;
    buf_unref(b);
    CHECK(ok);
}

int main(void) {
    RUN(test_get_with_query);
    RUN(test_expect_continue);
    RUN(test_target_forms);
    RUN(test_post_body_in_pieces);
    RUN(test_chunked_body);
    RUN(test_chunked_memory_bounded);
    RUN(test_splits_get);
    RUN(test_splits_post);
    RUN(test_splits_chunked);
    RUN(test_pipelined);
    RUN(test_feed_while_complete);
    RUN(test_upgrade);
    RUN(test_keep_alive);
    RUN(test_head_limit);
    RUN(test_too_many_headers);
    RUN(test_body_limit);
    RUN(test_bad_requests);
    RUN(test_header_tokens);
    RUN(test_query_param);
    RUN(test_pct_decode);
    RUN(test_response_bytes);
    RUN(test_status_text);
    RUN(test_error_json);
    return test_summary("test_http");
}
