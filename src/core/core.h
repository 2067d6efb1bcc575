/* core: what every layer above needs and nothing more.
 *
 * - error codes: one table of negative ints, chat_strerror(); no global last-error.
 * - buf_t: a refcounted byte buffer. A broadcast frame is encoded once into one buf_t and
 *   the same buf_t is queued to every recipient; each queue holds a reference.
 * - logging to stderr, one line per event: "ts level msg key=value ...".
 * - Snowflake-style ids and millisecond time helpers.
 * - one UTF-8 validator (utf8.c) and one JSON string escaper, for every layer above.
 * - queue.h (its own header): the one intrusive doubly linked list, for every layer above.
 * - conn_t: a TCP connection on libuv with a corked output queue: sends during a loop turn
 *   are queued and written with one sendmsg per connection at the end of that turn.
 * - tls_ctx_t: an optional TLS transport under conn_t (OpenSSL with memory BIOs on the loop):
 *   handlers see plaintext; queued frames are encrypted per connection at flush time.
 */
#ifndef CHAT_CORE_H
#define CHAT_CORE_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/queue.h"

/* ---- errors ------------------------------------------------------------------------- */
enum {
    CHAT_OK = 0,
    CHAT_EAGAIN = -1, /* incremental parser: need more bytes */
    CHAT_ENOMEM = -2,
    CHAT_EINVAL = -3,    /* malformed input */
    CHAT_ENOTFOUND = -4, /* no such message / chat / route */
    CHAT_EPERM = -5,     /* not allowed (e.g. not the author) */
    CHAT_EIO = -6,       /* storage or socket failure */
    CHAT_ETOOBIG = -7,   /* over a configured size limit */
    CHAT_EPROTO = -8,    /* protocol violation */
    CHAT_EUTF8 = -9,     /* invalid UTF-8 */
    CHAT_ECLOSED = -10,  /* the object is closing or closed */
    CHAT_EAUTH = -11,    /* bad or missing credentials */
    CHAT_EEXPIRED = -12, /* credentials expired */
    CHAT_EBUSY = -13,    /* backpressure: try later */
    CHAT_ERANGE = -14,   /* value out of range */
};
/* Static string for an error code; never NULL. */
const char *chat_strerror(int err);

/* ---- refcounted buffers --------------------------------------------------------------- */
typedef struct buf {
    uint32_t refs;
    uint32_t cap;
    size_t len;
    uint8_t data[]; /* cap bytes */
} buf_t;

/* New buffer with one reference, len 0 and room for cap bytes. NULL on OOM.
 * The caller owns that reference and releases it with buf_unref(). */
buf_t *buf_new(size_t cap);
/* New buffer holding a copy of p[0..n). One reference, owned by the caller. */
buf_t *buf_from(const void *p, size_t n);
/* Take another reference; returns b. Single-threaded: only the loop thread touches refs. */
static inline buf_t *buf_ref(buf_t *b) {
    b->refs++;
    return b;
}
/* Drop a reference; frees the buffer at zero. NULL is ignored. */
void buf_unref(buf_t *b);

/* ---- string builder ------------------------------------------------------------------- */
/* A growable byte string for encoding responses and events. After an allocation failure
 * every append is a no-op and oom stays set: check it once at the end. sbuf_free releases. */
