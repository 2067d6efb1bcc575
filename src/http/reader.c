/* http reader: HTTP/1.1 requests parsed incrementally by http-parser into one buffer, plus
 * the lookups a handler does on a parsed request (headers, query parameters).
 *
 * The one idea: the parser callbacks record OFFSETS into r->buf, never pointers, because
 * the buffer is realloc'd as bytes trickle in. Pointers are made only once a request is
 * complete, and the parser is paused right there, so nothing moves until consume.
 * Memory follows the limits, not the client: the head is parsed at most max_header_bytes
 * at a time, chunk framing is squeezed out of the buffer as soon as it is parsed, and
 * bytes fed beyond a complete request are bounded.
 */
#include "http.h"

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define READER_MIN_CAP 1024
/* Bytes copied in per parsing step: a caller handing over megabytes at once still has the
 * request refused after one step when it is over a limit, without copying it all. */
#define READER_STEP (64 * 1024)
/* An idle reader bigger than this gives memory back, so a keep-alive connection that
 * once posted a large body does not hold that buffer for its whole life. */
#define READER_KEEP_CAP (64 * 1024)

/* ---- buffer --------------------------------------------------------------------------- */

static int reader_append(http_reader_t *r, const char *data, size_t n) {
    if (n == 0) return 0;
    if (n > SIZE_MAX / 2 - r->len) return CHAT_ENOMEM;
    size_t need = r->len + n;
    if (need > r->cap) {
        size_t cap = r->cap ? r->cap : READER_MIN_CAP;
        while (cap < need) cap *= 2;
        char *nb = realloc(r->buf, cap);
        if (!nb) return CHAT_ENOMEM;
        r->buf = nb;
        r->cap = cap;
    }
    memcpy(r->buf + r->len, data, n);
    r->len = need;
    return 0;
}

static int reader_status_error(int status) {
    switch (status) {
    case 400: return CHAT_EINVAL;
    case 500: return CHAT_ENOMEM;
    default: return CHAT_ETOOBIG;
    }
}

/* The connection is done for: keep only the status, and drop the bytes now rather than
 * when the caller gets round to freeing the reader. */
static int reader_fail(http_reader_t *r, int status) {
    r->failed = true;
    r->error_status = status;
    r->complete = false;
    free(r->buf);
    r->buf = NULL;
    r->len = r->cap = r->parsed = r->req_end = 0;
    return reader_status_error(status);
}

/* ---- parser callbacks ------------------------------------------------------------------ */

/* A callback refusing the request: the status is kept in error_status and http-parser
 * reports HPE_CB_*, which the parse loop turns into this status. */
static int cb_refuse(http_reader_t *r, int status) {
    r->error_status = status;
    return -1;
}

static int on_url(http_parser *p, const char *at, size_t n) {
    http_reader_t *r = p->data;
    size_t off = (size_t)(at - r->buf);
    if (r->url_len == 0) {
        r->url_off = off;
    } else if (off != r->url_off + r->url_len) {
        return cb_refuse(r, 400);
    }
    r->url_len += n;
    return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t n) {
    http_reader_t *r = p->data;
    if (r->headers_done) return 0; /* trailers of a chunked body: not kept */
    size_t off = (size_t)(at - r->buf);
    if (r->n_hdr > 0 && !r->in_value) {
        /* the rest of a name cut by the end of a feed */
        if (off != r->hdr[r->n_hdr - 1].name_off + r->hdr[r->n_hdr - 1].name_len)
            return cb_refuse(r, 400);
        r->hdr[r->n_hdr - 1].name_len += n;
        return 0;
    }
    if (r->n_hdr == HTTP_MAX_HEADERS) return cb_refuse(r, 431);
    r->hdr[r->n_hdr].name_off = off;
    r->hdr[r->n_hdr].name_len = n;
    r->hdr[r->n_hdr].value_off = off + n;
    r->hdr[r->n_hdr].value_len = 0;
    r->n_hdr++;
    r->in_value = false;
    return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t n) {
    http_reader_t *r = p->data;
    if (r->headers_done) return 0;
    if (r->n_hdr == 0) return cb_refuse(r, 400);
    size_t off = (size_t)(at - r->buf);
    if (!r->in_value || r->hdr[r->n_hdr - 1].value_len == 0) {
        r->hdr[r->n_hdr - 1].value_off = off;
        r->hdr[r->n_hdr - 1].value_len = n;
        r->in_value = true;
        return 0;
    }
    /* A piece that does not continue the value is an obsolete line fold ("A: b\r\n c").
     * Merging it would put CRLF inside a value; RFC 7230 lets a server answer 400. */
    if (off != r->hdr[r->n_hdr - 1].value_off + r->hdr[r->n_hdr - 1].value_len)
        return cb_refuse(r, 400);
    r->hdr[r->n_hdr - 1].value_len += n;
    return 0;
}

