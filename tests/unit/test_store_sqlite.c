/* Unit tests for the SQLite store: a real libuv loop, a real database in a temp directory,
 * the real writer and reader threads. What is checked is what the domain relies on: exact
 * rows back, the right error codes, durability across a reopen, and group commit. */
#include <inttypes.h>
#include <sqlite3.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "store/store.h"
#include "store/store_sqlite_internal.h"
#include "test.h"

/* ---- fixture ------------------------------------------------------------------------- */

typedef struct fx {
    uv_loop_t loop;
    store_t *s;
    char dir[64];   /* the temp directory */
    char path[128]; /* dir/sub/chat.db: sub does not exist before the first open */
    char url[160];
} fx_t;

static bool fx_init(fx_t *f) {
    memset(f, 0, sizeof *f);
    snprintf(f->dir, sizeof f->dir, "/tmp/test_store_XXXXXX");
    if (!mkdtemp(f->dir)) return false;
    snprintf(f->path, sizeof f->path, "%s/sub/chat.db", f->dir);
    snprintf(f->url, sizeof f->url, "sqlite:%s", f->path);
    return uv_loop_init(&f->loop) == 0;
}

static int fx_open(fx_t *f) {
    char err[256] = "";
    int rc = store_open(&f->s, &f->loop, f->url, err, sizeof err);
    if (rc) fprintf(stderr, "  store_open: %s\n", err);
    return rc;
}

static void on_flag(void *arg) { (*(int *)arg)++; }

/* Close the store and run the loop until done() ran. */
static int fx_close_store(fx_t *f) {
    int done = 0;
    store_close(f->s, on_flag, &done);
    while (!done) uv_run(&f->loop, UV_RUN_ONCE);
    f->s = NULL;
    return done;
}

static void rm_db_files(const char *path) {
    const char *sfx[] = {"", "-wal", "-shm", "-journal"};
    char p[200];
    for (size_t i = 0; i < sizeof sfx / sizeof sfx[0]; i++) {
        snprintf(p, sizeof p, "%s%s", path, sfx[i]);
        unlink(p);
    }
}

/* Returns 0 when no handle leaked (uv_loop_close succeeds). */
static int fx_done(fx_t *f) {
    if (f->s) fx_close_store(f);
    uv_run(&f->loop, UV_RUN_NOWAIT);
    int rc = uv_loop_close(&f->loop);
    rm_db_files(f->path);
    char sub[96];
    snprintf(sub, sizeof sub, "%s/sub", f->dir);
    rmdir(sub);
    rmdir(f->dir);
    return rc;
}

static void on_req(store_req_t *r) { (*(int *)r->data)++; }

/* Submit and run the loop until the callback ran; the submit code, or 0. */
static int run_req(fx_t *f, store_req_t *r) {
    int called = 0;
    r->cb = on_req;
    r->data = &called;
    int rc = store_submit(f->s, r);
    if (rc) return rc;
    while (!called) uv_run(&f->loop, UV_RUN_ONCE);
    return called == 1 ? 0 : -100;
}

static store_req_t mk_append(const char *chat, const char *user, const char *text,
                             const char *client_id, uint64_t id, int64_t at) {
    store_req_t r;
    memset(&r, 0, sizeof r);
    r.op = STORE_APPEND;
    r.chat_id = chat;
    r.user = user;
    r.text = text;
    r.client_id = client_id;
    r.id = id;
    r.at = at;
    return r;
}

static store_req_t mk_read(store_op_t op, const char *chat, uint64_t id, int limit) {
    store_req_t r;
    memset(&r, 0, sizeof r);
    r.op = op;
    r.chat_id = chat;
    r.id = id;
    r.limit = limit;
    return r;
}

static store_req_t mk_change(store_op_t op, const char *chat, const char *user, const char *text,
                             uint64_t id, int64_t at) {
    store_req_t r;
    memset(&r, 0, sizeof r);
    r.op = op;
    r.chat_id = chat;
    r.user = user;
    r.text = text;
    r.id = id;
    r.at = at;
    return r;
}

/* Append and expect success; returns the status. */
static int append1(fx_t *f, const char *chat, const char *user, const char *text,
                   const char *client_id, uint64_t id) {
    store_req_t r = mk_append(chat, user, text, client_id, id, (int64_t)(1700000000000 + id));
    int rc = run_req(f, &r);
    if (rc == 0) rc = r.status;
    store_req_cleanup(&r);
    return rc;
}

/* One integer from a query on a separate connection (the store may be open or closed). */
static long long query_int(const char *path, const char *sql) {
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    long long v = -1;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
        sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW) {
        v = sqlite3_column_int64(st, 0);
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    return v;
}

static const char *query_str(const char *path, const char *sql, char *out, size_t n) {
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    const char *res = NULL;
    if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
        sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW &&
        sqlite3_column_text(st, 0)) {
        snprintf(out, n, "%s", (const char *)sqlite3_column_text(st, 0));
        res = out;
    }
    sqlite3_finalize(st);
    sqlite3_close(db);
    return res;
}

/* ---- tests --------------------------------------------------------------------------- */

static void test_url_dispatch(void) {
    store_t *s = (store_t *)1;
    char err[256] = "";
    CHECK_INT(store_open(&s, NULL, "redis://127.0.0.1", err, sizeof err), CHAT_EINVAL);
    CHECK(s == NULL);
    CHECK(strstr(err, "unknown store URL scheme") != NULL);
    /* cassandra:// goes to the Cassandra backend, whose URL parser refuses this one */
    err[0] = 0;
    CHECK_INT(store_open(&s, NULL, "cassandra://127.0.0.1:notaport/chat", err, sizeof err),
              CHAT_EINVAL);
    CHECK(err[0] != 0);
    CHECK(strstr(err, "unknown store URL scheme") == NULL);
    CHECK_INT(store_open(&s, NULL, "sqlite:", err, sizeof err), CHAT_EINVAL);
    CHECK_INT(store_open(&s, NULL, "sqlite://host/x.db", err, sizeof err), CHAT_EINVAL);
    CHECK_INT(store_open(&s, NULL, "sqlite::memory:", err, sizeof err), CHAT_EINVAL);
    CHECK_INT(store_open(&s, NULL, "", NULL, 0), CHAT_EINVAL);

    /* sqlite:///abs/path and a parent directory that does not exist yet */
    fx_t f;
    CHECK(fx_init(&f));
    char url[200];
    snprintf(url, sizeof url, "sqlite://%s", f.path);
    CHECK_INT(store_open(&s, NULL, url, err, sizeof err), 0);
    struct stat sb;
    CHECK_INT(stat(f.path, &sb), 0);
    int done = 0;
    store_close(s, on_flag, &done);
    CHECK_INT(done, 1); /* without a loop, close is synchronous */

    /* sqlite:RELATIVE, resolved against the working directory */
    char cwd[4096];
    CHECK(getcwd(cwd, sizeof cwd) != NULL);
    CHECK_INT(chdir(f.dir), 0);
    int rc = store_open(&s, NULL, "sqlite:./rel/chat.db", err, sizeof err);
    if (rc == 0) store_close(s, NULL, NULL);
    int st_rc = stat("rel/chat.db", &sb);
    rm_db_files("rel/chat.db");
    rmdir("rel");
    CHECK_INT(chdir(cwd), 0);
    CHECK_INT(rc, 0);
    CHECK_INT(st_rc, 0);
    CHECK_INT(fx_done(&f), 0);
}

