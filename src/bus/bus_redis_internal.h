/* bus_redis_internal: what the Redis bus exposes to its unit tests and nothing else.
 * The domain never includes this; it opens a Redis bus through bus_open() only. */
#ifndef CHAT_BUS_REDIS_INTERNAL_H
#define CHAT_BUS_REDIS_INTERNAL_H

#include "bus.h"

/* A parsed "redis://[[user]:password@]host[:port][/db]". Credentials are percent-decoded. */
typedef struct bus_redis_url {
    char host[256];     /* an IPv6 literal without its brackets */
    int port;           /* 1..65535, 6379 when absent */
    int db;             /* 0 when absent */
    char user[128];     /* "" when none (AUTH with the password only) */
    char password[256]; /* valid when has_password */
    bool has_password;
} bus_redis_url_t;

/* 0, or CHAT_EINVAL with a readable reason in err (the reason never repeats the password). */
int bus_redis__parse_url(const char *url, bus_redis_url_t *out, char *err, size_t errlen);

/* Keep the command connection down (hold == true: it is not reconnected after it drops, or
 * not connected at all if called before the first loop turn) so a test can order a
 * reconnect; hold == false connects it again at once. */
void bus_redis__hold_cmd(bus_t *b, bool hold);

/* Override the bounds of the publish queue and the time without a reply after which the
 * server is taken for dead (0 keeps a value as it is). */
void bus_redis__set_limits(bus_t *b, size_t max_msgs, size_t max_bytes, unsigned stall_ms);

/* The command connection is ready (on_state reports the subscriber connection only). */
bool bus_redis__cmd_ready(const bus_t *b);

/* The publish queue's bookkeeping agrees with its chunks (records, bytes, unsent). */
bool bus_redis__queue_ok(const bus_t *b);

/* Publishes not yet acknowledged by Redis (queued while down, or in flight). */
size_t bus_redis__queued(const bus_t *b);

#endif
