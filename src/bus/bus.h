/* bus: carries encoded chat events between server nodes.
 *
 * A node subscribes to a chat when its first local member joins and unsubscribes when the
 * last one leaves: one subscription per node per chat, never one per connection. A node
 * delivers to its own members itself and publishes for the others; the bus hands back
 * only what other nodes published (a backend filters its own echo).
 *
 * Backends, chosen by URL: "local" (one process: nothing to carry, the default) and, with
 * the scale-out work, "redis://host:port".
 */
#ifndef CHAT_BUS_H
#define CHAT_BUS_H

#include <stddef.h>
#include <uv.h>

#include "core/core.h"

typedef struct bus bus_t;

/* An event published by another node. chat_id and payload are valid during the call. */
typedef void (*bus_message_cb)(void *ud, const char *chat_id, const uint8_t *payload, size_t len);
/* The bus went down (up == false: events from other nodes may be missed from now on) or
 * came back (up == true: reconnected AND every chat resubscribed; the server now reads
 * from the store what its chats missed). The local bus never calls it. */
typedef void (*bus_state_cb)(void *ud, bool up);

/* The subscription to chat_id is active at the broker: from now on nothing published for
 * it is missed (the server reads the store for a resuming client only after this). */
typedef void (*bus_subscribed_cb)(void *ud, const char *chat_id);

/* A live chatd node, as registered on the bus (service discovery). */
typedef struct bus_node {
    char id[33];          /* this process's instance id: 32 hex chars, new at every start */
    char url[256];        /* public WebSocket base URL, e.g. "ws://127.0.0.1:8001" */
    uint64_t connections; /* WebSocket connections open on it */
    int64_t started_at;   /* Unix ms */
    int64_t seen_at;      /* Unix ms of its last heartbeat */
    bool draining;        /* shutting down: send no new clients there */
    int node_id;          /* the node id inside its message ids, 0..1023; -1 if not reported */
} bus_node_t;

/* The live nodes (heartbeat younger than their TTL, and, on Redis, a connection to the
 * broker that is still open: a crashed process is dropped at once), in no particular order. status 0 or a
 * negative CHAT_E* (then n == 0). nodes is valid during the call only. */
typedef void (*bus_nodes_cb)(void *ud, int status, const bus_node_t *nodes, size_t n);

/* The node id lease (see bus_ops_t.lease). The first call answers the request: status 0 and
 * the id now held, or CHAT_EBUSY (the id asked for is held by a live node; detail names the
 * holder's instance), CHAT_ERANGE (every id is held), CHAT_EIO (the broker refused, detail
 * says why). After a 0 it runs at most once more, with CHAT_EBUSY: the lease was lost (it
 * expired while the broker was unreachable and another node holds the id now). detail is
 * valid during the call only. */
typedef void (*bus_lease_cb)(void *ud, int status, unsigned node_id, const char *detail);

/* One user online in a chat through one node (bus_ops_t.presence_list). */
typedef struct bus_presence {
    char node[33];    /* the instance id of the node the user is connected through */
    const char *user; /* valid during the callback only */
} bus_presence_t;
/* status 0 or a negative CHAT_E* (then n == 0); p is valid during the call only. */
typedef void (*bus_presence_cb)(void *ud, int status, const bus_presence_t *p, size_t n);

