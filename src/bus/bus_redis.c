/* Placeholder until the Redis backend lands. */
#include <stdio.h>

#include "bus.h"

int bus_redis_open(bus_t **out, uv_loop_t *loop, const char *url, char *err, size_t errlen) {
    (void)out;
    (void)loop;
    if (err && errlen) snprintf(err, errlen, "redis bus not built yet: %s", url);
    return CHAT_EINVAL;
}
