/* http responses: a whole HTTP/1.1 response (head and body) in one refcounted buffer.
 *
 * The one idea: measure first, then allocate once and write, so a response is one
 * malloc and one contiguous buffer that conn_send can queue without further copies.
 * JSON error bodies are escaped straight into that buffer (core's json_escape measures,
 * then writes), with the same two passes.
 */
#include "http.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

const char *http_status_text(int status) {
    /* http-parser carries the IANA table; reuse it rather than keep a second copy. */
    if (status < 100 || status > 999) return "Unknown";
    const char *s = http_status_str((enum http_status)status);
    return strcmp(s, "<unknown>") == 0 ? "Unknown" : s;
}

typedef struct piece {
    const char *p;
    size_t n;
} piece_t;

/* Allocate a response for a body of body_len bytes, write everything but the body and
 * point *body at where it goes. NULL on a bad status or OOM. */
static buf_t *response_alloc(int status, const char *content_type, size_t body_len, bool keep_alive,
                             const char *extra_headers, uint8_t **body) {
    if (status < 100 || status > 999) return NULL;
    char status_line[32], length_line[48];
    snprintf(status_line, sizeof status_line, "HTTP/1.1 %d ", status);
    snprintf(length_line, sizeof length_line, "\r\nContent-Length: %zu\r\n", body_len);
    const char *reason = http_status_text(status);
    const char *conn = keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n";

    piece_t pieces[8];
    size_t np = 0;
    pieces[np++] = (piece_t){status_line, strlen(status_line)};
    pieces[np++] = (piece_t){reason, strlen(reason)};
    if (content_type) {
        pieces[np++] = (piece_t){"\r\nContent-Type: ", 16};
        pieces[np++] = (piece_t){content_type, strlen(content_type)};
    }
    pieces[np++] = (piece_t){length_line, strlen(length_line)};
    pieces[np++] = (piece_t){conn, strlen(conn)};
    if (extra_headers) pieces[np++] = (piece_t){extra_headers, strlen(extra_headers)};
    pieces[np++] = (piece_t){"\r\n", 2};

    size_t head = 0;
    for (size_t i = 0; i < np; i++) head += pieces[i].n;
    if (body_len > SIZE_MAX - head) return NULL;
    buf_t *b = buf_new(head + body_len);
    if (!b) return NULL;
    uint8_t *w = b->data;
    for (size_t i = 0; i < np; i++) {
        memcpy(w, pieces[i].p, pieces[i].n);
        w += pieces[i].n;
    }
    b->len = head + body_len;
    *body = w;
    return b;
}

buf_t *http_response_new(int status, const char *content_type, const void *body, size_t body_len,
                         bool keep_alive, const char *extra_headers) {
    if (body_len > 0 && !body) return NULL;
    uint8_t *dst;
    buf_t *b = response_alloc(status, content_type, body_len, keep_alive, extra_headers, &dst);
    if (b && body_len > 0) memcpy(dst, body, body_len);
    return b;
}

buf_t *http_error_new(int status, const char *code, const char *detail, bool keep_alive) {
    static const char p1[] = "{\"error\":\"", p2[] = "\",\"detail\":\"", p3[] = "\"}";
    if (!code) code = "";
    if (!detail) detail = "";
    size_t code_n = strlen(code), detail_n = strlen(detail);
    size_t code_len = json_escape(code, code_n, NULL);
    size_t detail_len = json_escape(detail, detail_n, NULL);
    size_t len = sizeof p1 - 1 + code_len + sizeof p2 - 1 + detail_len + sizeof p3 - 1;
    uint8_t *w;
    buf_t *b = response_alloc(status, "application/json", len, keep_alive, NULL, &w);
    if (!b) return NULL;
    memcpy(w, p1, sizeof p1 - 1);
    w += sizeof p1 - 1;
    w += json_escape(code, code_n, (char *)w);
    memcpy(w, p2, sizeof p2 - 1);
    w += sizeof p2 - 1;
    w += json_escape(detail, detail_n, (char *)w);
    memcpy(w, p3, sizeof p3 - 1);
    return b;
}
