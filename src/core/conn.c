/* conn: TCP connections on libuv with corked, refcounted output.
 *
 * The one idea: never write per message. conn_send() only appends a reference to the
 * connection's queue and puts the connection on the server's dirty list; a uv_check
 * handle (run right after the poll phase of every loop turn) writes each dirty connection
 * with one sendmsg of everything it has queued. A broadcast to 1,000 members
 * costs 1,000 queue appends and, at the end of the turn, one syscall per member however
 * many events the turn produced. Only when the kernel buffer is full does a uv_write_t get
 * allocated for the rest, so an idle or keeping-up connection owns no write request.
 *
 * Every connection reads into one shared buffer: handlers consume the bytes during the
 * read callback (the HTTP reader and WebSocket parser copy only what they must keep), so an
 * idle connection holds no read buffer.
 *
 * Closing is graceful by default: queued output is written, the write side is shut down,
 * and the socket lingers (discarding input) until the peer closes or a deadline passes, so
 * the peer reads our last bytes (a close frame, an error response) instead of a reset.
 *
 * TLS is a transport under all this, on the loop, with two memory BIOs per connection: the
 * socket's bytes are written into the read BIO and the plaintext OpenSSL gives back goes to
 * the handler, which never knows. The queue keeps holding plaintext, the same shared frames
 * as without TLS; at flush time they are encrypted (small ones coalesced into one record)
 * and the write BIO's bytes become the one segment that the usual sendmsg writes. So the
 * fan-out still encodes an event once and still makes one write per connection per turn;
 * only the encryption is per connection, as it must be. A TLS connection is handed to its
 * handler (on_open) when its handshake is done; one whose handshake does not finish within
 * handshake_timeout_ms is reset.
 */
#include "conn_internal.h"
#include "core.h"
#include "tls_internal.h"

#include <openssl/buffer.h>
#include <openssl/err.h>

#include <arpa/inet.h>
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

void conn_set_handler(conn_t *c, const conn_handler_t *h, void *ctx) {
    c->handler = h;
    c->ctx = ctx;
}

size_t conn_queued(const conn_t *c) { return c->q_bytes; }
void *conn_ctx(const conn_t *c) { return c->ctx; }
uint64_t conn_last_tx(const conn_t *c) { return c->last_tx; }
int conn_over_limit(const conn_t *c) { return c->over_limit; }
void *conn_server_data(const conn_t *c) { return c->server->handler_data; }

enum {
    CF_DIRTY = 1 << 0,   /* on the dirty list */
    CF_WRITING = 1 << 1, /* a uv_write is in flight */
    CF_CLOSING = 1 << 2, /* conn_close called: flush, shut down, linger */
    CF_SHUT = 1 << 3,    /* uv_shutdown issued */
    CF_CLOSED = 1 << 4,  /* uv_close issued */
    CF_LINGER = 1 << 5,  /* on the linger list */
    CF_EOF = 1 << 6,     /* the peer shut down its side */
    CF_RESET = 1 << 7,   /* conn_abort: close with a reset */
    CF_PAUSED = 1 << 8,  /* reading stopped by conn_pause_read */
    CF_DRAIN = 1 << 9,   /* on_drain armed by conn_notify_drain */
    CF_OPENED = 1 << 10, /* handler->on_open was called (so on_close is owed) */
};

#define CONN_READ_BUF (64 * 1024)
#define CONN_IOV_MAX 64
#define CONN_LINGER_MS 2000
#define CONN_TLS_RECORD 16384 /* the largest TLS record's plaintext */
/* A memory BIO keeps the capacity of its largest burst; past this, once empty, it is
 * replaced by a fresh one, so that an idle connection does not keep the handshake's flight
 * or a history page's worth of buffer. Small fan-out flushes stay below it: no churn. */
#define CONN_TLS_BIO_KEEP 1024

struct conn_tls {
    SSL *ssl;        /* owns the two memory BIOs */
    conn_t *conn;    /* whose state this is */
    queue_t hs_link; /* on the server's handshaking list until established */
    uint64_t hs_deadline;
    bool established;  /* handshake done, handler attached */
    bool failed;       /* a fatal TLS error: no more SSL calls but sending its alert */
    bool close_sent;   /* our close_notify is queued */
    bool read_pending; /* reading resumed: plaintext may wait in OpenSSL's buffers */
};

struct conn_seg {
    buf_t *b;
    uint32_t off; /* bytes of b already written */
};

static void conn__flush(conn_t *c);
static void conn__hard_close(conn_t *c);
static void conn__on_idle(uv_idle_t *h);
static void conn__on_linger_timer(uv_timer_t *t);
static void conn__tls_pump(conn_t *c);
static int conn__tls_encrypt(conn_t *c);
static void conn__tls_free(conn_t *c);
static void conn__tls_unlist(conn_t *c);
static int conn__tls_start(conn_t *c);
static void conn__open(conn_t *c);

/* ---- output queue --------------------------------------------------------------------- */