static void test_migrate_only(void) {
    fx_t f;
    CHECK(fx_init(&f));
    store_t *s = NULL;
    char err[256] = "", mode[16];
    CHECK_INT(store_open(&s, NULL, f.url, err, sizeof err), 0);
    CHECK_INT(store_migrate(s), 0);
    CHECK_INT(store_migrate(s), 0); /* idempotent */
    CHECK_INT(query_int(f.path, "PRAGMA user_version"), store_sqlite_schema_versions);
    CHECK_STR(query_str(f.path, "PRAGMA journal_mode", mode, sizeof mode), "wal");
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages"), 0);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM sqlite_master WHERE name = "
                                "'messages_client_id'"),
              1);
    store_req_t r = mk_read(STORE_HISTORY, "c", 0, 10);
    r.cb = on_req;
    CHECK_INT(store_submit(s, &r), CHAT_EINVAL); /* no loop: no requests */
    int done = 0;
    store_close(s, on_flag, &done);
    CHECK_INT(done, 1);

    /* A database from a newer program is refused, not silently used. */
    sqlite3 *db = NULL;
    CHECK_INT(sqlite3_open(f.path, &db), SQLITE_OK);
    CHECK_INT(sqlite3_exec(db, "PRAGMA user_version = 99", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db);
    log_set_level(CHAT_LOG_ERROR + 1); /* the error below is expected */
    int rc = store_open(&s, NULL, f.url, err, sizeof err);
    log_set_level(CHAT_LOG_WARN);
    CHECK_INT(rc, CHAT_EIO);
    CHECK(strstr(err, "newer") != NULL);
    CHECK_INT(fx_done(&f), 0);
}

static void test_invalid_submit(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    store_req_t r = mk_append("c", "alice", "hi", NULL, 0, 1);
    r.cb = on_req;
    CHECK_INT(store_submit(f.s, &r), CHAT_EINVAL); /* id 0 */
    r.id = (uint64_t)INT64_MAX + 1;
    CHECK_INT(store_submit(f.s, &r), CHAT_EINVAL); /* ids are < 2^63 */
    r.id = 5;
    r.cb = NULL;
    CHECK_INT(store_submit(f.s, &r), CHAT_EINVAL);
    r = mk_change(STORE_EDIT, "c", "alice", NULL, 5, 1);
    r.cb = on_req;
    CHECK_INT(store_submit(f.s, &r), CHAT_EINVAL); /* edit without text */
    r = mk_read(STORE_HISTORY, NULL, 0, 5);
    r.cb = on_req;
    CHECK_INT(store_submit(f.s, &r), CHAT_EINVAL);
    r = mk_read((store_op_t)42, "c", 0, 5);
    r.cb = on_req;
    CHECK_INT(store_submit(f.s, &r), CHAT_EINVAL);
    /* read positions: READ_SET needs a user and a message id, READ_GET a user */
    r = (store_req_t){.op = STORE_READ_SET, .chat_id = "c", .user = "alice", .cb = on_req};
    CHECK_INT(store_submit(f.s, &r), CHAT_EINVAL); /* id 0 */
    r = (store_req_t){.op = STORE_READ_SET, .chat_id = "c", .id = 5, .cb = on_req};
    CHECK_INT(store_submit(f.s, &r), CHAT_EINVAL);
    r = (store_req_t){.op = STORE_READ_GET, .chat_id = "c", .cb = on_req};
    CHECK_INT(store_submit(f.s, &r), CHAT_EINVAL);
    r = (store_req_t){.op = STORE_SEARCH, .chat_id = "c", .limit = 5, .cb = on_req};
    CHECK_INT(store_submit(f.s, &r), CHAT_EINVAL); /* no MATCH expression */
    /* the outbox is refused until enabled */
    r = (store_req_t){.op = STORE_OUTBOX_READ, .limit = 5, .cb = on_req};
    CHECK_INT(store_submit(f.s, &r), CHAT_EINVAL);
    CHECK_INT(fx_done(&f), 0);
}

static void test_append_history(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);

    store_req_t r = mk_append("general", "alice", "hello", "c-1", 1001, 1700000000123);
    CHECK_INT(run_req(&f, &r), 0);
    CHECK_INT(r.status, 0);
    CHECK(!r.duplicate);
    CHECK_INT(r.msg.id, 1001);
    CHECK_STR(r.msg.chat_id, "general");
    CHECK_STR(r.msg.user_from, "alice");
    CHECK_STR(r.msg.message, "hello");
    CHECK_STR(r.msg.client_id, "c-1");
    CHECK_INT(r.msg.created_at, 1700000000123);
    CHECK_INT(r.msg.edited_at, 0);
    CHECK_INT(r.msg.deleted_at, 0);
    store_req_cleanup(&r);
    CHECK(r.msg.chat_id == NULL);

    CHECK_INT(append1(&f, "general", "bob", "h\xc3\xa9llo \"world\"", NULL, 1002), 0);
    CHECK_INT(append1(&f, "other", "bob", "elsewhere", NULL, 1003), 0);

    store_req_t h = mk_read(STORE_HISTORY, "general", 0, 50);
    CHECK_INT(run_req(&f, &h), 0);
    CHECK_INT(h.status, 0);
    CHECK_INT(h.n_msgs, 2);
    CHECK_INT(h.msgs[0].id, 1002); /* newest first */
    CHECK_STR(h.msgs[0].user_from, "bob");
    CHECK_STR(h.msgs[0].message, "h\xc3\xa9llo \"world\"");
    CHECK(h.msgs[0].client_id == NULL);
    CHECK_INT(h.msgs[0].created_at, 1700000000000 + 1002);
    CHECK_INT(h.msgs[1].id, 1001);
    CHECK_STR(h.msgs[1].chat_id, "general");
    CHECK_STR(h.msgs[1].message, "hello");
    CHECK_STR(h.msgs[1].client_id, "c-1");
    CHECK_INT(h.msgs[1].created_at, 1700000000123);
    store_req_cleanup(&h);
    CHECK(h.msgs == NULL);
    CHECK_INT(h.n_msgs, 0);

    /* an unknown chat: success, no rows */
    h = mk_read(STORE_HISTORY, "nobody-here", 0, 50);
    CHECK_INT(run_req(&f, &h), 0);
    CHECK_INT(h.status, 0);
    CHECK_INT(h.n_msgs, 0);
    CHECK(h.msgs == NULL);
    CHECK_INT(fx_done(&f), 0);
}

