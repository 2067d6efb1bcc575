/* store_sqlite: the embedded message store. One writer thread with group commit, a small
 * pool of reader threads, completions handed back to the loop through one uv_async_t.
 *
 * The one idea: durability costs one fsync per transaction, not per message. The writer
 * takes everything queued while it was busy and commits it as one transaction (WAL +
 * synchronous=FULL: one fsync of the WAL per commit), so the busier the server, the more
 * messages share each fsync. A callback reporting success always follows a COMMIT that
 * returned; a failed COMMIT fails the whole batch.
 *
 * Threads and ownership:
 * - loop thread: submit() (a short critical section to queue), on_async() (callbacks),
 *   close(), migrate().
 * - writer: owns wdb and its statements; uses them only while holding wdb_lock, so that
 *   migrate() and store_sqlite_exec() can borrow the connection between two batches.
 * - readers: each owns one read-only connection (WAL lets them read while a write
 *   transaction is open; each statement sees one committed snapshot).
 * - checkpointer: owns cdb and copies the WAL back into the database file when the writer
 *   asks (see on_wal_commit), so that the copy and its fsync of the database stay off the
 *   commit path.
 * Requests travel between threads on intrusive lists (req->link_, core/queue.h) under s->lock. */
#include "store_internal.h"
#include "store_sqlite_internal.h"

#include <errno.h>
#include <inttypes.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>

/* Requests per transaction. Large on purpose: a transaction costs one fsync plus one WAL
 * frame per page it dirties, and with many active chats nearly every append dirties its own
 * pages (its chat's tail, its place in the client_id index), so bigger batches share pages
 * and measured 2-3x faster than 1024 with 1000 chats. Small loads make small batches
 * anyway; the cap only bounds one commit under a backlog. */
#define WRITE_BATCH_MAX 8192
/* Callbacks run per turn of the loop, so that a big batch does not stall its other I/O. */
#define DELIVER_MAX 1024
#define N_READERS 2
#define BUSY_TIMEOUT_MS 5000
/* While writes fail, the idle writer tries a real write this often, so that /healthz turns
 * ok again once the fault is repaired even if nobody sends meanwhile. */
#define PROBE_EVERY_NS 1000000000ull

/* Checkpoints, in WAL frames (one 4 KB page each). SQLite's own checkpoint runs inside the
 * COMMIT that crosses its threshold, so every message in that group waited for a copy of
 * the whole WAL plus an fsync of the database: 4-15 ms stalls about twice a second in the
 * chat benchmark (bench/RESULTS.md). Here the writer hands the copy to the checkpointer
 * thread at CKPT_START_FRAMES and does only the remainder itself, once it is at most
 * CKPT_INLINE_FRAMES: a WAL restarts from its beginning only after a checkpoint that ran
 * while nothing was appended, which only the writer can guarantee. If the WAL still reaches
 * CKPT_FORCE_FRAMES (the checkpointer cannot keep up) the writer copies it all itself.
 * Why 16384 (64 MB): a checkpoint writes each page once however often the WAL holds it, and
 * with many active chats the same tail pages recur, so rarer checkpoints write less; and its
 * burst of writes is what slows the WAL fsyncs beside it. 4096 measured p90 9 ms and p99
 * 20 ms in the chat benchmark, 16384 p90 3 ms and p99 15 ms. WAL_KEEP_BYTES keeps the file at
 * that size between cycles: truncating and growing it again cost more than it saves. */
#define CKPT_START_FRAMES 16384
#define CKPT_INLINE_FRAMES 256
#define CKPT_FORCE_FRAMES 65536
#define WAL_KEEP_BYTES "134217728"

/* Version 1. Kept byte-for-byte equal, modulo comments and whitespace, to schema/sqlite.sql
 * (the unit test compares them). Why WITHOUT ROWID clustered on (chat_id, id): every read
 * is "one chat, a range of ids", so a history page is one b-tree seek followed by adjacent
 * cells in the same leaf pages; a rowid table keyed by id would need a (chat_id, id) index
 * and one more seek per returned row, plus one more b-tree to update on every append.
 * The price: with 4 KB pages a row over about 1 KB keeps only its head in the leaf and the
 * rest in overflow pages; chat messages are mostly far shorter. id is unique per chat by
 * the key and globally by the Snowflake scheme; nothing looks a message up by id alone. */
static const char SCHEMA_V1[] =
    "CREATE TABLE IF NOT EXISTS messages (\n"
    "    chat_id    TEXT    NOT NULL,\n"
    "    id         INTEGER NOT NULL,\n"
    "    user_from  TEXT    NOT NULL,\n"
    "    message    TEXT,\n"
    "    client_id  TEXT,\n"
    "    created_at INTEGER NOT NULL,\n"
    "    edited_at  INTEGER,\n"
    "    deleted_at INTEGER,\n"
    "    PRIMARY KEY (chat_id, id)\n"
    ") WITHOUT ROWID;\n"
    "CREATE UNIQUE INDEX IF NOT EXISTS messages_client_id\n"
    "    ON messages (chat_id, user_from, client_id) WHERE client_id IS NOT NULL;\n";

/* Version 2: the full-text index of the embedded search backend (src/search/search_sqlite.c),
 * kept in the writer's own transactions: a message is searchable exactly when it is stored,
 * an edit replaces its words and a delete removes them, atomically. Its rowid is the message
 * id (Snowflake ids are unique across chats; OR REPLACE keeps a write from failing should
 * two chats ever share one). chat and author hold hex(chat_id) and hex(user_from): one token
 * each whatever the id's characters, so a search names its chats and author inside the
 * MATCH expression itself (exact, and the index does the filtering); chat_id UNINDEXED joins
 * back to messages. unicode61 remove_diacritics 2: language-neutral word splitting, case and
 * accent folding ("cafe" finds "café"). columnsize = 0: no per-row token counts (they serve
 * only bm25 ranking; hits come newest first), one b-tree fewer to write per append.
 * Edits and deletes (rare) are indexed by triggers, so that every writer of the file keeps
 * them right. Appends are indexed by do_append's own INSERT (fts_insert) instead: a trigger
 * makes every INSERT into messages open a statement savepoint, and FTS5 flushes its pending
 * terms to a new segment at every savepoint; measured, 4-5 times the cost of the same rows
 * indexed by a statement of their own in the same transaction (bench/RESULTS.md, Search).
 * The INSERT at the end fills the index from the rows of a version-1 database, once (the
 * migration runs it only when it moves the file from version 1). */
static const char SCHEMA_V2[] =
    "CREATE VIRTUAL TABLE IF NOT EXISTS messages_fts USING fts5 (\n"
    "    message, chat, author, chat_id UNINDEXED,\n"
    "    tokenize = 'unicode61 remove_diacritics 2', columnsize = 0\n"
    ");\n"
    "CREATE TRIGGER IF NOT EXISTS messages_fts_update AFTER UPDATE OF message, deleted_at\n"
    "    ON messages\n"
    "BEGIN\n"
    "    DELETE FROM messages_fts WHERE rowid = OLD.id AND chat_id = OLD.chat_id;\n"
    "    INSERT OR REPLACE INTO messages_fts (rowid, message, chat, author, chat_id)\n"
    "        SELECT NEW.id, NEW.message, hex(NEW.chat_id), hex(NEW.user_from), NEW.chat_id\n"
    "        WHERE NEW.message IS NOT NULL AND NEW.deleted_at IS NULL;\n"
    "END;\n"
    "CREATE TRIGGER IF NOT EXISTS messages_fts_delete AFTER DELETE ON messages\n"
    "BEGIN\n"
    "    DELETE FROM messages_fts WHERE rowid = OLD.id AND chat_id = OLD.chat_id;\n"
    "END;\n"
    "INSERT OR REPLACE INTO messages_fts (rowid, message, chat, author, chat_id)\n"
    "    SELECT id, message, hex(chat_id), hex(user_from), chat_id FROM messages\n"
    "    WHERE message IS NOT NULL AND deleted_at IS NULL;\n";

/* Version 3: read positions, one row per (chat, user): the newest message id the user has
 * read in that chat. Clustered on the key like messages, so a position is one seek; the
 * writer only ever moves message_id up (see do_read_set). */
static const char SCHEMA_V3[] = "CREATE TABLE IF NOT EXISTS read_positions (\n"
                                "    chat_id    TEXT    NOT NULL,\n"
                                "    user_id    TEXT    NOT NULL,\n"
                                "    message_id INTEGER NOT NULL,\n"
                                "    updated_at INTEGER NOT NULL,\n"
                                "    PRIMARY KEY (chat_id, user_id)\n"
                                ") WITHOUT ROWID;\n";

const char *const store_sqlite_schema[] = {SCHEMA_V1, SCHEMA_V2, SCHEMA_V3};

/* The outbox of the Kafka relay (src/stream/): created by outbox_enable, that is only when a
 * relay is configured, so that a store without one pays nothing for it. Not a schema
 * version: it belongs to a feature that can be switched on and off, and an empty outbox of a
 * store whose relay was switched off is harmless.
 *
 * One row per group commit, not per event: the events a transaction stored, packed into one
 * blob (see ob_pack), events first..seq. A row per event cost the writer, which every send
 * waits for, about a quarter of its time in b-tree inserts and deletes; a row per batch costs
 * one insert and one delete per commit and the bytes. Every event has its own seq all the
 * same: AUTOINCREMENT on the last one keeps the high-water mark, so that a seq is never
 * reused, even after the outbox was emptied: the relay publishes it as the event's version
 * header, which must grow for every change of a message. The events are the bytes members
 * received, encoded by the domain's encoder in the same transaction as the change.
 * (The first version had a row per event with the columns seq, chat_id, message_id, at and
 * event: outbox_enable converts such a table.) */
static const char OUTBOX_DDL[] = "CREATE TABLE IF NOT EXISTS outbox (\n"
                                 "    seq    INTEGER PRIMARY KEY AUTOINCREMENT,\n"
                                 "    first  INTEGER NOT NULL,\n"
                                 "    events BLOB    NOT NULL\n"
                                 ");\n";
/* The events in the outbox: as seqs are given in order and only a prefix is ever deleted,
 * everything from the oldest row's first event to the highest seq given (two lookups). */
#define OB_COUNT_SQL                                                          \
    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'outbox')" \
    " - (SELECT first FROM outbox ORDER BY seq LIMIT 1) + 1, 0)"
/* A batch's blob is cut into several rows past this many bytes, so that a batch of large
 * messages does not make one huge value. */
#define OB_PACK_MAX (1 << 20)
const int store_sqlite_schema_versions =
    (int)(sizeof store_sqlite_schema / sizeof store_sqlite_schema[0]);

/* Column order shared by every statement that returns rows (row_to_msg reads it). */
#define MSG_COLS "id, chat_id, user_from, message, client_id, created_at, edited_at, deleted_at"

typedef struct sqlite_store sqlite_store_t;

typedef struct reader {
    sqlite_store_t *s;
    uv_thread_t tid;
    sqlite3 *db;
    sqlite3_stmt *history, *after, *search;
    sqlite3_stmt *read_pos, *unread; /* READ_GET */
    sqlite3_stmt *outbox, *ob_count; /* prepared at first use: the table may be newer than db */
} reader_t;

