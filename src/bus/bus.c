/* bus: URL dispatch, the instance id, and the "local" backend.
 * With one process there is no other node to reach: the hub has already delivered every
 * event to every local member, so local publish and subscribe have nothing to do, and the
 * only live node is this one. */
#include "bus.h"

#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct bus_local {
    bus_t base;
    bus_node_t self;
    bool registered;
    /* node-list answers queued for a later turn: each reads the bus, so a close waits for
     * them and the last one frees it */
    unsigned lists_pending;
    bool closing;
    void (*done)(void *);
    void *done_arg;
} bus_local_t;

static int local_subscribe(bus_t *b, const char *chat_id) { return 1; /* nothing to wait for */ }
static int local_unsubscribe(bus_t *b, const char *chat_id) { return 0; }
static int local_publish(bus_t *b, const char *chat_id, const void *p, size_t n) { return 0; }

static int local_heartbeat(bus_t *b, const bus_node_t *self, unsigned ttl_ms) {
    bus_local_t *l = (bus_local_t *)b;
    l->self = *self;
    l->self.seen_at = time_now_ms();
    l->registered = true;
    return 0;
}

static int local_deregister(bus_t *b, const char *id) {
    ((bus_local_t *)b)->registered = false;
    return 0;
}

typedef struct local_list {
    uv_idle_t idle;
    bus_local_t *bus;
    bus_nodes_cb cb;
    void *ud;
} local_list_t;

static void local_free(bus_local_t *l) {
    void (*done)(void *) = l->done;
    void *arg = l->done_arg;
    free(l);
    if (done) done(arg);
}

static void local_list_closed(uv_handle_t *h) {
    local_list_t *q = h->data;
    bus_local_t *l = q->bus;
    free(q);
    if (--l->lists_pending == 0 && l->closing) local_free(l);
}

/* Answer on a later loop turn, as every backend does: callers may rely on it. Once the bus
 * is closing the answer is CHAT_ECLOSED, as the Redis bus answers. */
static void local_list_run(uv_idle_t *h) {
    local_list_t *q = h->data;
    bus_local_t *l = q->bus;
    uv_idle_stop(h);
    if (l->closing) {
        q->cb(q->ud, CHAT_ECLOSED, NULL, 0);
    } else {
        q->cb(q->ud, 0, &l->self, l->registered ? 1 : 0);
    }
    uv_close((uv_handle_t *)h, local_list_closed);
}

static int local_list_nodes(bus_t *b, bus_nodes_cb cb, void *ud) {
    if (((bus_local_t *)b)->closing) return CHAT_ECLOSED;
    local_list_t *q = calloc(1, sizeof(*q));
    if (!q) return CHAT_ENOMEM;
    q->bus = (bus_local_t *)b;
    q->cb = cb;
    q->ud = ud;
    uv_idle_init(b->loop, &q->idle);
    q->idle.data = q;
    uv_idle_start(&q->idle, local_list_run);
    q->bus->lists_pending++;
    return 0;
}

static void local_close(bus_t *b, void (*done)(void *), void *arg) {
    bus_local_t *l = (bus_local_t *)b;
    if (l->closing) return;
    l->closing = true;
    l->done = done;
    l->done_arg = arg;
    if (l->lists_pending == 0) local_free(l);
}

static const bus_ops_t local_ops = {
    .name = "local",
    .has_peers = false,
    .subscribe = local_subscribe,
    .unsubscribe = local_unsubscribe,
    .publish = local_publish,
    .heartbeat = local_heartbeat,
    .deregister = local_deregister,
    .list_nodes = local_list_nodes,
    .close = local_close,
};

int bus_open(bus_t **out, uv_loop_t *loop, const char *url, const bus_callbacks_t *cb, char *err,
             size_t errlen) {
    bus_t *b = NULL;
    int rc;
    if (!url || !*url || strcmp(url, "local") == 0) {
        bus_local_t *l = calloc(1, sizeof(*l));
        if (!l) return CHAT_ENOMEM;
        l->base.ops = &local_ops;
        b = &l->base;
    } else if (strncmp(url, "redis://", 8) == 0) {
        if ((rc = bus_redis_open(&b, loop, url, err, errlen)) < 0) return rc;
    } else {
        if (err && errlen)
            snprintf(err, errlen, "unknown bus '%s' (supported: local, redis://host:port)", url);
        return CHAT_EINVAL;
    }
    b->loop = loop;
    if (cb) b->cb = *cb;
    unsigned char raw[16];
    if (RAND_bytes(raw, sizeof raw) != 1) {
        bus_close(b, NULL, NULL);
        return CHAT_EIO;
    }
    for (int i = 0; i < 16; i++) snprintf(b->instance + 2 * i, 3, "%02x", raw[i]);
    *out = b;
    return 0;
}