/* Paused so that the parse loop learns exactly where the head ends (http-parser stops on
 * the final LF without consuming it) and can check Content-Length before any body. */
static int on_headers_complete(http_parser *p) {
    http_reader_t *r = p->data;
    r->headers_done = true;
    http_parser_pause(p, 1);
    return 0;
}

/* The announced chunk size is checked before its data arrives. */
static int on_chunk_header(http_parser *p) {
    http_reader_t *r = p->data;
    if (p->content_length > r->max_body_bytes - r->body_len) return cb_refuse(r, 413);
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t n) {
    http_reader_t *r = p->data;
    if (n > r->max_body_bytes - r->body_len) return cb_refuse(r, 413);
    /* Chunked data is moved down over the framing that preceded it, which the parser has
     * already passed, so the body ends up contiguous. Identity bodies never move. */
    char *dst = r->buf + r->body_off + r->body_len;
    if (dst != at) memmove(dst, at, n);
    r->body_len += n;
    return 0;
}

/* Paused so that pipelined bytes wait in the buffer until http_reader_consume. */
static int on_message_complete(http_parser *p) {
    http_reader_t *r = p->data;
    r->complete = true;
    http_parser_pause(p, 1);
    return 0;
}

/* ---- reader ---------------------------------------------------------------------------- */

static void reader_reset_request(http_reader_t *r) {
    r->parsed = 0;
    r->req_end = 0;
    r->complete = false;
    r->error_status = 0;
    r->url_off = r->url_len = 0;
    r->n_hdr = 0;
    r->in_value = false;
    r->body_off = r->body_len = 0;
    r->headers_done = false;
    r->head_len = 0;
    r->expect_continue = false;
    http_parser_init(&r->parser, HTTP_REQUEST);
    r->parser.data = r;
}

void http_reader_init(http_reader_t *r) {
    memset(r, 0, sizeof(*r));
    r->max_header_bytes = 16384;
    r->max_body_bytes = 1024 * 1024;
    http_parser_settings_init(&r->settings);
    r->settings.on_url = on_url;
    r->settings.on_header_field = on_header_field;
    r->settings.on_header_value = on_header_value;
    r->settings.on_headers_complete = on_headers_complete;
    r->settings.on_chunk_header = on_chunk_header;
    r->settings.on_body = on_body;
    r->settings.on_message_complete = on_message_complete;
    reader_reset_request(r);
}

void http_reader_free(http_reader_t *r) {
    free(r->buf);
    r->buf = NULL;
    r->len = r->cap = r->parsed = r->req_end = 0;
    r->complete = false;
}

/* tchar of RFC 7230 3.2.6. */
static bool is_tchar(unsigned char c) {
    if ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return true;
    return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL;
}

/* http-parser lets blanks into header names ("Bad Name: x", "Name : x"); RFC 7230 3.2.4
 * has a server answer 400 rather than guess what was meant. */
static bool names_are_tokens(const http_reader_t *r) {
    for (size_t i = 0; i < r->n_hdr; i++) {
        const char *name = r->buf + r->hdr[i].name_off;
        if (r->hdr[i].name_len == 0) return false;
        for (size_t j = 0; j < r->hdr[i].name_len; j++)
            if (!is_tchar((unsigned char)name[j])) return false;
    }
    return true;
}

static bool is_ows(char c) { return c == ' ' || c == '\t'; }

static bool ascii_ieq(const char *a, const char *b, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char x = (unsigned char)a[i], y = (unsigned char)b[i];
        if (x >= 'A' && x <= 'Z') x = (unsigned char)(x + 32);
        if (y >= 'A' && y <= 'Z') y = (unsigned char)(y + 32);
        if (x != y) return false;
    }
    return true;
}