static void test_history_paging(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    char text[32];
    for (uint64_t id = 1; id <= 25; id++) {
        snprintf(text, sizeof text, "m%" PRIu64, id);
        CHECK_INT(append1(&f, "room", "alice", text, NULL, id * 10), 0);
    }
    CHECK_INT(append1(&f, "noise", "alice", "x", NULL, 5), 0);

    const size_t want_n[] = {10, 10, 5, 0};
    uint64_t before = 0, expect = 250;
    for (int page = 0; page < 4; page++) {
        store_req_t h = mk_read(STORE_HISTORY, "room", before, 10);
        CHECK_INT(run_req(&f, &h), 0);
        CHECK_INT(h.status, 0);
        CHECK_INT(h.n_msgs, want_n[page]);
        for (size_t i = 0; i < h.n_msgs; i++) {
            CHECK_INT(h.msgs[i].id, expect);
            snprintf(text, sizeof text, "m%" PRIu64, expect / 10);
            CHECK_STR(h.msgs[i].message, text);
            expect -= 10;
        }
        if (h.n_msgs) before = h.msgs[h.n_msgs - 1].id;
        store_req_cleanup(&h);
    }
    CHECK_INT(expect, 0);

    /* a limit outside 1..1000 is clamped, not trusted */
    store_req_t h = mk_read(STORE_HISTORY, "room", 0, 0);
    CHECK_INT(run_req(&f, &h), 0);
    CHECK_INT(h.n_msgs, 1);
    CHECK_INT(h.msgs[0].id, 250);
    store_req_cleanup(&h);
    h = mk_read(STORE_HISTORY, "room", 0, 1000000);
    CHECK_INT(run_req(&f, &h), 0);
    CHECK_INT(h.n_msgs, 25);
    store_req_cleanup(&h);
    /* a "before" beyond every id behaves like 0 */
    h = mk_read(STORE_HISTORY, "room", UINT64_MAX, 3);
    CHECK_INT(run_req(&f, &h), 0);
    CHECK_INT(h.n_msgs, 3);
    CHECK_INT(h.msgs[0].id, 250);
    store_req_cleanup(&h);
    CHECK_INT(fx_done(&f), 0);
}

static void test_after(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    for (uint64_t id = 1; id <= 8; id++) CHECK_INT(append1(&f, "room", "bob", "t", NULL, id), 0);
    CHECK_INT(append1(&f, "zzz", "bob", "t", NULL, 100), 0);

    store_req_t a = mk_read(STORE_AFTER, "room", 3, 4);
    CHECK_INT(run_req(&f, &a), 0);
    CHECK_INT(a.status, 0);
    CHECK_INT(a.n_msgs, 4);
    for (size_t i = 0; i < 4; i++) CHECK_INT(a.msgs[i].id, 4 + i); /* oldest first */
    store_req_cleanup(&a);

    a = mk_read(STORE_AFTER, "room", 0, 100);
    CHECK_INT(run_req(&f, &a), 0);
    CHECK_INT(a.n_msgs, 8);
    CHECK_INT(a.msgs[0].id, 1);
    CHECK_INT(a.msgs[7].id, 8);
    store_req_cleanup(&a);

    a = mk_read(STORE_AFTER, "room", 8, 100);
    CHECK_INT(run_req(&f, &a), 0);
    CHECK_INT(a.status, 0);
    CHECK_INT(a.n_msgs, 0);
    store_req_cleanup(&a);

    a = mk_read(STORE_AFTER, "room", UINT64_MAX, 100);
    CHECK_INT(run_req(&f, &a), 0);
    CHECK_INT(a.n_msgs, 0);
    store_req_cleanup(&a);
    CHECK_INT(fx_done(&f), 0);
}

static void test_idempotent_append(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);

    store_req_t r = mk_append("c", "alice", "first", "k1", 10, 111);
    CHECK_INT(run_req(&f, &r), 0);
    CHECK_INT(r.status, 0);
    CHECK(!r.duplicate);
    store_req_cleanup(&r);

    /* the retry: new id, new text, same key -> the original comes back, nothing inserted */
    r = mk_append("c", "alice", "retry", "k1", 20, 222);
    CHECK_INT(run_req(&f, &r), 0);
    CHECK_INT(r.status, 0);
    CHECK(r.duplicate);
    CHECK_INT(r.msg.id, 10);
    CHECK_STR(r.msg.message, "first");
    CHECK_STR(r.msg.client_id, "k1");
    CHECK_INT(r.msg.created_at, 111);
    store_req_cleanup(&r);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages"), 1);

    /* another user, same client_id: a different key */
    r = mk_append("c", "bob", "bob's", "k1", 30, 333);
    CHECK_INT(run_req(&f, &r), 0);
    CHECK_INT(r.status, 0);
    CHECK(!r.duplicate);
    CHECK_INT(r.msg.id, 30);
    store_req_cleanup(&r);
    /* another chat, same user and client_id: also a different key */
    CHECK_INT(append1(&f, "d", "alice", "x", "k1", 35), 0);
    /* no client_id: never deduplicated */
    CHECK_INT(append1(&f, "c", "alice", "same", NULL, 40), 0);
    CHECK_INT(append1(&f, "c", "alice", "same", NULL, 41), 0);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages"), 5);

    /* the same key twice inside one transaction */
    store_sqlite_stats_t st0, st1;
    store_sqlite_stats(f.s, &st0);
    store_sqlite_pause(f.s, true);
    int called = 0;
    store_req_t a = mk_append("c", "carol", "one", "k2", 50, 555);
    store_req_t b = mk_append("c", "carol", "two", "k2", 51, 556);
    a.cb = b.cb = on_req;
    a.data = b.data = &called;
    CHECK_INT(store_submit(f.s, &a), 0);
    CHECK_INT(store_submit(f.s, &b), 0);
    store_sqlite_pause(f.s, false);
    while (called < 2) uv_run(&f.loop, UV_RUN_ONCE);
    store_sqlite_stats(f.s, &st1);
    CHECK_INT(st1.batches - st0.batches, 1);
    CHECK_INT(st1.writes - st0.writes, 2);
    /* one new row and its index entry: a page or two of the WAL, never none */
    CHECK(st1.wal_frames > st0.wal_frames && st1.wal_frames - st0.wal_frames <= 8);
    CHECK_INT(a.status, 0);
    CHECK(!a.duplicate);
    CHECK_INT(a.msg.id, 50);
    CHECK_INT(b.status, 0);
    CHECK(b.duplicate);
    CHECK_INT(b.msg.id, 50);
    CHECK_STR(b.msg.message, "one");
    store_req_cleanup(&a);
    store_req_cleanup(&b);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages WHERE client_id = 'k2'"), 1);
    CHECK_INT(fx_done(&f), 0);
}