static int conn__q_grow(conn_t *c) {
    uint32_t ncap = c->q_cap ? c->q_cap * 2 : 8;
    struct conn_seg *nq = malloc(sizeof(*nq) * ncap);
    if (!nq) return CHAT_ENOMEM;
    /* unroll the ring so the head is at 0 */
    for (uint32_t i = 0; i < c->q_len; i++) nq[i] = c->q[(c->q_head + i) & (c->q_cap - 1)];
    free(c->q);
    c->q = nq;
    c->q_cap = ncap;
    c->q_head = 0;
    return 0;
}

static inline struct conn_seg *conn__seg(conn_t *c, uint32_t i) {
    return &c->q[(c->q_head + i) & (c->q_cap - 1)];
}

static void conn__q_pop(conn_t *c) {
    struct conn_seg *s = conn__seg(c, 0);
    buf_unref(s->b);
    s->b = NULL;
    c->q_head = (c->q_head + 1) & (c->q_cap - 1);
    c->q_len--;
}

/* Forget everything queued, and give the ring back once it is empty: a connection that
 * once had a burst should not keep its peak queue forever. */
static void conn__q_clear(conn_t *c) {
    while (c->q_len) conn__q_pop(c);
    c->q_bytes = 0;
    free(c->q);
    c->q = NULL;
    c->q_cap = c->q_head = 0;
}

/* Mark n bytes written from the front of the queue. */
static void conn__q_consume(conn_t *c, size_t n) {
    c->q_bytes -= n;
    while (n && c->q_len) {
        struct conn_seg *s = conn__seg(c, 0);
        size_t left = s->b->len - s->off;
        if (n < left) {
            s->off += (uint32_t)n;
            return;
        }
        n -= left;
        conn__q_pop(c);
    }
}

/* Appended at the tail, flushed from the head: when one turn completes many messages, the
 * members of the oldest (which waited longest already) are written first. Flushed newest
 * first, as before, a group's first message waited for the whole flush, 5-10 ms at times in
 * the chat scenario: its p99.9 was 29 ms against 21 ms now (bench/RESULTS.md). */
/* Fire an armed on_drain once the queue is short enough. Called after writes; the
 * callback may close c (the conn_t stays valid until its uv_close callback). */
static void conn__maybe_drained(conn_t *c) {
    if (!(c->flags & CF_DRAIN) || (c->flags & (CF_CLOSING | CF_CLOSED))) return;
    if (c->q_bytes > c->drain_below) return;
    c->flags &= (uint16_t)~CF_DRAIN;
    if (c->handler && c->handler->on_drain) c->handler->on_drain(c);
}

static void conn__mark_dirty(conn_t *c) {
    if (c->flags & (CF_DIRTY | CF_CLOSED)) return;
    conn_server_t *s = c->server;
    c->flags |= CF_DIRTY;
    if (queue_empty(&s->dirty)) uv_idle_start(&s->kick, conn__on_idle);
    queue_insert_tail(&s->dirty, &c->dirty_link);
}

static void conn__unmark_dirty(conn_t *c) {
    if (!(c->flags & CF_DIRTY)) return;
    queue_remove(&c->dirty_link);
    c->flags &= (uint16_t)~CF_DIRTY;
}

static int conn__enqueue(conn_t *c, buf_t *b, bool force) {
    if (c->flags & (CF_CLOSING | CF_CLOSED)) return CHAT_ECLOSED;
    if (b->len == 0) return 0;
    if (!force && c->q_bytes + b->len > c->max_outbound) return CHAT_EBUSY;
    if (c->q_len == c->q_cap && conn__q_grow(c) < 0) return CHAT_ENOMEM;
    struct conn_seg *s = conn__seg(c, c->q_len);
    s->b = buf_ref(b);
    s->off = 0;
    c->q_len++;
    c->q_bytes += b->len;
    conn__mark_dirty(c);
    return 0;
}

int conn_send(conn_t *c, buf_t *b) { return conn__enqueue(c, b, false); }
int conn_send_force(conn_t *c, buf_t *b) { return conn__enqueue(c, b, true); }

int conn_send_copy(conn_t *c, const void *p, size_t n) {
    buf_t *b = buf_from(p, n);
    if (!b) return CHAT_ENOMEM;
    int rc = conn_send(c, b);
    buf_unref(b);
    return rc;
}

/* ---- closing -------------------------------------------------------------------------- */

/* ---- connections per peer address ------------------------------------------------------ */

#define CONN_IP_BUCKETS 4096

struct conn_ip {
    struct conn_ip *next;
    uint8_t addr[16]; /* IPv6, or IPv4 mapped into IPv6 */
    size_t n;
};

