/* Unit tests for the SQLite store's outbox (the Kafka relay's source of truth): a real
 * libuv loop, a real database in a temp directory, the real writer and reader threads.
 * What is checked is what the relay's contract stands on: a change and its event commit
 * together or not at all, only changes that happened get an event, the rows come back in
 * order with the encoder's bytes, a full outbox refuses changes without storing them, and
 * seqs are never reused. */
#include <inttypes.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "store/store.h"
#include "store/store_sqlite_internal.h"
#include "test.h"

typedef struct fx {
    uv_loop_t loop;
    store_t *s;
    char dir[64];
    char path[128];
    char url[160];
    int notified;
    /* what the hand-off lent, copied (fx_open_handoff) */
    size_t n_handed;
    uint64_t handed_seq[64];
    char handed_event[64][64];
    char handed_chat[64][8];
} fx_t;

static bool fx_init(fx_t *f) {
    memset(f, 0, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/test_outbox_XXXXXX");
    if (!mkdtemp(f->dir)) return false;
    snprintf(f->path, sizeof f->path, "%s/chat.db", f->dir);
    snprintf(f->url, sizeof f->url, "sqlite:%s", f->path);
    return uv_loop_init(&f->loop) == 0;
}

/* A stand-in for the protocol's encoder: the op, the id and the text, readable. */
static void encode(sbuf_t *out, store_op_t op, const store_msg_t *m) {
    sbuf_printf(out, "%s|%" PRIu64 "|%s|%s",
                op == STORE_APPEND ? "msg"
                : op == STORE_EDIT ? "edit"
                                   : "del",
                m->id, m->chat_id, m->message ? m->message : "-");
}

static void on_notify(void *arg) { ((fx_t *)arg)->notified++; }

static void on_handoff(void *arg, const store_outbox_row_t *rows, size_t n) {
    fx_t *f = arg;
    for (size_t i = 0; i < n && f->n_handed < 64; i++, f->n_handed++) {
        f->handed_seq[f->n_handed] = rows[i].seq;
        snprintf(f->handed_event[f->n_handed], sizeof f->handed_event[0], "%.*s",
                 (int)rows[i].event_len, rows[i].event);
        snprintf(f->handed_chat[f->n_handed], sizeof f->handed_chat[0], "%s", rows[i].chat_id);
    }
}

static int fx_open_opts(fx_t *f, uint64_t max_rows, bool handoff) {
    char err[256] = "";
    int rc = store_open(&f->s, &f->loop, f->url, err, sizeof err);
    if (rc) {
        fprintf(stderr, "  store_open: %s\n", err);
        return rc;
    }
    store_outbox_opts_t o = {.encode = encode,
                             .max_rows = max_rows,
                             .notify = on_notify,
                             .handoff = handoff ? on_handoff : NULL,
                             .arg = f};
    return store_outbox_enable(f->s, &o);
}

static int fx_open(fx_t *f, uint64_t max_rows) { return fx_open_opts(f, max_rows, false); }

static void on_flag(void *arg) { (*(int *)arg)++; }

static void fx_close_store(fx_t *f) {
    int done = 0;
    store_close(f->s, on_flag, &done);
    while (!done) uv_run(&f->loop, UV_RUN_ONCE);
    f->s = NULL;
}

static int fx_done(fx_t *f) {
    if (f->s) fx_close_store(f);
    uv_run(&f->loop, UV_RUN_NOWAIT);
    int rc = uv_loop_close(&f->loop);
    const char *sfx[] = {"", "-wal", "-shm"};
    char p[200];
    for (int i = 0; i < 3; i++) {
        snprintf(p, sizeof p, "%s%s", f->path, sfx[i]);
        unlink(p);
    }
    rmdir(f->dir);
    return rc;
}

static void on_req(store_req_t *r) { (*(int *)r->data)++; }

static int run_req(fx_t *f, store_req_t *r) {
    int called = 0;
    r->cb = on_req;
    r->data = &called;
    int rc = store_submit(f->s, r);
    if (rc) return rc;
    while (!called) uv_run(&f->loop, UV_RUN_ONCE);
    return 0;
}

/* One write request; its status (or the submit's error). */
static int write1(fx_t *f, store_op_t op, const char *user, const char *text, const char *client_id,
                  uint64_t id) {
    store_req_t r;
    memset(&r, 0, sizeof r);
    r.op = op;
    r.chat_id = "c";
    r.user = user;
    r.text = text;
    r.client_id = client_id;
    r.id = id;
    r.at = 1700000000000 + (int64_t)id;
    int rc = run_req(f, &r);
    if (rc == 0) rc = r.status;
    store_req_cleanup(&r);
    return rc;
}

static store_req_t read_rows(fx_t *f, uint64_t after, int limit) {
    store_req_t r;
    memset(&r, 0, sizeof r);
    r.op = STORE_OUTBOX_READ;
    r.id = after;
    r.limit = limit;
    if (run_req(f, &r) != 0) r.status = -100;
    return r;
}

static int delete_through(fx_t *f, uint64_t seq) {
    store_req_t r;
    memset(&r, 0, sizeof r);
    r.op = STORE_OUTBOX_DELETE;
    r.id = seq;
    int rc = run_req(f, &r);
    if (rc == 0) rc = r.status;
    store_req_cleanup(&r);
    return rc;
}

static long long query_int(const char *path, const char *sql) {
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    long long v = -1;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
        sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return v;
}

static void test_only_real_changes_get_an_event(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f, 0), 0);
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "hello", "k1", 10), 0);
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "hello again", "k1", 11), 0); /* duplicate */
    CHECK_INT(write1(&f, STORE_EDIT, "bob", "not mine", NULL, 10), CHAT_EPERM);
    CHECK_INT(write1(&f, STORE_EDIT, "alice", "hello!", NULL, 10), 0);
    CHECK_INT(write1(&f, STORE_EDIT, "alice", "nothing", NULL, 99), CHAT_ENOTFOUND);
    CHECK_INT(write1(&f, STORE_DELETE, "alice", NULL, NULL, 10), 0);
    CHECK_INT(write1(&f, STORE_DELETE, "alice", NULL, NULL, 10), CHAT_ENOTFOUND);
    CHECK(f.notified >= 1);

    store_req_t r = read_rows(&f, 0, 100);
    CHECK_INT(r.status, 0);
    CHECK_INT(r.n_rows, 3);
    CHECK_STR(r.rows[0].event, "msg|10|c|hello");
    CHECK_STR(r.rows[1].event, "edit|10|c|hello!");
    CHECK_STR(r.rows[2].event, "del|10|c|-");
    for (size_t i = 0; i < 3; i++) {
        CHECK_STR(r.rows[i].chat_id, "c");
        CHECK_INT(r.rows[i].message_id, 10);
        CHECK_INT(r.rows[i].event_len, strlen(r.rows[i].event));
        if (i) CHECK(r.rows[i].seq > r.rows[i - 1].seq);
    }
    uint64_t first = r.rows[0].seq, last = r.rows[2].seq;
    store_req_cleanup(&r);
    /* reading after a seq, and with a limit, keeps the order */
    r = read_rows(&f, first, 1);
    CHECK_INT(r.n_rows, 1);
    CHECK_STR(r.rows[0].event, "edit|10|c|hello!");
    store_req_cleanup(&r);

    store_outbox_stats_t st;
    store_outbox_stats(f.s, &st);
    CHECK_INT(st.rows, 3);
    CHECK_INT(st.written, 3);
    CHECK_INT(delete_through(&f, first), 0);
    store_outbox_stats(f.s, &st);
    CHECK_INT(st.rows, 2);
    r = read_rows(&f, 0, 100);
    CHECK_INT(r.n_rows, 2);
    CHECK_INT(r.rows[0].seq, first + 1);
    store_req_cleanup(&r);

    /* a seq is never reused, even once the outbox was emptied */
    CHECK_INT(delete_through(&f, last), 0);
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "later", NULL, 20), 0);
    r = read_rows(&f, 0, 100);
    CHECK_INT(r.n_rows, 1);
    CHECK(r.rows[0].seq > last);
    store_req_cleanup(&r);
    CHECK_INT(fx_done(&f), 0);
}

