/* store_sqlite_internal: what the SQLite backend exposes to its own tests and tools, and
 * nothing the domain should use (the domain talks to store.h only). */
#ifndef CHAT_STORE_SQLITE_INTERNAL_H
#define CHAT_STORE_SQLITE_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include "store.h"

/* The DDL of each schema version, in order; version i+1 is store_sqlite_schema[i]. The same
 * text is in schema/sqlite.sql (for people); the unit test keeps the two identical. */
extern const char *const store_sqlite_schema[];
extern const int store_sqlite_schema_versions;

typedef struct store_sqlite_stats {
    uint64_t batches;        /* write transactions committed */
    uint64_t failed_batches; /* write transactions that failed (every request got CHAT_EIO) */
    uint64_t writes;         /* write requests completed, in either kind of batch */
    uint64_t reads;          /* read requests completed */
    uint64_t max_batch;      /* largest number of requests in one transaction */
    uint64_t checkpoints;    /* checkpoints the checkpointer thread completed */
    uint64_t wal_frames;     /* pages the writer's commits appended to the WAL */
} store_sqlite_stats_t;

/* Counters since open. Safe from any thread; s must be an open sqlite store. */
void store_sqlite_stats(store_t *s, store_sqlite_stats_t *out);

/* Tests: while paused the writer leaves queued writes alone, so the next batch holds
 * exactly what was submitted meanwhile. Closing overrides a pause. */
void store_sqlite_pause(store_t *s, bool paused);

/* Tests and tools: run SQL on the write connection between two batches (synchronous, on the
 * caller's thread). 0 or CHAT_EIO. */
int store_sqlite_exec(store_t *s, const char *sql);

/* Tests: hand the WAL to the checkpointer thread at this many frames instead of 16384, so
 * that a test sees several checkpoint cycles without writing hundreds of megabytes. */
void store_sqlite_checkpoint_at(store_t *s, int frames);

#endif
