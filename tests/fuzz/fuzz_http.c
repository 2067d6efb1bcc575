/* fuzz_http: the HTTP request reader and the lookups done on what it returns.
 *
 * The first input byte picks how the rest is cut into feeds ('0'..'7': 1, 2, 3, 7, 16,
 * 61, 256 bytes, or all at once), as the network would cut it. Every complete request
 * is walked byte by byte (so ASan sees any pointer out of the buffer), looked up the way
 * the server does, and consumed; an upgrade ends the input, the rest being WebSocket.
 * Invariants that must hold for any input abort on violation.
 */
#include "http/http.h"

#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEAD 2048
#define MAX_BODY 4096

static unsigned sum(const char *p, size_t n) {
    unsigned s = 0;
    for (size_t i = 0; i < n; i++) s = s * 31 + (unsigned char)p[i];
    return s;
}

static void require(bool ok) {
    if (!ok) abort();
}

static bool inside(const http_reader_t *r, const char *p, size_t n) {
    return p >= r->buf && n <= r->len && p - r->buf <= (ptrdiff_t)(r->len - n);
}

/* The JSON error body built from client bytes must parse as JSON. */
static void check_error_json(const char *detail) {
    buf_t *b = http_error_new(400, "bad_request", detail, false);
    require(b != NULL);
    const uint8_t *body = memmem(b->data, b->len, "\r\n\r\n", 4);
    require(body != NULL);
    body += 4;
    json_error_t err;
    json_t *j = json_loadb((const char *)body, b->len - (size_t)(body - b->data), 0, &err);
    require(j != NULL && json_is_object(j));
    json_decref(j);
    buf_unref(b);
}

static unsigned check_request(const http_reader_t *r, const http_request_t *q) {
    unsigned s = 0;
    require(q->path != NULL);
    require(inside(r, q->path, q->path_len) || (q->path_len == 1 && q->path[0] == '/'));
    s += sum(q->path, q->path_len);
    if (q->query) {
        require(inside(r, q->query, q->query_len));
        s += sum(q->query, q->query_len);
    }
    require(q->n_headers <= HTTP_MAX_HEADERS);
    for (size_t i = 0; i < q->n_headers; i++) {
        const http_header_t *h = &q->headers[i];
        require(inside(r, h->name, h->name_len) && inside(r, h->value, h->value_len));
        s += sum(h->name, h->name_len) + sum(h->value, h->value_len);
        /* looking a header up by its own name finds one of that name */
        char name[64];
        if (h->name_len < sizeof name) {
            memcpy(name, h->name, h->name_len);
            name[h->name_len] = 0;
            size_t vlen;
            const char *v = http_header(q, name, &vlen);
            require(v != NULL && inside(r, v, vlen));
            s += http_header_has_token(q, name, "upgrade");
        }
    }
    require(q->body_len <= MAX_BODY);
    require((q->body == NULL) == (q->body_len == 0));
    if (q->body) {
        require(inside(r, q->body, q->body_len));
        s += sum(q->body, q->body_len);
    }
    size_t n;
    const char *v = http_header(q, "Host", &n);
    if (v) s += sum(v, n);
    s += http_header_has_token(q, "Connection", "upgrade");
    s += http_header_has_token(q, "Connection", "close");

    char out[64];
    static const char *params[] = {"token", "since", "before", "limit", "q", ""};
    for (size_t i = 0; i < sizeof params / sizeof params[0]; i++) {
        int rc = http_query_param(q, params[i], out, sizeof out);
        require(rc == CHAT_ENOTFOUND || rc == CHAT_EINVAL || rc == CHAT_ETOOBIG ||
                (rc >= 0 && (size_t)rc < sizeof out && strlen(out) == (size_t)rc));
        rc = http_query_param(q, params[i], out, 4);
        require(rc < 4);
    }
    char path[MAX_HEAD + 1];
    int rc = http_pct_decode(q->path, q->path_len, path, sizeof path, false);
    require(rc == CHAT_EINVAL || (rc >= 0 && strlen(path) == (size_t)rc));
    if (rc >= 0) check_error_json(path);
    return s;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const size_t steps[8] = {1, 2, 3, 7, 16, 61, 256, SIZE_MAX};
    if (size == 0) return 0;
    size_t step = steps[data[0] % 8];
    const char *in = (const char *)data + 1;
    size--;

    http_reader_t r;
    http_request_t q;
    http_reader_init(&r);
    r.max_header_bytes = MAX_HEAD;
    r.max_body_bytes = MAX_BODY;
    volatile unsigned sink = 0;
    size_t off = 0;
    for (;;) {
        size_t n = size - off < step ? size - off : step;
        int rc = http_reader_feed(&r, in + off, n, &q);
        off += n;
        while (rc == 1) {
            sink += check_request(&r, &q);
            size_t rest_len;
            const char *rest = http_reader_rest(&r, &rest_len);
            require(rest_len == 0 || inside(&r, rest, rest_len));
            sink += sum(rest, rest_len);
            if (q.upgrade) goto done;
            http_reader_consume(&r);
            rc = http_reader_feed(&r, NULL, 0, &q);
        }
        if (rc < 0) {
            require(r.error_status == 400 || r.error_status == 413 || r.error_status == 431);
            require(rc == (r.error_status == 400 ? CHAT_EINVAL : CHAT_ETOOBIG));
            require(http_reader_feed(&r, "GET / HTTP/1.1\r\n\r\n", 18, &q) == rc);
            break;
        }
        if (rc == 0) { /* an interim 100 is only ever the fixed line, and only once */
            size_t cl = 0;
            const char *c = http_reader_continue(&r, &cl);
            require(!c || (cl == 25 && memcmp(c, "HTTP/1.1 100 Continue\r\n\r\n", 25) == 0));
            require(!c || http_reader_continue(&r, &cl) == NULL);
        }
        /* memory follows the limits, whatever was sent */
        require(r.len <= 2 * (MAX_HEAD + MAX_BODY) + 64 * 1024 + 256);
        if (off == size) break;
    }
done:
    http_reader_free(&r);
    (void)sink;
    return 0;
}