static struct conn_ip *conn__ip_take(conn_server_t *s, const uv_tcp_t *tcp) {
    struct sockaddr_storage a;
    int len = sizeof(a);
    uint8_t key[16] = {0};
    if (uv_tcp_getpeername(tcp, (struct sockaddr *)&a, &len) < 0) return NULL;
    if (a.ss_family == AF_INET6) {
        memcpy(key, &((struct sockaddr_in6 *)&a)->sin6_addr, 16);
    } else {
        key[10] = key[11] = 0xff;
        memcpy(key + 12, &((struct sockaddr_in *)&a)->sin_addr, 4);
    }
    uint32_t h = 2166136261u; /* FNV-1a */
    for (int i = 0; i < 16; i++) h = (h ^ key[i]) * 16777619u;
    struct conn_ip **b = &s->ips[h % CONN_IP_BUCKETS], *e;
    for (e = *b; e; e = e->next)
        if (memcmp(e->addr, key, 16) == 0) break;
    if (!e) {
        if (!(e = calloc(1, sizeof(*e)))) return NULL; /* not counted: better than refused */
        memcpy(e->addr, key, 16);
        e->next = *b;
        *b = e;
    }
    e->n++;
    return e;
}

static void conn__ip_release(conn_server_t *s, struct conn_ip *e) {
    if (--e->n) return;
    uint32_t h = 2166136261u;
    for (int i = 0; i < 16; i++) h = (h ^ e->addr[i]) * 16777619u;
    struct conn_ip **pp = &s->ips[h % CONN_IP_BUCKETS];
    while (*pp != e) pp = &(*pp)->next;
    *pp = e->next;
    free(e);
}

static void conn__on_closed(uv_handle_t *h) {
    conn_t *c = h->data;
    conn_server_t *s = c->server;
    if ((c->flags & CF_OPENED) && c->handler && c->handler->on_close) c->handler->on_close(c);
    conn__tls_free(c);
    conn__q_clear(c);
    free(c->wreq);
    if (c->ip && s->ips) conn__ip_release(s, c->ip);
    s->n_conns--;
    free(c);
}

static void conn__unlinger(conn_t *c) {
    if (!(c->flags & CF_LINGER)) return;
    queue_remove(&c->linger_link);
    c->flags &= (uint16_t)~CF_LINGER;
}

static void conn__hard_close(conn_t *c) {
    if (c->flags & CF_CLOSED) return;
    c->flags |= CF_CLOSED;
    conn__unmark_dirty(c);
    conn__unlinger(c);
    conn__tls_unlist(c);
    uv_read_stop((uv_stream_t *)&c->tcp);
    /* An abort resets the connection: the kernel drops what it still buffers for the
     * peer (a slow consumer may have megabytes there) and the peer learns at once. */
    if (!(c->flags & CF_RESET) || uv_tcp_close_reset(&c->tcp, conn__on_closed) < 0)
        uv_close((uv_handle_t *)&c->tcp, conn__on_closed);
}

static void conn__on_shutdown(uv_shutdown_t *req, int status) {
    conn_t *c = req->data;
    free(req);
    if (c->flags & CF_CLOSED) return;
    if (status < 0) {
        conn__hard_close(c);
        return;
    }
    if (c->flags & CF_EOF) {
        conn__hard_close(c);
        return;
    }
    /* Wait for the peer's FIN (the read callback sees EOF) or the linger deadline. */
    conn_server_t *s = c->server;
    c->linger_deadline = uv_now(s->loop) + CONN_LINGER_MS;
    queue_insert_tail(&s->lingering, &c->linger_link);
    c->flags |= CF_LINGER;
    if (!uv_is_active((uv_handle_t *)&s->linger_timer))
        uv_timer_start(&s->linger_timer, conn__on_linger_timer, 250, 250);
}

static void conn__shutdown(conn_t *c) {
    if (c->flags & (CF_SHUT | CF_CLOSED)) return;
    c->flags |= CF_SHUT;
    uv_shutdown_t *req = malloc(sizeof(*req));
    if (!req) {
        conn__hard_close(c);
        return;
    }
    req->data = c;
    if (uv_shutdown(req, (uv_stream_t *)&c->tcp, conn__on_shutdown) < 0) {
        free(req);
        conn__hard_close(c);
    }
}

void conn_close(conn_t *c) {
    if (c->flags & (CF_CLOSING | CF_CLOSED)) return;
    c->flags |= CF_CLOSING;
    /* A closing connection reads again (and discards) so the peer's FIN ends the linger. */
    conn_resume_read(c);
    /* TLS: the flush queues our close_notify (or a failed handshake's alert) first */
    if (c->tls) conn__mark_dirty(c);
    else if (c->q_len == 0 && !(c->flags & CF_WRITING)) conn__shutdown(c);
    /* else the flush that empties the queue shuts down */
}

void conn_abort(conn_t *c) {
    c->flags |= CF_CLOSING | CF_RESET;
    conn__hard_close(c);
}

bool conn_is_closing(const conn_t *c) { return (c->flags & (CF_CLOSING | CF_CLOSED)) != 0; }

static void conn__alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf);
static void conn__on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf);

void conn_pause_read(conn_t *c) {
    if (c->flags & (CF_PAUSED | CF_CLOSING | CF_CLOSED)) return;
    c->flags |= CF_PAUSED;
    uv_read_stop((uv_stream_t *)&c->tcp);
}