static void test_change_and_event_commit_together(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f, 0), 0);
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "before", NULL, 1), 0);
    CHECK_INT(store_sqlite_exec(f.s, "PRAGMA max_page_count = 1"), 0); /* the disk is full */
    size_t n = 200000;
    char *big = malloc(n + 1);
    CHECK(big != NULL);
    memset(big, 'x', n);
    big[n] = '\0';
    log_set_level(CHAT_LOG_ERROR + 1);
    int rc = write1(&f, STORE_APPEND, "alice", big, NULL, 2);
    log_set_level(CHAT_LOG_WARN);
    free(big);
    CHECK_INT(rc, CHAT_EIO);
    CHECK_INT(store_sqlite_exec(f.s, "PRAGMA max_page_count = 1073741823"), 0);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages"), 1);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM outbox"), 1);
    store_outbox_stats_t st;
    store_outbox_stats(f.s, &st);
    CHECK_INT(st.rows, 1);
    CHECK_INT(fx_done(&f), 0);
}

static void test_full_outbox_refuses_and_stores_nothing(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f, 2), 0);
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "one", NULL, 1), 0);
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "two", NULL, 2), 0);
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "three", NULL, 3), CHAT_EBUSY);
    CHECK_INT(write1(&f, STORE_EDIT, "alice", "one!", NULL, 1), CHAT_EBUSY);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages"), 2);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages WHERE edited_at IS NOT NULL"), 0);
    store_outbox_stats_t st;
    store_outbox_stats(f.s, &st);
    CHECK_INT(st.rows, 2);
    CHECK_INT(st.refused, 2);
    /* the relay caught up with one: there is room for one more */
    store_req_t r = read_rows(&f, 0, 1);
    CHECK_INT(r.n_rows, 1);
    uint64_t seq = r.rows[0].seq;
    store_req_cleanup(&r);
    CHECK_INT(delete_through(&f, seq), 0);
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "three", NULL, 3), 0);
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "four", NULL, 4), CHAT_EBUSY);
    CHECK_INT(fx_done(&f), 0);
}

