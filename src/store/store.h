/* store: durable message storage behind one asynchronous interface.
 *
 * The domain submits a store_req_t and gets its callback later on the loop thread; the
 * backend does its work elsewhere (SQLite: a writer thread with group commit and reader
 * threads; Cassandra: requests on the loop). A callback that reports success for a write
 * means the write is durable (committed and synced): only then may the event be delivered.
 *
 * Backends are a struct of function pointers; store_open() picks one from a URL:
 *   sqlite:PATH            (e.g. sqlite:./data/chat.db)
 *   cassandra://[user:pass@]host:9042,host2:9042/keyspace?consistency=local_quorum
 */
#ifndef CHAT_STORE_H
#define CHAT_STORE_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "core/core.h"

/* One stored message. Strings are NUL-terminated, owned by whoever owns the containing
 * request (freed by store_req_cleanup). message is NULL when deleted; client_id may be NULL. */
typedef struct store_msg {
    uint64_t id;
    char *chat_id;
    char *user_from;
    char *message;
    char *client_id;
    int64_t created_at; /* Unix ms */
    int64_t edited_at;  /* Unix ms, 0 if never edited */
    int64_t deleted_at; /* Unix ms, 0 if not deleted */
} store_msg_t;

typedef enum store_op {
    STORE_APPEND,  /* in: chat_id user text client_id id at. out: msg, duplicate */
    STORE_EDIT,    /* in: chat_id user text id at. out: msg (edited). CHAT_ENOTFOUND, CHAT_EPERM */
    STORE_DELETE,  /* in: chat_id user id at. out: msg (deleted). CHAT_ENOTFOUND, CHAT_EPERM */
    STORE_HISTORY, /* in: chat_id id (before; 0 = newest) limit. out: msgs, newest first */
    STORE_AFTER,   /* in: chat_id id (after) limit. out: msgs, oldest first */
    /* The outbox (only after outbox_enable; chat_id is ignored and may be NULL): */
    STORE_OUTBOX_READ,   /* in: id (after this seq) limit. out: rows, oldest first */
    STORE_OUTBOX_DELETE, /* in: id (through this seq): rows delivered, removed for good */
    /* SQLite only (the search layer's sqlite backend): in: text, an FTS5 MATCH expression
     * over the messages_fts table (the caller builds it from parsed, quoted terms; chat_id
     * is only for logs), id (before; 0 = newest), limit. out: msgs, newest first, not
     * deleted, and marks. Other backends answer CHAT_EINVAL from submit. */
    STORE_SEARCH,
    /* Read positions: one per (chat, user), the newest message id the user has read there.
     * READ_SET in: chat_id user id (a message of the chat) at (Unix ms). Moves the position
     * to id only if id is newer (monotonic: an older id leaves it). out: read_id (the
     * position now, >= id), read_moved. CHAT_ENOTFOUND: no message id in this chat.
     * READ_GET in: chat_id user. out: read_id (0: never read), unread, unread_capped. */
    STORE_READ_SET,
    STORE_READ_GET,
} store_op_t;

/* READ_GET's unread: the messages after the position, not deleted and not the user's own,
 * newest first; counting stops at STORE_UNREAD_CAP (unread_capped) and looks at no more than
 * STORE_UNREAD_SCAN messages (past which unread_capped too: "at least unread"), so a user
 * who never read a busy chat costs one bounded read, not a walk through its history. */
#define STORE_UNREAD_CAP 100
#define STORE_UNREAD_SCAN 1000

/* One outbox row: an event written in the same transaction as the change it describes.
 * Strings are owned by the containing request (freed by store_req_cleanup). */
typedef struct store_outbox_row {
    uint64_t seq; /* strictly increasing over the store's life, never reused */
    /* The record's version header when not 0 (else seq): a backend whose seq is a cursor of
     * its own (Cassandra: local to one relay's run) gives here a number that orders the
     * changes of one message across runs and nodes. */
    uint64_t version;
    char *chat_id;
    uint64_t message_id;
    int64_t at;  /* when the change was stored, Unix ms */
    char *event; /* the encoded event, event_len bytes (also NUL-terminated) */
    size_t event_len;
} store_outbox_row_t;

/* Encodes the event of a stored change (op: APPEND, EDIT or DELETE; m: the message after
 * it) by appending to out. Runs on the backend's writer thread: it must be pure (no state,
 * no loop). The caller owns out. */