typedef struct sbuf {
    char *p;
    size_t len, cap;
    bool oom;
} sbuf_t;
void sbuf_put(sbuf_t *sb, const void *p, size_t n);
void sbuf_puts(sbuf_t *sb, const char *s);
void sbuf_printf(sbuf_t *sb, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Append s[0..n) as a JSON string literal, quotes included (json_escape). */
void sbuf_json_str(sbuf_t *sb, const char *s, size_t n);
/* Append one Prometheus metric with its HELP and TYPE lines: "counter" or "gauge" for
 * type; name and help are the caller's (written as they are, not escaped). */
void sbuf_metric(sbuf_t *sb, const char *name, const char *type, const char *help, uint64_t v);

/* ---- JSON strings and UTF-8 ----------------------------------------------------------- */
/* The contents of a JSON string literal for s[0..n), without the quotes: written to out
 * (the caller's, at least 6 * n bytes) unless out is NULL; returns the length either way,
 * so a caller can measure first and write once. Valid UTF-8 is copied as is; quotes,
 * backslashes and control characters are escaped (\n \r \t, others \u00XX); each byte of
 * invalid UTF-8 becomes \ufffd, so the result is valid JSON whatever s holds (an error
 * detail may quote client input). */
size_t json_escape(const char *s, size_t n, char *out);

/* Incremental UTF-8 validator (utf8.c). State UTF8_ACCEPT = at a character boundary;
 * UTF8_REJECT = invalid (sticky). */
#define UTF8_ACCEPT 0u
#define UTF8_REJECT 1u
/* Advance state over p[0..n); returns the new state. Rejects overlongs, surrogates
 * (U+D800..DFFF) and code points above U+10FFFF. */
uint32_t utf8_feed(uint32_t state, const uint8_t *p, size_t n);
/* Whole-string check: true if p[0..n) is complete, valid UTF-8. */
bool utf8_valid(const uint8_t *p, size_t n);
/* Length (1 to 4) of the valid UTF-8 sequence at p[0..n), or 0 if p starts an invalid or
 * truncated one. n must be > 0. */
size_t utf8_seq_len(const uint8_t *p, size_t n);
void sbuf_free(sbuf_t *sb);

/* Copy a URL for logs with any password hidden: "scheme://user:secret@host" becomes
 * "scheme://user:***@host" (also ":secret@" without a user). Always NUL-terminates out. */
void url_redact(const char *url, char *out, size_t n);

/* ---- logging -------------------------------------------------------------------------- */
enum { CHAT_LOG_DEBUG, CHAT_LOG_INFO, CHAT_LOG_WARN, CHAT_LOG_ERROR };
void log_set_level(int level);
/* printf-style message; by convention "event key=value key=value". One line to stderr. */
void log_msg(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
#define log_debug(...) log_msg(CHAT_LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(CHAT_LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(CHAT_LOG_WARN, __VA_ARGS__)
#define log_error(...) log_msg(CHAT_LOG_ERROR, __VA_ARGS__)

/* A value for a log field, logfmt style. A string a client chose (a user id, a header, a
 * URL) must not be able to end its field and forge another (`sub` = `alice user=admin`),
 * nor break the line. So s[0..n) is written as is only when it is a non-empty run of
 * printable ASCII without space, '"', backslash or '='; otherwise in double quotes, with '"'
 * and backslash escaped by a backslash, \n \r \t, and every other byte outside printable
 * ASCII as \xNN (non-ASCII too: no control or bidi character reaches a terminal). A value
 * longer than out has room for is cut and ends in "...". s may be NULL (logged as "").
 * out (cap >= 8 bytes) is the caller's and always NUL-terminated; returns out. */
char *log_value(char *out, size_t cap, const char *s, size_t n);
/* log_value of a NUL-terminated string into a buffer that lives until the end of the
 * enclosing block, for use as a log argument: log_info("x user=%s", LOG_STR(user)). */
#define LOG_VALUE_MAX 256
#define LOG_STR(s) log_str_((char[LOG_VALUE_MAX]){0}, (s))
char *log_str_(char out[LOG_VALUE_MAX], const char *s);

/* ---- time and ids --------------------------------------------------------------------- */
/* Wall-clock milliseconds since the Unix epoch. */
int64_t time_now_ms(void);
/* RFC 3339 UTC with milliseconds, "2026-11-29T12:00:00.123Z"; out needs 25 bytes. */
void time_format_ms(int64_t ms, char out[25]);

/* Snowflake ids: 41 bits of milliseconds since ID_EPOCH_MS, 10 bits of node id, 12 bits of
 * sequence. Time-ordered, unique per node; the clock never runs backwards in ids (a clock
 * step back reuses the last millisecond until the wall clock catches up). */
#define ID_EPOCH_MS 1577836800000LL /* 2020-01-01T00:00:00Z */
typedef struct id_gen {
    unsigned node;   /* 0..1023 */
    int64_t last_ms; /* last millisecond handed out, relative to the epoch */
    unsigned seq;
} id_gen_t;
void id_gen_init(id_gen_t *g, unsigned node);
/* Next id; *ms_out (may be NULL) gets its Unix time in ms. Not thread-safe: one per loop. */
uint64_t id_next(id_gen_t *g, int64_t *ms_out);
/* Unix ms encoded in an id. */
int64_t id_time_ms(uint64_t id);
/* Parse a decimal id; 0 on success, CHAT_EINVAL if not a non-empty decimal uint64. */
int id_parse(const char *s, size_t n, uint64_t *out);

/* ---- TLS (tls.c) ---------------------------------------------------------------------- */
/* A server TLS context: TLS 1.2 and 1.3 only, the server's cipher order, ALPN http/1.1,
 * stateless session tickets, small idle connections (record buffers released). */
typedef struct tls_ctx tls_ctx_t;
/* Load a PEM certificate chain and a PEM private key (the paths are copied: tls_ctx_reload
 * reads them again). NULL with a reason in err if a file is unreadable or the key does not
 * match. The caller owns the result (tls_ctx_free). */
tls_ctx_t *tls_ctx_new(const char *cert_file, const char *key_file, char *err, size_t errlen);
/* Read the two files again; new handshakes use the new pair, open connections keep theirs.
 * On failure (CHAT_EINVAL, err says why) the old pair stays in use. Loop thread only. */
int tls_ctx_reload(tls_ctx_t *t, char *err, size_t errlen);
/* Release the caller's context; connections accepted with it keep it alive until they close. */
void tls_ctx_free(tls_ctx_t *t);

/* ---- connections ---------------------------------------------------------------------- */
typedef struct conn conn_t;
typedef struct conn_server conn_server_t;

/* What a connection does with its bytes. The handler can be swapped at any time (HTTP
 * upgrades to WebSocket by calling conn_set_handler). */
typedef struct conn_handler {
    /* A connection was accepted (handler data: c->server->handler_data), with TLS once its
     * handshake finished. May close it. on_close is called only after on_open was. */
    void (*on_open)(conn_t *c);
    /* Bytes arrived. data is valid only during the call and may be modified in place
     * (the WebSocket parser unmasks in place). The callback may close the connection. */
    void (*on_read)(conn_t *c, uint8_t *data, size_t len);
    /* The connection is gone (peer closed, error, conn_close finished). Release ctx here;
     * the conn_t is freed right after this returns. Called exactly once. */
    void (*on_close)(conn_t *c);
    /* Optional. The output queue drained to at most the low-water mark given to the last
     * conn_notify_drain() (one-shot: armed again only by another conn_notify_drain). The
     * callback may send, pause or resume reading, or close the connection. */
    void (*on_drain)(conn_t *c);
} conn_handler_t;

/* conn_t is opaque: only conn.c reads or changes a connection's fields; everything else goes
 * through the functions below (its handler state, its queue, its timings, its limits). */

/* A connection accepted beyond a limit is still accepted, so that the handler can say why
 * (an HTTP 503) rather than leave it to a reset; c->over_limit tells which limit. */
enum { CONN_OVER_TOTAL = 1, CONN_OVER_PER_IP = 2 };

typedef struct conn_server_opts {
    const char *host; /* "0.0.0.0" if NULL */
    int port;         /* 0 = pick a free port */
    size_t max_outbound_bytes;
    size_t max_conns;              /* open connections beyond which over_limit is set; 0: none */
    size_t max_conns_per_ip;       /* the same per peer address; 0: none */
    const conn_handler_t *handler; /* initial handler of every accepted connection */
    void *handler_data;            /* conn_server_t.handler_data, for the handler's use */
    /* TLS on every connection (borrowed, must outlive the server; NULL: plain TCP), and
     * the time a handshake may take before the connection is dropped (0: 10 s). */
    tls_ctx_t *tls;
    unsigned handshake_timeout_ms;
} conn_server_opts_t;

struct conn_server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    uv_check_t flusher;      /* writes every dirty connection after the poll phase */
    uv_idle_t kick;          /* keeps the poll from blocking while anything is dirty */
    uv_timer_t linger_timer; /* drops half-closed connections whose peer never closes */
    queue_t dirty;           /* conn_t.dirty_link, oldest first: flushed in the order dirtied */
    queue_t lingering;       /* conn_t.linger_link */
    queue_t handshaking;     /* TLS handshakes under way (conn_tls), oldest first */
    conn_server_opts_t opts;
    uint8_t *rbuf; /* one read buffer for every connection: reads are handled at once */
    void *handler_data;
    size_t n_conns;
    int port; /* the bound port */
    bool listening;
    uint64_t next_id;
    struct conn_ip **ips; /* connections per peer address (max_conns_per_ip only) */
    /* Accepting without memory for a conn_t: the connection is taken into this handle and
     * closed, since libuv stops polling the listener until a pending connection is taken. */
    uv_tcp_t reject;
    bool reject_busy;                   /* reject is closing */
    bool accept_waiting;                /* a connection waits for reject to be free */
    struct conn_server_closing *closer; /* conn_server_close is under way */
};

/* Bind and listen. On success *srv->port is the bound port. The server struct is owned by
 * the caller and must outlive every connection. */
int conn_server_init(conn_server_t *s, uv_loop_t *loop, const conn_server_opts_t *o);
/* Stop accepting; existing connections stay open, but TLS handshakes under way are reset. */
void conn_server_stop_listening(conn_server_t *s);
/* Release the loop handles (after every connection closed); done (if not NULL) runs once
 * they are closed. */
void conn_server_close(conn_server_t *s, void (*done)(void *), void *arg);

/* Queue a buffer for sending. Takes its own reference on b (the caller keeps its own).
 * Written at the end of this loop turn together with everything else queued.
 * CHAT_EBUSY: the outbound limit would be exceeded; nothing was queued (the caller
 * decides, usually to abort the slow client). CHAT_ECLOSED: connection is closing. */
int conn_send(conn_t *c, buf_t *b);
/* Same as conn_send with a private copy of p[0..n). */
int conn_send_copy(conn_t *c, const void *p, size_t n);
/* Same as conn_send, ignoring the outbound limit (for the final close frame). */
int conn_send_force(conn_t *c, buf_t *b);
/* Write what is queued, stop reading, then close. on_close follows. Idempotent. */
void conn_close(conn_t *c);
/* Close now with a TCP reset, discarding queued output (ours and what the kernel still
 * buffers). on_close follows. Idempotent. */
void conn_abort(conn_t *c);
/* Swap the handler (and its ctx). */
void conn_set_handler(conn_t *c, const conn_handler_t *h, void *ctx);
bool conn_is_closing(const conn_t *c);
/* Bytes queued and not yet taken by the kernel. */
size_t conn_queued(const conn_t *c);
/* The handler's state (conn_set_handler's ctx; borrowed). */
void *conn_ctx(const conn_t *c);
/* uv_now() of the last write that moved bytes to the kernel (0: none yet). */
uint64_t conn_last_tx(const conn_t *c);
/* CONN_OVER_* when it was accepted beyond a limit (its handler refuses it), else 0. */
int conn_over_limit(const conn_t *c);
/* The server's handler_data (conn_server_opts_t; borrowed). */
void *conn_server_data(const conn_t *c);
/* Stop / restart reading from the peer (backpressure: a client whose answers pile up is
 * not read further until they drain). Idempotent; a paused connection still writes and
 * still closes normally. */
void conn_pause_read(conn_t *c);
void conn_resume_read(conn_t *c);
bool conn_read_paused(const conn_t *c);
/* Arm a one-shot call of handler->on_drain once the queue holds at most low_water bytes
 * (from a later loop turn's flush; if it already holds that little, at the next flush
 * that writes, or the end of this turn). Arming again before it fired keeps the lower of
 * the two marks, so two parties waiting on one connection are both woken. */
void conn_notify_drain(conn_t *c, size_t low_water);
/* Peer address as "ip:port" for logs. */
void conn_peer(const conn_t *c, char *out, size_t n);

#endif