static bool expects_continue(const http_reader_t *r) {
    for (size_t i = 0; i < r->n_hdr; i++) {
        const char *v = r->buf + r->hdr[i].value_off;
        size_t vlen = r->hdr[i].value_len;
        while (vlen > 0 && is_ows(v[vlen - 1])) vlen--; /* http-parser keeps trailing OWS */
        if (r->hdr[i].name_len == 6 && ascii_ieq(r->buf + r->hdr[i].name_off, "expect", 6) &&
            vlen == 12 && ascii_ieq(v, "100-continue", 12))
            return true;
    }
    return false;
}

/* Run the parser over the buffered bytes it has not seen. Returns 1 when a request is
 * complete, 0 when every buffered byte was parsed and more are needed, or an error. */
static int reader_parse(http_reader_t *r) {
    while (r->parsed < r->len) {
        size_t n = r->len - r->parsed;
        if (!r->headers_done) {
            /* The request starts at offset 0, so parsed is the head seen so far. Never
             * showing the parser more than the limit is what bounds an endless head. */
            if (r->parsed >= r->max_header_bytes) return reader_fail(r, 431);
            if (n > r->max_header_bytes - r->parsed) n = r->max_header_bytes - r->parsed;
        }
        size_t got = http_parser_execute(&r->parser, &r->settings, r->buf + r->parsed, n);
        r->parsed += got;
        enum http_errno e = HTTP_PARSER_ERRNO(&r->parser);
        if (e != HPE_OK && e != HPE_PAUSED) {
            int status = r->error_status ? r->error_status : 400;
            if (e == HPE_HEADER_OVERFLOW) status = 431;
            return reader_fail(r, status);
        }
        if (e == HPE_OK && got != n) return reader_fail(r, 400); /* stopped, no reason */

        if (r->headers_done && r->head_len == 0) {
            /* paused in on_headers_complete, on the LF that ends the head */
            r->head_len = r->parsed + 1;
            r->body_off = r->head_len;
            if (!names_are_tokens(r)) return reader_fail(r, 400);
            uint64_t cl = r->parser.content_length;
            if (!(r->parser.flags & F_CHUNKED) && cl != ULLONG_MAX && cl > r->max_body_bytes)
                return reader_fail(r, 413);
            /* RFC 7231 5.1.1: an HTTP/1.1 client may wait for the 100 before it sends the
             * body (curl does, for about a second, past 1 KB). A body over the limit was
             * refused just above, so the 100 is only promised to what will be read. */
            bool has_body = (r->parser.flags & F_CHUNKED) || (cl != ULLONG_MAX && cl > 0);
            r->expect_continue = has_body && r->parser.http_major == 1 &&
                                 r->parser.http_minor >= 1 && expects_continue(r);
            http_parser_pause(&r->parser, 0);
        }
        if (r->headers_done) {
            /* Everything parsed past the body's end is chunk framing or trailers: drop
             * it so that a stream of tiny chunks costs no more memory than its data. */
            size_t body_end = r->body_off + r->body_len;
            if (r->parsed > body_end) {
                memmove(r->buf + body_end, r->buf + r->parsed, r->len - r->parsed);
                r->len -= r->parsed - body_end;
                r->parsed = body_end;
            }
        }
        if (r->complete) {
            r->req_end = r->parsed;
            return 1;
        }
    }
    if (!r->headers_done && r->parsed >= r->max_header_bytes) return reader_fail(r, 431);
    return 0;
}

/* Absolute-form targets ("http://host/p?q", RFC 7230 5.3.2) are reduced to their path. */
static void split_target(const char *u, size_t n, http_request_t *req) {
    const char *hash = memchr(u, '#', n);
    if (hash) n = (size_t)(hash - u);
    const char *q = memchr(u, '?', n);
    size_t plen = q ? (size_t)(q - u) : n;
    req->query = q ? q + 1 : NULL;
    req->query_len = q ? n - plen - 1 : 0;
    req->path = u;
    req->path_len = plen;
    if (plen > 0 && u[0] != '/') {
        const char *sep = NULL;
        for (size_t i = 0; i + 2 < plen; i++) {
            if (u[i] == '/') break;
            if (u[i] == ':' && u[i + 1] == '/' && u[i + 2] == '/') {
                sep = u + i + 3;
                break;
            }
        }
        if (sep) {
            const char *slash = memchr(sep, '/', plen - (size_t)(sep - u));
            if (slash) {
                req->path = slash;
                req->path_len = plen - (size_t)(slash - u);
            } else {
                req->path = "/"; /* static, outlives the request like the buffer would */
                req->path_len = 1;
            }
        }
    }
}