void conn_resume_read(conn_t *c) {
    if (!(c->flags & CF_PAUSED) || (c->flags & CF_CLOSED)) return;
    c->flags &= (uint16_t)~CF_PAUSED;
    if (uv_read_start((uv_stream_t *)&c->tcp, conn__alloc, conn__on_read) < 0) {
        conn__hard_close(c);
        return;
    }
    /* Records already decrypted, or read into the BIO, wait for no new socket bytes: the
     * flusher hands them over at the end of this turn (not here, inside a handler). */
    if (c->tls && c->tls->established && !(c->flags & CF_CLOSING)) {
        c->tls->read_pending = true;
        conn__mark_dirty(c);
    }
}

bool conn_read_paused(const conn_t *c) { return (c->flags & CF_PAUSED) != 0; }

void conn_notify_drain(conn_t *c, size_t low_water) {
    if (c->flags & (CF_CLOSING | CF_CLOSED)) return;
    if (!(c->flags & CF_DRAIN) || low_water < c->drain_below) c->drain_below = low_water;
    c->flags |= CF_DRAIN;
    /* Already short enough: the flush at the end of this turn fires it. */
    if (c->q_bytes <= c->drain_below && !(c->flags & CF_WRITING)) conn__mark_dirty(c);
}

/* ---- writing -------------------------------------------------------------------------- */

static void conn__on_write(uv_write_t *req, int status) {
    conn_t *c = req->data;
    c->flags &= (uint16_t)~CF_WRITING;
    if (status < 0 || (c->flags & CF_CLOSED)) {
        if (!(c->flags & CF_CLOSED)) conn__hard_close(c);
        return;
    }
    /* The segments covered were written whole (libuv finishes a uv_write before its cb). */
    size_t n = 0;
    for (uint32_t i = 0; i < c->w_segs; i++) {
        struct conn_seg *s = conn__seg(c, i);
        n += s->b->len - s->off;
    }
    conn__q_consume(c, n);
    c->w_segs = 0;
    if (n) c->last_tx = uv_now(c->server->loop);
    if (c->q_len || c->tls) {
        conn__flush(c);
        return;
    }
    if (c->flags & CF_CLOSING) conn__shutdown(c);
    else if (c->q_cap > 64) conn__q_clear(c);
    conn__maybe_drained(c);
}

/* What the kernel took without blocking: bytes, 0 if it has no room now (as libuv, ENOBUFS
 * counts as that), or a negative
 * libuv error. send/sendmsg rather than uv_try_write's write/writev: the socket calls skip
 * the VFS write path (permission and fsnotify hooks), a few percent of the loop's time
 * when every delivery is a syscall. uv_buf_t is laid out as struct iovec on Unix. */
_Static_assert(sizeof(uv_buf_t) == sizeof(struct iovec) &&
                   offsetof(uv_buf_t, base) == offsetof(struct iovec, iov_base) &&
                   offsetof(uv_buf_t, len) == offsetof(struct iovec, iov_len),
               "uv_buf_t is not struct iovec");
static ssize_t conn__send(conn_t *c, uv_buf_t *iov, uint32_t n) {
    uv_os_fd_t fd;
    if (uv_fileno((uv_handle_t *)&c->tcp, &fd) < 0) return UV_EBADF;
    for (;;) {
        ssize_t w;
        if (n == 1) {
            w = send(fd, iov[0].base, iov[0].len, MSG_DONTWAIT | MSG_NOSIGNAL);
        } else {
            struct msghdr mh = {.msg_iov = (struct iovec *)iov, .msg_iovlen = n};
            w = sendmsg(fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
        }
        if (w >= 0) return w;
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS) return 0;
        return uv_translate_sys_error(errno);
    }
}

static void conn__flush(conn_t *c) {
    if (c->flags & (CF_WRITING | CF_CLOSED)) return;
    if (c->tls && conn__tls_encrypt(c) < 0) {
        conn__hard_close(c);
        return;
    }
    uv_buf_t iov[CONN_IOV_MAX];
    while (c->q_len) {
        uint32_t n = c->q_len < CONN_IOV_MAX ? c->q_len : CONN_IOV_MAX;
        size_t total = 0;
        for (uint32_t i = 0; i < n; i++) {
            struct conn_seg *s = conn__seg(c, i);
            iov[i] = uv_buf_init((char *)s->b->data + s->off, (unsigned)(s->b->len - s->off));
            total += iov[i].len;
        }
        ssize_t w = conn__send(c, iov, n);
        if (w < 0) {
            conn__hard_close(c);
            return;
        }
        conn__q_consume(c, (size_t)w);
        if (w > 0) c->last_tx = uv_now(c->server->loop);
        if ((size_t)w == total) continue;
        /* The kernel buffer is full: hand the rest to libuv, which waits for POLLOUT. */
        n = c->q_len < CONN_IOV_MAX ? c->q_len : CONN_IOV_MAX;
        for (uint32_t i = 0; i < n; i++) {
            struct conn_seg *s = conn__seg(c, i);
            iov[i] = uv_buf_init((char *)s->b->data + s->off, (unsigned)(s->b->len - s->off));
        }
        if (!c->wreq && !(c->wreq = malloc(sizeof(*c->wreq)))) {
            conn__hard_close(c);
            return;
        }
        c->wreq->data = c;
        if (uv_write(c->wreq, (uv_stream_t *)&c->tcp, iov, n, conn__on_write) < 0) {
            conn__hard_close(c);
            return;
        }
        c->flags |= CF_WRITING;
        c->w_segs = n;
        conn__maybe_drained(c);
        return;
    }
    if (c->flags & CF_CLOSING) conn__shutdown(c);
    else if (c->q_cap > 64) conn__q_clear(c);
    conn__maybe_drained(c);
}

