/* indexer: the Kafka -> OpenSearch / Elasticsearch sink (build/chat-indexer).
 *
 * A member of a Kafka consumer group: it reads the chat events chatd produces (src/stream/),
 * turns each into a versioned document (src/search/search_os.h) and writes batches with the
 * _bulk API over libcurl; it commits a batch's offsets only once every record of it is in
 * the index (or, for a record that can never be indexed, in the dead-letter topic): at least
 * once, and the versions make a replay harmless. Several instances share the partitions.
 *
 * One thread does the consuming and the writing (blocking calls, nothing else to serve), a
 * second answers /metrics on its own port.
 */
#ifndef CHAT_INDEXER_H
#define CHAT_INDEXER_H

#include <signal.h>
#include <stdbool.h>

#define INDEXER_DEFAULT_GROUP "chat-indexer"
#define INDEXER_DEFAULT_METRICS_PORT 9108
#define INDEXER_DEFAULT_BATCH 1000
#define INDEXER_DEFAULT_LINGER_MS 100

typedef struct indexer_opts {
    const char *brokers;      /* host:port[,host:port] */
    const char *search_url;   /* opensearch://host:port[/ALIAS], elasticsearch://... */
    const char *group;        /* consumer group; NULL: INDEXER_DEFAULT_GROUP */
    const char *topic;        /* NULL: chat.events (STREAM_DEFAULT_TOPIC) */
    const char *dlq_topic;    /* NULL: "<topic>.dlq" */
    const char *metrics_host; /* NULL: 0.0.0.0 */
    int metrics_port;         /* 0: a free one (logged) */
    int replicas;             /* the template's number_of_replicas */
    int batch;                /* records per _bulk, at most */
    int linger_ms;            /* wait this long for a batch to fill */
} indexer_opts_t;

/* Run until *stop becomes non-zero (a signal handler sets it). Returns the process's exit
 * status: 0 after a clean stop, 1 when it cannot start (bad options, the metrics port taken,
 * the engine refusing the template; the reason is logged). The strings in o are borrowed for
 * the call. */
int indexer_run(const indexer_opts_t *o, volatile sig_atomic_t *stop);

#endif