static void test_what_a_run_left_is_there_after_reopen(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f, 0), 0);
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "one", NULL, 1), 0);
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "two", NULL, 2), 0);
    fx_close_store(&f);
    f.notified = 0;
    CHECK_INT(fx_open(&f, 0), 0);
    store_outbox_stats_t st;
    store_outbox_stats(f.s, &st);
    CHECK_INT(st.rows, 2);
    /* the relay is told at start, without any new write */
    while (!f.notified) uv_run(&f.loop, UV_RUN_ONCE);
    store_req_t r = read_rows(&f, 0, 10);
    CHECK_INT(r.n_rows, 2);
    CHECK_STR(r.rows[1].event, "msg|2|c|two");
    store_req_cleanup(&r);
    CHECK_INT(fx_done(&f), 0);
}

/* One batch of changes: one packed row in the outbox, each event with a seq of its own, lent
 * to the relay after the commit instead of a notify; a delete through a seq inside the
 * batch keeps the row whole (its later events are not delivered yet). */
static void test_a_batch_is_packed_and_handed_over(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open_opts(&f, 0, true), 0);
    enum { N = 40 };
    store_req_t reqs[N];
    char text[N][32];
    int called = 0;
    store_sqlite_pause(f.s, true);
    for (int i = 0; i < N; i++) {
        store_req_t *r = &reqs[i];
        memset(r, 0, sizeof *r);
        snprintf(text[i], sizeof text[i], "m%d", i);
        r->op = i == N - 1 ? STORE_EDIT : STORE_APPEND; /* the last edits the first */
        r->chat_id = "c";
        r->user = "alice";
        r->text = i == N - 1 ? "m0!" : text[i];
        r->id = i == N - 1 ? 1 : (uint64_t)i + 1;
        r->at = 1700000000000 + i;
        r->cb = on_req;
        r->data = &called;
        if (i == 1) { /* what the caller encoded already is stored as it is */
            r->event = "msg|2|c|m1 (the caller's bytes)";
            r->event_len = strlen(r->event);
        }
        CHECK_INT(store_submit(f.s, r), 0);
    }
    store_sqlite_pause(f.s, false);
    while (called < N) uv_run(&f.loop, UV_RUN_ONCE);
    for (int i = 0; i < N; i++) {
        CHECK_INT(reqs[i].status, 0);
        store_req_cleanup(&reqs[i]);
    }
    while (f.n_handed < N) uv_run(&f.loop, UV_RUN_ONCE);
    CHECK_INT(f.notified, 0);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM outbox"), 1);
    store_req_t r = read_rows(&f, 0, 100);
    CHECK_INT(r.status, 0);
    CHECK_INT(r.n_rows, N);
    for (size_t i = 0; i < N && i < r.n_rows; i++) {
        if (i) CHECK_INT(r.rows[i].seq, r.rows[i - 1].seq + 1);
        CHECK_INT(r.rows[i].seq, f.handed_seq[i]);
        CHECK_STR(r.rows[i].event, f.handed_event[i]);
        CHECK_STR(f.handed_chat[i], "c");
        CHECK_STR(r.rows[i].chat_id, "c");
        CHECK_INT(r.rows[i].message_id, i == N - 1 ? 1 : i + 1);
    }
    CHECK_STR(r.rows[0].event, "msg|1|c|m0");
    CHECK_STR(r.rows[1].event, "msg|2|c|m1 (the caller's bytes)");
    CHECK_STR(r.rows[N - 1].event, "edit|1|c|m0!");
    uint64_t first = r.rows[0].seq;
    store_req_cleanup(&r);
    /* acknowledged through the middle: the row stays, reads go on after that seq */
    CHECK_INT(delete_through(&f, first + 9), 0);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM outbox"), 1);
    r = read_rows(&f, first + 9, 5);
    CHECK_INT(r.n_rows, 5);
    CHECK_INT(r.rows[0].seq, first + 10);
    CHECK_STR(r.rows[0].event, "msg|11|c|m10");
    store_req_cleanup(&r);
    CHECK_INT(delete_through(&f, first + N - 1), 0);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM outbox"), 0);
    store_outbox_stats_t st;
    store_outbox_stats(f.s, &st);
    CHECK_INT(st.rows, 0);
    CHECK_INT(fx_done(&f), 0);
}