static void conn__on_check(uv_check_t *h) {
    conn_server_t *s = h->data;
    while (!queue_empty(&s->dirty)) {
        conn_t *c = queue_data(queue_head(&s->dirty), conn_t, dirty_link);
        if (c->tls && c->tls->read_pending) {
            c->tls->read_pending = false;
            conn__tls_pump(c); /* may close c: then the flush below does nothing */
        }
        conn__unmark_dirty(c);
        conn__flush(c);
    }
    uv_idle_stop(&s->kick);
}

static void conn__on_idle(uv_idle_t *h) { (void)h; }

/* ---- reading -------------------------------------------------------------------------- */

static void conn__alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
    (void)suggested;
    conn_t *c = h->data;
    buf->base = (char *)c->server->rbuf;
    buf->len = CONN_READ_BUF;
}

static void conn__on_read(uv_stream_t *st, ssize_t nread, const uv_buf_t *buf) {
    conn_t *c = st->data;
    if (nread == 0) return;
    if (nread == UV_EOF && !(c->flags & CF_SHUT)) {
        /* The peer finished sending but may still read: let what we queued reach it (a
         * client that half-closes after its request still gets the answer). */
        c->flags |= CF_EOF;
        conn_close(c);
        return;
    }
    if (nread < 0) {
        /* a lingering close completed, or the connection failed */
        conn__hard_close(c);
        return;
    }
    if (c->flags & CF_CLOSING) return; /* discard input while closing */
    if (c->tls) {
        BIO *rb = SSL_get_rbio(c->tls->ssl);
        if (BIO_write(rb, buf->base, (int)nread) != (int)nread) {
            conn__hard_close(c);
            return;
        }
        conn__tls_pump(c);
        return;
    }
    c->handler->on_read(c, (uint8_t *)buf->base, (size_t)nread);
}

/* ---- TLS transport ------------------------------------------------------------------- */

/* Hand the connection to its handler: at accept, or with TLS once the handshake is done. */
static void conn__open(conn_t *c) {
    c->flags |= CF_OPENED;
    if (c->handler->on_open) c->handler->on_open(c);
}

static int conn__tls_start(conn_t *c) {
    conn_server_t *s = c->server;
    struct conn_tls *t = calloc(1, sizeof(*t));
    SSL *ssl = SSL_new(tls_ctx_ssl(s->opts.tls));
    BIO *rb = BIO_new(BIO_s_mem()), *wb = BIO_new(BIO_s_mem());
    if (!t || !ssl || !rb || !wb) {
        free(t);
        SSL_free(ssl);
        BIO_free(rb);
        BIO_free(wb);
        ERR_clear_error();
        return CHAT_ENOMEM;
    }
    SSL_set_bio(ssl, rb, wb);
    SSL_set_accept_state(ssl);
    t->ssl = ssl;
    t->hs_deadline = uv_now(s->loop) + s->opts.handshake_timeout_ms;
    t->conn = c;
    queue_insert_tail(&s->handshaking, &t->hs_link);
    c->tls = t;
    if (!uv_is_active((uv_handle_t *)&s->linger_timer))
        uv_timer_start(&s->linger_timer, conn__on_linger_timer, 250, 250);
    return 0;
}

/* Off the handshaking list (handshake done, or the connection closes). */
static void conn__tls_unlist(conn_t *c) {
    if (c->tls) queue_remove(&c->tls->hs_link);
}

static void conn__tls_free(conn_t *c) {
    if (!c->tls) return;
    conn__tls_unlist(c);
    SSL_free(c->tls->ssl);
    free(c->tls);
    c->tls = NULL;
}

/* An empty memory BIO that once held a burst keeps its buffer: give it back. */
static void conn__tls_trim(SSL *ssl, bool read_side) {
    BIO *b = read_side ? SSL_get_rbio(ssl) : SSL_get_wbio(ssl);
    BUF_MEM *m = NULL;
    if (BIO_ctrl_pending(b) || BIO_get_mem_ptr(b, &m) != 1 || !m || m->max <= CONN_TLS_BIO_KEEP)
        return;
    BIO *n = BIO_new(BIO_s_mem());
    if (!n) return;
    if (read_side) SSL_set0_rbio(ssl, n);
    else SSL_set0_wbio(ssl, n);
}