typedef void (*store_encode_fn)(sbuf_t *out, store_op_t op, const store_msg_t *m);

typedef struct store_outbox_opts {
    store_encode_fn encode;
    /* Rows the outbox may hold; a change that would add one more fails with CHAT_EBUSY
     * (nothing stored) until the relay catches up. 0: no limit. */
    uint64_t max_rows;
    /* Called on the loop thread after a commit that added rows (NULL: nobody asks); never
     * once close was called. */
    void (*notify)(void *arg);
    void *arg;
    /* Optional (NULL: nobody takes them; a backend may also not offer it, and then calls
     * notify only). Called on the loop thread after a commit with the rows it added, in seq
     * order, instead of notify: so that the relay need not read back what was just written.
     * The rows are in the outbox all the same (a crash loses nothing), so a relay that
     * cannot keep them may drop them and read the outbox. rows and their strings are lent
     * for the call only (the backend's memory): copy what is kept. Never once close was
     * called. */
    void (*handoff)(void *arg, const store_outbox_row_t *rows, size_t n);
} store_outbox_opts_t;

typedef struct store_outbox_stats {
    uint64_t rows;    /* rows in the outbox now (as this node last saw) */
    uint64_t refused; /* changes refused because the outbox was full */
    uint64_t written; /* rows this node wrote */
} store_outbox_stats_t;

/* The most rows one HISTORY or AFTER request returns; larger limits are clamped. */
#define STORE_READ_MAX 100001

typedef struct store_req store_req_t;
typedef void (*store_cb)(store_req_t *req);

struct store_req {
    store_op_t op;
    /* inputs: owned by the caller, must stay valid until the callback */
    const char *chat_id;
    const char *user;
    const char *text;
    const char *client_id; /* APPEND: NULL = not idempotent */
    uint64_t id; /* APPEND: the new id; EDIT/DELETE: target; HISTORY: before; AFTER: after */
    int64_t at;  /* APPEND: created_at; EDIT/DELETE: the time of the change (Unix ms) */
    int limit;   /* HISTORY/AFTER */
    /* APPEND, optional: the event of this append exactly as the outbox encoder would make it
     * of the stored message (store_outbox_opts_t.encode), event_len bytes, when the caller
     * has it already (it broadcasts the same bytes): a backend with an outbox then stores
     * these instead of encoding again. NULL: the backend encodes. */
    const char *event;
    size_t event_len;
    /* outputs, valid in the callback, freed by store_req_cleanup() */
    int status;        /* 0 or a negative CHAT_E* code */
    bool duplicate;    /* APPEND: client_id seen before; msg is the original */
    store_msg_t msg;   /* APPEND/EDIT/DELETE */
    store_msg_t *msgs; /* HISTORY/AFTER/SEARCH */
    size_t n_msgs;
    store_outbox_row_t *rows; /* OUTBOX_READ */
    size_t n_rows;
    /* SEARCH: per msgs[i], its text with each matched token between the bytes \x01 and
     * \x02 (NULL if none); NULL otherwise. Freed by store_req_cleanup. */
    char **marks;
    uint64_t read_id;   /* READ_SET/READ_GET: the position after the request, 0: none */
    bool read_moved;    /* READ_SET: this request moved it */
    bool unread_capped; /* READ_GET: unread is a lower bound (see STORE_UNREAD_CAP) */
    uint32_t unread;    /* READ_GET */
    /* the caller's */
    void *data;
    store_cb cb;
    /* private to the backend */
    queue_t link_;
    void *priv_;
};

typedef struct store store_t;