static void test_edit(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    CHECK_INT(append1(&f, "c", "alice", "original", "k", 7), 0);

    store_req_t e = mk_change(STORE_EDIT, "c", "alice", "edited", 7, 1800000000000);
    CHECK_INT(run_req(&f, &e), 0);
    CHECK_INT(e.status, 0);
    CHECK_INT(e.msg.id, 7);
    CHECK_STR(e.msg.message, "edited");
    CHECK_STR(e.msg.user_from, "alice");
    CHECK_STR(e.msg.client_id, "k");
    CHECK_INT(e.msg.created_at, 1700000000007);
    CHECK_INT(e.msg.edited_at, 1800000000000);
    CHECK_INT(e.msg.deleted_at, 0);
    store_req_cleanup(&e);

    e = mk_change(STORE_EDIT, "c", "mallory", "pwned", 7, 1);
    CHECK_INT(run_req(&f, &e), 0);
    CHECK_INT(e.status, CHAT_EPERM);
    CHECK(e.msg.message == NULL);
    store_req_cleanup(&e);

    e = mk_change(STORE_EDIT, "c", "alice", "x", 8, 1);
    CHECK_INT(run_req(&f, &e), 0);
    CHECK_INT(e.status, CHAT_ENOTFOUND);
    store_req_cleanup(&e);
    e = mk_change(STORE_EDIT, "other-chat", "alice", "x", 7, 1); /* the id, in another chat */
    CHECK_INT(run_req(&f, &e), 0);
    CHECK_INT(e.status, CHAT_ENOTFOUND);
    store_req_cleanup(&e);
    e = mk_change(STORE_EDIT, "c", "alice", "x", UINT64_MAX, 1);
    CHECK_INT(run_req(&f, &e), 0);
    CHECK_INT(e.status, CHAT_ENOTFOUND);
    store_req_cleanup(&e);

    store_req_t h = mk_read(STORE_HISTORY, "c", 0, 10);
    CHECK_INT(run_req(&f, &h), 0);
    CHECK_INT(h.n_msgs, 1);
    CHECK_STR(h.msgs[0].message, "edited");
    CHECK_INT(h.msgs[0].edited_at, 1800000000000);
    store_req_cleanup(&h);
    CHECK_INT(fx_done(&f), 0);
}

static void test_delete(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    store_req_t d0;
    /* long enough that the smaller rewritten row cannot simply overwrite it in place */
    const char *secret = "top secret words, top secret words, top secret words, top secret "
                         "words, top secret words, top secret words, top secret words";
    CHECK_INT(append1(&f, "c", "alice", secret, NULL, 7), 0);
    /* and one that spills into overflow pages, which the delete frees */
    char *long_secret = malloc(20001);
    CHECK(long_secret != NULL);
    for (int i = 0; i < 20000; i++) long_secret[i] = "SECRET"[i % 6];
    long_secret[20000] = '\0';
    int rc = append1(&f, "c", "alice", long_secret, NULL, 6);
    free(long_secret);
    CHECK_INT(rc, 0);
    d0 = mk_change(STORE_DELETE, "c", "alice", NULL, 6, 1);
    CHECK_INT(run_req(&f, &d0), 0);
    CHECK_INT(d0.status, 0);
    store_req_cleanup(&d0);
    CHECK_INT(append1(&f, "c", "alice", "stays", NULL, 8), 0);

    store_req_t d = mk_change(STORE_DELETE, "c", "bob", NULL, 7, 5);
    CHECK_INT(run_req(&f, &d), 0);
    CHECK_INT(d.status, CHAT_EPERM);
    store_req_cleanup(&d);

    d = mk_change(STORE_DELETE, "c", "alice", NULL, 7, 1900000000000);
    CHECK_INT(run_req(&f, &d), 0);
    CHECK_INT(d.status, 0);
    CHECK_INT(d.msg.id, 7);
    CHECK(d.msg.message == NULL);
    CHECK_STR(d.msg.user_from, "alice");
    CHECK_INT(d.msg.deleted_at, 1900000000000);
    CHECK_INT(d.msg.created_at, 1700000000007);
    store_req_cleanup(&d);

    /* gone for good: a second delete, an edit, even by someone else, find nothing */
    d = mk_change(STORE_DELETE, "c", "alice", NULL, 7, 1);
    CHECK_INT(run_req(&f, &d), 0);
    CHECK_INT(d.status, CHAT_ENOTFOUND);
    store_req_cleanup(&d);
    d = mk_change(STORE_EDIT, "c", "alice", "resurrect", 7, 1);
    CHECK_INT(run_req(&f, &d), 0);
    CHECK_INT(d.status, CHAT_ENOTFOUND);
    store_req_cleanup(&d);
    d = mk_change(STORE_DELETE, "c", "bob", NULL, 7, 1);
    CHECK_INT(run_req(&f, &d), 0);
    CHECK_INT(d.status, CHAT_ENOTFOUND);
    store_req_cleanup(&d);

    store_req_t h = mk_read(STORE_HISTORY, "c", 0, 10);
    CHECK_INT(run_req(&f, &h), 0);
    CHECK_INT(h.n_msgs, 3);
    CHECK_INT(h.msgs[2].id, 6);
    CHECK(h.msgs[2].message == NULL);
    CHECK_INT(h.msgs[1].id, 7);
    CHECK(h.msgs[1].message == NULL);
    CHECK_STR(h.msgs[1].user_from, "alice");
    CHECK_INT(h.msgs[1].deleted_at, 1900000000000);
    CHECK_STR(h.msgs[0].message, "stays");
    CHECK_INT(h.msgs[0].deleted_at, 0);
    store_req_cleanup(&h);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages WHERE id = 7 AND message IS NULL "
                                "AND deleted_at = 1900000000000"),
              1);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages WHERE message LIKE '%secret%'"), 0);
    /* After a clean close the WAL is folded into the database, and secure_delete zeroed the
     * cell the text lived in: the words are not in the file either. */
    CHECK_INT(fx_close_store(&f), 1);
    FILE *fp = fopen(f.path, "rb");
    CHECK(fp != NULL);
    static char bytes[1 << 20];
    size_t n = fread(bytes, 1, sizeof bytes, fp);
    fclose(fp);
    CHECK(n > 0 && n < sizeof bytes);
    CHECK(memmem(bytes, n, "stays", 5) != NULL);
    CHECK(memmem(bytes, n, "SECRET", 6) == NULL); /* the text as written: only in rows */
    /* The search index holds words folded to lower case. It drops a deleted message's words
     * at once only with FTS5 secure-delete (SQLite 3.44+); before, they stay in an index
     * segment until FTS5 merges it (README: Search). */
    if (sqlite3_libversion_number() >= 3044000) CHECK(memmem(bytes, n, "secret", 6) == NULL);
    else
        printf("  SQLite %s: a deleted message's words stay in the FTS5 index until a merge\n",
               sqlite3_libversion());
    CHECK_INT(fx_done(&f), 0);
}