struct sqlite_store {
    store_t base;
    char *path;

    /* the write connection; the writer thread's, borrowed under wdb_lock */
    uv_mutex_t wdb_lock;
    sqlite3 *wdb;
    sqlite3_stmt *begin, *commit, *rollback;
    sqlite3_stmt *insert, *by_client, *edit, *del, *get;
    sqlite3_stmt *fts_insert;          /* an appended message into messages_fts (SCHEMA_V2) */
    sqlite3_stmt *read_set, *read_get; /* READ_SET (SCHEMA_V3) */

    reader_t readers[N_READERS];
    int n_readers_started;
    uv_thread_t writer;
    bool writer_started;
    uv_thread_t ckpt_thread;
    bool ckpt_started;
    sqlite3 *cdb;   /* the checkpointer's connection */
    int wal_prev;   /* frames in the WAL after the previous commit; under wdb_lock */
    char werr[200]; /* why the last write failed; under wdb_lock */
    int ckpt_start; /* CKPT_START_FRAMES, unless a test asked for less */
    uv_async_t async;

    /* guarded by lock */
    uv_mutex_t lock;
    uv_cond_t wcond; /* the writer waits for work; it also waits here for readers to exit */
    uv_cond_t rcond; /* readers wait for work */
    uv_cond_t ccond; /* the checkpointer waits for ckpt_wanted */
    queue_t wq, rq, finished; /* of store_req_t.link_: writes, reads, done with */
    int threads_live;
    int readers_live; /* threads with a connection of their own: readers and checkpointer */
    bool ckpt_wanted, ckpt_busy;
    unsigned wal_gen;        /* WAL restarts the writer has seen */
    unsigned ckpt_gen;       /* the WAL the last checkpoint ran on; its figures below */
    int ckpt_log, ckpt_done; /* frames the WAL had then, and frames it copied */
    bool closing;
    bool paused;
    bool failing;       /* the last write (batch or probe) failed: /healthz says so */
    char fail_why[200]; /* its reason, for /healthz */
    store_sqlite_stats_t stats;
    uint64_t wal_frames_new; /* the writer thread's, folded into stats by its post_done */

    /* the outbox: ob_on and ob are set once by outbox_enable under wdb_lock, before any
     * write; ob_insert, ob_delete, ob_buf and ob_rows are the writer's (under wdb_lock) */
    bool ob_on;
    store_outbox_opts_t ob;
    sqlite3_stmt *ob_insert, *ob_delete, *ob_next, *ob_count;
    sbuf_t ob_buf;
    /* The writer's: this batch's outbox rows as frames (OB_FRAME: the first event's seq and
     * the pack's length, then the pack), the last one still open at ob_at (0: none open);
     * kept for the relay after the commit when it takes them (ob.handoff), else cleared at
     * each flush. ob_lost: they did not fit OB_HAND_MAX, the relay reads them instead. */
    sbuf_t ob_hand;
    size_t ob_at;
    bool ob_lost;
    uint64_t ob_first; /* the writer's: the seq of the open pack's first event */
    uint64_t ob_seq;   /* the writer's: the seq of the next event, 0: not known yet */
    int64_t ob_rows;
    store_outbox_stats_t ob_stats; /* under lock */
    bool ob_new;                   /* under lock: a commit added rows since the last notify */
    sbuf_t ob_done;                /* under lock: committed frames for ob.handoff, in order */
    store_outbox_row_t *ob_view;   /* the loop's: a frame's rows, lent to ob.handoff */
    size_t ob_view_cap;

    /* loop thread only */
    queue_t cb; /* completed, callbacks not yet called (the loop thread's) */
    bool close_called;
    bool finishing;
    void (*done)(void *);
    void *done_arg;
};

static const store_ops_t sqlite_ops;

/* ---- small helpers ------------------------------------------------------------------- */

/* mkdir -p of the directory part of path. Errors are left for sqlite3_open to report with
 * the file name, except a failing mkdir, which says more. */
static int make_parent_dir(const char *path, char *err, size_t errlen) {
    char *dir = strdup(path);
    if (!dir) return CHAT_ENOMEM;
    int rc = 0;
    char *slash = strrchr(dir, '/');
    if (!slash || slash == dir) goto out;
    *slash = '\0';
    for (char *p = dir + 1;; p++) {
        if (*p != '/' && *p != '\0') continue;
        char c = *p;
        *p = '\0';
        if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
            store__set_err(err, errlen, "cannot create directory %s: %s", dir, strerror(errno));
            rc = CHAT_EIO;
            goto out;
        }
        *p = c;
        if (!c) break;
    }
out:
    free(dir);
    return rc;
}

static int prepare(sqlite3 *db, const char *sql, sqlite3_stmt **st) {
    return sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL);
}

/* Run a statement that returns no rows we need; the step's result. */
static int step_once(sqlite3_stmt *st) {
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    return rc;
}

static int exec(sqlite3 *db, const char *sql) { return sqlite3_exec(db, sql, NULL, NULL, NULL); }

static int col_dup(sqlite3_stmt *st, int i, char **out) {
    *out = NULL;
    if (sqlite3_column_type(st, i) == SQLITE_NULL) return 0;
    const unsigned char *t = sqlite3_column_text(st, i);
    if (!t) return CHAT_ENOMEM;
    size_t n = (size_t)sqlite3_column_bytes(st, i);
    char *p = malloc(n + 1);
    if (!p) return CHAT_ENOMEM;
    memcpy(p, t, n);
    p[n] = '\0';
    *out = p;
    return 0;
}

/* Fill m from the current row (MSG_COLS order). On failure m is cleared. */
static int row_to_msg(sqlite3_stmt *st, store_msg_t *m) {
    memset(m, 0, sizeof *m);
    m->id = (uint64_t)sqlite3_column_int64(st, 0);
    m->created_at = sqlite3_column_int64(st, 5);
    m->edited_at = sqlite3_column_int64(st, 6); /* NULL reads as 0, the header's "never" */
    m->deleted_at = sqlite3_column_int64(st, 7);
    if (col_dup(st, 1, &m->chat_id) || col_dup(st, 2, &m->user_from) ||
        col_dup(st, 3, &m->message) || col_dup(st, 4, &m->client_id)) {
        store_msg_clear(m);
        return CHAT_ENOMEM;
    }
    return 0;
}

static char *dup_or_null(const char *s, bool *oom) {
    if (!s) return NULL;
    char *p = strdup(s);
    if (!p) *oom = true;
    return p;
}

/* ---- connections and schema ------------------------------------------------------------ */

/* Apply every schema version newer than the database's, in one transaction. */
static int migrate_db(sqlite3 *db, const char *path, char *err, size_t errlen) {
    sqlite3_stmt *st = NULL;
    int version = -1;
    if (exec(db, "BEGIN IMMEDIATE") != SQLITE_OK) goto fail;
    if (sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK) goto fail;
    if (sqlite3_step(st) == SQLITE_ROW) version = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    st = NULL;
    if (version < 0) goto fail;
    if (version > store_sqlite_schema_versions) {
        store__set_err(err, errlen, "%s: schema version %d is newer than this program (%d)", path,
                       version, store_sqlite_schema_versions);
        log_error("store_schema_too_new path=%s version=%d known=%d", path, version,
                  store_sqlite_schema_versions);
        exec(db, "ROLLBACK");
        return CHAT_EIO;
    }
    for (int v = version; v < store_sqlite_schema_versions; v++) {
        if (exec(db, store_sqlite_schema[v]) != SQLITE_OK) goto fail;
    }
    if (version < store_sqlite_schema_versions) {
        char sql[64];
        snprintf(sql, sizeof sql, "PRAGMA user_version = %d", store_sqlite_schema_versions);
        if (exec(db, sql) != SQLITE_OK) goto fail;
    }
    if (exec(db, "COMMIT") != SQLITE_OK) goto fail;
    if (version < store_sqlite_schema_versions) {
        log_info("store_schema_applied path=%s from=%d to=%d", path, version,
                 store_sqlite_schema_versions);
    }
    return 0;
fail:
    store__set_err(err, errlen, "%s: schema: %s", path, sqlite3_errmsg(db));
    log_error("store_schema_failed path=%s err=%s", path, LOG_STR(sqlite3_errmsg(db)));
    sqlite3_finalize(st);
    if (!sqlite3_get_autocommit(db)) exec(db, "ROLLBACK");
    return CHAT_EIO;
}

/* Another process (a second node sharing the file, chatctl) holds the write lock. SQLite's
 * own busy timeout sleeps 1, 2, 5, 10, ... 100 ms between tries, so one commit of the other
 * writer, a fraction of a millisecond, could cost a node 10-100 ms: three nodes on one file
 * measured p99 250 ms for 10,000 msg/s. Short sleeps that grow to 1 ms keep the lock
 * changing hands at commit speed; the deadline stays BUSY_TIMEOUT_MS of sleeping, as
 * SQLite's own handler counts it, but measured: the sum of nominal sleeps ran 10% late (each
 * sleep overshoots). Only the sleeps count, not the work SQLite does between its waits within
 * one call (a checkpoint may copy for seconds between two). SQLite restarts tries at 0 for
 * each call, and a call runs on one thread, so the sum can be thread-local. */
static _Thread_local uint64_t busy_slept_ns;

static int on_busy(void *arg, int tries) {
    (void)arg;
    static const unsigned short us[] = {50, 100, 200, 400, 800};
    enum { STEPS = sizeof us / sizeof us[0], THEN_US = 1000 };
    if (tries == 0) busy_slept_ns = 0;
    if (busy_slept_ns >= (uint64_t)BUSY_TIMEOUT_MS * 1000000u) return 0;
    struct timespec ts = {0, (long)(tries < STEPS ? us[tries] : THEN_US) * 1000};
    uint64_t t0 = uv_hrtime();
    nanosleep(&ts, NULL);
    busy_slept_ns += uv_hrtime() - t0;
    return 1;
}

/* Close a read-write connection, saying so if SQLite refuses (statements left open). */
static void close_db(sqlite_store_t *s, sqlite3 **db) {
    if (*db && sqlite3_close(*db) != SQLITE_OK) {
        log_error("store_close_failed path=%s err=%s", s->path, LOG_STR(sqlite3_errmsg(*db)));
    }
    *db = NULL;
}

/* Prove that the database takes a write: a transaction that rewrites the schema version
 * with its own value commits one page through the WAL (and its fsync), as a message would.
 * Opening is not enough: SQLite opens a file it may not write read-only without a word, and
 * a WAL it cannot write fails only at the first commit. 0, or the reason in why. */
static int probe_write(sqlite3 *db, char *why, size_t n) {
    char sql[96];
    snprintf(sql, sizeof sql, "BEGIN IMMEDIATE; PRAGMA user_version = %d; COMMIT;",
             store_sqlite_schema_versions);
    if (sqlite3_db_readonly(db, "main") == 1) {
        snprintf(why, n, "read-only (the file or its file system cannot be written)");
        return CHAT_EIO;
    }
    if (exec(db, sql) == SQLITE_OK) return 0;
    snprintf(why, n, "%s", sqlite3_errmsg(db));
    if (!sqlite3_get_autocommit(db)) exec(db, "ROLLBACK");
    return CHAT_EIO;
}