static void conn__tls_failed(conn_t *c, const char *stage, int ssl_err) {
    unsigned long e = ERR_peek_error();
    char peer[80], reason[160];
    conn_peer(c, peer, sizeof peer);
    if (e) ERR_error_string_n(e, reason, sizeof reason);
    else snprintf(reason, sizeof reason, "%s", ssl_err == SSL_ERROR_SYSCALL ? "eof" : "error");
    ERR_clear_error();
    log_info("tls_error peer=%s stage=%s reason=%s", peer, stage, LOG_STR(reason));
    c->tls->failed = true;
    if (ERR_GET_REASON(e) == SSL_R_HTTP_REQUEST) {
        /* plain HTTP to the TLS port: say so in HTTP rather than reset it (nginx's 497) */
#define CONN_TLS_REQUIRED \
    "{\"error\":\"tls_required\",\"detail\":\"this port speaks TLS: use https:// or wss://\"}"
        static const char answer[] = "HTTP/1.1 400 Bad Request\r\n"
                                     "Content-Type: application/json\r\n"
                                     "Connection: close\r\n"
                                     "Content-Length: %zu\r\n\r\n%s";
        char out[256];
        int n = snprintf(out, sizeof out, answer, sizeof CONN_TLS_REQUIRED - 1, CONN_TLS_REQUIRED);
        BIO *wb = SSL_get_wbio(c->tls->ssl);
        (void)BIO_reset(wb);
        BIO_write(wb, out, n);
    }
    conn_close(c); /* the alert OpenSSL wrote goes out first */
}

/* Run the handshake and hand decrypted bytes to the handler, until OpenSSL needs more
 * input or the handler pauses or closes. Whatever OpenSSL has to send (handshake flights,
 * tickets, alerts) is in the write BIO: the flush at the end of the turn sends it. */
static void conn__tls_pump(conn_t *c) {
    struct conn_tls *t = c->tls;
    uint8_t *rbuf = c->server->rbuf; /* its ciphertext is in the read BIO already */
    while (!(c->flags & (CF_PAUSED | CF_CLOSING | CF_CLOSED))) {
        ERR_clear_error();
        if (!t->established) {
            int r = SSL_do_handshake(t->ssl);
            if (r == 1) {
                t->established = true;
                conn__tls_unlist(c);
                conn__mark_dirty(c); /* the server's last flight and its tickets */
                conn__open(c);
                continue;
            }
            int e = SSL_get_error(t->ssl, r);
            if (e != SSL_ERROR_WANT_READ) conn__tls_failed(c, "handshake", e);
            break;
        }
        size_t got = 0;
        if (SSL_read_ex(t->ssl, rbuf, CONN_READ_BUF, &got) == 1) {
            c->handler->on_read(c, rbuf, got);
            continue;
        }
        int e = SSL_get_error(t->ssl, 0);
        if (e == SSL_ERROR_ZERO_RETURN) conn_close(c); /* the peer's close_notify */
        else if (e != SSL_ERROR_WANT_READ) conn__tls_failed(c, "read", e);
        break;
    }
    if (c->flags & CF_CLOSED) return;
    if (BIO_ctrl_pending(SSL_get_wbio(t->ssl))) conn__mark_dirty(c);
    conn__tls_trim(t->ssl, true);
}

/* At flush time: encrypt the queued plaintext into the write BIO and put the BIO's bytes
 * in the queue instead, as one segment. The queue holds only plaintext here (the flush
 * runs with no write in flight, and the last ciphertext segment left with that write). */
static int conn__tls_encrypt(conn_t *c) {
    static _Thread_local uint8_t gather[CONN_TLS_RECORD];
    struct conn_tls *t = c->tls;
    if (t->established && !t->failed) {
        ERR_clear_error();
        while (c->q_len) {
            struct conn_seg *sg = conn__seg(c, 0);
            size_t left = sg->b->len - sg->off, n = 0;
            const uint8_t *p = sg->b->data + sg->off;
            if (left < CONN_TLS_RECORD) {
                /* small frames (the fan-out's) share records: one seal instead of many */
                while (c->q_len && n < CONN_TLS_RECORD) {
                    sg = conn__seg(c, 0);
                    size_t take = sg->b->len - sg->off;
                    if (take > CONN_TLS_RECORD - n) take = CONN_TLS_RECORD - n;
                    memcpy(gather + n, sg->b->data + sg->off, take);
                    n += take;
                    conn__q_consume(c, take);
                }
                p = gather;
            } else {
                n = left;
            }
            size_t w = 0;
            if (SSL_write_ex(t->ssl, p, n, &w) != 1 || w != n) {
                ERR_clear_error();
                return CHAT_EIO;
            }
            if (p != gather) conn__q_consume(c, n);
        }
        if ((c->flags & CF_CLOSING) && !t->close_sent) {
            t->close_sent = true;
            SSL_shutdown(t->ssl); /* queues close_notify; the peer's answer is not awaited */
            ERR_clear_error();
        }
    }
    BIO *wb = SSL_get_wbio(t->ssl);
    size_t pend = BIO_ctrl_pending(wb);
    if (!pend) return 0;
    if (c->q_len || pend > INT32_MAX) return CHAT_EIO; /* plaintext that could not be sealed */
    buf_t *b = buf_new(pend);
    if (!b) return CHAT_ENOMEM;
    if (BIO_read(wb, b->data, (int)pend) != (int)pend) {
        buf_unref(b);
        return CHAT_EIO;
    }
    b->len = pend;
    if (c->q_cap == 0 && conn__q_grow(c) < 0) {
        buf_unref(b);
        return CHAT_ENOMEM;
    }
    struct conn_seg *sg = conn__seg(c, 0);
    sg->b = b; /* the queue takes our reference */
    sg->off = 0;
    c->q_len = 1;
    c->q_bytes = pend;
    conn__tls_trim(t->ssl, false);
    return 0;
}

