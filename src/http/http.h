/* http: HTTP/1.1 requests in, responses out, with no I/O of its own.
 *
 * http_reader_t wraps http-parser (the nodejs one Debian packages). It keeps the bytes of
 * the request being read in one buffer and records positions as offsets, so the buffer may
 * grow while a request trickles in; once a request is complete every pointer in
 * http_request_t points into that buffer and stays valid until http_reader_consume().
 * Sizes are bounded: header block over max_header_bytes is 431, body over max_body_bytes
 * is 413, anything malformed is 400. Pipelined requests are read one after the other; on
 * an Upgrade the bytes after the head are left for the new protocol.
 */
#ifndef CHAT_HTTP_H
#define CHAT_HTTP_H

#include <http_parser.h>
#include <stdbool.h>
#include <stddef.h>

#include "core/core.h"

#define HTTP_MAX_HEADERS 64

typedef struct http_header {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
} http_header_t;

typedef struct http_request {
    int method;       /* enum http_method of http_parser.h (HTTP_GET, HTTP_POST, ...) */
    const char *path; /* percent-encoded, without the query */
    size_t path_len;
    const char *query; /* after '?', without it; NULL if none */
    size_t query_len;
    http_header_t headers[HTTP_MAX_HEADERS];
    size_t n_headers;
    const char *body; /* NULL if none */
    size_t body_len;
    bool keep_alive; /* what the client asked for, by version and Connection header */
    bool upgrade;    /* Connection: upgrade with an Upgrade header */
    unsigned short http_major, http_minor;
} http_request_t;

typedef struct http_reader {
    /* settings */
    size_t max_header_bytes; /* default 16384 */
    size_t max_body_bytes;   /* default 1 MiB */
    /* private */
    http_parser parser;
    http_parser_settings settings;
    char *buf;
    size_t len, cap; /* bytes held */
    size_t parsed;   /* bytes of buf given to the parser */
    size_t req_end;  /* end of the complete request in buf, 0 if none yet */
    bool complete, failed;
    int error_status; /* 400, 413, 431 after a failure */
    /* offsets recorded by the parser callbacks */
    size_t url_off, url_len;
    struct {
        size_t name_off, name_len, value_off, value_len;
    } hdr[HTTP_MAX_HEADERS];
    size_t n_hdr;
    bool in_value;
    size_t body_off, body_len;
    bool headers_done;
    size_t head_len; /* bytes of the head (through the blank line) */
    /* The head asked "Expect: 100-continue" and the body is still to come: the caller
     * answers "100 Continue" (http_reader_continue) so that the client sends it. */
    bool expect_continue;
} http_reader_t;

void http_reader_init(http_reader_t *r);
/* Free the buffer. */
void http_reader_free(http_reader_t *r);
/* Feed bytes (copied into the reader). Returns
 *   1           a complete request: *req is filled, valid until http_reader_consume()
 *   0           need more bytes
 *   CHAT_EINVAL / CHAT_ETOOBIG   bad request: r->error_status is the HTTP status to answer
 *               (400, 413 or 431); the connection should be answered and closed.
 * Call again with len 0 after http_reader_consume() to parse a pipelined request that is
 * already buffered. */
int http_reader_feed(http_reader_t *r, const char *data, size_t len, http_request_t *req);
/* Drop the completed request, keeping the bytes that follow it. */
void http_reader_consume(http_reader_t *r);
/* Whether a request is under way: some of it was read, not all of it (for the deadlines of
 * a request that trickles in). *in_body: its head is complete and its body is being read;
 * *body_len: the body bytes read so far. */
bool http_reader_partial(const http_reader_t *r, bool *in_body, size_t *body_len);
/* After an upgrade request: the bytes after its head (already received, belonging to the
 * new protocol). Valid until the next call on r. */
const char *http_reader_rest(const http_reader_t *r, size_t *len);

/* After http_reader_feed returned 0: the interim "HTTP/1.1 100 Continue" response to send
 * now (a static string, len in *len), or NULL. Returns it once per request. */
const char *http_reader_continue(http_reader_t *r, size_t *len);

/* Case-insensitive header lookup; returns the first value (not NUL-terminated) or NULL. */
const char *http_header(const http_request_t *req, const char *name, size_t *len);
/* True if the header (a comma-separated token list, as Connection) holds token, ignoring
 * case and blanks; every occurrence of the header is searched. */
bool http_header_has_token(const http_request_t *req, const char *name, const char *token);
/* Query parameter by name, percent-decoded ('+' is a space) into out (NUL-terminated).
 * Returns its length, CHAT_ENOTFOUND if absent, CHAT_ETOOBIG if it needs more than
 * outcap-1 bytes, CHAT_EINVAL if the encoding is bad. */
int http_query_param(const http_request_t *req, const char *name, char *out, size_t outcap);
/* Percent-decode src into out (NUL-terminated); returns the length or CHAT_EINVAL /
 * CHAT_ETOOBIG. plus_is_space for query strings. */
int http_pct_decode(const char *src, size_t n, char *out, size_t outcap, bool plus_is_space);

/* ---- responses ------------------------------------------------------------------------ */
/* Reason phrase for a status ("OK", "Not Found"...). */
const char *http_status_text(int status);
/* A complete response in one new buffer (caller owns the reference):
 * status line, Content-Type (if not NULL), Content-Length, Connection keep-alive/close,
 * extra_headers verbatim (each line ending in \r\n, may be NULL), blank line, body. */
buf_t *http_response_new(int status, const char *content_type, const void *body, size_t body_len,
                         bool keep_alive, const char *extra_headers);
/* A JSON error response: {"error":code,"detail":detail} (detail JSON-escaped).
 * Caller owns the reference. */
buf_t *http_error_new(int status, const char *code, const char *detail, bool keep_alive);

#endif
