/* bus: URL dispatch and the "local" backend.
 * With one process there is no other node to reach: the hub has already delivered every
 * event to every local member, so local publish and subscribe have nothing to do. */
#include "bus.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int local_subscribe(bus_t *b, const char *chat_id) { return 0; }
static int local_unsubscribe(bus_t *b, const char *chat_id) { return 0; }
static int local_publish(bus_t *b, const char *chat_id, const void *p, size_t n) { return 0; }
static void local_close(bus_t *b, void (*done)(void *), void *arg) {
    free(b);
    if (done) done(arg);
}

static const bus_ops_t local_ops = {
    .name = "local",
    .subscribe = local_subscribe,
    .unsubscribe = local_unsubscribe,
    .publish = local_publish,
    .close = local_close,
};

int bus_open(bus_t **out, uv_loop_t *loop, const char *url, bus_message_cb cb, void *ud,
             char *err, size_t errlen) {
    if (!url || !*url || strcmp(url, "local") == 0) {
        bus_t *b = calloc(1, sizeof(*b));
        if (!b) return CHAT_ENOMEM;
        b->ops = &local_ops;
        b->loop = loop;
        b->on_message = cb;
        b->ud = ud;
        *out = b;
        return 0;
    }
    if (err && errlen)
        snprintf(err, errlen, "unknown bus '%s' (supported: local)", url);
    return CHAT_EINVAL;
}