static int open_db(sqlite3 **out, const char *path, bool readonly, char *err, size_t errlen) {
    /* NOMUTEX: each connection is used by one thread at a time (the writer's is handed over
     * under wdb_lock), so SQLite's per-connection mutex would be pure overhead. */
    int flags = SQLITE_OPEN_NOMUTEX |
                (readonly ? SQLITE_OPEN_READONLY : SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
    sqlite3 *db = NULL;
    int rc = sqlite3_open_v2(path, &db, flags, NULL);
    if (rc != SQLITE_OK) goto fail;
    sqlite3_extended_result_codes(db, 1);
    sqlite3_busy_handler(db, on_busy, NULL);
    if (!readonly) {
        /* WAL: readers never block the writer nor it them. synchronous=FULL in WAL mode
         * fsyncs the WAL on every commit, so an acknowledged message survives power loss
         * (NORMAL would only survive a process crash). The journal mode is stored in the
         * file; the rest is per connection. secure_delete=ON zeroes what a deleted message
         * leaves behind, in its page and in freed overflow pages, so the text is really gone
         * once the WAL is checkpointed; deletes are rare, the extra writes cheap. Set here
         * because the compiled-in default differs between builds. The automatic checkpoint
         * at 8192 pages only serves connections without a loop (migrate); a running store's
         * writer replaces it with on_wal_commit. */
        sqlite3_stmt *st = NULL;
        if (sqlite3_prepare_v2(db, "PRAGMA journal_mode=WAL", -1, &st, NULL) != SQLITE_OK)
            goto fail;
        const unsigned char *mode = NULL;
        if (sqlite3_step(st) == SQLITE_ROW) mode = sqlite3_column_text(st, 0);
        bool wal = mode && strcmp((const char *)mode, "wal") == 0;
        sqlite3_finalize(st);
        if (!wal) {
            store__set_err(err, errlen, "%s: cannot switch to WAL mode: %s", path,
                           sqlite3_errmsg(db));
            rc = SQLITE_ERROR;
            goto fail_msg;
        }
        rc = exec(db, "PRAGMA synchronous=FULL;"
                      "PRAGMA foreign_keys=OFF;"
                      "PRAGMA cache_size=-32768;"
                      "PRAGMA temp_store=MEMORY;"
                      "PRAGMA secure_delete=ON;"
                      "PRAGMA wal_autocheckpoint=8192;"
                      "PRAGMA journal_size_limit=" WAL_KEEP_BYTES ";");
    } else {
        rc = exec(db, "PRAGMA cache_size=-16384;");
    }
    if (rc != SQLITE_OK) goto fail;
    *out = db;
    return 0;
fail:
    store__set_err(err, errlen, "cannot open %s: %s", path,
                   db ? sqlite3_errmsg(db) : "out of memory");
fail_msg:
    log_error("store_open_failed path=%s ro=%d err=%s", path, readonly,
              LOG_STR(db ? sqlite3_errmsg(db) : "out of memory"));
    sqlite3_close(db);
    *out = NULL;
    return CHAT_EIO;
}

/* The last thing a reader or the checkpointer does, its connection closed: the writer may be
 * waiting for the last such connection (see writer_main), the loop for the last thread. */
static void side_thread_exit(sqlite_store_t *s) {
    uv_mutex_lock(&s->lock);
    s->readers_live--;
    s->threads_live--;
    uv_mutex_unlock(&s->lock);
    uv_cond_broadcast(&s->wcond);
    uv_async_send(&s->async);
}

/* Called by SQLite after every commit on the write connection, on whichever thread holds
 * wdb_lock, with the number of frames now in the WAL. Decides who checkpoints (see
 * CKPT_START_FRAMES). Replaces SQLite's automatic checkpoint on this connection. */
static int on_wal_commit(void *arg, sqlite3 *db, const char *name, int frames) {
    sqlite_store_t *s = arg;
    bool restarted = frames < s->wal_prev;
    /* frames counts the whole WAL: with other processes writing the same file, what they
     * appended since our last commit is counted too (a metric, not a ledger) */
    s->wal_frames_new += (uint64_t)(restarted ? frames : frames - s->wal_prev);
    s->wal_prev = frames;
    if (!restarted && frames < s->ckpt_start) return SQLITE_OK;
    bool copy_here = false;
    uv_mutex_lock(&s->lock);
    if (restarted) s->wal_gen++;
    if (frames >= s->ckpt_start && !s->ckpt_busy) {
        /* Its figures count for this WAL only: same generation, and no fewer frames now
         * than then (a WAL only grows until it restarts, which wal_prev can miss when the
         * first commit after a restart is large, or when another process restarted it). */
        int copied = s->ckpt_gen == s->wal_gen && frames >= s->ckpt_log ? s->ckpt_done : 0;
        if (frames - copied <= CKPT_INLINE_FRAMES) {
            copy_here = true;
        } else {
            s->ckpt_busy = s->ckpt_wanted = true;
            uv_cond_signal(&s->ccond);
        }
    }
    uv_mutex_unlock(&s->lock);
    /* With the checkpointer busy this returns SQLITE_BUSY at once: it is copying already. */
    if (frames >= CKPT_FORCE_FRAMES) copy_here = true;
    if (copy_here) {
        int rc = sqlite3_wal_checkpoint_v2(db, name, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
        if (rc != SQLITE_OK && rc != SQLITE_BUSY) {
            log_warn("store_checkpoint_failed path=%s err=%s", s->path,
                     LOG_STR(sqlite3_errmsg(db)));
        }
    }
    return SQLITE_OK;
}

static void checkpointer_main(void *arg) {
    sqlite_store_t *s = arg;
    for (;;) {
        uv_mutex_lock(&s->lock);
        while (!s->ckpt_wanted && !s->closing) uv_cond_wait(&s->ccond, &s->lock);
        bool wanted = s->ckpt_wanted;
        s->ckpt_wanted = false;
        unsigned gen = s->wal_gen;
        uv_mutex_unlock(&s->lock);
        if (!wanted) break;
        /* PASSIVE: copies what no reader still needs, never waits for the writer, who goes
         * on appending meanwhile; what it appends is the remainder the writer copies. */
        int log = 0, done = 0; /* frames in the WAL, frames copied */
        int rc = sqlite3_wal_checkpoint_v2(s->cdb, NULL, SQLITE_CHECKPOINT_PASSIVE, &log, &done);
        if (rc != SQLITE_OK && rc != SQLITE_BUSY) {
            log_warn("store_checkpoint_failed path=%s err=%s", s->path,
                     LOG_STR(sqlite3_errmsg(s->cdb)));
        }
        uv_mutex_lock(&s->lock);
        s->ckpt_busy = false;
        if (rc == SQLITE_OK) {
            s->ckpt_gen = gen;
            s->ckpt_log = log;
            s->ckpt_done = done;
            s->stats.checkpoints++;
        }
        uv_mutex_unlock(&s->lock);
    }
    close_db(s, &s->cdb);
    side_thread_exit(s);
}

static int prepare_outbox(sqlite_store_t *s) {
    return prepare(s->wdb, "INSERT INTO outbox (seq, first, events) VALUES (?1, ?2, ?3)",
                   &s->ob_insert) ||
           prepare(s->wdb, "DELETE FROM outbox WHERE seq <= ?1 RETURNING seq - first + 1",
                   &s->ob_delete) ||
           prepare(s->wdb, "SELECT seq FROM sqlite_sequence WHERE name = 'outbox'", &s->ob_next) ||
           prepare(s->wdb, OB_COUNT_SQL, &s->ob_count);
}

static int prepare_writer(sqlite_store_t *s) {
    sqlite3 *db = s->wdb;
    sqlite3_wal_hook(db, on_wal_commit, s);
    /* An append that hits the client_id index does nothing and changes no row; the caller
     * then reads the original. Any other conflict (the primary key) is an error. */
    if (prepare(db, "BEGIN IMMEDIATE", &s->begin) || prepare(db, "COMMIT", &s->commit) ||
        prepare(db, "ROLLBACK", &s->rollback) ||
        prepare(db,
                "INSERT INTO messages (chat_id, id, user_from, message, client_id, created_at)"
                " VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
                " ON CONFLICT (chat_id, user_from, client_id) WHERE client_id IS NOT NULL"
                " DO NOTHING",
                &s->insert) ||
        prepare(db,
                "SELECT " MSG_COLS " FROM messages"
                " WHERE chat_id = ?1 AND user_from = ?2 AND client_id = ?3",
                &s->by_client) ||
        prepare(db,
                "UPDATE messages SET message = ?4, edited_at = ?5"
                " WHERE chat_id = ?1 AND id = ?2 AND user_from = ?3 AND deleted_at IS NULL"
                " RETURNING " MSG_COLS,
                &s->edit) ||
        prepare(db,
                "UPDATE messages SET message = NULL, deleted_at = ?4"
                " WHERE chat_id = ?1 AND id = ?2 AND user_from = ?3 AND deleted_at IS NULL"
                " RETURNING " MSG_COLS,
                &s->del) ||
        prepare(db, "SELECT user_from, deleted_at FROM messages WHERE chat_id = ?1 AND id = ?2",
                &s->get) ||
        prepare(db,
                "INSERT OR REPLACE INTO messages_fts (rowid, message, chat, author, chat_id)"
                " VALUES (?2, ?4, hex(?1), hex(?3), ?1)",
                &s->fts_insert) ||
        /* the WHERE of the upsert keeps the position monotonic inside the one writer */
        prepare(db,
                "INSERT INTO read_positions (chat_id, user_id, message_id, updated_at)"
                " VALUES (?1, ?2, ?3, ?4) ON CONFLICT (chat_id, user_id) DO UPDATE"
                " SET message_id = excluded.message_id, updated_at = excluded.updated_at"
                " WHERE excluded.message_id > read_positions.message_id",
                &s->read_set) ||
        prepare(db, "SELECT message_id FROM read_positions WHERE chat_id = ?1 AND user_id = ?2",
                &s->read_get) ||
        (s->ob_on && prepare_outbox(s))) {
        log_error("store_prepare_failed path=%s err=%s", s->path, LOG_STR(sqlite3_errmsg(db)));
        return CHAT_EIO;
    }
    return 0;
}

static void close_writer_db(sqlite_store_t *s) {
    sqlite3_stmt **sts[] = {&s->begin,     &s->commit,    &s->rollback,   &s->insert,
                            &s->by_client, &s->edit,      &s->del,        &s->get,
                            &s->ob_insert, &s->ob_delete, &s->fts_insert, &s->read_set,
                            &s->read_get,  &s->ob_next,   &s->ob_count};
    for (size_t i = 0; i < sizeof sts / sizeof sts[0]; i++) {
        sqlite3_finalize(*sts[i]);
        *sts[i] = NULL;
    }
    close_db(s, &s->wdb);
}

static int open_reader(sqlite_store_t *s, reader_t *rd, char *err, size_t errlen) {
    rd->s = s;
    int rc = open_db(&rd->db, s->path, true, err, errlen);
    if (rc) return rc;
    if (prepare(rd->db,
                "SELECT " MSG_COLS " FROM messages WHERE chat_id = ?1 AND id < ?2"
                " ORDER BY id DESC LIMIT ?3",
                &rd->history) ||
        prepare(rd->db,
                "SELECT " MSG_COLS " FROM messages WHERE chat_id = ?1 AND id > ?2"
                " ORDER BY id ASC LIMIT ?3",
                &rd->after) ||
        /* The FTS table drives (CROSS JOIN keeps the planner from starting at messages):
         * its MATCH, rowid bound and ORDER BY rowid DESC walk the index newest first and
         * stop at the limit; each hit is then one primary-key lookup. \x01 and \x02 mark
         * the matched tokens (search_sqlite.c escapes the rest). */
        prepare(rd->db,
                "SELECT m.id, m.chat_id, m.user_from, m.message, m.client_id, m.created_at,"
                " m.edited_at, m.deleted_at, highlight(messages_fts, 0, char(1), char(2))"
                " FROM messages_fts CROSS JOIN messages m"
                " ON m.chat_id = messages_fts.chat_id AND m.id = messages_fts.rowid"
                " WHERE messages_fts MATCH ?1 AND messages_fts.rowid < ?2"
                " AND m.deleted_at IS NULL"
                " ORDER BY messages_fts.rowid DESC LIMIT ?3",
                &rd->search) ||
        prepare(rd->db, "SELECT message_id FROM read_positions WHERE chat_id = ?1 AND user_id = ?2",
                &rd->read_pos) ||
        prepare(rd->db,
                "SELECT user_from, deleted_at IS NOT NULL FROM messages"
                " WHERE chat_id = ?1 AND id > ?2 ORDER BY id DESC LIMIT ?3",
                &rd->unread)) {
        store__set_err(err, errlen, "%s: %s", s->path, sqlite3_errmsg(rd->db));
        log_error("store_prepare_failed path=%s err=%s", s->path, LOG_STR(sqlite3_errmsg(rd->db)));
        return CHAT_EIO;
    }
    return 0;
}

static void close_reader_db(reader_t *rd) {
    sqlite3_finalize(rd->history);
    sqlite3_finalize(rd->after);
    sqlite3_finalize(rd->outbox);
    sqlite3_finalize(rd->search);
    sqlite3_finalize(rd->read_pos);
    sqlite3_finalize(rd->unread);
    sqlite3_finalize(rd->ob_count);
    rd->history = rd->after = rd->outbox = rd->search = rd->read_pos = rd->unread = NULL;
    rd->ob_count = NULL;
    sqlite3_close(rd->db);
    rd->db = NULL;
}

/* ---- the writer ---------------------------------------------------------------------- */

/* Each op returns SQLITE_OK when the request has its outcome in r->status (success or a
 * per-request failure that leaves the transaction intact), or the SQLite error that makes
 * the transaction unusable (the batch then fails as a whole). */

static int do_append(sqlite_store_t *s, store_req_t *r) {
    sqlite3_stmt *st = s->insert;
    /* Copy the outputs before inserting: on OOM nothing was written, so the status is
     * honest and a retry is safe. */
    bool oom = false;
    store_msg_t *m = &r->msg;
    m->id = r->id;
    m->created_at = r->at;
    m->chat_id = dup_or_null(r->chat_id, &oom);
    m->user_from = dup_or_null(r->user, &oom);
    m->message = dup_or_null(r->text, &oom);
    m->client_id = dup_or_null(r->client_id, &oom);
    if (oom) {
        store_msg_clear(m);
        r->status = CHAT_ENOMEM;
        return SQLITE_OK;
    }
    sqlite3_bind_text(st, 1, r->chat_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)r->id);
    sqlite3_bind_text(st, 3, r->user, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, r->text, -1, SQLITE_STATIC);
    if (r->client_id) {
        sqlite3_bind_text(st, 5, r->client_id, -1, SQLITE_STATIC);
    } else {
        sqlite3_bind_null(st, 5);
    }
    sqlite3_bind_int64(st, 6, r->at);
    int rc = sqlite3_step(st);
    int changed = rc == SQLITE_DONE ? sqlite3_changes(s->wdb) : 0;
    if (rc != SQLITE_DONE) {
        log_error("store_append_failed chat=%s id=%" PRIu64 " err=%s", r->chat_id, r->id,
                  LOG_STR(sqlite3_errmsg(s->wdb)));
    }
    sqlite3_reset(st);
    if (rc != SQLITE_DONE) {
        store_msg_clear(m);
        /* A primary key clash (an id reused) fails this request only. */
        if ((rc & 0xff) == SQLITE_CONSTRAINT) {
            r->status = CHAT_EIO;
            return SQLITE_OK;
        }
        return rc;
    }
    r->status = 0;
    if (changed) {
        /* the search index, in the same transaction (see SCHEMA_V2); a failure fails the
         * batch, so that no acknowledged message is missing from it */
        st = s->fts_insert;
        sqlite3_bind_text(st, 1, r->chat_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, (sqlite3_int64)r->id);
        sqlite3_bind_text(st, 3, r->user, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 4, r->text, -1, SQLITE_STATIC);
        rc = step_once(st);
        if (rc != SQLITE_DONE) {
            log_error("store_index_failed chat=%s id=%" PRIu64 " err=%s", r->chat_id, r->id,
                      LOG_STR(sqlite3_errmsg(s->wdb)));
            store_msg_clear(m);
            return rc;
        }
        return SQLITE_OK;
    }

    /* The (chat, user, client_id) key exists, possibly from earlier in this same batch:
     * answer with the stored original. */
    store_msg_clear(m);
    st = s->by_client;
    sqlite3_bind_text(st, 1, r->chat_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, r->user, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, r->client_id, -1, SQLITE_STATIC);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        r->status = row_to_msg(st, m);
        r->duplicate = r->status == 0;
        rc = SQLITE_OK;
    } else if (rc == SQLITE_DONE) {
        log_error("store_append_conflict_without_row chat=%s", r->chat_id);
        r->status = CHAT_EIO;
        rc = SQLITE_OK;
    }
    sqlite3_reset(st);
    return rc;
}

