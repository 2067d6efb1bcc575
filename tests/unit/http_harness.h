/* http_harness: the HTTP driver (http/server.h) on a real loopback listener with a trivial
 * handler, and a client socket to talk to it from the same thread (the loop runs between
 * the client's reads and writes). Shared by tests/unit/test_http_server.c and
 * tests/fuzz/fuzz_http_server.c.
 *
 * The handler answers every request with 200, text/plain, the body "METHOD PATH BODYLEN",
 * keep-alive as asked, except:
 *   /wait     the answer comes later: hh_answer_waiting() (or at once with auto_answer)
 *   /big      a 64 KiB body
 *   /upgrade  the connection leaves HTTP: "UP:" and the bytes after the head are sent raw,
 *             then it closes
 */
#ifndef CHAT_HTTP_HARNESS_H
#define CHAT_HTTP_HARNESS_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "http/server.h"

#define HH_BIG (64 * 1024)

typedef struct hh {
    uv_loop_t loop;
    conn_server_t cs;
    size_t max_outbound;
    size_t n_open, n_freed; /* owners made and freed */
    bool draining;
    bool auto_answer; /* answer /wait at the next hh_pump */
    uint64_t answered;
    http_conn_t *last;    /* the newest connection's driver (NULL once freed) */
    http_conn_t *waiting; /* a /wait request's connection, referenced */
} hh_t;

typedef struct hh_owner {
    int refs; /* 1 for the connection + holds */
    hh_t *h;
    http_conn_t http;
} hh_owner_t;

static inline void hh__unref(hh_owner_t *o) {
    if (--o->refs > 0) return;
    if (o->h->last == &o->http) o->h->last = NULL;
    o->h->n_freed++;
    http_conn_free(&o->http);
    free(o);
}

static inline void hh__hold(http_conn_t *hc) { ((hh_owner_t *)hc->data)->refs++; }
static inline void hh__release(http_conn_t *hc) { hh__unref(hc->data); }
static inline void hh__closed(http_conn_t *hc) { hh__unref(hc->data); }

static inline void hh__answer(http_conn_t *hc, const http_request_t *req, size_t body_len) {
    char body[600];
    int n = snprintf(body, sizeof body, "%s %.*s %zu", http_method_str(req->method),
                     (int)(req->path_len > 512 ? 512 : req->path_len), req->path, req->body_len);
    char *big = NULL;
    if (body_len) {
        big = malloc(body_len);
        if (big) memset(big, 'x', body_len);
    }
    http_conn_respond(hc,
                      http_response_new(200, "text/plain", big ? big : body,
                                        big ? body_len : (size_t)n, req->keep_alive, NULL),
                      req->keep_alive);
    free(big);
}

static inline void hh__sink_read(conn_t *c, uint8_t *data, size_t len) {}
static inline void hh__sink_close(conn_t *c) {}
static const conn_handler_t hh__sink = {.on_read = hh__sink_read, .on_close = hh__sink_close};

static inline void hh__on_request(http_conn_t *hc, const http_request_t *req) {
    hh_owner_t *o = hc->data;
    if (req->path_len == 5 && memcmp(req->path, "/wait", 5) == 0 && !o->h->waiting) {
        http_conn_wait(hc);
        o->refs++;
        o->h->waiting = hc;
        return;
    }
    if (req->path_len == 4 && memcmp(req->path, "/big", 4) == 0) {
        hh__answer(hc, req, HH_BIG);
        return;
    }
    if (req->path_len == 8 && memcmp(req->path, "/upgrade", 8) == 0) {
        const uint8_t *rest;
        size_t rest_len;
        conn_t *c = http_conn_detach(hc, &rest, &rest_len);
        conn_set_handler(c, &hh__sink, NULL);
        conn_send_copy(c, "UP:", 3);
        if (rest_len) conn_send_copy(c, rest, rest_len);
        conn_close(c);
        hh__unref(o); /* the connection's reference: on_close will not come */
        return;
    }
    hh__answer(hc, req, 0);
}

static const http_conn_ops_t hh__ops = {
    .on_request = hh__on_request,
    .hold = hh__hold,
    .release = hh__release,
    .on_close = hh__closed,
};