/* ---- the listener --------------------------------------------------------------------- */

/* Lingering closes and TLS handshakes past their deadlines, every 250 ms while any is. */
static void conn__on_linger_timer(uv_timer_t *t) {
    conn_server_t *s = t->data;
    uint64_t now = uv_now(s->loop);
    /* the list is in deadline order: every handshake has the same timeout */
    while (!queue_empty(&s->handshaking)) {
        struct conn_tls *tls = queue_data(queue_head(&s->handshaking), struct conn_tls, hs_link);
        if (tls->hs_deadline > now) break;
        conn_t *c = tls->conn;
        char peer[80];
        conn_peer(c, peer, sizeof peer);
        log_info("tls_handshake_timeout peer=%s", peer);
        conn_abort(c); /* unlists it */
    }
    queue_t *q, *n;
    QUEUE_FOREACH_SAFE(q, n, &s->lingering) {
        conn_t *c = queue_data(q, conn_t, linger_link);
        if (c->linger_deadline <= now) conn__hard_close(c); /* unlingers it */
    }
    if (queue_empty(&s->lingering) && queue_empty(&s->handshaking)) uv_timer_stop(t);
}

static void conn__on_connection(uv_stream_t *ls, int status);
static void conn__server_closing_step(struct conn_server_closing *cl);

/* A connection accepted without a conn_t was closed: take the next one that waited. */
static void conn__reject_closed(uv_handle_t *h) {
    conn_server_t *s = h->data;
    s->reject_busy = false;
    if (s->closer) {
        conn__server_closing_step(s->closer);
        return;
    }
    if (s->accept_waiting && s->listening) {
        s->accept_waiting = false;
        conn__on_connection((uv_stream_t *)&s->listener, 0);
    }
}

/* Never leave a pending connection untaken: libuv stops polling the listener until it is
 * taken, and the node would accept nothing ever again. Without memory for it, take it into
 * the spare handle and close it at once (the client sees a reset and may retry). */
static void conn__reject(conn_server_t *s) {
    if (s->reject_busy) {
        s->accept_waiting = true; /* taken once the spare handle has closed */
        return;
    }
    uv_tcp_init(s->loop, &s->reject);
    s->reject.data = s;
    s->reject_busy = true;
    if (uv_accept((uv_stream_t *)&s->listener, (uv_stream_t *)&s->reject) == 0)
        log_warn("accept_refused reason=out_of_memory");
    uv_close((uv_handle_t *)&s->reject, conn__reject_closed);
}

/* A conn_t whose accept failed: it holds nothing but its memory. */
static void conn__free_unaccepted(uv_handle_t *h) { free(h->data); }

static void conn__on_connection(uv_stream_t *ls, int status) {
    conn_server_t *s = ls->data;
    if (status < 0) {
        log_warn("accept_failed error=%s", uv_strerror(status));
        return;
    }
    conn_t *c = calloc(1, sizeof(*c));
    if (!c) {
        conn__reject(s);
        return;
    }
    uv_tcp_init(s->loop, &c->tcp);
    c->tcp.data = c;
    c->server = s;
    c->handler = s->opts.handler;
    c->max_outbound = s->opts.max_outbound_bytes;
    c->id = ++s->next_id;
    if (uv_accept(ls, (uv_stream_t *)&c->tcp) < 0) {
        uv_close((uv_handle_t *)&c->tcp, conn__free_unaccepted);
        return;
    }
    s->n_conns++;
    if (s->opts.max_conns && s->n_conns > s->opts.max_conns) c->over_limit = CONN_OVER_TOTAL;
    if (s->ips && (c->ip = conn__ip_take(s, &c->tcp)) && c->ip->n > s->opts.max_conns_per_ip)
        c->over_limit = CONN_OVER_PER_IP;
    c->last_tx = uv_now(s->loop);
    uv_tcp_nodelay(&c->tcp, 1);
    if (s->opts.tls && conn__tls_start(c) < 0) {
        conn__hard_close(c);
        return;
    }
    if (uv_read_start((uv_stream_t *)&c->tcp, conn__alloc, conn__on_read) < 0) {
        conn__hard_close(c);
        return;
    }
    if (!c->tls) conn__open(c);
}