/* EDIT and DELETE: one UPDATE ... RETURNING does the common case; when it matches nothing,
 * a lookup tells "no such message" from "not yours". */
static int do_change(sqlite_store_t *s, store_req_t *r) {
    if (r->id > (uint64_t)INT64_MAX) {
        r->status = CHAT_ENOTFOUND;
        return SQLITE_OK;
    }
    sqlite3_stmt *st = r->op == STORE_EDIT ? s->edit : s->del;
    sqlite3_bind_text(st, 1, r->chat_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)r->id);
    sqlite3_bind_text(st, 3, r->user, -1, SQLITE_STATIC);
    if (r->op == STORE_EDIT) {
        sqlite3_bind_text(st, 4, r->text, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 5, r->at);
    } else {
        sqlite3_bind_int64(st, 4, r->at);
    }
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        r->status = row_to_msg(st, &r->msg);
        sqlite3_reset(st); /* the change itself was made by the first step */
        return SQLITE_OK;
    }
    if (rc != SQLITE_DONE) {
        log_error("store_change_failed chat=%s id=%" PRIu64 " err=%s", r->chat_id, r->id,
                  LOG_STR(sqlite3_errmsg(s->wdb)));
        sqlite3_reset(st);
        return rc;
    }
    sqlite3_reset(st);

    st = s->get;
    sqlite3_bind_text(st, 1, r->chat_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)r->id);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        bool deleted = sqlite3_column_type(st, 1) != SQLITE_NULL;
        const char *author = (const char *)sqlite3_column_text(st, 0);
        if (deleted) {
            r->status = CHAT_ENOTFOUND;
        } else {
            r->status = author && strcmp(author, r->user) != 0 ? CHAT_EPERM : CHAT_ENOTFOUND;
        }
        rc = SQLITE_OK;
    } else if (rc == SQLITE_DONE) {
        r->status = CHAT_ENOTFOUND;
        rc = SQLITE_OK;
    }
    sqlite3_reset(st);
    return rc;
}

/* The position of (chat, user) through st (writer's or reader's): 0 if none. */
static int read_position(sqlite3_stmt *st, store_req_t *r, uint64_t *out) {
    sqlite3_bind_text(st, 1, r->chat_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, r->user, -1, SQLITE_STATIC);
    int rc = sqlite3_step(st);
    *out = rc == SQLITE_ROW ? (uint64_t)sqlite3_column_int64(st, 0) : 0;
    sqlite3_reset(st);
    return rc == SQLITE_ROW || rc == SQLITE_DONE ? SQLITE_OK : rc;
}

/* READ_SET: the message must be one of the chat's (deleted or not); then the upsert moves
 * the position only upwards. One writer, so nothing moves between the upsert and the read
 * of the result. */
static int do_read_set(sqlite_store_t *s, store_req_t *r) {
    if (r->id > (uint64_t)INT64_MAX) {
        r->status = CHAT_ENOTFOUND;
        return SQLITE_OK;
    }
    sqlite3_stmt *st = s->get;
    sqlite3_bind_text(st, 1, r->chat_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, (sqlite3_int64)r->id);
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc == SQLITE_DONE) {
        r->status = CHAT_ENOTFOUND;
        return SQLITE_OK;
    }
    if (rc != SQLITE_ROW) return rc;
    st = s->read_set;
    sqlite3_bind_text(st, 1, r->chat_id, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, r->user, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 3, (sqlite3_int64)r->id);
    sqlite3_bind_int64(st, 4, r->at);
    rc = sqlite3_step(st);
    r->read_moved = rc == SQLITE_DONE && sqlite3_changes(s->wdb) > 0;
    sqlite3_reset(st);
    if (rc != SQLITE_DONE) {
        log_error("store_read_set_failed chat=%s err=%s", r->chat_id,
                  LOG_STR(sqlite3_errmsg(s->wdb)));
        return rc;
    }
    rc = read_position(s->read_get, r, &r->read_id);
    if (rc == SQLITE_OK) r->status = 0;
    return rc;
}

/* READ_GET: the position, then the messages after it, newest first, bounded (store.h). */
static void do_read_get(reader_t *rd, store_req_t *r) {
    int rc = read_position(rd->read_pos, r, &r->read_id);
    sqlite3_stmt *st = rd->unread;
    if (rc == SQLITE_OK) {
        sqlite3_bind_text(st, 1, r->chat_id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 2, (sqlite3_int64)r->read_id);
        sqlite3_bind_int(st, 3, STORE_UNREAD_SCAN);
        int n = 0;
        while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
            const char *u = (const char *)sqlite3_column_text(st, 0);
            n++;
            if (!store_unread_add(r, u ? u : "", sqlite3_column_int(st, 1) != 0)) {
                rc = SQLITE_DONE;
                break;
            }
        }
        if (n == STORE_UNREAD_SCAN) r->unread_capped = true;
        sqlite3_reset(st);
        if (rc == SQLITE_DONE) rc = SQLITE_OK;
    }
    if (rc != SQLITE_OK) {
        log_error("store_read_get_failed chat=%s err=%s", LOG_STR(r->chat_id),
                  LOG_STR(sqlite3_errmsg(rd->db)));
        r->read_id = r->unread = 0;
        r->unread_capped = false;
    }
    r->status = rc == SQLITE_OK ? 0 : CHAT_EIO;
}