static void fill_request(const http_reader_t *r, http_request_t *req) {
    req->method = (int)r->parser.method;
    req->http_major = r->parser.http_major;
    req->http_minor = r->parser.http_minor;
    req->keep_alive = http_should_keep_alive(&r->parser) != 0;
    req->upgrade = r->parser.upgrade != 0;
    split_target(r->buf + r->url_off, r->url_len, req);
    req->n_headers = r->n_hdr;
    for (size_t i = 0; i < r->n_hdr; i++) {
        const char *v = r->buf + r->hdr[i].value_off;
        size_t vlen = r->hdr[i].value_len;
        while (vlen > 0 && is_ows(v[vlen - 1])) vlen--; /* http-parser keeps trailing OWS */
        req->headers[i].name = r->buf + r->hdr[i].name_off;
        req->headers[i].name_len = r->hdr[i].name_len;
        req->headers[i].value = v;
        req->headers[i].value_len = vlen;
    }
    req->body = r->body_len ? r->buf + r->body_off : NULL;
    req->body_len = r->body_len;
}

int http_reader_feed(http_reader_t *r, const char *data, size_t len, http_request_t *req) {
    r->parser.data = r; /* in case the reader was moved since init */
    if (r->failed) return reader_status_error(r->error_status);
    size_t off = 0;
    for (;;) {
        if (!r->complete) {
            int rc = reader_parse(r);
            if (rc < 0) return rc;
        }
        if (r->complete) {
            /* Bytes beyond the request wait for consume (pipelining) or for the new
             * protocol (upgrade). A client may run ahead by a full request and a read,
             * not more: the caller is still busy with this one. */
            size_t rest = len - off;
            size_t ahead_max = r->max_header_bytes + r->max_body_bytes;
            if (ahead_max < r->max_body_bytes || ahead_max > SIZE_MAX - READER_STEP)
                ahead_max = SIZE_MAX; /* limits set that high mean no limit */
            else ahead_max += READER_STEP;
            if (rest > 0) {
                if (r->len - r->req_end + rest > ahead_max) return reader_fail(r, 413);
                if (reader_append(r, data + off, rest) < 0) return reader_fail(r, 500);
            }
            fill_request(r, req);
            return 1;
        }
        if (off == len) return 0;
        size_t n = len - off < READER_STEP ? len - off : READER_STEP;
        if (reader_append(r, data + off, n) < 0) return reader_fail(r, 500);
        off += n;
    }
}

void http_reader_consume(http_reader_t *r) {
    if (!r->complete) return;
    size_t rest = r->len - r->req_end;
    memmove(r->buf, r->buf + r->req_end, rest);
    r->len = rest;
    if (r->cap > READER_KEEP_CAP && rest <= READER_KEEP_CAP / 2) {
        char *nb = realloc(r->buf, READER_KEEP_CAP / 2);
        if (nb) { /* on failure the bigger buffer simply stays */
            r->buf = nb;
            r->cap = READER_KEEP_CAP / 2;
        }
    }
    reader_reset_request(r);
}

bool http_reader_partial(const http_reader_t *r, bool *in_body, size_t *body_len) {
    *in_body = r->headers_done;
    *body_len = r->body_len;
    return r->len > 0 && !r->complete && !r->failed;
}

const char *http_reader_rest(const http_reader_t *r, size_t *len) {
    if (!r->complete) {
        *len = 0;
        return NULL;
    }
    *len = r->len - r->req_end;
    return r->buf + r->req_end;
}

/* ---- lookups on a parsed request ------------------------------------------------------ */