int conn_server_init(conn_server_t *s, uv_loop_t *loop, const conn_server_opts_t *o) {
    memset(s, 0, sizeof(*s));
    queue_init(&s->dirty);
    queue_init(&s->lingering);
    queue_init(&s->handshaking);
    s->loop = loop;
    s->opts = *o;
    s->handler_data = o->handler_data;
    if (!s->opts.max_outbound_bytes) s->opts.max_outbound_bytes = 4u << 20;
    if (!s->opts.handshake_timeout_ms) s->opts.handshake_timeout_ms = 10000;
    s->rbuf = malloc(CONN_READ_BUF);
    if (!s->rbuf) return CHAT_ENOMEM;
    if (o->max_conns_per_ip && !(s->ips = calloc(CONN_IP_BUCKETS, sizeof(*s->ips)))) {
        free(s->rbuf);
        return CHAT_ENOMEM;
    }

    struct sockaddr_storage addr;
    const char *host = o->host ? o->host : "0.0.0.0";
    int rc = strchr(host, ':') ? uv_ip6_addr(host, o->port, (struct sockaddr_in6 *)&addr)
                               : uv_ip4_addr(host, o->port, (struct sockaddr_in *)&addr);
    if (rc < 0) goto fail_buf;
    uv_tcp_init(loop, &s->listener);
    s->listener.data = s;
    if ((rc = uv_tcp_bind(&s->listener, (struct sockaddr *)&addr, 0)) < 0 ||
        (rc = uv_listen((uv_stream_t *)&s->listener, 1024, conn__on_connection)) < 0) {
        uv_close((uv_handle_t *)&s->listener, NULL);
        goto fail_buf;
    }
    struct sockaddr_storage bound;
    int len = sizeof(bound);
    uv_tcp_getsockname(&s->listener, (struct sockaddr *)&bound, &len);
    s->port = ntohs(bound.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&bound)->sin6_port
                                                : ((struct sockaddr_in *)&bound)->sin_port);
    s->listening = true;

    uv_check_init(loop, &s->flusher);
    s->flusher.data = s;
    uv_check_start(&s->flusher, conn__on_check);
    uv_idle_init(loop, &s->kick);
    s->kick.data = s;
    uv_timer_init(loop, &s->linger_timer);
    s->linger_timer.data = s;
    return 0;

fail_buf:
    free(s->rbuf);
    s->rbuf = NULL;
    free(s->ips);
    s->ips = NULL;
    log_error("listen_failed host=%s port=%d error=%s", host, o->port, uv_strerror(rc));
    return CHAT_EIO;
}

void conn_server_stop_listening(conn_server_t *s) {
    if (!s->listening) return;
    s->listening = false;
    uv_close((uv_handle_t *)&s->listener, NULL);
    /* TLS handshakes under way belong to no handler yet, so nothing above would close them
     * and the loop would never end: they go now. */
    while (!queue_empty(&s->handshaking))
        conn_abort(queue_data(queue_head(&s->handshaking), struct conn_tls, hs_link)->conn);
}

struct conn_server_closing {
    int left;
    void (*done)(void *);
    void *arg;
    uint8_t *rbuf;
    struct conn_ip **ips;
};

static void conn__server_closing_step(struct conn_server_closing *cl) {
    if (--cl->left) return;
    free(cl->rbuf);
    /* every connection closed before this, so every count is gone: only the table is left */
    free(cl->ips);
    if (cl->done) cl->done(cl->arg);
    free(cl);
}

static void conn__server_handle_closed(uv_handle_t *h) { conn__server_closing_step(h->data); }

void conn_server_close(conn_server_t *s, void (*done)(void *), void *arg) {
    conn_server_stop_listening(s);
    struct conn_server_closing *cl = malloc(sizeof(*cl));
    if (!cl) abort(); /* shutting down; nothing sensible is left to do */
    cl->left = 3 + (s->reject_busy ? 1 : 0);
    cl->done = done;
    cl->arg = arg;
    cl->rbuf = s->rbuf;
    s->rbuf = NULL;
    cl->ips = s->ips;
    s->ips = NULL;
    s->closer = cl;
    s->flusher.data = s->kick.data = s->linger_timer.data = cl;
    uv_close((uv_handle_t *)&s->flusher, conn__server_handle_closed);
    uv_close((uv_handle_t *)&s->kick, conn__server_handle_closed);
    uv_close((uv_handle_t *)&s->linger_timer, conn__server_handle_closed);
}

void conn_peer(const conn_t *c, char *out, size_t n) {
    struct sockaddr_storage a;
    int len = sizeof(a);
    char ip[64] = "?";
    int port = 0;
    if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&a, &len) == 0) {
        if (a.ss_family == AF_INET6) {
            uv_ip6_name((struct sockaddr_in6 *)&a, ip, sizeof ip);
            port = ntohs(((struct sockaddr_in6 *)&a)->sin6_port);
        } else {
            uv_ip4_name((struct sockaddr_in *)&a, ip, sizeof ip);
            port = ntohs(((struct sockaddr_in *)&a)->sin_port);
        }
    }
    snprintf(out, n, "%s:%d", ip, port);
}