/* An outbox of the first version (a row per event) is converted when the relay starts: the
 * events it held come back with their seqs, and no seq is given twice. */
static void test_a_first_version_outbox_is_converted(void) {
    fx_t f;
    CHECK(fx_init(&f));
    char err[256];
    CHECK_INT(store_open(&f.s, &f.loop, f.url, err, sizeof err), 0);
    CHECK_INT(store_sqlite_exec(f.s,
                                "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
                                " chat_id TEXT NOT NULL, message_id INTEGER NOT NULL,"
                                " at INTEGER NOT NULL, event BLOB NOT NULL);"
                                "INSERT INTO outbox VALUES (7, 'c', 1, 1700000000001, 'msg|1|c|a');"
                                "INSERT INTO outbox VALUES (9, 'd', 2, 1700000000002, 'msg|2|d|b');"
                                "INSERT INTO outbox VALUES (12, 'c', 3, 1700000000003, 'x');"
                                "DELETE FROM outbox WHERE seq = 12;"),
              0);
    fx_close_store(&f);
    CHECK_INT(fx_open(&f, 0), 0);
    store_outbox_stats_t st;
    store_outbox_stats(f.s, &st);
    CHECK_INT(st.rows, 2);
    store_req_t r = read_rows(&f, 0, 10);
    CHECK_INT(r.n_rows, 2);
    if (r.n_rows == 2) {
        CHECK_INT(r.rows[0].seq, 7);
        CHECK_STR(r.rows[0].event, "msg|1|c|a");
        CHECK_STR(r.rows[0].chat_id, "c");
        CHECK_INT(r.rows[0].message_id, 1);
        CHECK_INT(r.rows[0].at, 1700000000001);
        CHECK_INT(r.rows[1].seq, 9);
        CHECK_STR(r.rows[1].event, "msg|2|d|b");
        CHECK_STR(r.rows[1].chat_id, "d");
    }
    store_req_cleanup(&r);
    /* seq 12 was given once (and its row deleted): the next one comes after it */
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "new", NULL, 5), 0);
    r = read_rows(&f, 9, 10);
    CHECK_INT(r.n_rows, 1);
    if (r.n_rows == 1) CHECK_INT(r.rows[0].seq, 13);
    store_req_cleanup(&r);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM sqlite_master WHERE name = 'outbox_v1'"), 0);
    CHECK_INT(fx_done(&f), 0);
}

static void test_without_outbox(void) {
    fx_t f;
    CHECK(fx_init(&f));
    char err[256];
    CHECK_INT(store_open(&f.s, &f.loop, f.url, err, sizeof err), 0);
    CHECK_INT(write1(&f, STORE_APPEND, "alice", "one", NULL, 1), 0);
    store_req_t r;
    memset(&r, 0, sizeof r);
    r.op = STORE_OUTBOX_READ;
    r.cb = on_req;
    CHECK_INT(store_submit(f.s, &r), CHAT_EINVAL);
    fx_close_store(&f);
    /* no outbox unless asked for: a store without Kafka pays nothing */
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM sqlite_master WHERE name = 'outbox'"), 0);
    CHECK_INT(fx_done(&f), 0);
}

int main(void) {
    log_set_level(CHAT_LOG_WARN);
    RUN(test_only_real_changes_get_an_event);
    RUN(test_change_and_event_commit_together);
    RUN(test_full_outbox_refuses_and_stores_nothing);
    RUN(test_what_a_run_left_is_there_after_reopen);
    RUN(test_a_batch_is_packed_and_handed_over);
    RUN(test_a_first_version_outbox_is_converted);
    RUN(test_without_outbox);
    return test_summary("outbox");
}