/* ---- the outbox's packed rows ----
 * A row's events blob is its events one after the other, each a 24-byte head (message_id
 * u64, at i64, chat_id's length u32, the event's length u32, all little-endian) then the
 * chat_id's bytes and the event's, each followed by a NUL (so that the rows a relay is lent
 * can point into the pack). Read back by ob_unpack, which trusts nothing. */
#define OB_HEAD 24
/* In the writer's ob_hand, each pack follows a frame: its first seq and its length (u64s). */
#define OB_FRAME 16
/* The most bytes of events one batch keeps for the relay, and the loop may have waiting;
 * beyond, the relay is only told, and reads them from the outbox. */
#define OB_HAND_MAX (64u << 20)

static void put_le(uint8_t *p, uint64_t v, int n) {
    for (int i = 0; i < n; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

static void ob_pack(sbuf_t *pk, uint64_t message_id, int64_t at, const char *chat_id,
                    const char *ev, size_t ev_len) {
    size_t clen = strlen(chat_id);
    uint8_t h[OB_HEAD];
    put_le(h, message_id, 8);
    put_le(h + 8, (uint64_t)at, 8);
    put_le(h + 16, clen, 4);
    put_le(h + 20, ev_len, 4);
    sbuf_put(pk, h, sizeof h);
    sbuf_put(pk, chat_id, clen + 1);
    sbuf_put(pk, ev, ev_len);
    sbuf_put(pk, "", 1);
}

/* The events of one pack as rows pointing into it (the pack must be well formed: ours). */
static size_t ob_rows_of(const uint8_t *p, size_t len, uint64_t first, store_outbox_row_t *rows) {
    size_t n = 0;
    for (size_t off = 0; off + OB_HEAD <= len; n++) {
        size_t clen = get_le(p + off + 16, 4), elen = get_le(p + off + 20, 4);
        rows[n] = (store_outbox_row_t){.seq = first + n,
                                       .message_id = get_le(p + off, 8),
                                       .at = (int64_t)get_le(p + off + 8, 8),
                                       .chat_id = (char *)p + off + OB_HEAD,
                                       .event = (char *)p + off + OB_HEAD + clen + 1,
                                       .event_len = elen};
        off += OB_HEAD + clen + 1 + elen + 1;
    }
    return n;
}

/* The events of one row (seqs first.. in order) with a seq above after, into rows from
 * *n on, at most max in all. 0, or CHAT_EIO for a blob that is not a pack (logged) and
 * CHAT_ENOMEM; either way *n counts the rows filled, whose strings are the caller's. */
static int ob_unpack(const uint8_t *p, size_t len, uint64_t first, uint64_t last, uint64_t after,
                     store_outbox_row_t *rows, size_t *n, size_t max) {
    uint64_t seq = first;
    size_t off = 0;
    while (off < len && *n < max) {
        if (len - off < OB_HEAD) break;
        uint64_t clen = get_le(p + off + 16, 4), elen = get_le(p + off + 20, 4);
        if (clen + elen + 2 > len - off - OB_HEAD) break;
        if (seq > after) {
            store_outbox_row_t *o = &rows[*n];
            *o = (store_outbox_row_t){.seq = seq,
                                      .message_id = get_le(p + off, 8),
                                      .at = (int64_t)get_le(p + off + 8, 8),
                                      .event_len = elen};
            o->chat_id = malloc(clen + 1);
            o->event = malloc(elen + 1);
            if (!o->chat_id || !o->event) {
                free(o->chat_id);
                free(o->event);
                return CHAT_ENOMEM;
            }
            memcpy(o->chat_id, p + off + OB_HEAD, clen);
            o->chat_id[clen] = '\0';
            memcpy(o->event, p + off + OB_HEAD + clen + 1, elen);
            o->event[elen] = '\0';
            (*n)++;
        }
        off += OB_HEAD + clen + 1 + elen + 1;
        seq++;
    }
    if (*n < max && (off != len || seq != last + 1)) {
        log_error("store_outbox_corrupt seq=%" PRIu64 " first=%" PRIu64, last, first);
        return CHAT_EIO;
    }
    return 0;
}

/* The open pack into a row of its own. */
static int ob_flush(sqlite_store_t *s) {
    if (!s->ob_at) return SQLITE_OK;
    sbuf_t *h = &s->ob_hand;
    size_t len = h->len - s->ob_at;
    put_le((uint8_t *)h->p + s->ob_at - OB_FRAME, s->ob_first, 8);
    put_le((uint8_t *)h->p + s->ob_at - OB_FRAME + 8, len, 8);
    sqlite3_stmt *st = s->ob_insert;
    sqlite3_bind_int64(st, 1, (sqlite3_int64)(s->ob_seq - 1));
    sqlite3_bind_int64(st, 2, (sqlite3_int64)s->ob_first);
    sqlite3_bind_blob(st, 3, h->p + s->ob_at, (int)len, SQLITE_STATIC);
    int rc = step_once(st);
    s->ob_at = 0;
    if (!s->ob.handoff || h->len > OB_HAND_MAX) {
        s->ob_lost = s->ob_lost || s->ob.handoff;
        h->len = 0;
    }
    if (rc != SQLITE_DONE) {
        log_error("store_outbox_insert_failed err=%s", LOG_STR(sqlite3_errmsg(s->wdb)));
        return rc;
    }
    return SQLITE_OK;
}

/* The event of a change that just succeeded, into the outbox, in the same transaction: into
 * the open pack, which ob_flush writes before the commit. */
static int ob_write(sqlite_store_t *s, store_req_t *r) {
    if (!s->ob_seq) { /* the batch's first: the seq after the highest ever given */
        int rc = sqlite3_step(s->ob_next);
        s->ob_seq = rc == SQLITE_ROW ? (uint64_t)sqlite3_column_int64(s->ob_next, 0) + 1 : 1;
        sqlite3_reset(s->ob_next);
        if (rc != SQLITE_ROW && rc != SQLITE_DONE) return rc;
    }
    sbuf_t *h = &s->ob_hand;
    if (!s->ob_at) { /* a new pack, behind its frame */
        s->ob_first = s->ob_seq;
        sbuf_put(h, "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0", OB_FRAME);
        s->ob_at = h->len;
    }
    if (r->op == STORE_APPEND && r->event) { /* the caller encoded it (store.h), once for all */
        ob_pack(h, r->msg.id, r->at, r->msg.chat_id, r->event, r->event_len);
    } else {
        sbuf_t *b = &s->ob_buf;
        b->len = 0;
        s->ob.encode(b, r->op, &r->msg);
        if (!b->oom) ob_pack(h, r->msg.id, r->at, r->msg.chat_id, b->p, b->len);
        if (b->oom) sbuf_free(b);
    }
    if (h->oom) { /* the batch fails: a change without its event would break the contract */
        sbuf_free(h);
        s->ob_at = 0;
        return SQLITE_NOMEM;
    }
    s->ob_seq++;
    return h->len - s->ob_at >= OB_PACK_MAX ? ob_flush(s) : SQLITE_OK;
}

/* The events in the outbox, counted anew (OB_COUNT_SQL) at each batch: counting only what
 * this process added and deleted would drift when several share the file (one deletes what
 * another wrote), and refuse changes for an outbox that is empty. */
static int ob_count(sqlite_store_t *s, int64_t *out) {
    int rc = sqlite3_step(s->ob_count);
    *out = rc == SQLITE_ROW ? sqlite3_column_int64(s->ob_count, 0) : 0;
    sqlite3_reset(s->ob_count);
    return rc == SQLITE_ROW ? SQLITE_OK : rc;
}

/* Rows whose every event is through r->id; a row still holding a later one stays whole. */
static int ob_delete(sqlite_store_t *s, store_req_t *r, int64_t *removed) {
    sqlite3_stmt *st = s->ob_delete;
    if (!st) {
        r->status = CHAT_EINVAL;
        return SQLITE_OK;
    }
    sqlite3_bind_int64(st, 1, r->id > (uint64_t)INT64_MAX ? INT64_MAX : (sqlite3_int64)r->id);
    /* FAST, not ON, for these rows only: ON would write every page they free again, zeroed,
     * into the WAL (as many bytes as the events themselves, for every event); the events
     * are in Kafka by now, and the pages are reused by the next batches. */
    int rc = exec(s->wdb, "PRAGMA secure_delete=FAST");
    if (rc != SQLITE_OK) return rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) *removed += sqlite3_column_int64(st, 0);
    sqlite3_reset(st);
    int rc2 = exec(s->wdb, "PRAGMA secure_delete=ON");
    if (rc == SQLITE_DONE) rc = rc2 == SQLITE_OK ? SQLITE_DONE : rc2;
    if (rc != SQLITE_DONE) return rc;
    r->status = 0;
    return SQLITE_OK;
}

#define req_of(q) queue_data(q, store_req_t, link_)

static void fail_batch(queue_t *batch) {
    queue_t *q;
    QUEUE_FOREACH(q, batch) {
        store_req_t *r = req_of(q);
        store_msg_clear(&r->msg);
        r->duplicate = false;
        r->status = CHAT_EIO;
    }
}

/* A commit added rows: the batch's frames to the loop for the relay, or just tell it (it
 * reads the outbox). Under lock. */
static void ob_hand_over(sqlite_store_t *s) {
    sbuf_t *h = &s->ob_hand, *d = &s->ob_done;
    if (!s->ob.handoff || s->ob_lost || d->len + h->len > OB_HAND_MAX) {
        s->ob_new = true;
        if (s->ob.handoff) d->len = 0; /* a gap would follow them: they are read too */
    } else if (!d->len) {              /* the common case: the loop took the last ones already */
        sbuf_t t = *d;
        *d = *h;
        *h = t;
    } else {
        sbuf_put(d, h->p, h->len);
        if (d->oom) {
            sbuf_free(d);
            s->ob_new = true;
        }
    }
    h->len = 0;
    s->ob_lost = false;
}

/* One transaction for the whole batch. Caller holds wdb_lock. true if committed. */
static bool write_batch(sqlite_store_t *s, queue_t *batch) {
    if (!s->wdb) { /* a reopen failed (writer_probe): werr says why */
        fail_batch(batch);
        return false;
    }
    int rc = step_once(s->begin);
    if (rc != SQLITE_DONE) {
        log_error("store_begin_failed path=%s err=%s", s->path, LOG_STR(sqlite3_errmsg(s->wdb)));
        goto fail;
    }
    /* what the outbox holds now, other processes' rows and deletes included (ob_count) */
    if (s->ob_on && (rc = ob_count(s, &s->ob_rows)) != SQLITE_OK) goto fail;
    int64_t added = 0, removed = 0;
    bool deleted = false;
    uint64_t refused = 0;
    queue_t *q;
    QUEUE_FOREACH(q, batch) {
        store_req_t *r = req_of(q);
        if (r->op == STORE_OUTBOX_DELETE) {
            rc = ob_delete(s, r, &removed);
            deleted = true;
        } else if (r->op == STORE_READ_SET) { /* no event of a message: not in the outbox */
            rc = do_read_set(s, r);
        } else if (s->ob_on && s->ob.max_rows &&
                   s->ob_rows + added - removed >= (int64_t)s->ob.max_rows) {
            /* The relay is that far behind (Kafka down for long): refuse rather than store
             * a change whose event could not be kept. Nothing is written. */
            r->status = CHAT_EBUSY;
            refused++;
            continue;
        } else {
            rc = r->op == STORE_APPEND ? do_append(s, r) : do_change(s, r);
            if (rc == SQLITE_OK && s->ob_on && r->status == 0 && !r->duplicate) {
                rc = ob_write(s, r);
                added++;
            }
        }
        /* After an I/O error, a full disk or OOM SQLite may already have rolled the
         * transaction back; either way nothing in this batch can be promised. */
        if (rc != SQLITE_OK) goto fail;
    }
    if (s->ob_on && (rc = ob_flush(s)) != SQLITE_OK) goto fail;
    s->ob_seq = 0;
    int64_t count = -1;
    if ((deleted || added) && (rc = ob_count(s, &count)) != SQLITE_OK) goto fail;
    rc = step_once(s->commit);
    if (rc != SQLITE_DONE) {
        log_error("store_commit_failed path=%s err=%s", s->path, LOG_STR(sqlite3_errmsg(s->wdb)));
        goto fail;
    }
    if (s->ob_on) {
        s->ob_rows = count >= 0 ? count : s->ob_rows + added - removed;
        uv_mutex_lock(&s->lock);
        s->ob_stats.rows = (uint64_t)s->ob_rows;
        s->ob_stats.written += (uint64_t)added;
        s->ob_stats.refused += refused;
        if (added) ob_hand_over(s);
        uv_mutex_unlock(&s->lock);
    }
    return true;
fail:
    s->ob_seq = 0;
    s->ob_at = 0;
    s->ob_hand.len = 0;
    s->ob_lost = false;
    snprintf(s->werr, sizeof s->werr, "%s", sqlite3_errmsg(s->wdb));
    if (!sqlite3_get_autocommit(s->wdb)) step_once(s->rollback);
    fail_batch(batch);
    return false;
}

/* The writer's view of the store's health, published for sq_health. Logs the changes only. */
static void set_failing(sqlite_store_t *s, bool failing) {
    uv_mutex_lock(&s->lock);
    bool was = s->failing;
    s->failing = failing;
    if (failing) snprintf(s->fail_why, sizeof s->fail_why, "%s", s->werr);
    uv_mutex_unlock(&s->lock);
    if (failing && !was) log_error("store_failing path=%s err=%s", s->path, LOG_STR(s->werr));
    if (!failing && was) log_info("store_recovered path=%s", s->path);
}

/* Caller holds wdb_lock; the writer thread, while writes fail. A fresh connection first:
 * whatever state the failure left the old one in (a file replaced under it, a WAL it gave up
 * on, or a read-only open) is gone with it, and a file made writable again is opened for
 * writing. Then a real write. true if it worked. */
static bool writer_probe(sqlite_store_t *s) {
    struct stat st;
    if (stat(s->path, &st) != 0) {
        /* moved or deleted under us: opening would create an empty database */
        snprintf(s->werr, sizeof s->werr, "the database file is gone: %s", strerror(errno));
        return false;
    }
    close_writer_db(s);
    s->wal_prev = 0;
    if (open_db(&s->wdb, s->path, false, s->werr, sizeof s->werr) != 0) return false;
    if (prepare_writer(s) != 0) {
        snprintf(s->werr, sizeof s->werr, "%s", sqlite3_errmsg(s->wdb));
        close_writer_db(s);
        return false;
    }
    return probe_write(s->wdb, s->werr, sizeof s->werr) == 0;
}

/* Hand finished requests (all of list, which is left empty) to the loop thread. */
static void post_done(sqlite_store_t *s, queue_t *list, uint64_t n, int batch_result) {
    uv_mutex_lock(&s->lock);
    queue_move_tail(list, &s->finished);
    if (batch_result > 0) s->stats.batches++;
    if (batch_result < 0) s->stats.failed_batches++;
    if (batch_result) { /* the writer thread: its own frame count is safe to read here */
        s->stats.writes += n;
        s->stats.wal_frames += s->wal_frames_new;
        s->wal_frames_new = 0;
        if (n > s->stats.max_batch) s->stats.max_batch = n;
    } else {
        s->stats.reads += n;
    }
    uv_mutex_unlock(&s->lock);
    uv_async_send(&s->async);
}

static void writer_main(void *arg) {
    sqlite_store_t *s = arg;
    for (;;) {
        bool probe = false;
        uv_mutex_lock(&s->lock);
        while ((queue_empty(&s->wq) || s->paused) && !s->closing) {
            if (!s->failing) {
                uv_cond_wait(&s->wcond, &s->lock);
            } else if (uv_cond_timedwait(&s->wcond, &s->lock, PROBE_EVERY_NS) == UV_ETIMEDOUT) {
                probe = true;
                break;
            }
        }
        queue_t list;
        queue_init(&list);
        if (!probe) queue_move_tail(&s->wq, &list);
        bool failing = s->failing;
        uv_mutex_unlock(&s->lock);
        if (probe) {
            uv_mutex_lock(&s->wdb_lock);
            bool ok = writer_probe(s);
            uv_mutex_unlock(&s->wdb_lock);
            set_failing(s, !ok);
            continue;
        }
        if (queue_empty(&list)) break; /* closing, and nothing left to write */
        while (!queue_empty(&list)) {
            queue_t batch;
            queue_init(&batch);
            uint64_t n = 0;
            for (; n < WRITE_BATCH_MAX && !queue_empty(&list); n++) {
                queue_t *q = queue_head(&list);
                queue_remove(q);
                queue_insert_tail(&batch, q);
            }
            uv_mutex_lock(&s->wdb_lock);
            /* while failing, a busy store gets its fresh connection here (see writer_probe) */
            bool ok = !failing || writer_probe(s);
            if (ok) {
                ok = write_batch(s, &batch);
            } else {
                fail_batch(&batch);
            }
            failing = !ok;
            uv_mutex_unlock(&s->wdb_lock);
            set_failing(s, !ok); /* before the callbacks: a caller told "failed" sees it too */
            post_done(s, &batch, n, ok ? 1 : -1);
        }
    }

    /* Wait for the readers to close their connections, so that ours is the last one: then
     * SQLite checkpoints and removes the WAL, and the database is one file again. */
    uv_mutex_lock(&s->lock);
    while (s->readers_live > 0) uv_cond_wait(&s->wcond, &s->lock);
    uv_mutex_unlock(&s->lock);
    uv_mutex_lock(&s->wdb_lock);
    if (s->wdb && exec(s->wdb, "PRAGMA wal_checkpoint(TRUNCATE)") != SQLITE_OK) {
        log_warn("store_checkpoint_failed path=%s err=%s", s->path,
                 LOG_STR(sqlite3_errmsg(s->wdb)));
    }
    close_writer_db(s);
    uv_mutex_unlock(&s->wdb_lock);

    uv_mutex_lock(&s->lock);
    s->threads_live--;
    uv_mutex_unlock(&s->lock);
    /* The loop joins this thread before it closes the async handle, so the handle is still
     * alive here even if the loop already saw threads_live == 0. */
    uv_async_send(&s->async);
}

/* ---- the readers --------------------------------------------------------------------- */

static void do_read(reader_t *rd, store_req_t *r) {
    sqlite3_stmt *st = r->op == STORE_HISTORY  ? rd->history
                       : r->op == STORE_SEARCH ? rd->search
                                               : rd->after;
    int limit = r->limit < 1 ? 1 : r->limit > STORE_READ_MAX ? STORE_READ_MAX : r->limit;
    /* ids are < 2^63; a bound beyond that (or "before 0" = from the newest) is INT64_MAX,
     * which gives everything for HISTORY and nothing for AFTER, as it should. */
    sqlite3_int64 bound = (sqlite3_int64)r->id;
    if (r->id > (uint64_t)INT64_MAX || (r->op != STORE_AFTER && r->id == 0)) {
        bound = INT64_MAX;
    }
    sqlite3_bind_text(st, 1, r->op == STORE_SEARCH ? r->text : r->chat_id, -1, SQLITE_STATIC);
    sqlite3_bind_int64(st, 2, bound);
    sqlite3_bind_int(st, 3, limit);

    store_msg_t *msgs = NULL;
    char **marks = NULL; /* SEARCH: the highlight column */
    size_t n = 0, cap = 0;
    int status = 0, rc;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (n == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            if (ncap > (size_t)limit) ncap = (size_t)limit;
            store_msg_t *p = realloc(msgs, ncap * sizeof *p);
            if (!p) {
                status = CHAT_ENOMEM;
                break;
            }
            msgs = p;
            if (r->op == STORE_SEARCH) {
                char **q = realloc(marks, ncap * sizeof *q);
                if (!q) {
                    status = CHAT_ENOMEM;
                    break;
                }
                marks = q;
            }
            cap = ncap;
        }
        if ((status = row_to_msg(st, &msgs[n])) != 0) break;
        if (marks && (status = col_dup(st, 8, &marks[n])) != 0) {
            store_msg_clear(&msgs[n]);
            break;
        }
        n++;
    }
    if (status == 0 && rc != SQLITE_DONE) {
        /* SEARCH: the search layer builds every MATCH expression from parsed, quoted terms,
         * so an FTS5 syntax error here is our bug; it is logged, and the client gets the
         * usual 503 without the engine's text */
        log_error("store_read_failed chat=%s err=%s", LOG_STR(r->chat_id),
                  LOG_STR(sqlite3_errmsg(rd->db)));
        status = CHAT_EIO;
    }
    sqlite3_reset(st);
    if (status != 0) {
        for (size_t i = 0; i < n; i++) {
            store_msg_clear(&msgs[i]);
            if (marks) free(marks[i]);
        }
        free(msgs);
        free(marks);
        msgs = NULL;
        marks = NULL;
        n = 0;
    }
    r->status = status;
    r->msgs = msgs;
    r->marks = marks;
    r->n_msgs = n;
}