static void test_durability_reopen(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    CHECK_INT(append1(&f, "c", "alice", "persist me", "k", 42), 0);
    CHECK_INT(fx_close_store(&f), 1);
    /* closed cleanly: the WAL was checkpointed into the database and removed */
    char wal[200];
    snprintf(wal, sizeof wal, "%s-wal", f.path);
    struct stat sb;
    CHECK(stat(wal, &sb) != 0);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages WHERE message = 'persist me'"), 1);

    CHECK_INT(fx_open(&f), 0);
    store_req_t h = mk_read(STORE_HISTORY, "c", 0, 10);
    CHECK_INT(run_req(&f, &h), 0);
    CHECK_INT(h.n_msgs, 1);
    CHECK_INT(h.msgs[0].id, 42);
    CHECK_STR(h.msgs[0].message, "persist me");
    store_req_cleanup(&h);
    /* and the idempotency key survived too */
    store_req_t r = mk_append("c", "alice", "again", "k", 43, 1);
    CHECK_INT(run_req(&f, &r), 0);
    CHECK(r.duplicate);
    CHECK_INT(r.msg.id, 42);
    store_req_cleanup(&r);
    CHECK_INT(fx_done(&f), 0);
}

typedef struct burst {
    int called;
    int out_of_order;
    int failed;
} burst_t;

typedef struct burst_req {
    store_req_t r;
    burst_t *b;
    int index;
    char text[24];
} burst_req_t;

static void on_burst(store_req_t *r) {
    burst_req_t *br = (burst_req_t *)r; /* r is the first member */
    if (br->index != br->b->called) br->b->out_of_order++;
    if (r->status != 0 || r->msg.id != r->id || !r->msg.message ||
        strcmp(r->msg.message, br->text) != 0) {
        br->b->failed++;
    }
    br->b->called++;
    store_req_cleanup(r);
}

/* Submit n appends without running the loop, then run it until all completed. */
static int burst(fx_t *f, burst_req_t *reqs, int n, uint64_t first_id, burst_t *b) {
    memset(b, 0, sizeof *b);
    for (int i = 0; i < n; i++) {
        burst_req_t *br = &reqs[i];
        snprintf(br->text, sizeof br->text, "msg %d", i);
        br->r = mk_append(i % 2 ? "odd" : "even", "u", br->text, NULL, first_id + (uint64_t)i,
                          1700000000000 + i);
        br->r.cb = on_burst;
        br->b = b;
        br->index = i;
        int rc = store_submit(f->s, &br->r);
        if (rc) return rc;
    }
    while (b->called < n) uv_run(&f->loop, UV_RUN_ONCE);
    return 0;
}

static void test_group_commit(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    enum { N = 5000, M = 10000 };
    burst_req_t *reqs = calloc(M, sizeof *reqs);
    CHECK(reqs != NULL);
    burst_t b;
    store_sqlite_stats_t st0, st1;

    store_sqlite_stats(f.s, &st0);
    int rc = burst(&f, reqs, N, 1, &b);
    store_sqlite_stats(f.s, &st1);
    if (rc) free(reqs);
    CHECK_INT(rc, 0);
    CHECK_INT(b.called, N);
    CHECK_INT(b.failed, 0);
    CHECK_INT(b.out_of_order, 0); /* callbacks come in submission order */
    CHECK_INT(st1.writes - st0.writes, N);
    CHECK_INT(st1.failed_batches, 0);
    uint64_t txs = st1.batches - st0.batches;
    fprintf(stderr, "  group commit: %d appends in %" PRIu64 " transactions\n", N, txs);
    CHECK(txs >= 1);
    CHECK(txs <= N / 20);

    /* paused: exactly what was queued, cut into transactions of at most 8192 */
    store_sqlite_pause(f.s, true);
    store_sqlite_stats(f.s, &st0);
    memset(&b, 0, sizeof b);
    for (int i = 0; i < M; i++) {
        burst_req_t *br = &reqs[i];
        snprintf(br->text, sizeof br->text, "msg %d", i);
        br->r = mk_append("p", "u", br->text, NULL, 100000 + (uint64_t)i, 1);
        br->r.cb = on_burst;
        br->b = &b;
        br->index = i;
        CHECK_INT(store_submit(f.s, &br->r), 0);
    }
    store_sqlite_pause(f.s, false);
    int turns = 0;
    for (; b.called < M; turns++) uv_run(&f.loop, UV_RUN_ONCE);
    store_sqlite_stats(f.s, &st1);
    free(reqs);
    CHECK_INT(b.failed, 0);
    CHECK_INT(b.out_of_order, 0);
    CHECK_INT(st1.batches - st0.batches, 2);
    CHECK_INT(st1.max_batch, 8192);
    CHECK(turns >= M / 1024); /* callbacks are spread over loop turns, 1024 at most each */
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages"), N + M);
    CHECK_INT(fx_done(&f), 0);
}

/* Appends spread over many chats dirty a page each, so the WAL grows fast. The checkpointer
 * thread copies it back into the database, the writer copies the rest and the WAL starts
 * over: it stays far smaller than everything written, and nothing is lost on the way. */