static inline void hh__on_open(conn_t *c) {
    hh_t *h = conn_server_data(c);
    hh_owner_t *o = calloc(1, sizeof(*o));
    if (!o) {
        conn_abort(c);
        return;
    }
    o->refs = 1;
    o->h = h;
    h->n_open++;
    http_conn_cfg_t cfg = {
        .loop = &h->loop,
        .max_body_bytes = 4096,
        .max_outbound_bytes = h->max_outbound,
        .header_timeout_ms = 1000,
        .answered = &h->answered,
        .draining = &h->draining,
    };
    http_conn_start(&o->http, c, &hh__ops, &cfg, o);
    h->last = &o->http;
}

static const conn_handler_t hh__accept = {.on_open = hh__on_open};

/* The waiting /wait request gets its answer, and its connection goes on. */
static inline void hh_answer_waiting(hh_t *h) {
    http_conn_t *hc = h->waiting;
    if (!hc) return;
    h->waiting = NULL;
    http_request_t req = {.method = HTTP_GET, .path = "/wait", .path_len = 5, .keep_alive = true};
    hh__answer(hc, &req, 0);
    http_conn_resume(hc);
    hh__unref(hc->data);
}

/* One turn of the loop, without blocking. */
static inline void hh_pump(hh_t *h) {
    uv_run(&h->loop, UV_RUN_NOWAIT);
    if (h->auto_answer && h->waiting) hh_answer_waiting(h);
}

static inline int hh_start(hh_t *h, size_t max_outbound) {
    memset(h, 0, sizeof(*h));
    h->max_outbound = max_outbound;
    if (uv_loop_init(&h->loop) < 0) return -1;
    conn_server_opts_t o = {
        .host = "127.0.0.1",
        .max_outbound_bytes = max_outbound,
        .handler = &hh__accept,
        .handler_data = h,
    };
    return conn_server_init(&h->cs, &h->loop, &o);
}

/* A connected, non-blocking client socket (-1 on failure). */
static inline int hh_client(hh_t *h) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)h->cs.port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

/* Close a client with a reset, so that no TIME_WAIT is left behind (the fuzzer makes many). */
static inline void hh_reset(int fd) {
    struct linger l = {.l_onoff = 1, .l_linger = 0};
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    close(fd);
}

/* Write all of p, running the loop while the socket is full. */
static inline int hh_send(hh_t *h, int fd, const void *p, size_t n) {
    const char *s = p;
    for (int spins = 0; n && spins < 100000; spins++) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
        if (w > 0) {
            s += w;
            n -= (size_t)w;
        } else if (w < 0 && errno != EAGAIN && errno != EINTR) {
            return -1;
        }
        hh_pump(h);
    }
    return n ? -1 : 0;
}

static inline size_t hh__count(const char *p, size_t n, const char *needle) {
    size_t c = 0, nl = strlen(needle);
    for (const char *q = p; (q = memmem(q, n - (size_t)(q - p), needle, nl)); q += nl) c++;
    return c;
}

/* Read into out (NUL-terminated, at most cap-1 bytes) until it holds `want` occurrences of
 * needle (want 0: until quiet), or the server closed (*eof), running the loop meanwhile.
 * Returns the length read. The bound on idle turns is a safety net, not a deadline. */
static inline size_t hh_read(hh_t *h, int fd, char *out, size_t cap, const char *needle,
                             size_t want, bool *eof) {
    size_t len = 0;
    *eof = false;
    /* idle: turns in a row that brought nothing */
    for (int idle = 0; idle < (want ? 5000 : 20);) {
        hh_pump(h);
        ssize_t r = recv(fd, out + len, cap - 1 - len, 0);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
            *eof = true;
            break;
        }
        if (r > 0) {
            len += (size_t)r;
            idle = 0;
            out[len] = '\0';
            if (want && hh__count(out, len, needle) >= want) break;
            if (len == cap - 1) break;
            continue;
        }
        idle++;
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        poll(&pfd, 1, want ? 1 : 0);
    }
    out[len] = '\0';
    return len;
}

/* Close the listener once every connection is gone. */
static inline void hh_stop(hh_t *h) {
    for (int i = 0; i < 20000 && h->n_freed < h->n_open; i++) {
        hh_pump(h);
        if (h->n_freed < h->n_open) usleep(100);
    }
    conn_server_close(&h->cs, NULL, NULL);
    uv_run(&h->loop, UV_RUN_DEFAULT);
    uv_loop_close(&h->loop);
}

#endif