static void do_outbox_read(reader_t *rd, store_req_t *r) {
    int limit = r->limit < 1 ? 1 : r->limit > STORE_READ_MAX ? STORE_READ_MAX : r->limit;
    if (!rd->outbox &&
        prepare(rd->db, "SELECT seq, first, events FROM outbox WHERE seq > ?1 ORDER BY seq",
                &rd->outbox)) {
        r->status = CHAT_EIO;
        return;
    }
    sqlite3_stmt *st = rd->outbox;
    sqlite3_bind_int64(st, 1, r->id > (uint64_t)INT64_MAX ? INT64_MAX : (sqlite3_int64)r->id);
    store_outbox_row_t *rows = malloc((size_t)limit * sizeof *rows);
    size_t n = 0;
    int status = rows ? 0 : CHAT_ENOMEM, rc = SQLITE_DONE;
    while (status == 0 && n < (size_t)limit && (rc = sqlite3_step(st)) == SQLITE_ROW) {
        uint64_t last = (uint64_t)sqlite3_column_int64(st, 0);
        uint64_t first = (uint64_t)sqlite3_column_int64(st, 1);
        const uint8_t *p = sqlite3_column_blob(st, 2);
        size_t len = (size_t)sqlite3_column_bytes(st, 2);
        status = ob_unpack(p, len, first, last, r->id, rows, &n, (size_t)limit);
    }
    if (status == 0 && rc != SQLITE_DONE && rc != SQLITE_ROW) {
        log_error("store_outbox_read_failed err=%s", LOG_STR(sqlite3_errmsg(rd->db)));
        status = CHAT_EIO;
    }
    sqlite3_reset(st);
    /* The depth as this read saw it: a process that writes nothing (another one relays and
     * deletes) has no batch of its own to count it at. */
    if (status == 0 && (rd->ob_count || prepare(rd->db, OB_COUNT_SQL, &rd->ob_count) == 0) &&
        sqlite3_step(rd->ob_count) == SQLITE_ROW) {
        int64_t depth = sqlite3_column_int64(rd->ob_count, 0);
        uv_mutex_lock(&rd->s->lock);
        rd->s->ob_stats.rows = (uint64_t)depth;
        uv_mutex_unlock(&rd->s->lock);
    }
    if (rd->ob_count) sqlite3_reset(rd->ob_count);
    r->status = status;
    r->rows = rows;
    r->n_rows = n;
    if (status != 0) {
        store_outbox_rows_free(rows, n);
        r->rows = NULL;
        r->n_rows = 0;
    }
}