static void test_wal_checkpointed_in_background(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    enum { ROUND = 512, ROUNDS = 80, CHATS = 1000 };
    static burst_req_t reqs[ROUND];
    static char chats[CHATS][24];
    for (int c = 0; c < CHATS; c++) snprintf(chats[c], sizeof chats[c], "chat-%d", c);
    store_sqlite_checkpoint_at(f.s, 4096);
    store_sqlite_stats_t st0, st1;
    store_sqlite_stats(f.s, &st0);
    char wal[200];
    snprintf(wal, sizeof wal, "%s-wal", f.path);
    off_t wal_max = 0;
    int failed = 0;
    for (int round = 0; round < ROUNDS; round++) {
        burst_t b = {0};
        for (int i = 0; i < ROUND; i++) {
            int n = round * ROUND + i;
            burst_req_t *br = &reqs[i];
            snprintf(br->text, sizeof br->text, "msg %d", n);
            /* a stride coprime to CHATS: consecutive appends land in different chats */
            br->r = mk_append(chats[(n * 7) % CHATS], "u", br->text, NULL, 1 + (uint64_t)n,
                              1700000000000 + n);
            br->r.cb = on_burst;
            br->b = &b;
            br->index = i;
            CHECK_INT(store_submit(f.s, &br->r), 0);
        }
        while (b.called < ROUND) uv_run(&f.loop, UV_RUN_ONCE);
        failed += b.failed + b.out_of_order;
        struct stat sb;
        if (stat(wal, &sb) == 0 && sb.st_size > wal_max) wal_max = sb.st_size;
    }
    store_sqlite_stats(f.s, &st1);
    CHECK_INT(failed, 0);
    CHECK_INT(st1.writes - st0.writes, ROUND * ROUNDS);
    /* every round dirties hundreds of pages: tens of thousands of frames were written */
    fprintf(stderr,
            "  %" PRIu64 " transactions, %" PRIu64 " background checkpoints, WAL at most %lld KB\n",
            st1.batches - st0.batches, st1.checkpoints - st0.checkpoints,
            (long long)wal_max / 1024);
    CHECK(st1.checkpoints - st0.checkpoints >= 1);
    /* The WAL restarted: at most the 4096 frames that start a checkpoint, what the writer
     * added while it ran, and one round, far below the 40,000 pages it would hold else. */
    CHECK(wal_max > 0);
    CHECK(wal_max < (off_t)12000 * 4120);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages"), ROUND * ROUNDS);
    CHECK_INT(query_int(f.path, "SELECT count(DISTINCT chat_id) FROM messages"), CHATS);
    CHECK_INT(fx_done(&f), 0);
}

/* Another process holds the write lock (a second node on the same file): an append waits
 * for it and succeeds once it is released; held past the 5 s deadline, the append fails
 * with CHAT_EIO and the store keeps working. */
typedef struct lock_holder {
    const char *path;
    int hold_ms;
    int rc;
    volatile int locked; /* set once the lock is held */
} lock_holder_t;

