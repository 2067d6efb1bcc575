/* http responses: a whole HTTP/1.1 response (head and body) in one refcounted buffer.
 *
 * The one idea: measure first, then allocate once and write, so a response is one
 * malloc and one contiguous buffer that conn_send can queue without further copies.
 * JSON error bodies are escaped straight into that buffer, with the same two passes.
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
static buf_t *response_alloc(int status, const char *content_type, size_t body_len,
                             bool keep_alive, const char *extra_headers, uint8_t **body) {
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

buf_t *http_response_new(int status, const char *content_type, const void *body,
                         size_t body_len, bool keep_alive, const char *extra_headers) {
    if (body_len > 0 && !body) return NULL;
    uint8_t *dst;
    buf_t *b = response_alloc(status, content_type, body_len, keep_alive, extra_headers, &dst);
    if (b && body_len > 0) memcpy(dst, body, body_len);
    return b;
}

/* Length of a valid UTF-8 sequence at s (1 to 4 bytes), or 0 if s starts an invalid one
 * (stray continuation, overlong form, surrogate, beyond U+10FFFF, truncated). */
static size_t utf8_seq_len(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    size_t k;
    uint32_t cp, min;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) {
        k = 2;
        cp = c & 0x1Fu;
        min = 0x80;
    } else if (c >= 0xE0 && c <= 0xEF) {
        k = 3;
        cp = c & 0x0Fu;
        min = 0x800;
    } else if (c >= 0xF0 && c <= 0xF4) {
        k = 4;
        cp = c & 0x07u;
        min = 0x10000;
    } else {
        return 0;
    }
    if (n < k) return 0;
    for (size_t j = 1; j < k; j++) {
        if ((s[j] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[j] & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return k;
}

/* JSON string contents for s; writes to out unless it is NULL, returns the length either
 * way. Invalid UTF-8 becomes U+FFFD: the detail may quote client input, and the response
 * must stay valid JSON whatever the client sent. */
static size_t json_escape(const char *s, uint8_t *out) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    size_t n = strlen(s), o = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = p[i];
        char esc[7];
        const char *w = esc;
        size_t wn;
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            wn = 2;
            i++;
        } else if (c < 0x20) {
            memcpy(esc, "\\u00", 4);
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            wn = 6;
            i++;
        } else {
            wn = utf8_seq_len(p + i, n - i);
            if (wn == 0) {
                w = "\\ufffd";
                wn = 6;
                i++;
            } else {
                w = s + i;
                i += wn;
            }
        }
        if (out) memcpy(out + o, w, wn);
        o += wn;
    }
    return o;
}

buf_t *http_error_new(int status, const char *code, const char *detail, bool keep_alive) {
    static const char p1[] = "{\"error\":\"", p2[] = "\",\"detail\":\"", p3[] = "\"}";
    if (!code) code = "";
    if (!detail) detail = "";
    size_t code_len = json_escape(code, NULL), detail_len = json_escape(detail, NULL);
    size_t len = sizeof p1 - 1 + code_len + sizeof p2 - 1 + detail_len + sizeof p3 - 1;
    uint8_t *w;
    buf_t *b = response_alloc(status, "application/json", len, keep_alive, NULL, &w);
    if (!b) return NULL;
    memcpy(w, p1, sizeof p1 - 1);
    w += sizeof p1 - 1;
    w += json_escape(code, w);
    memcpy(w, p2, sizeof p2 - 1);
    w += sizeof p2 - 1;
    w += json_escape(detail, w);
    memcpy(w, p3, sizeof p3 - 1);
    return b;
}