static void reader_main(void *arg) {
    reader_t *rd = arg;
    sqlite_store_t *s = rd->s;
    for (;;) {
        uv_mutex_lock(&s->lock);
        while (queue_empty(&s->rq) && !s->closing) uv_cond_wait(&s->rcond, &s->lock);
        store_req_t *r = NULL;
        if (!queue_empty(&s->rq)) {
            r = req_of(queue_head(&s->rq));
            queue_remove(&r->link_);
        }
        uv_mutex_unlock(&s->lock);
        if (!r) break; /* closing, and every queued read served */
        if (r->op == STORE_OUTBOX_READ) {
            do_outbox_read(rd, r);
        } else if (r->op == STORE_READ_GET) {
            do_read_get(rd, r);
        } else {
            do_read(rd, r);
        }
        queue_t one;
        queue_init(&one);
        queue_insert_tail(&one, &r->link_);
        post_done(s, &one, 1, 0);
    }
    close_reader_db(rd);
    side_thread_exit(s);
}

/* ---- the loop side --------------------------------------------------------------------- */

static void free_store(sqlite_store_t *s) {
    uv_cond_destroy(&s->ccond);
    uv_cond_destroy(&s->rcond);
    uv_cond_destroy(&s->wcond);
    uv_mutex_destroy(&s->lock);
    uv_mutex_destroy(&s->wdb_lock);
    sbuf_free(&s->ob_buf);
    sbuf_free(&s->ob_hand);
    sbuf_free(&s->ob_done);
    free(s->ob_view);
    free(s->path);
    free(s);
}

static void on_closed(uv_handle_t *h) {
    sqlite_store_t *s = h->data;
    void (*done)(void *) = s->done;
    void *arg = s->done_arg;
    free_store(s);
    if (done) done(arg);
}

/* Join what was started and close what the threads did not (after a failed start, some
 * connections never had a thread). Then the async handle, and the store with it. */
static void finish(sqlite_store_t *s) {
    s->finishing = true;
    for (int i = 0; i < s->n_readers_started; i++) uv_thread_join(&s->readers[i].tid);
    if (s->ckpt_started) uv_thread_join(&s->ckpt_thread);
    if (s->writer_started) uv_thread_join(&s->writer);
    for (int i = 0; i < N_READERS; i++) close_reader_db(&s->readers[i]);
    close_db(s, &s->cdb);
    close_writer_db(s);
    uv_close((uv_handle_t *)&s->async, on_closed);
}

/* Committed frames (ob_done's) to the relay, as rows lent for the call. */
static void ob_lend(sqlite_store_t *s, const uint8_t *p, size_t len) {
    for (size_t off = 0; off + OB_FRAME <= len;) {
        uint64_t first = get_le(p + off, 8);
        size_t plen = get_le(p + off + 8, 8);
        const uint8_t *pack = p + off + OB_FRAME;
        off += OB_FRAME + plen;
        /* at most one event per OB_HEAD + 2 bytes: room for the rows first */
        size_t most = plen / (OB_HEAD + 2) + 1;
        if (most > s->ob_view_cap) {
            store_outbox_row_t *v = realloc(s->ob_view, most * sizeof *v);
            if (!v) { /* the relay reads them from the outbox */
                if (s->ob.notify) s->ob.notify(s->ob.arg);
                return;
            }
            s->ob_view = v;
            s->ob_view_cap = most;
        }
        size_t n = ob_rows_of(pack, plen, first, s->ob_view);
        s->ob.handoff(s->ob.arg, s->ob_view, n);
    }
}

static void on_async(uv_async_t *h) {
    sqlite_store_t *s = h->data;
    uv_mutex_lock(&s->lock);
    queue_move_tail(&s->finished, &s->cb);
    bool ob_new = s->ob_new;
    s->ob_new = false;
    sbuf_t hand = s->ob_done;
    s->ob_done = (sbuf_t){0};
    uv_mutex_unlock(&s->lock);
    /* never after close: the relay is told to stop before the store closes */
    if (ob_new && s->ob.notify && !s->close_called) s->ob.notify(s->ob.arg);
    if (hand.len && !s->close_called) ob_lend(s, (const uint8_t *)hand.p, hand.len);
    sbuf_free(&hand);
    for (int n = 0; !queue_empty(&s->cb) && n < DELIVER_MAX; n++) {
        store_req_t *r = req_of(queue_head(&s->cb));
        queue_remove(&r->link_); /* before the callback, which may free or resubmit r */
        r->cb(r);
    }
    if (!queue_empty(&s->cb)) {
        uv_async_send(&s->async); /* the rest on the next turn, after pending I/O */
        return;
    }
    if (s->finishing) return;
    uv_mutex_lock(&s->lock);
    bool all_done = s->closing && s->threads_live == 0 && queue_empty(&s->finished);
    uv_mutex_unlock(&s->lock);
    if (all_done) finish(s);
}

static void stop_threads(sqlite_store_t *s) {
    uv_mutex_lock(&s->lock);
    s->closing = true;
    uv_mutex_unlock(&s->lock);
    uv_cond_broadcast(&s->wcond);
    uv_cond_broadcast(&s->rcond);
    uv_cond_broadcast(&s->ccond);
}

/* ---- the ops ------------------------------------------------------------------------- */

static int sq_submit(store_t *base, store_req_t *r) {
    sqlite_store_t *s = (sqlite_store_t *)base;
    bool write;
    switch (r->op) {
    case STORE_SEARCH:
    case STORE_HISTORY:
    case STORE_AFTER:
    case STORE_READ_GET: write = false; break;
    case STORE_OUTBOX_READ:
        if (!s->ob_on) return CHAT_EINVAL;
        write = false;
        break;
    case STORE_OUTBOX_DELETE:
        if (!s->ob_on) return CHAT_EINVAL;
        write = true;
        break;
    default: write = true; break; /* APPEND, EDIT, DELETE, READ_SET */
    }

    bool wake;
    uv_mutex_lock(&s->lock);
    if (s->closing) {
        uv_mutex_unlock(&s->lock);
        return CHAT_ECLOSED;
    }
    queue_t *to = write ? &s->wq : &s->rq;
    /* The writer sleeps only on an empty queue, so only the first request after that
     * needs to wake it; the rest of a burst joins the same batch for free. */
    wake = queue_empty(to) || !write;
    queue_insert_tail(to, &r->link_);
    uv_mutex_unlock(&s->lock);
    if (wake) uv_cond_signal(write ? &s->wcond : &s->rcond);
    return 0;
}

static int sq_migrate(store_t *base) {
    sqlite_store_t *s = (sqlite_store_t *)base;
    uv_mutex_lock(&s->wdb_lock);
    int rc = s->wdb ? migrate_db(s->wdb, s->path, NULL, 0) : CHAT_ECLOSED;
    uv_mutex_unlock(&s->wdb_lock);
    return rc;
}

static void sq_close(store_t *base, void (*done)(void *), void *arg) {
    sqlite_store_t *s = (sqlite_store_t *)base;
    if (!s->base.loop) {
        /* migrate-only use: no threads, nothing in flight */
        close_writer_db(s);
        free_store(s);
        if (done) done(arg);
        return;
    }
    if (s->close_called) {
        log_warn("store_close_twice path=%s", s->path);
        return;
    }
    s->close_called = true;
    s->done = done;
    s->done_arg = arg;
    stop_threads(s); /* each thread drains its queue, posts, and sends the async on exit */
}

/* What an operator needs to see the group commit and the write volume: writes per commit
 * is the group size, WAL frames (pages) per write the write amplification. */
static void sq_metrics(store_t *base, sbuf_t *sb) {
    store_sqlite_stats_t st;
    store_sqlite_stats(base, &st);
    const struct {
        const char *name, *type, *help;
        uint64_t value;
    } rows[] = {
        {"commits_total", "counter", "Write transactions committed, one fsync each.", st.batches},
        {"failed_commits_total", "counter", "Write transactions that failed.", st.failed_batches},
        {"writes_total", "counter", "Appends, edits and deletes completed.", st.writes},
        {"wal_frames_total", "counter", "Pages the commits appended to the WAL.", st.wal_frames},
        {"checkpoints_total", "counter", "WAL checkpoints completed by the checkpointer.",
         st.checkpoints},
        {"largest_commit", "gauge", "Most requests in one transaction since start.", st.max_batch},
    };
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        sbuf_printf(sb, "# HELP chat_store_sqlite_%s %s\n# TYPE chat_store_sqlite_%s %s\n",
                    rows[i].name, rows[i].help, rows[i].name, rows[i].type);
        sbuf_printf(sb, "chat_store_sqlite_%s %" PRIu64 "\n", rows[i].name, rows[i].value);
    }
}

static int sq_health(store_t *base, char *detail, size_t n) {
    sqlite_store_t *s = (sqlite_store_t *)base;
    uv_mutex_lock(&s->lock);
    bool failing = s->failing;
    if (failing) snprintf(detail, n, "sqlite: %s: writes fail: %s", s->path, s->fail_why);
    uv_mutex_unlock(&s->lock);
    return failing ? CHAT_EIO : 0;
}

/* An outbox of the first version (a row per event, see OUTBOX_DDL) becomes one of packed
 * rows, in one transaction: each event keeps its seq (a row of its own), and the high-water
 * mark stays, so no seq is ever given twice. Until they are relayed, the depth (OB_COUNT_SQL)
 * counts the seqs missing between them too: a little high, never low. Caller holds
 * wdb_lock. */