typedef struct bus_ops {
    const char *name; /* for logs and messages only: ask the flags below, not the name */
    /* Other nodes share this bus: their events reach this node only through it, so while it
     * is down a room can miss some (to be read back from the store once it is up), and
     * list_nodes can name peers. false for "local" (one process, nothing to miss). */
    bool has_peers;
    /* 1: active now; 0: on_subscribed follows once the broker confirms; < 0: error. */
    int (*subscribe)(bus_t *b, const char *chat_id);
    int (*unsubscribe)(bus_t *b, const char *chat_id);
    /* Queue payload for the other nodes (copied; no reply is awaited). */
    int (*publish)(bus_t *b, const char *chat_id, const void *payload, size_t len);
    /* Register this node or refresh its entry (the server calls it every second with a
     * fresh connection count); the entry expires ttl_ms after the last call. self is copied. */
    int (*heartbeat)(bus_t *b, const bus_node_t *self, unsigned ttl_ms);
    /* Remove this node's entry now (drain). */
    int (*deregister)(bus_t *b, const char *id);
    /* Ask for the live nodes; cb runs later on the loop thread, exactly once, unless this
     * returns an error. */
    int (*list_nodes)(bus_t *b, bus_nodes_cb cb, void *ud);
    /* Lease a node id, so that no two live nodes mint message ids with the same one: want
     * 0..1023, or -1 for any free id. The lease is renewed by the bus itself every ttl_ms/5
     * while the broker is reachable (re-taken if it expired and is still free) and released
     * by close. Waits for the broker if it is down; cb runs later on the loop thread. NULL in
     * a backend without other nodes (local): the configured id is used as is. */
    int (*lease)(bus_t *b, int want, unsigned ttl_ms, bus_lease_cb cb, void *ud);
    /* Presence kept where the bus lives, so that a node joining a chat learns who is online
     * in it through the other nodes. presence_set records (online) or removes this node's
     * entry for user in chat_id, queued in order with publish (an entry set before a publish
     * is in place when the publish arrives). A node's entries count only while the node is
     * live (registered, connected): a crashed node's entries vanish with it. presence_list
     * answers the live entries of every node, this one's included; cb runs once, later or
     * from inside the bus's I/O callback, unless this returns an error. Both NULL in a
     * backend without other nodes (local): the server's own table is all there is. The
     * strings are copied. */
    int (*presence_set)(bus_t *b, const char *chat_id, const char *user, bool online);
    int (*presence_list)(bus_t *b, const char *chat_id, bus_presence_cb cb, void *ud);
    /* Stop and free; done (if not NULL) runs on the loop thread when every handle closed.
     * Publishes queued before close are sent first, if the connection allows. */
    void (*close)(bus_t *b, void (*done)(void *), void *arg);
} bus_ops_t;

/* What the owner of a bus hears from it, given once to bus_open. Any callback may be NULL
 * (not interested); each gets ud first. */
typedef struct bus_callbacks {
    bus_message_cb on_message;
    bus_state_cb on_state;
    bus_subscribed_cb on_subscribed;
    void *ud;
} bus_callbacks_t;

struct bus {
    const bus_ops_t *ops;
    uv_loop_t *loop;
    bus_callbacks_t cb; /* a copy of bus_open's; backends call through it */
    char instance[33];  /* this process's instance id (hex), set by bus_open */
};

/* Open a bus from a URL: "local" (or NULL), or "redis://[:password@]host:port[/db]".
 * *out is owned by the caller, released with bus_close(). cb (may be NULL: no callbacks) is
 * copied. err gets a readable reason on failure (CHAT_EINVAL: unknown scheme or bad URL). A
 * Redis bus that cannot connect yet still opens: it keeps retrying with backoff and reports
 * through on_state. */
int bus_open(bus_t **out, uv_loop_t *loop, const char *url, const bus_callbacks_t *cb, char *err,
             size_t errlen);

static inline int bus_subscribe(bus_t *b, const char *chat) { return b->ops->subscribe(b, chat); }
static inline int bus_unsubscribe(bus_t *b, const char *chat) {
    return b->ops->unsubscribe(b, chat);
}
static inline int bus_publish(bus_t *b, const char *chat, const void *p, size_t n) {
    return b->ops->publish(b, chat, p, n);
}
static inline int bus_heartbeat(bus_t *b, const bus_node_t *self, unsigned ttl_ms) {
    return b->ops->heartbeat(b, self, ttl_ms);
}
static inline int bus_deregister(bus_t *b, const char *id) { return b->ops->deregister(b, id); }
static inline int bus_list_nodes(bus_t *b, bus_nodes_cb cb, void *ud) {
    return b->ops->list_nodes(b, cb, ud);
}
static inline int bus_lease(bus_t *b, int want, unsigned ttl_ms, bus_lease_cb cb, void *ud) {
    return b->ops->lease ? b->ops->lease(b, want, ttl_ms, cb, ud) : CHAT_EINVAL;
}
static inline int bus_presence_set(bus_t *b, const char *chat, const char *user, bool online) {
    return b->ops->presence_set ? b->ops->presence_set(b, chat, user, online) : 0;
}
static inline void bus_close(bus_t *b, void (*done)(void *), void *arg) {
    b->ops->close(b, done, arg);
}

/* Backends (store.c-style registry; the domain uses bus_open only). */
int bus_redis_open(bus_t **out, uv_loop_t *loop, const char *url, char *err, size_t errlen);

#endif