static void hold_lock(void *arg) {
    lock_holder_t *lh = arg;
    sqlite3 *db = NULL;
    lh->rc = sqlite3_open(lh->path, &db);
    if (lh->rc == SQLITE_OK) lh->rc = sqlite3_exec(db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
    if (lh->rc == SQLITE_OK) {
        sqlite3_exec(db,
                     "INSERT INTO messages (chat_id, id, user_from, message, created_at)"
                     " VALUES ('other', 1, 'bob', 'from the other node', 1)",
                     NULL, NULL, NULL);
        __atomic_store_n(&lh->locked, 1, __ATOMIC_RELEASE);
        struct timespec ts = {lh->hold_ms / 1000, (long)(lh->hold_ms % 1000) * 1000000};
        nanosleep(&ts, NULL);
        lh->rc = sqlite3_exec(db, "COMMIT", NULL, NULL, NULL);
    }
    sqlite3_close(db);
    __atomic_store_n(&lh->locked, 1, __ATOMIC_RELEASE); /* also on failure: never wait forever */
}

static void test_waits_for_another_writer(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    CHECK_INT(append1(&f, "c", "alice", "first", NULL, 1), 0);
    struct {
        int hold_ms;
        int want;
    } cases[] = {{300, 0}, {5600, CHAT_EIO}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        lock_holder_t lh = {f.path, cases[i].hold_ms, -1, 0};
        uv_thread_t t;
        CHECK_INT(uv_thread_create(&t, hold_lock, &lh), 0);
        while (!__atomic_load_n(&lh.locked, __ATOMIC_ACQUIRE)) {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
        uint64_t t0 = uv_hrtime();
        CHECK_INT(append1(&f, "c", "alice", "waited", NULL, 10 + i), cases[i].want);
        double waited_ms = (double)(uv_hrtime() - t0) / 1e6;
        uv_thread_join(&t);
        CHECK_INT(lh.rc, SQLITE_OK);
        fprintf(stderr, "  lock held %d ms: append %s after %.0f ms\n", cases[i].hold_ms,
                cases[i].want ? "failed" : "stored", waited_ms);
        /* it gives up at the deadline: not before, and not 10% after (the nominal sleeps) */
        if (cases[i].want) CHECK(waited_ms >= 5000.0 && waited_ms < 5400.0);
        CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages WHERE chat_id = 'other'"), 1);
        CHECK_INT(store_sqlite_exec(f.s, "DELETE FROM messages WHERE chat_id = 'other'"), 0);
    }
    /* the store goes on */
    CHECK_INT(append1(&f, "c", "alice", "after", NULL, 100), 0);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages WHERE chat_id = 'c'"), 3);
    CHECK_INT(fx_done(&f), 0);
}

/* Readers run while the writer commits: every page they return is a consistent, ordered
 * snapshot, and the last read sees everything. */
typedef struct rw {
    fx_t *f;
    int writes_left, writes_done, reads_done, bad;
    uint64_t next_id;
    store_req_t w[4];
    char wtext[4][24];
    store_req_t rd[2];
} rw_t;

static void rw_write(rw_t *c, int slot);

static void on_rw_write(store_req_t *r) {
    rw_t *c = r->data;
    if (r->status != 0) c->bad++;
    store_req_cleanup(r);
    c->writes_done++;
    rw_write(c, (int)(r - c->w));
}

static void rw_write(rw_t *c, int slot) {
    if (c->writes_left == 0) return;
    c->writes_left--;
    uint64_t id = c->next_id++;
    snprintf(c->wtext[slot], sizeof c->wtext[slot], "m%" PRIu64, id);
    c->w[slot] = mk_append("busy", "alice", c->wtext[slot], NULL, id, 1);
    c->w[slot].cb = on_rw_write;
    c->w[slot].data = c;
    if (store_submit(c->f->s, &c->w[slot]) != 0) c->bad++;
}

static void on_rw_read(store_req_t *r) {
    rw_t *c = r->data;
    char want[24];
    if (r->status != 0 || r->n_msgs > 20) c->bad++;
    for (size_t i = 0; i < r->n_msgs; i++) {
        snprintf(want, sizeof want, "m%" PRIu64, r->msgs[i].id);
        if (!r->msgs[i].message || strcmp(r->msgs[i].message, want) != 0) c->bad++;
        if (i > 0 && r->msgs[i].id >= r->msgs[i - 1].id) c->bad++;
    }
    store_req_cleanup(r);
    c->reads_done++;
    if (c->writes_left > 0 || c->writes_done < 2000) {
        *r = mk_read(STORE_HISTORY, "busy", 0, 20);
        r->cb = on_rw_read;
        r->data = c;
        if (store_submit(c->f->s, r) != 0) c->bad++;
    } else {
        r->cb = NULL; /* finished */
    }
}

static void test_reads_while_writing(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    rw_t *c = calloc(1, sizeof *c);
    CHECK(c != NULL);
    c->f = &f;
    c->writes_left = 2000;
    c->next_id = 1;
    for (int i = 0; i < 4; i++) rw_write(c, i);
    for (int i = 0; i < 2; i++) {
        c->rd[i] = mk_read(STORE_HISTORY, "busy", 0, 20);
        c->rd[i].cb = on_rw_read;
        c->rd[i].data = c;
        CHECK_INT(store_submit(f.s, &c->rd[i]), 0);
    }
    while (c->writes_done < 2000 || c->rd[0].cb || c->rd[1].cb) uv_run(&f.loop, UV_RUN_ONCE);
    int bad = c->bad, reads = c->reads_done;
    free(c);
    CHECK_INT(bad, 0);
    CHECK(reads > 2);
    store_sqlite_stats_t st;
    store_sqlite_stats(f.s, &st);
    CHECK_INT(st.reads, (uint64_t)reads);

    store_req_t h = mk_read(STORE_HISTORY, "busy", 0, 5);
    CHECK_INT(run_req(&f, &h), 0);
    CHECK_INT(h.n_msgs, 5);
    CHECK_INT(h.msgs[0].id, 2000);
    store_req_cleanup(&h);
    CHECK_INT(fx_done(&f), 0);
}

static void test_disk_full_fails_whole_batch(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    CHECK_INT(append1(&f, "c", "alice", "before", NULL, 1), 0);
    /* cannot go below the current size: this caps the file where it is */
    CHECK_INT(store_sqlite_exec(f.s, "PRAGMA max_page_count = 1"), 0);

    size_t big_n = 200000;
    char *big = malloc(big_n + 1);
    CHECK(big != NULL);
    memset(big, 'x', big_n);
    big[big_n] = '\0';
    int called = 0;
    store_req_t r[3] = {mk_append("c", "alice", "small, fits", NULL, 2, 1),
                        mk_append("c", "alice", big, NULL, 3, 1),
                        mk_append("c", "alice", "small too", NULL, 4, 1)};
    store_sqlite_stats_t st0, st1;
    store_sqlite_stats(f.s, &st0);
    store_sqlite_pause(f.s, true);
    for (int i = 0; i < 3; i++) {
        r[i].cb = on_req;
        r[i].data = &called;
        CHECK_INT(store_submit(f.s, &r[i]), 0);
    }
    log_set_level(CHAT_LOG_ERROR + 1); /* the disk-full errors are expected */
    store_sqlite_pause(f.s, false);
    while (called < 3) uv_run(&f.loop, UV_RUN_ONCE);
    log_set_level(CHAT_LOG_WARN);
    free(big);
    store_sqlite_stats(f.s, &st1);
    for (int i = 0; i < 3; i++) {
        CHECK_INT(r[i].status, CHAT_EIO); /* no partial success */
        CHECK(r[i].msg.message == NULL);
        store_req_cleanup(&r[i]);
    }
    CHECK_INT(st1.failed_batches - st0.failed_batches, 1);
    CHECK_INT(st1.batches, st0.batches);

    store_req_t h = mk_read(STORE_HISTORY, "c", 0, 10);
    CHECK_INT(run_req(&f, &h), 0);
    CHECK_INT(h.n_msgs, 1);
    CHECK_STR(h.msgs[0].message, "before");
    store_req_cleanup(&h);

    /* space again: the store recovers without a reopen */
    CHECK_INT(store_sqlite_exec(f.s, "PRAGMA max_page_count = 1073741823"), 0);
    CHECK_INT(append1(&f, "c", "alice", "after", NULL, 5), 0);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages"), 2);
    CHECK_INT(fx_done(&f), 0);
}

typedef struct drain {
    int calls, ok, done_calls, calls_at_done;
} drain_t;

static void on_drain_req(store_req_t *r) {
    drain_t *d = r->data;
    d->calls++;
    if (r->status == 0) d->ok++;
    store_req_cleanup(r);
}

static void on_drain_done(void *arg) {
    drain_t *d = arg;
    d->done_calls++;
    d->calls_at_done = d->calls;
}

static void test_close_drains(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    enum { N = 300 };
    static store_req_t reqs[N + 2];
    drain_t d = {0};
    for (int i = 0; i < N; i++) {
        reqs[i] = mk_append("c", "alice", "queued", NULL, (uint64_t)i + 1, 1);
        reqs[i].cb = on_drain_req;
        reqs[i].data = &d;
        CHECK_INT(store_submit(f.s, &reqs[i]), 0);
    }
    for (int i = N; i < N + 2; i++) {
        reqs[i] = mk_read(STORE_AFTER, "c", 0, 10);
        reqs[i].cb = on_drain_req;
        reqs[i].data = &d;
        CHECK_INT(store_submit(f.s, &reqs[i]), 0);
    }
    store_close(f.s, on_drain_done, &d);
    store_req_t late = mk_append("c", "alice", "late", NULL, 9999, 1);
    late.cb = on_drain_req;
    late.data = &d;
    CHECK_INT(store_submit(f.s, &late), CHAT_ECLOSED);
    while (!d.done_calls) uv_run(&f.loop, UV_RUN_ONCE);
    f.s = NULL;
    CHECK_INT(d.done_calls, 1);
    CHECK_INT(d.calls_at_done, N + 2); /* every callback before done, none after */
    CHECK_INT(d.ok, N + 2);
    CHECK_INT(uv_run(&f.loop, UV_RUN_NOWAIT), 0);
    CHECK_INT(d.calls, N + 2);
    CHECK_INT(query_int(f.path, "SELECT count(*) FROM messages"), N);
    CHECK_INT(fx_done(&f), 0);
}

/* Closing from inside a completion callback is allowed. */
static store_t *close_from_cb_store;
static void on_close_from_cb(store_req_t *r) {
    int *flags = r->data;
    flags[0] = r->status == 0 ? 1 : -1;
    store_req_cleanup(r);
    store_close(close_from_cb_store, on_flag, &flags[1]);
}

static void test_close_from_callback(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    int flags[2] = {0, 0};
    close_from_cb_store = f.s;
    store_req_t r = mk_append("c", "alice", "bye", NULL, 1, 1);
    r.cb = on_close_from_cb;
    r.data = flags;
    CHECK_INT(store_submit(f.s, &r), 0);
    while (!flags[1]) uv_run(&f.loop, UV_RUN_ONCE);
    f.s = NULL;
    CHECK_INT(flags[0], 1);
    CHECK_INT(flags[1], 1);
    CHECK_INT(fx_done(&f), 0);
}

/* Read positions: only a message of the chat, only upwards, and the unread count bounded. */
static store_req_t mk_readpos(store_op_t op, const char *chat, const char *user, uint64_t id) {
    store_req_t r = mk_change(op, chat, user, NULL, id, 1700000000000);
    return r;
}

static void test_read_positions(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    for (uint64_t id = 10; id < 10 + STORE_UNREAD_CAP + 5; id++)
        CHECK_INT(append1(&f, "c", id == 11 ? "alice" : "bob", "m", NULL, id), 0);
    CHECK_INT(append1(&f, "other", "bob", "m", NULL, 5), 0);
    store_req_t d = mk_change(STORE_DELETE, "c", "bob", NULL, 12, 1);
    CHECK_INT(run_req(&f, &d), 0);
    CHECK_INT(d.status, 0);
    store_req_cleanup(&d);

    store_req_t g = mk_readpos(STORE_READ_GET, "c", "alice", 0);
    CHECK_INT(run_req(&f, &g), 0);
    CHECK_INT(g.status, 0);
    CHECK_INT(g.read_id, 0);
    CHECK_INT(g.unread, STORE_UNREAD_CAP);
    CHECK(g.unread_capped);
    store_req_cleanup(&g);

    store_req_t r = mk_readpos(STORE_READ_SET, "c", "alice", 5); /* the other chat's */
    CHECK_INT(run_req(&f, &r), 0);
    CHECK_INT(r.status, CHAT_ENOTFOUND);
    store_req_cleanup(&r);
    r = mk_readpos(STORE_READ_SET, "c", "alice", 100);
    CHECK_INT(run_req(&f, &r), 0);
    CHECK_INT(r.status, 0);
    CHECK(r.read_moved);
    CHECK_INT(r.read_id, 100);
    store_req_cleanup(&r);
    r = mk_readpos(STORE_READ_SET, "c", "alice", 12); /* older, and deleted: allowed, no move */
    CHECK_INT(run_req(&f, &r), 0);
    CHECK_INT(r.status, 0);
    CHECK(!r.read_moved);
    CHECK_INT(r.read_id, 100);
    store_req_cleanup(&r);

    g = mk_readpos(STORE_READ_GET, "c", "alice", 0);
    CHECK_INT(run_req(&f, &g), 0);
    CHECK_INT(g.read_id, 100);
    CHECK_INT(g.unread, 14); /* 101..114 */
    CHECK(!g.unread_capped);
    store_req_cleanup(&g);
    /* bob: alice's 11 counts, his own and the deleted 12 do not */
    g = mk_readpos(STORE_READ_GET, "c", "bob", 0);
    CHECK_INT(run_req(&f, &g), 0);
    CHECK_INT(g.read_id, 0);
    CHECK_INT(g.unread, 1);
    CHECK(!g.unread_capped);
    store_req_cleanup(&g);

    /* durable: a reopened store has the position */
    CHECK_INT(fx_close_store(&f), 1);
    CHECK_INT(fx_open(&f), 0);
    g = mk_readpos(STORE_READ_GET, "c", "alice", 0);
    CHECK_INT(run_req(&f, &g), 0);
    CHECK_INT(g.read_id, 100);
    store_req_cleanup(&g);
    CHECK_INT(fx_done(&f), 0);
}

/* The schema file and the DDL compiled into the binary must not drift apart. */
static char *normalize_sql(const char *in) {
    size_t n = strlen(in);
    char *out = malloc(n + 1), *o = out;
    if (!out) return NULL;
    bool space = false;
    for (const char *p = in; *p;) {
        if (p[0] == '-' && p[1] == '-') {
            while (*p && *p != '\n') p++;
            continue;
        }
        if (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r') {
            space = o != out;
            p++;
            continue;
        }
        if (space) *o++ = ' ';
        space = false;
        *o++ = *p++;
    }
    *o = '\0';
    return out;
}

static void test_schema_file_matches(void) {
    char path[512];
    const char *file = __FILE__; /* tests/unit/test_store_sqlite.c, relative or absolute */
    const char *cut = strstr(file, "tests/unit/");
    snprintf(path, sizeof path, "%.*sschema/sqlite.sql", cut ? (int)(cut - file) : 0, file);
    FILE *fp = fopen(path, "rb");
    if (!fp) fprintf(stderr, "  cannot open %s (run from the repository root)\n", path);
    CHECK(fp != NULL);
    static char buf[65536];
    size_t n = fread(buf, 1, sizeof buf - 1, fp);
    fclose(fp);
    buf[n] = '\0';
    char all[8192] = "";
    for (int i = 0; i < store_sqlite_schema_versions; i++) {
        strncat(all, store_sqlite_schema[i], sizeof all - strlen(all) - 1);
    }
    char *a = normalize_sql(buf), *b = normalize_sql(all);
    int same = a && b && strcmp(a, b) == 0;
    if (!same) fprintf(stderr, "  file:     %s\n  embedded: %s\n", a, b);
    free(a);
    free(b);
    CHECK(same);
}

/* The queries use the indexes the schema was designed for. */
static bool plan_uses(sqlite3 *db, const char *sql, const char *want) {
    sqlite3_stmt *st = NULL;
    bool found = false;
    char q[512];
    snprintf(q, sizeof q, "EXPLAIN QUERY PLAN %s", sql);
    if (sqlite3_prepare_v2(db, q, -1, &st, NULL) != SQLITE_OK) return false;
    while (sqlite3_step(st) == SQLITE_ROW) {
        const char *detail = (const char *)sqlite3_column_text(st, 3);
        if (detail && strstr(detail, want)) found = true;
    }
    sqlite3_finalize(st);
    return found;
}

static void test_query_plans(void) {
    fx_t f;
    CHECK(fx_init(&f));
    CHECK_INT(fx_open(&f), 0);
    sqlite3 *db = NULL;
    CHECK_INT(sqlite3_open_v2(f.path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    bool h = plan_uses(db,
                       "SELECT * FROM messages WHERE chat_id = ?1 AND id < ?2 "
                       "ORDER BY id DESC LIMIT ?3",
                       "USING PRIMARY KEY (chat_id=? AND id<?)");
    bool k = plan_uses(db,
                       "SELECT * FROM messages WHERE chat_id = ?1 AND user_from = ?2 "
                       "AND client_id = ?3",
                       "messages_client_id");
    sqlite3_close(db);
    CHECK(h);
    CHECK(k);
    CHECK_INT(fx_done(&f), 0);
}

int main(void) {
    log_set_level(CHAT_LOG_WARN);
    RUN(test_url_dispatch);
    RUN(test_migrate_only);
    RUN(test_invalid_submit);
    RUN(test_append_history);
    RUN(test_history_paging);
    RUN(test_after);
    RUN(test_idempotent_append);
    RUN(test_edit);
    RUN(test_delete);
    RUN(test_read_positions);
    RUN(test_durability_reopen);
    RUN(test_group_commit);
    RUN(test_wal_checkpointed_in_background);
    RUN(test_waits_for_another_writer);
    RUN(test_reads_while_writing);
    RUN(test_disk_full_fails_whole_batch);
    RUN(test_close_drains);
    RUN(test_close_from_callback);
    RUN(test_schema_file_matches);
    RUN(test_query_plans);
    return test_summary("test_store_sqlite");
}