static int ob_convert(sqlite_store_t *s) {
    sqlite3 *db = s->wdb;
    sqlite3_stmt *old = NULL, *ins = NULL;
    sbuf_t pk = {0};
    int rc = exec(db, "ALTER TABLE outbox RENAME TO outbox_v1");
    if (rc == SQLITE_OK) rc = exec(db, OUTBOX_DDL);
    if (rc == SQLITE_OK)
        rc = prepare(db, "SELECT seq, chat_id, message_id, at, event FROM outbox_v1 ORDER BY seq",
                     &old);
    if (rc == SQLITE_OK)
        rc = prepare(db, "INSERT INTO outbox (seq, first, events) VALUES (?1, ?1, ?2)", &ins);
    uint64_t n = 0;
    while (rc == SQLITE_OK && (rc = sqlite3_step(old)) == SQLITE_ROW) {
        const char *chat = (const char *)sqlite3_column_text(old, 1);
        const void *ev = sqlite3_column_blob(old, 4);
        size_t len = (size_t)sqlite3_column_bytes(old, 4);
        pk.len = 0;
        ob_pack(&pk, (uint64_t)sqlite3_column_int64(old, 2), sqlite3_column_int64(old, 3),
                chat ? chat : "", ev ? ev : "", len);
        if (pk.oom) {
            rc = SQLITE_NOMEM;
            break;
        }
        sqlite3_bind_int64(ins, 1, sqlite3_column_int64(old, 0));
        sqlite3_bind_blob(ins, 2, pk.p, (int)pk.len, SQLITE_STATIC);
        rc = step_once(ins) == SQLITE_DONE ? SQLITE_OK : SQLITE_ERROR;
        n++;
    }
    if (rc == SQLITE_DONE) rc = SQLITE_OK;
    sqlite3_finalize(old);
    sqlite3_finalize(ins);
    sbuf_free(&pk);
    if (rc == SQLITE_OK)
        rc = exec(db, "DELETE FROM sqlite_sequence WHERE name = 'outbox';"
                      "INSERT INTO sqlite_sequence (name, seq)"
                      " SELECT 'outbox', seq FROM sqlite_sequence WHERE name = 'outbox_v1';"
                      "DROP TABLE outbox_v1;");
    if (rc == SQLITE_OK) log_info("store_outbox_converted path=%s events=%" PRIu64, s->path, n);
    return rc;
}

static int sq_outbox_enable(store_t *base, const store_outbox_opts_t *o) {
    sqlite_store_t *s = (sqlite_store_t *)base;
    if (!o || !o->encode || s->ob_on || !s->base.loop) return CHAT_EINVAL;
    uv_mutex_lock(&s->wdb_lock);
    int rc = CHAT_EIO;
    sqlite3_stmt *st = NULL;
    if (!s->wdb || exec(s->wdb, "BEGIN IMMEDIATE") != SQLITE_OK) goto out;
    if (prepare(s->wdb, "SELECT count(*) FROM pragma_table_info('outbox') WHERE name = 'event'",
                &st) ||
        sqlite3_step(st) != SQLITE_ROW)
        goto out;
    bool v1 = sqlite3_column_int(st, 0) > 0;
    sqlite3_finalize(st);
    st = NULL;
    if ((v1 ? ob_convert(s) : exec(s->wdb, OUTBOX_DDL)) != SQLITE_OK) goto out;
    if (prepare(s->wdb, "SELECT coalesce(sum(seq - first + 1), 0) FROM outbox", &st) ||
        sqlite3_step(st) != SQLITE_ROW)
        goto out;
    s->ob_rows = sqlite3_column_int64(st, 0);
    if (exec(s->wdb, "COMMIT") != SQLITE_OK) goto out;
    s->ob = *o;
    s->ob_on = true; /* the writer reads it under wdb_lock, which we hold */
    if (prepare_outbox(s)) {
        s->ob_on = false;
        goto out;
    }
    uv_mutex_lock(&s->lock);
    s->ob_stats.rows = (uint64_t)s->ob_rows;
    s->ob_new = s->ob_rows > 0; /* what a previous run left: the relay starts with it */
    uv_mutex_unlock(&s->lock);
    if (s->ob_rows > 0) uv_async_send(&s->async);
    rc = 0;
out:
    if (rc)
        log_error("store_outbox_failed path=%s err=%s", s->path,
                  LOG_STR(s->wdb ? sqlite3_errmsg(s->wdb) : "closed"));
    sqlite3_finalize(st);
    if (s->wdb && !sqlite3_get_autocommit(s->wdb)) exec(s->wdb, "ROLLBACK");
    uv_mutex_unlock(&s->wdb_lock);
    return rc;
}

static void sq_outbox_stats(store_t *base, store_outbox_stats_t *out) {
    sqlite_store_t *s = (sqlite_store_t *)base;
    uv_mutex_lock(&s->lock);
    *out = s->ob_stats;
    uv_mutex_unlock(&s->lock);
}

static const store_ops_t sqlite_ops = {
    .outbox_enable = sq_outbox_enable,
    .outbox_stats = sq_outbox_stats,
    .name = "sqlite",
    .submit = sq_submit,
    .migrate = sq_migrate,
    .metrics = sq_metrics,
    .close = sq_close,
    .health = sq_health,
};

int store_sqlite_open(store_t **out, uv_loop_t *loop, const char *path, char *err, size_t errlen) {
    *out = NULL;
    if (strcmp(path, ":memory:") == 0 || *path == '\0') {
        store__set_err(err, errlen, "sqlite store needs a file path, not \"%s\"", path);
        return CHAT_EINVAL;
    }
    if (!sqlite3_threadsafe()) {
        store__set_err(err, errlen, "libsqlite3 was built without thread support");
        return CHAT_EIO;
    }
    sqlite_store_t *s = calloc(1, sizeof *s);
    if (!s) return CHAT_ENOMEM;
    queue_init(&s->wq);
    queue_init(&s->rq);
    queue_init(&s->finished);
    queue_init(&s->cb);
    s->base.ops = &sqlite_ops;
    s->base.loop = loop;
    s->ckpt_start = CKPT_START_FRAMES;
    int rc = CHAT_ENOMEM;
    if (!(s->path = strdup(path))) goto fail_free;
    rc = CHAT_EIO;
    if (uv_mutex_init(&s->lock)) goto fail_free;
    if (uv_mutex_init(&s->wdb_lock)) goto fail_lock;
    if (uv_cond_init(&s->wcond)) goto fail_wdb_lock;
    if (uv_cond_init(&s->rcond)) goto fail_wcond;
    if (uv_cond_init(&s->ccond)) goto fail_rcond;

    if ((rc = make_parent_dir(path, err, errlen)) != 0) goto fail_sync;
    if ((rc = open_db(&s->wdb, path, false, err, errlen)) != 0) goto fail_sync;
    /* A store that cannot write would take every send only to fail it: refuse to start. */
    char why[200];
    if (sqlite3_db_readonly(s->wdb, "main") == 1) {
        probe_write(s->wdb, why, sizeof why);
        goto not_writable;
    }
    if ((rc = migrate_db(s->wdb, path, err, errlen)) != 0) goto fail_dbs;
    /* A deleted message's words leave the search index at once only with FTS5's
     * secure-delete (SQLite 3.44+; a setting kept in the file). Older libraries keep them in
     * index segments until FTS5 merges those (they never match: the row is gone); the
     * README says so. */
    if (sqlite3_libversion_number() >= 3044000 &&
        exec(s->wdb, "INSERT INTO messages_fts (messages_fts, rank) VALUES ('secure-delete', 1)") !=
            SQLITE_OK)
        log_warn("store_fts_secure_delete_failed path=%s err=%s", path,
                 LOG_STR(sqlite3_errmsg(s->wdb)));
    if (probe_write(s->wdb, why, sizeof why) != 0) goto not_writable;
    if (!loop) {
        *out = &s->base;
        return 0;
    }
    rc = CHAT_EIO;
    if (prepare_writer(s)) {
        store__set_err(err, errlen, "%s: %s", path, sqlite3_errmsg(s->wdb));
        goto fail_dbs;
    }
    for (int i = 0; i < N_READERS; i++) {
        if ((rc = open_reader(s, &s->readers[i], err, errlen)) != 0) goto fail_dbs;
    }
    if ((rc = open_db(&s->cdb, path, false, err, errlen)) != 0) goto fail_dbs;
    rc = CHAT_EIO;
    if (uv_async_init(loop, &s->async, on_async)) goto fail_dbs;
    s->async.data = s;

    /* Readers and checkpointer first: the writer, on its way out, waits for readers_live
     * to reach zero. Each thread counted here decrements both counts as it exits. */
    s->threads_live = N_READERS + 2;
    s->readers_live = N_READERS + 1;
    for (int i = 0; i < N_READERS; i++) {
        if (uv_thread_create(&s->readers[i].tid, reader_main, &s->readers[i])) goto fail_threads;
        s->n_readers_started++;
    }
    if (uv_thread_create(&s->ckpt_thread, checkpointer_main, s)) goto fail_threads;
    s->ckpt_started = true;
    if (uv_thread_create(&s->writer, writer_main, s)) goto fail_threads;
    s->writer_started = true;
    log_info("store_opened backend=sqlite path=%s readers=%d", path, N_READERS);
    *out = &s->base;
    return 0;

fail_threads:
    /* Rare enough to keep simple: the writer never started (it starts last), so stop the
     * readers that did, join them, close every connection, and let the async handle's
     * close callback free the store once the loop runs. */
    store__set_err(err, errlen, "%s: cannot start store threads", path);
    stop_threads(s);
    finish(s);
    return CHAT_EIO;
not_writable:
    store__set_err(err, errlen, "%s is not writable: %s", path, why);
    log_error("store_not_writable path=%s err=%s", path, LOG_STR(why));
    rc = CHAT_EIO;
fail_dbs:
    for (int i = 0; i < N_READERS; i++) close_reader_db(&s->readers[i]);
    close_db(s, &s->cdb);
    close_writer_db(s);
fail_sync:
    uv_cond_destroy(&s->ccond);
fail_rcond:
    uv_cond_destroy(&s->rcond);
fail_wcond:
    uv_cond_destroy(&s->wcond);
fail_wdb_lock:
    uv_mutex_destroy(&s->wdb_lock);
fail_lock:
    uv_mutex_destroy(&s->lock);
fail_free:
    free(s->path);
    free(s);
    return rc;
}

/* ---- internal API (store_sqlite_internal.h) ------------------------------------------- */

void store_sqlite_stats(store_t *base, store_sqlite_stats_t *out) {
    sqlite_store_t *s = (sqlite_store_t *)base;
    uv_mutex_lock(&s->lock);
    *out = s->stats;
    uv_mutex_unlock(&s->lock);
}

void store_sqlite_pause(store_t *base, bool paused) {
    sqlite_store_t *s = (sqlite_store_t *)base;
    uv_mutex_lock(&s->lock);
    s->paused = paused;
    uv_mutex_unlock(&s->lock);
    if (!paused) uv_cond_broadcast(&s->wcond);
}

int store_sqlite_exec(store_t *base, const char *sql) {
    sqlite_store_t *s = (sqlite_store_t *)base;
    uv_mutex_lock(&s->wdb_lock);
    int rc = s->wdb ? exec(s->wdb, sql) : SQLITE_MISUSE;
    if (rc != SQLITE_OK) {
        log_error("store_exec_failed sql=%s err=%s", LOG_STR(sql),
                  LOG_STR(s->wdb ? sqlite3_errmsg(s->wdb) : "closed"));
    }
    uv_mutex_unlock(&s->wdb_lock);
    return rc == SQLITE_OK ? 0 : CHAT_EIO;
}

void store_sqlite_checkpoint_at(store_t *base, int frames) {
    sqlite_store_t *s = (sqlite_store_t *)base;
    uv_mutex_lock(&s->wdb_lock);
    s->ckpt_start = frames > CKPT_INLINE_FRAMES ? frames : CKPT_INLINE_FRAMES + 1;
    uv_mutex_unlock(&s->wdb_lock);
}