const char *http_header(const http_request_t *req, const char *name, size_t *len) {
    size_t nlen = strlen(name);
    for (size_t i = 0; i < req->n_headers; i++) {
        const http_header_t *h = &req->headers[i];
        if (h->name_len == nlen && ascii_ieq(h->name, name, nlen)) {
            if (len) *len = h->value_len;
            return h->value;
        }
    }
    if (len) *len = 0;
    return NULL;
}

bool http_header_has_token(const http_request_t *req, const char *name, const char *token) {
    size_t nlen = strlen(name), tlen = strlen(token);
    if (tlen == 0) return false; /* empty list elements are ignored, never matched */
    for (size_t i = 0; i < req->n_headers; i++) {
        const http_header_t *h = &req->headers[i];
        if (h->name_len != nlen || !ascii_ieq(h->name, name, nlen)) continue;
        const char *v = h->value, *end = h->value + h->value_len;
        while (v < end) {
            const char *comma = memchr(v, ',', (size_t)(end - v));
            const char *s = v, *e = comma ? comma : end;
            while (s < e && is_ows(*s)) s++;
            while (e > s && is_ows(e[-1])) e--;
            if ((size_t)(e - s) == tlen && ascii_ieq(s, token, tlen)) return true;
            v = comma ? comma + 1 : end;
        }
    }
    return false;
}

static int hex_val(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The decoded byte at s[*i], advancing *i past it; -1 for a bad %-escape. */
static int pct_next(const char *s, size_t n, size_t *i, bool plus_is_space) {
    char c = s[*i];
    if (c == '%') {
        if (n - *i < 3) return -1;
        int hi = hex_val(s[*i + 1]), lo = hex_val(s[*i + 2]);
        if (hi < 0 || lo < 0) return -1;
        *i += 3;
        return hi * 16 + lo;
    }
    *i += 1;
    if (c == '+' && plus_is_space) return ' ';
    return (unsigned char)c;
}

int http_pct_decode(const char *src, size_t n, char *out, size_t outcap, bool plus_is_space) {
    /* Validate and measure first, so a bad encoding is reported as such however long. */
    size_t need = 0, o = 0;
    int err = 0;
    for (size_t i = 0; i < n; need++) {
        /* NUL is refused: the result is used as a C string, where it would cut it short */
        if (pct_next(src, n, &i, plus_is_space) <= 0) {
            err = CHAT_EINVAL;
            goto fail;
        }
    }
    if (need >= outcap || need > INT_MAX) {
        err = CHAT_ETOOBIG;
        goto fail;
    }
    for (size_t i = 0; i < n;) out[o++] = (char)pct_next(src, n, &i, plus_is_space);
    out[o] = '\0';
    return (int)o;
fail:
    if (outcap > 0) out[0] = '\0';
    return err;
}

/* Does the encoded name s[0..n) decode to name[0..nlen)? A bad escape never matches. */
static bool pct_name_eq(const char *s, size_t n, const char *name, size_t nlen) {
    size_t i = 0, j = 0;
    while (i < n) {
        int c = pct_next(s, n, &i, true);
        if (c < 0 || j == nlen || (unsigned char)name[j] != c) return false;
        j++;
    }
    return j == nlen;
}

int http_query_param(const http_request_t *req, const char *name, char *out, size_t outcap) {
    const char *q = req->query, *end = req->query ? req->query + req->query_len : NULL;
    size_t nlen = strlen(name);
    while (q && q < end) {
        const char *amp = memchr(q, '&', (size_t)(end - q));
        const char *pe = amp ? amp : end;
        const char *eq = memchr(q, '=', (size_t)(pe - q));
        const char *ne = eq ? eq : pe;
        if (pe > q && pct_name_eq(q, (size_t)(ne - q), name, nlen)) {
            const char *v = eq ? eq + 1 : pe;
            return http_pct_decode(v, (size_t)(pe - v), out, outcap, true);
        }
        q = amp ? amp + 1 : end;
    }
    if (outcap > 0) out[0] = '\0';
    return CHAT_ENOTFOUND;
}

const char *http_reader_continue(http_reader_t *r, size_t *len) {
    static const char cont[] = "HTTP/1.1 100 Continue\r\n\r\n";
    if (!r->expect_continue || r->complete || r->failed) return NULL;
    r->expect_continue = false;
    *len = sizeof cont - 1;
    return cont;
}