typedef struct store_ops {
    const char *name;
    /* Queue a request that store_submit checked and whose outputs it reset. 0: cb will be
     * called exactly once, on the loop thread. A negative code: cb will never be called
     * (CHAT_EINVAL for an op this backend does not do). */
    int (*submit)(store_t *s, store_req_t *req);
    /* Create or upgrade the schema, synchronously (for chatctl migrate). Idempotent. */
    int (*migrate)(store_t *s);
    /* Finish every queued write, call their callbacks, then free the store and call done
     * (if not NULL) on the loop thread. No submit after close. */
    void (*close)(store_t *s, void (*done)(void *arg), void *arg);
    /* Optional (NULL: none): append the backend's own counters to out as Prometheus text
     * lines, names starting chat_store_<name>_. Called on the loop thread. */
    void (*metrics)(store_t *s, sbuf_t *out);
    /* Optional (NULL: always healthy): 0 while the store can take writes as far as it knows,
     * else CHAT_EIO and a readable reason in detail (NUL-terminated, cut to n bytes). Cheap:
     * it reports state the backend keeps, no I/O. Called on the loop thread. */
    int (*health)(store_t *s, char *detail, size_t n);
    /* Optional (NULL: the backend has no outbox yet). From now on every APPEND, EDIT and
     * DELETE that succeeds also writes its event to the outbox in the same transaction, so
     * that a relay can hand it on (src/stream/). Creates the outbox if missing.
     * Synchronous; call once, on the loop thread, before any submit. 0 or CHAT_EIO. */
    int (*outbox_enable)(store_t *s, const store_outbox_opts_t *o);
    /* Optional, with outbox_enable. Safe from any thread. */
    void (*outbox_stats)(store_t *s, store_outbox_stats_t *out);
} store_ops_t;

/* Every backend's struct starts with this. */
struct store {
    const store_ops_t *ops;
    uv_loop_t *loop;
};

/* Open a store from a URL. loop may be NULL only for migrate-only use (chatctl), in which
 * case submit must not be called. On success *out is owned by the caller and released with
 * store_close(). Errors: CHAT_EINVAL for an unknown scheme, CHAT_EIO if it cannot be opened;
 * err (if not NULL, errlen > 0) gets a readable reason. */
int store_open(store_t **out, uv_loop_t *loop, const char *url, char *err, size_t errlen);

/* Submit r: the one entry to every backend. The request is checked here (CHAT_EINVAL: no
 * loop, no cb, an unknown op or an input its op needs is missing; see store_op_t) and its
 * outputs reset, so a backend's submit gets a well-formed request and checks only what is
 * its own (an op it does not do, closing). 0: r->cb runs exactly once, later, on the loop
 * thread; a negative code: it never runs. r and its inputs stay the caller's and must stay
 * valid until the callback; its outputs are freed by store_req_cleanup. */
int store_submit(store_t *s, store_req_t *r);
static inline int store_migrate(store_t *s) { return s->ops->migrate(s); }
static inline void store_close(store_t *s, void (*done)(void *), void *arg) {
    s->ops->close(s, done, arg);
}
static inline void store_metrics(store_t *s, sbuf_t *out) {
    if (s->ops->metrics) s->ops->metrics(s, out);
}

/* The store's state for /healthz: 0 or CHAT_EIO with a reason in detail (see health). */
static inline int store_health(store_t *s, char *detail, size_t n) {
    if (n) detail[0] = '\0';
    return s->ops->health ? s->ops->health(s, detail, n) : 0;
}

/* The outbox, if the backend has one: CHAT_EINVAL when it has not. */
static inline int store_outbox_enable(store_t *s, const store_outbox_opts_t *o) {
    return s->ops->outbox_enable ? s->ops->outbox_enable(s, o) : CHAT_EINVAL;
}

static inline void store_outbox_stats(store_t *s, store_outbox_stats_t *out) {
    *out = (store_outbox_stats_t){0};
    if (s->ops->outbox_stats) s->ops->outbox_stats(s, out);
}

/* Free n outbox rows' strings (NULL ones are fine) and the rows array (may be NULL). */
void store_outbox_rows_free(store_outbox_row_t *rows, size_t n);

/* Free the outputs of a request (msg strings, msgs array) so it can be reused. */
void store_req_cleanup(store_req_t *r);
/* For backends: count one message of a READ_GET's scan (newest first, after the position)
 * into r->unread. false: the cap is reached (r->unread_capped set), stop scanning. */
bool store_unread_add(store_req_t *r, const char *user_from, bool deleted);
/* Free a message's strings and zero it. */
void store_msg_clear(store_msg_t *m);

/* Backends (declared here so store.c can list them; the domain uses store_open only). */
int store_sqlite_open(store_t **out, uv_loop_t *loop, const char *path, char *err, size_t errlen);
/* url: the whole "cassandra://[user:pass@]host[:port][,host...]/keyspace?options" URL. */
int store_cassandra_open(store_t **out, uv_loop_t *loop, const char *url, char *err, size_t errlen);

#endif
