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

#include "../core/core.h"

typedef struct bus bus_t;

/* An event published by another node. chat_id and payload are valid during the call. */
typedef void (*bus_message_cb)(void *ud, const char *chat_id, const uint8_t *payload,
                               size_t len);

typedef struct bus_ops {
    const char *name;
    int (*subscribe)(bus_t *b, const char *chat_id);
    int (*unsubscribe)(bus_t *b, const char *chat_id);
    /* Queue payload for the other nodes (copied; no reply is awaited). */
    int (*publish)(bus_t *b, const char *chat_id, const void *payload, size_t len);
    /* Stop and free; done (if not NULL) runs on the loop thread when every handle closed. */
    void (*close)(bus_t *b, void (*done)(void *), void *arg);
} bus_ops_t;

struct bus {
    const bus_ops_t *ops;
    uv_loop_t *loop;
    bus_message_cb on_message;
    void *ud;
};

/* Open a bus from a URL ("local"; NULL means local). *out is owned by the caller, released
 * with bus_close(). err gets a readable reason on failure (CHAT_EINVAL: unknown scheme). */
int bus_open(bus_t **out, uv_loop_t *loop, const char *url, bus_message_cb cb, void *ud,
             char *err, size_t errlen);

static inline int bus_subscribe(bus_t *b, const char *chat) { return b->ops->subscribe(b, chat); }
static inline int bus_unsubscribe(bus_t *b, const char *chat) {
    return b->ops->unsubscribe(b, chat);
}
static inline int bus_publish(bus_t *b, const char *chat, const void *p, size_t n) {
    return b->ops->publish(b, chat, p, n);
}
static inline void bus_close(bus_t *b, void (*done)(void *), void *arg) {
    b->ops->close(b, done, arg);
}

#endif
