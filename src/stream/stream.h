/* stream: the outbox relay. Every stored change (append, edit, delete) to a Kafka topic, at
 * least once and in per-chat order, however long Kafka is away and however chatd ends.
 *
 * The store writes each change's event into its outbox in the same transaction as the change
 * (store.h: outbox_enable). This relay reads the outbox in sequence order, produces each row
 * with librdkafka (idempotent, acks=all, key = chat_id), and deletes rows only once Kafka
 * acknowledged them. Everything runs on the loop thread: librdkafka's own threads talk to
 * us through its main queue, which wakes a uv_poll; store requests are asynchronous.
 */
#ifndef CHAT_STREAM_H
#define CHAT_STREAM_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/core.h"
#include "store/store.h"

#define STREAM_DEFAULT_TOPIC "chat.events"
#define STREAM_DEFAULT_OUTBOX_MAX_ROWS 1000000
#define STREAM_DEFAULT_PARTITIONS 12

typedef struct stream stream_t;

typedef struct stream_opts {
    const char *brokers;      /* "host:port[,host:port]" */
    const char *topic;        /* NULL: STREAM_DEFAULT_TOPIC */
    uint64_t outbox_max_rows; /* past this, changes are refused (CHAT_EBUSY); 0: no limit */
    store_encode_fn encode;   /* the event of a change, as members receive it */
} stream_opts_t;

/* Enable the store's outbox and start relaying it (what a previous run left first). The
 * strings in o are copied. On success *out is the caller's, released by stream_close.
 * Errors: CHAT_EINVAL (the store has no outbox, bad options; err says which), CHAT_EIO. */
int stream_open(stream_t **out, uv_loop_t *loop, store_t *store, const stream_opts_t *o, char *err,
                size_t errlen);

/* Stop producing (events not yet acknowledged stay in the outbox for the next run) and free
 * the relay once its store requests came back: call before store_close, which completes
 * them. NULL is ignored. */
void stream_close(stream_t *st);

/* Append the relay's Prometheus lines (chat_outbox_*, chat_kafka_*) to out. Loop thread. */
void stream_metrics(stream_t *st, sbuf_t *out);

/* Create the topic if it does not exist (chatctl migrate): synchronous, waits up to
 * timeout_ms. 0 when it exists afterwards (created, or already there: *created says which,
 * may be NULL); CHAT_EIO with a readable reason in err otherwise. */
int stream_create_topic(const char *brokers, const char *topic, int partitions, int replication,
                        int timeout_ms, bool *created, char *err, size_t errlen);

#endif
