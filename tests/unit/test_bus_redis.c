/* Unit tests for the Redis bus against a real redis-server: started on a free loopback port
 * with no persistence in a temp directory, killed and restarted by the tests, and killed at
 * exit (atexit, a watchdog alarm, and PR_SET_PDEATHSIG if this process dies some other way).
 * No Redis is a failure, not a skip. Every wait runs a real libuv loop with a deadline, so a
 * bug fails a check instead of hanging. What Redis itself holds (subscriptions, keys) is
 * checked through a separate synchronous hiredis connection. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hiredis/hiredis.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bus/bus.h"
#include "bus/bus_redis_internal.h"
#include "test.h"

/* ---- redis-server ------------------------------------------------------------------------ */

#define REDIS_BIN "/usr/bin/redis-server"

static char tmpdir[64];
static int redis_port; /* the main server */
static pid_t redis_pids[2];
static char redis_url[64]; /* redis://127.0.0.1:PORT */

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (fd < 0) return -1;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 ||
        getsockname(fd, (struct sockaddr *)&a, &len) < 0) {
        close(fd);
        return -1;
    }
    close(fd);
    return ntohs(a.sin_port);
}

static redisContext *raw_connect(int port) {
    struct timeval tv = {1, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    if (c && c->err) {
        redisFree(c);
        c = NULL;
    }
    return c;
}

static void redis_kill(int slot) {
    if (redis_pids[slot] > 0) {
        kill(redis_pids[slot], SIGKILL);
        waitpid(redis_pids[slot], NULL, 0);
        redis_pids[slot] = 0;
    }
}

/* Start redis-server in slot on port (extra: one more "--opt value" pair, or NULL) and wait
 * until it answers (with AUTH pass when given). */
static bool redis_start(int slot, int port, const char *opt, const char *val, const char *pass) {
    char portstr[16], log[128];
    snprintf(portstr, sizeof portstr, "%d", port);
    snprintf(log, sizeof log, "%s/redis-%d.log", tmpdir, slot);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) return false;
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* never outlive the test */
        if (getppid() != parent) _exit(127);
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1);
        }
        if (opt)
            execl(REDIS_BIN, "redis-server", "--port", portstr, "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no", "--dir", tmpdir, "--logfile", log, opt, val, (char *)NULL);
        else
            execl(REDIS_BIN, "redis-server", "--port", portstr, "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "no", "--dir", tmpdir, "--logfile", log, (char *)NULL);
        _exit(127);
    }
    redis_pids[slot] = pid;
    for (int i = 0; i < 500; i++) {
        if (waitpid(pid, NULL, WNOHANG) == pid) {
            redis_pids[slot] = 0;
            fprintf(stderr, "  redis-server exited at start (see %s)\n", log);
            return false;
        }
        redisContext *c = raw_connect(port);
        if (c) {
            redisReply *r = pass ? redisCommand(c, "AUTH %s", pass) : redisCommand(c, "PING");
            bool ok = r && r->type != REDIS_REPLY_ERROR;
            if (r) freeReplyObject(r);
            redisFree(c);
            if (ok) return true;
        }
        usleep(10000);
    }
    fprintf(stderr, "  redis-server did not answer on port %d\n", port);
    redis_kill(slot);
    return false;
}

static void cleanup(void) {
    redis_kill(0);
    redis_kill(1);
    if (!tmpdir[0]) return;
    DIR *d = opendir(tmpdir);
    if (d) {
        struct dirent *e;
        char p[400];
        while ((e = readdir(d)))
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
                snprintf(p, sizeof p, "%s/%s", tmpdir, e->d_name);
                unlink(p);
            }
        closedir(d);
    }
    rmdir(tmpdir);
    tmpdir[0] = 0;
}

static void on_alarm(int sig) {
    static const char msg[] = "test_bus_redis: watchdog expired\n";
    (void)sig;
    for (int i = 0; i < 2; i++)
        if (redis_pids[i] > 0) kill(redis_pids[i], SIGKILL);
    if (write(2, msg, sizeof msg - 1) < 0) _exit(1);
    _exit(1);
}

/* A command on a fresh synchronous connection to the main server; NULL if it is down. */
static redisReply *raw(const char *fmt, ...) {
    redisContext *c = raw_connect(redis_port);
    if (!c) return NULL;
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    return r;
}

static long long raw_int(const char *fmt, const char *arg) {
    redisReply *r = raw(fmt, arg);
    long long v = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
    if (r) freeReplyObject(r);
    return v;
}

static long long numsub(const char *chan) {
    redisReply *r = raw("PUBSUB NUMSUB %s", chan);
    long long v = -1;
    if (r && r->type == REDIS_REPLY_ARRAY && r->elements == 2 &&
        r->element[1]->type == REDIS_REPLY_INTEGER)
        v = r->element[1]->integer;
    if (r) freeReplyObject(r);
    return v;
}

/* ---- a bus under test and the loop ----------------------------------------------------- */

typedef struct msg {
    char chat[256];
    size_t len;
    uint32_t sum;      /* FNV-1a of all len bytes */
    uint8_t data[128]; /* the first bytes */
} msg_t;

static uint32_t fnv(const uint8_t *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

typedef struct peer {
    bus_t *bus;
    bool up;
    int ups, downs;
    char hist[16];     /* 'U' / 'D' per on_state, in order */
    int subscribed;    /* on_subscribed calls */
    char last_sub[32]; /* the chat of the last one */
    msg_t *msgs;
    size_t n, cap;
} peer_t;

static void on_msg(void *ud, const char *chat_id, const uint8_t *p, size_t len) {
    peer_t *pe = ud;
    if (pe->n == pe->cap) {
        pe->cap = pe->cap ? pe->cap * 2 : 64;
        pe->msgs = realloc(pe->msgs, pe->cap * sizeof *pe->msgs);
        if (!pe->msgs) abort();
    }
    msg_t *m = &pe->msgs[pe->n++];
    snprintf(m->chat, sizeof m->chat, "%s", chat_id);
    m->len = len;
    m->sum = fnv(p, len);
    memcpy(m->data, p, len < sizeof m->data ? len : sizeof m->data);
}

static void on_state(void *ud, bool up) {
    peer_t *pe = ud;
    pe->up = up;
    if (up) pe->ups++;
    else pe->downs++;
    size_t n = strlen(pe->hist);
    if (n + 1 < sizeof pe->hist) pe->hist[n] = up ? 'U' : 'D';
}

static void on_subscribed(void *ud, const char *chat_id) {
    peer_t *pe = ud;
    pe->subscribed++;
    snprintf(pe->last_sub, sizeof pe->last_sub, "%s", chat_id);
}

static int peer_open(peer_t *pe, uv_loop_t *loop, const char *url) {
    char err[256] = "";
    memset(pe, 0, sizeof *pe);
    bus_callbacks_t cb = {
        .on_message = on_msg, .on_state = on_state, .on_subscribed = on_subscribed, .ud = pe};
    int rc = bus_open(&pe->bus, loop, url, &cb, err, sizeof err);
    if (rc) fprintf(stderr, "  bus_open(%s): %s\n", url, err);
    return rc;
}

static void noop_tick(uv_timer_t *t) {}

/* Run the loop until pred(arg) holds or ms pass; returns pred(arg). */
static bool run_until(uv_loop_t *loop, bool (*pred)(void *), void *arg, unsigned ms) {
    uv_timer_t tick; /* wakes the loop so the deadline is checked */
    uv_timer_init(loop, &tick);
    uv_timer_start(&tick, noop_tick, 5, 5);
    uv_update_time(loop);
    uint64_t deadline = uv_now(loop) + ms;
    while (!(pred && pred(arg)) && uv_now(loop) < deadline) uv_run(loop, UV_RUN_ONCE);
    bool ok = pred && pred(arg);
    uv_close((uv_handle_t *)&tick, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
    return ok;
}

static void run_for(uv_loop_t *loop, unsigned ms) { run_until(loop, NULL, NULL, ms); }

/* on_state follows the subscriber connection; tests that use discovery also want the
 * command connection */
static bool p_up(void *a) { return ((peer_t *)a)->up; }
static bool p_cmd(void *a) { return bus_redis__cmd_ready(((peer_t *)a)->bus); }
static bool p_down(void *a) { return !((peer_t *)a)->up && ((peer_t *)a)->downs > 0; }
static bool p_subscribed(void *a) { return ((peer_t *)a)->subscribed > 0; }
static bool p_flag(void *a) { return *(int *)a != 0; }
static bool p_queue_empty(void *a) { return bus_redis__queued(a) == 0 && bus_redis__queue_ok(a); }

typedef struct count_arg {
    const size_t *v;
    size_t want;
} count_arg_t;
static bool p_count(void *a) { return *((count_arg_t *)a)->v >= ((count_arg_t *)a)->want; }

static bool wait_msgs(uv_loop_t *loop, peer_t *pe, size_t want, unsigned ms) {
    count_arg_t c = {&pe->n, want};
    return run_until(loop, p_count, &c, ms);
}

static bool wait_numsub(uv_loop_t *loop, const char *chan, long long want, unsigned ms) {
    for (unsigned waited = 0;; waited += 10) {
        if (numsub(chan) == want) return true;
        if (waited >= ms) return false;
        run_for(loop, 10);
    }
}

static void on_done(void *arg) { (*(int *)arg)++; }

static bool peer_close(peer_t *pe, uv_loop_t *loop) {
    int done = 0;
    bus_close(pe->bus, on_done, &done);
    bool ok = run_until(loop, p_flag, &done, 3000);
    free(pe->msgs);
    pe->msgs = NULL;
    return ok && done == 1;
}

static bool msg_is(const msg_t *m, const char *chat, const void *data, size_t len) {
    return strcmp(m->chat, chat) == 0 && m->len == len && memcmp(m->data, data, len) == 0;
}

/* Every handle closed: uv_loop_close succeeds only then. */
static bool loop_finish(uv_loop_t *loop) {
    uv_run(loop, UV_RUN_NOWAIT);
    bool ok = uv_loop_close(loop) == 0;
    free(loop);
    return ok;
}

static uv_loop_t *loop_new(void) {
    uv_loop_t *l = malloc(sizeof *l);
    if (l && uv_loop_init(l) != 0) {
        free(l);
        l = NULL;
    }
    return l;
}

/* list_nodes answer, copied */
typedef struct list_ans {
    int calls, status;
    size_t n;
    bus_node_t nodes[8];
} list_ans_t;

static void on_list(void *ud, int status, const bus_node_t *nodes, size_t n) {
    list_ans_t *a = ud;
    a->calls++;
    a->status = status;
    a->n = n;
    for (size_t i = 0; i < n && i < 8; i++) a->nodes[i] = nodes[i];
}

static bool p_listed(void *a) { return ((list_ans_t *)a)->calls > 0; }

static const bus_node_t *find_node(const list_ans_t *a, const char *id) {
    for (size_t i = 0; i < a->n && i < 8; i++)
        if (strcmp(a->nodes[i].id, id) == 0) return &a->nodes[i];
    return NULL;
}

/* ---- URL parsing ------------------------------------------------------------------------ */

static void test_url_parse(void) {
    bus_redis_url_t u;
    char err[200];
    CHECK_INT(bus_redis__parse_url("redis://127.0.0.1", &u, err, sizeof err), 0);
    CHECK_STR(u.host, "127.0.0.1");
    CHECK_INT(u.port, 6379);
    CHECK_INT(u.db, 0);
    CHECK(!u.has_password);
    CHECK_INT(bus_redis__parse_url("redis://localhost:6380/2", &u, err, sizeof err), 0);
    CHECK_STR(u.host, "localhost");
    CHECK_INT(u.port, 6380);
    CHECK_INT(u.db, 2);
    CHECK_INT(bus_redis__parse_url("redis://:s3cret@redis.internal:7000/15", &u, err, sizeof err),
              0);
    CHECK(u.has_password);
    CHECK_STR(u.password, "s3cret");
    CHECK_STR(u.user, "");
    CHECK_STR(u.host, "redis.internal");
    CHECK_INT(u.port, 7000);
    CHECK_INT(u.db, 15);
    CHECK_INT(bus_redis__parse_url("redis://alice:p%40ss%3aw@h_1", &u, err, sizeof err), 0);
    CHECK_STR(u.user, "alice");
    CHECK_STR(u.password, "p@ss:w");
    CHECK_STR(u.host, "h_1");
    CHECK_INT(bus_redis__parse_url("redis://:a:b@h", &u, err, sizeof err), 0);
    CHECK_STR(u.password, "a:b");
    CHECK_INT(bus_redis__parse_url("redis://[::1]:6390", &u, err, sizeof err), 0);
    CHECK_STR(u.host, "::1");
    CHECK_INT(u.port, 6390);
    CHECK_INT(bus_redis__parse_url("redis://h:65535/", &u, err, sizeof err), 0);
    CHECK_INT(u.port, 65535);
    CHECK_INT(u.db, 0);

    static const char *bad[] = {
        "",
        "redis:/h",
        "http://h:6379",
        "REDIS://h",
        "redis://",
        "redis://:6379",
        "redis://h:",
        "redis://h:0",
        "redis://h:65536",
        "redis://h:12a",
        "redis://h:123456",
        "redis://h:-1",
        "redis://h/x",
        "redis://h/1/2",
        "redis://h/-1",
        "redis://h/1x",
        "redis://h?db=1",
        "redis://h#f",
        "redis://pw@h",
        "redis://:@h",
        "redis://:p%zz@h",
        "redis://:p%4@h",
        "redis://:p%00@h",
        "redis://[::1",
        "redis://[zz]:1",
        "redis://[]:1",
        "redis://h h",
        "redis://:secret@",
        "redis://:secret@:1",
        "redis://h:1:2",
        "redis://a@b@h",
        "redis://:p w@h",
        "redis://h:6379/12345678901",
        "redis://h\n",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        int rc = bus_redis__parse_url(bad[i], &u, err, sizeof err);
        if (rc != CHAT_EINVAL) fprintf(stderr, "  accepted: '%s'\n", bad[i]);
        CHECK_INT(rc, CHAT_EINVAL);
        CHECK(strncmp(err, "bad redis URL: ", 15) == 0 && strlen(err) > 15);
        CHECK(!strstr(err, "secret")); /* the reason may be logged: no password in it */
    }

    /* through bus_open: rejected at once, nothing to close */
    uv_loop_t *loop = loop_new();
    CHECK(loop);
    bus_t *b = (bus_t *)(uintptr_t)1;
    err[0] = 0;
    bus_callbacks_t cb = {.on_message = on_msg, .on_state = on_state};
    CHECK_INT(bus_open(&b, loop, "redis://h:99999", &cb, err, sizeof err), CHAT_EINVAL);
    CHECK(b == (bus_t *)(uintptr_t)1);
    CHECK(strstr(err, "port") != NULL);
    CHECK(loop_finish(loop));
}

/* ---- pub/sub ---------------------------------------------------------------------------- */

static void test_pubsub(void) {
    uv_loop_t *loop = loop_new();
    peer_t a, b;
    CHECK(loop);
    CHECK_INT(peer_open(&a, loop, redis_url), 0);
    CHECK_INT(peer_open(&b, loop, redis_url), 0);
    CHECK_STR(a.bus->ops->name, "redis");
    CHECK(!a.up && a.ups == 0); /* nothing happens before the loop runs */
    CHECK(run_until(loop, p_up, &a, 3000));
    CHECK(run_until(loop, p_up, &b, 3000));
    CHECK_INT(a.ups, 1);
    CHECK_INT(a.downs, 0);

    CHECK_INT(bus_subscribe(b.bus, "x"), 0);
    CHECK(wait_numsub(loop, "chat:x", 1, 2000));
    /* the broker's confirmation reaches the callback given to bus_open */
    CHECK(run_until(loop, p_subscribed, &b, 2000));
    CHECK_STR(b.last_sub, "x");

    /* binary-safe payload, exactly once, with the chat id */
    static const uint8_t bin[] = {'a', 0, 'b', '|', 'c', 0xff, '\r', '\n', 0};
    CHECK_INT(bus_publish(a.bus, "x", bin, sizeof bin), 0);
    CHECK(wait_msgs(loop, &b, 1, 2000));
    run_for(loop, 100);
    CHECK_INT(b.n, 1);
    CHECK(msg_is(&b.msgs[0], "x", bin, sizeof bin));
    CHECK_INT(a.n, 0);

    /* a second subscriber; subscribing again is a no-op */
    CHECK_INT(bus_subscribe(a.bus, "x"), 0);
    CHECK_INT(bus_subscribe(a.bus, "x"), 0);
    CHECK(wait_numsub(loop, "chat:x", 2, 2000));
    run_for(loop, 50);
    CHECK_INT(numsub("chat:x"), 2);

    /* A does not hear itself; B hears A and A hears B */
    CHECK_INT(bus_publish(a.bus, "x", "p2", 2), 0);
    CHECK(wait_msgs(loop, &b, 2, 2000));
    CHECK(msg_is(&b.msgs[1], "x", "p2", 2));
    CHECK_INT(bus_publish(b.bus, "x", "p3", 2), 0);
    CHECK(wait_msgs(loop, &a, 1, 2000));
    run_for(loop, 100);
    CHECK_INT(a.n, 1);
    CHECK(msg_is(&a.msgs[0], "x", "p3", 2));
    CHECK_INT(b.n, 2);

    /* an empty payload */
    CHECK_INT(bus_publish(a.bus, "x", NULL, 0), 0);
    CHECK(wait_msgs(loop, &b, 3, 2000));
    CHECK(msg_is(&b.msgs[2], "x", "", 0));

    /* unsubscribe stops delivery: A publishes to x then to y, B (on y only) gets just y */
    CHECK_INT(bus_unsubscribe(b.bus, "x"), 0);
    CHECK_INT(bus_unsubscribe(b.bus, "x"), 0);
    CHECK_INT(bus_unsubscribe(b.bus, "never"), 0);
    CHECK_INT(bus_subscribe(b.bus, "y"), 0);
    CHECK(wait_numsub(loop, "chat:x", 1, 2000));
    CHECK(wait_numsub(loop, "chat:y", 1, 2000));
    CHECK_INT(bus_publish(a.bus, "x", "gone", 4), 0);
    CHECK_INT(bus_publish(a.bus, "y", "marker", 6), 0);
    CHECK(wait_msgs(loop, &b, 4, 2000));
    run_for(loop, 50);
    CHECK_INT(b.n, 4);
    CHECK(msg_is(&b.msgs[3], "y", "marker", 6));

    /* unsubscribe right after subscribe, in the same turn: no subscription is left */
    CHECK_INT(bus_subscribe(b.bus, "z"), 0);
    CHECK_INT(bus_unsubscribe(b.bus, "z"), 0);
    run_for(loop, 100);
    CHECK_INT(numsub("chat:z"), 0);

    /* bad arguments */
    char longid[300];
    memset(longid, 'k', sizeof longid - 1);
    longid[sizeof longid - 1] = 0;
    CHECK_INT(bus_subscribe(b.bus, ""), CHAT_EINVAL);
    CHECK_INT(bus_subscribe(b.bus, longid), CHAT_EINVAL);
    CHECK_INT(bus_publish(a.bus, "", "x", 1), CHAT_EINVAL);
    CHECK_INT(bus_publish(a.bus, "x", NULL, 1), CHAT_EINVAL);

    /* 1000 publishes in one loop turn arrive complete and in order */
    CHECK_INT(bus_subscribe(b.bus, "x"), 0);
    CHECK(wait_numsub(loop, "chat:x", 2, 2000));
    size_t base = b.n;
    char buf[32];
    for (int i = 0; i < 1000; i++) {
        int n = snprintf(buf, sizeof buf, "m%04d", i);
        CHECK_INT(bus_publish(a.bus, "x", buf, (size_t)n), 0);
    }
    CHECK(wait_msgs(loop, &b, base + 1000, 5000));
    run_for(loop, 50);
    CHECK_INT(b.n, base + 1000);
    for (int i = 0; i < 1000; i++) {
        int n = snprintf(buf, sizeof buf, "m%04d", i);
        CHECK(msg_is(&b.msgs[base + (size_t)i], "x", buf, (size_t)n));
    }
    CHECK_INT(bus_redis__queued(a.bus), 0); /* every PUBLISH acknowledged */
    CHECK(bus_redis__queue_ok(a.bus));
    CHECK_INT(a.n, 1);

    /* payloads larger than a queue chunk, with the queue empty and then not */
    size_t big_len = 700000;
    uint8_t *big = malloc(big_len);
    CHECK(big);
    for (size_t i = 0; i < big_len; i++) big[i] = (uint8_t)(i * 7 + (i >> 11));
    base = b.n;
    int rc1 = bus_publish(a.bus, "x", big, big_len);
    int rc2 = bus_publish(a.bus, "x", "small", 5);
    int rc3 = bus_publish(a.bus, "x", big, big_len / 2);
    uint32_t sum_full = fnv(big, big_len), sum_half = fnv(big, big_len / 2);
    free(big);
    CHECK_INT(rc1, 0);
    CHECK_INT(rc2, 0);
    CHECK_INT(rc3, 0);
    CHECK(bus_redis__queue_ok(a.bus));
    CHECK(wait_msgs(loop, &b, base + 3, 5000));
    CHECK_INT(b.msgs[base].len, big_len);
    CHECK_INT(b.msgs[base].sum, sum_full);
    CHECK(msg_is(&b.msgs[base + 1], "x", "small", 5));
    CHECK_INT(b.msgs[base + 2].len, big_len / 2);
    CHECK_INT(b.msgs[base + 2].sum, sum_half);
    CHECK(run_until(loop, p_queue_empty, a.bus, 2000));

    CHECK(peer_close(&a, loop));
    CHECK(peer_close(&b, loop));
    CHECK_INT(numsub("chat:x"), 0);
    CHECK(loop_finish(loop));
}

/* ---- discovery -------------------------------------------------------------------------- */

static void test_nodes(void) {
    uv_loop_t *loop = loop_new();
    peer_t a, b;
    CHECK(loop);
    CHECK_INT(peer_open(&a, loop, redis_url), 0);
    CHECK_INT(peer_open(&b, loop, redis_url), 0);
    CHECK(run_until(loop, p_up, &a, 3000));
    CHECK(run_until(loop, p_up, &b, 3000));
    CHECK(run_until(loop, p_cmd, &a, 3000));
    CHECK(run_until(loop, p_cmd, &b, 3000));
    redisReply *r = raw("DEL chat:nodes");
    CHECK(r);
    freeReplyObject(r);

    bus_node_t na = {.connections = 3, .started_at = 1700000000123LL};
    snprintf(na.id, sizeof na.id, "%s", a.bus->instance);
    snprintf(na.url, sizeof na.url, "ws://127.0.0.1:8001");
    bus_node_t nb = {.connections = 7, .started_at = 1700000000456LL, .draining = true};
    snprintf(nb.id, sizeof nb.id, "%s", b.bus->instance);
    snprintf(nb.url, sizeof nb.url, "ws://[::1]:8002/with space");
    int64_t t0 = time_now_ms();
    CHECK_INT(bus_heartbeat(a.bus, &na, 5000), 0);
    CHECK_INT(bus_heartbeat(b.bus, &nb, 5000), 0);
    CHECK_INT(bus_heartbeat(a.bus, &na, 0), CHAT_EINVAL);
    char key_b[64];
    snprintf(key_b, sizeof key_b, "chat:node:%s", nb.id);
    for (int i = 0; i < 200 && raw_int("EXISTS %s", key_b) != 1; i++) run_for(loop, 10);
    CHECK_INT(raw_int("EXISTS %s", key_b), 1);
    long long pttl = raw_int("PTTL %s", key_b);
    CHECK(pttl > 0 && pttl <= 5000);

    list_ans_t ans = {0};
    CHECK_INT(bus_list_nodes(a.bus, on_list, &ans), 0);
    CHECK_INT(ans.calls, 0); /* never from inside the call */
    CHECK(run_until(loop, p_listed, &ans, 2000));
    int64_t t1 = time_now_ms();
    CHECK_INT(ans.calls, 1);
    CHECK_INT(ans.status, 0);
    CHECK_INT(ans.n, 2);
    const bus_node_t *ga = find_node(&ans, na.id), *gb = find_node(&ans, nb.id);
    CHECK(ga && gb);
    CHECK_STR(ga->url, na.url);
    CHECK_INT(ga->connections, 3);
    CHECK_INT(ga->started_at, na.started_at);
    CHECK(ga->seen_at >= t0 && ga->seen_at <= t1);
    CHECK(!ga->draining);
    CHECK_STR(gb->url, nb.url);
    CHECK_INT(gb->connections, 7);
    CHECK_INT(gb->started_at, nb.started_at);
    CHECK(gb->draining);

    /* deregister removes one */
    CHECK_INT(bus_deregister(b.bus, nb.id), 0);
    memset(&ans, 0, sizeof ans);
    for (int i = 0; i < 200 && raw_int("EXISTS %s", key_b) != 0; i++) run_for(loop, 10);
    CHECK_INT(bus_list_nodes(a.bus, on_list, &ans), 0);
    CHECK(run_until(loop, p_listed, &ans, 2000));
    CHECK_INT(ans.status, 0);
    CHECK_INT(ans.n, 1);
    CHECK(find_node(&ans, na.id) != NULL);
    CHECK_INT(raw_int("EXISTS %s", key_b), 0);
    r = raw("ZSCORE chat:nodes %s", nb.id);
    CHECK(r && r->type == REDIS_REPLY_NIL);
    freeReplyObject(r);

    /* A node counts as live only while a connection of its process subscribes to its alive
     * channel: one that died (its socket closed) is dropped at once, although its entry
     * has seconds to live. Node c is played by a plain connection. */
    bus_node_t nc = {.connections = 1, .node_id = 77};
    memset(nc.id, 'c', 32);
    snprintf(nc.url, sizeof nc.url, "ws://10.0.0.3:8000");
    char alive_c[64], key_c[64];
    snprintf(alive_c, sizeof alive_c, "chat:alive:%s", nc.id);
    snprintf(key_c, sizeof key_c, "chat:node:%s", nc.id);
    CHECK_INT(bus_heartbeat(a.bus, &nc, 5000), 0);
    memset(&ans, 0, sizeof ans);
    CHECK_INT(bus_list_nodes(a.bus, on_list, &ans), 0); /* same connection: sees c's entry */
    CHECK(run_until(loop, p_listed, &ans, 2000));
    CHECK_INT(ans.n, 1); /* but nothing of c's is connected */
    CHECK(find_node(&ans, na.id) != NULL);
    redisContext *csub = raw_connect(redis_port);
    CHECK(csub);
    r = redisCommand(csub, "SUBSCRIBE %s", alive_c);
    CHECK(r && r->type == REDIS_REPLY_ARRAY);
    freeReplyObject(r);
    memset(&ans, 0, sizeof ans);
    CHECK_INT(bus_list_nodes(a.bus, on_list, &ans), 0);
    CHECK(run_until(loop, p_listed, &ans, 2000));
    CHECK_INT(ans.n, 2);
    const bus_node_t *gc = find_node(&ans, nc.id);
    CHECK(gc != NULL);
    CHECK_INT(gc->node_id, 77);
    CHECK_INT(find_node(&ans, na.id)->node_id, 0);
    redisFree(csub); /* c "crashes" */
    CHECK(wait_numsub(loop, alive_c, 0, 2000));
    memset(&ans, 0, sizeof ans);
    CHECK_INT(bus_list_nodes(a.bus, on_list, &ans), 0);
    CHECK(run_until(loop, p_listed, &ans, 2000));
    CHECK_INT(ans.n, 1);
    CHECK(find_node(&ans, nc.id) == NULL);
    CHECK(raw_int("PTTL %s", key_c) > 1000); /* dropped long before its entry expires */

    /* a node whose entry expired is not listed, and leaves the index */
    csub = raw_connect(redis_port);
    CHECK(csub);
    r = redisCommand(csub, "SUBSCRIBE %s", alive_c);
    CHECK(r && r->type == REDIS_REPLY_ARRAY);
    freeReplyObject(r);
    CHECK_INT(bus_heartbeat(a.bus, &nc, 100), 0);
    memset(&ans, 0, sizeof ans);
    CHECK_INT(bus_list_nodes(a.bus, on_list, &ans), 0); /* same connection: sees c, alive */
    CHECK(run_until(loop, p_listed, &ans, 2000));
    CHECK_INT(ans.n, 2);
    CHECK(find_node(&ans, nc.id) != NULL);
    run_for(loop, 300);
    memset(&ans, 0, sizeof ans);
    CHECK_INT(bus_list_nodes(a.bus, on_list, &ans), 0);
    CHECK(run_until(loop, p_listed, &ans, 2000));
    CHECK_INT(ans.status, 0);
    CHECK_INT(ans.n, 1);
    CHECK(find_node(&ans, na.id) != NULL);
    bool gone = false;
    for (int i = 0; i < 100 && !gone; i++) {
        run_for(loop, 10);
        r = raw("ZSCORE chat:nodes %s", nc.id);
        gone = r && r->type == REDIS_REPLY_NIL;
        if (r) freeReplyObject(r);
    }
    redisFree(csub);
    CHECK(gone);

    /* an empty registry */
    CHECK_INT(bus_deregister(a.bus, na.id), 0);
    memset(&ans, 0, sizeof ans);
    CHECK_INT(bus_list_nodes(a.bus, on_list, &ans), 0);
    CHECK(run_until(loop, p_listed, &ans, 2000));
    CHECK_INT(ans.status, 0);
    CHECK_INT(ans.n, 0);

    /* a list still pending at close is answered (once) before done */
    memset(&ans, 0, sizeof ans);
    CHECK_INT(bus_list_nodes(a.bus, on_list, &ans), 0);
    CHECK(peer_close(&a, loop));
    CHECK_INT(ans.calls, 1);
    CHECK(peer_close(&b, loop));
    CHECK(loop_finish(loop));
}

/* ---- presence ---------------------------------------------------------------------------- */

typedef struct pres_ans {
    int calls, status;
    size_t n;
    char entries[8][64]; /* "<node>/<user>", sorted */
} pres_ans_t;

static int cmp_str64(const void *a, const void *b) { return strcmp(a, b); }

static void on_presence(void *ud, int status, const bus_presence_t *p, size_t n) {
    pres_ans_t *a = ud;
    a->calls++;
    a->status = status;
    a->n = n;
    for (size_t i = 0; i < n && i < 8; i++)
        snprintf(a->entries[i], sizeof a->entries[i], "%s/%s", p[i].node, p[i].user);
    qsort(a->entries, n < 8 ? n : 8, sizeof a->entries[0], cmp_str64);
}

static bool p_pres(void *a) { return ((pres_ans_t *)a)->calls > 0; }

/* The live entries of chat, as pe's bus lists them; n = (size_t)-1 if it failed. */
static pres_ans_t presence_of(uv_loop_t *loop, peer_t *pe, const char *chat) {
    pres_ans_t ans = {0};
    if (pe->bus->ops->presence_list(pe->bus, chat, on_presence, &ans) != 0 ||
        !run_until(loop, p_pres, &ans, 2000) || ans.calls != 1 || ans.status != 0)
        ans.n = (size_t)-1;
    return ans;
}

/* Entries are written in order with the publishes, listed with their node, and count only
 * while their node is live (registered and subscribed to its alive channel): a dead node's
 * entries are left out and deleted by the reader. */
static void test_presence(void) {
    uv_loop_t *loop = loop_new();
    peer_t a, b;
    CHECK(loop);
    CHECK_INT(peer_open(&a, loop, redis_url), 0);
    CHECK_INT(peer_open(&b, loop, redis_url), 0);
    CHECK(run_until(loop, p_up, &a, 3000) && run_until(loop, p_up, &b, 3000));
    CHECK(run_until(loop, p_cmd, &a, 3000) && run_until(loop, p_cmd, &b, 3000));
    bus_node_t na = {0}, nb = {0};
    snprintf(na.id, sizeof na.id, "%s", a.bus->instance);
    snprintf(nb.id, sizeof nb.id, "%s", b.bus->instance);
    CHECK_INT(bus_heartbeat(a.bus, &na, 5000), 0);
    CHECK_INT(bus_heartbeat(b.bus, &nb, 5000), 0);

    CHECK_INT(bus_presence_set(a.bus, "room", "alice", true), 0);
    CHECK_INT(bus_presence_set(b.bus, "room", "bob", true), 0);
    CHECK_INT(bus_presence_set(b.bus, "room", "carol", true), 0);
    CHECK_INT(bus_presence_set(b.bus, "room", "carol", false), 0);
    CHECK_INT(bus_presence_set(b.bus, "other", "dave", true), 0);
    CHECK_INT(bus_presence_set(a.bus, "", "x", true), CHAT_EINVAL);
    CHECK_INT(bus_presence_set(a.bus, "room", "", true), CHAT_EINVAL);
    CHECK(run_until(loop, p_queue_empty, a.bus, 2000));
    CHECK(run_until(loop, p_queue_empty, b.bus, 2000));

    pres_ans_t ans = presence_of(loop, &a, "room");
    char ea[64], eb[64];
    snprintf(ea, sizeof ea, "%s/alice", na.id);
    snprintf(eb, sizeof eb, "%s/bob", nb.id);
    CHECK_INT(ans.n, 2);
    bool a_first = strcmp(ea, eb) < 0;
    CHECK_STR(ans.entries[a_first ? 0 : 1], ea);
    CHECK_STR(ans.entries[a_first ? 1 : 0], eb);
    long long ttl = raw_int("PTTL %s", "chat:presence:room");
    CHECK(ttl > 0 && ttl <= 60000); /* the hash expires unless rewritten */
    CHECK_INT(presence_of(loop, &b, "nobody-here").n, 0);

    /* b dies: its connections close, its alive channel loses its subscriber */
    char alive_b[64];
    snprintf(alive_b, sizeof alive_b, "chat:alive:%s", nb.id);
    CHECK(peer_close(&b, loop));
    CHECK(wait_numsub(loop, alive_b, 0, 2000));
    ans = presence_of(loop, &a, "room");
    CHECK_INT(ans.n, 1);
    CHECK_STR(ans.entries[0], ea);
    CHECK_INT(raw_int("HLEN %s", "chat:presence:room"), 1); /* the reader deleted bob's */
    CHECK_INT(presence_of(loop, &a, "other").n, 0);

    /* an unregistered node's entries do not count either */
    CHECK_INT(bus_deregister(a.bus, na.id), 0);
    CHECK_INT(presence_of(loop, &a, "room").n, 0);
    CHECK(peer_close(&a, loop));
    CHECK(loop_finish(loop));
}

/* ---- node id lease ---------------------------------------------------------------------- */

typedef struct lease_ans {
    int calls, status;
    unsigned id;
    char detail[256];
} lease_ans_t;

static void on_lease(void *ud, int status, unsigned node_id, const char *detail) {
    lease_ans_t *a = ud;
    a->calls++;
    a->status = status;
    a->id = node_id;
    snprintf(a->detail, sizeof a->detail, "%s", detail ? detail : "");
}

static bool p_leased(void *a) { return ((lease_ans_t *)a)->calls > 0; }
static bool p_lease_again(void *a) { return ((lease_ans_t *)a)->calls > 1; }

static char *raw_str(const char *fmt, unsigned id, char *out, size_t n) {
    redisReply *r = raw(fmt, id);
    out[0] = 0;
    if (r && r->type == REDIS_REPLY_STRING) snprintf(out, n, "%s", r->str);
    if (r) freeReplyObject(r);
    return out;
}

/* Node ids are leased: auto-assigned ones differ, one held by a live bus is refused (the
 * answer names the holder), one held by a dead process is taken over, the lease is renewed
 * while held, released by close, and its loss is reported. */
static void test_lease(void) {
    uv_loop_t *loop = loop_new();
    peer_t a, b, c;
    lease_ans_t la = {0}, lb = {0}, lc = {0};
    char v[64];
    CHECK(loop);
    redisReply *r = raw("FLUSHDB");
    CHECK(r);
    freeReplyObject(r);
    CHECK_INT(peer_open(&a, loop, redis_url), 0);
    CHECK_INT(peer_open(&b, loop, redis_url), 0);
    /* asked before the bus is up: answered once it is */
    CHECK_INT(bus_lease(a.bus, -1, 300, on_lease, &la), 0);
    CHECK_INT(bus_lease(a.bus, -1, 300, on_lease, &la), CHAT_EBUSY); /* one per bus */
    CHECK_INT(bus_lease(b.bus, 1024, 300, on_lease, &lb), CHAT_EINVAL);
    CHECK_INT(la.calls, 0);
    CHECK(run_until(loop, p_leased, &la, 3000));
    CHECK_INT(la.status, 0);
    CHECK(la.id < 1024);
    CHECK_STR(raw_str("GET chat:nodeid:%u", la.id, v, sizeof v), a.bus->instance);

    /* the same id, asked for by number while its holder lives: refused */
    CHECK_INT(bus_lease(b.bus, (int)la.id, 300, on_lease, &lb), 0);
    CHECK(run_until(loop, p_leased, &lb, 3000));
    CHECK_INT(lb.status, CHAT_EBUSY);
    CHECK(strstr(lb.detail, a.bus->instance) != NULL);
    CHECK(peer_close(&b, loop));

    /* auto: another one */
    CHECK_INT(peer_open(&b, loop, redis_url), 0);
    memset(&lb, 0, sizeof lb);
    CHECK_INT(bus_lease(b.bus, -1, 300, on_lease, &lb), 0);
    CHECK(run_until(loop, p_leased, &lb, 3000));
    CHECK_INT(lb.status, 0);
    CHECK(lb.id != la.id);

    /* renewed: still ours after several TTLs */
    run_for(loop, 1000);
    CHECK_STR(raw_str("GET chat:nodeid:%u", la.id, v, sizeof v), a.bus->instance);
    CHECK_INT(la.calls, 1);

    /* held by a process that died (no subscriber on its alive channel): taken over */
    unsigned dead_id = (la.id + 1) % 1024 == lb.id ? (la.id + 2) % 1024 : (la.id + 1) % 1024;
    r = raw("SET chat:nodeid:%u 0123456789abcdef0123456789abcdef PX 60000", dead_id);
    CHECK(r);
    freeReplyObject(r);
    CHECK_INT(peer_open(&c, loop, redis_url), 0);
    CHECK_INT(bus_lease(c.bus, (int)dead_id, 300, on_lease, &lc), 0);
    CHECK(run_until(loop, p_leased, &lc, 3000));
    CHECK_INT(lc.status, 0);
    CHECK_INT(lc.id, dead_id);
    CHECK_STR(raw_str("GET chat:nodeid:%u", dead_id, v, sizeof v), c.bus->instance);

    /* released on close: the key is gone at once, not after its TTL */
    CHECK(peer_close(&c, loop));
    CHECK_STR(raw_str("GET chat:nodeid:%u", dead_id, v, sizeof v), "");

    /* lost: another holder appears (as after an outage longer than the TTL) */
    r = raw("SET chat:nodeid:%u 0123456789abcdef0123456789abcdef", lb.id);
    CHECK(r);
    freeReplyObject(r);
    CHECK(run_until(loop, p_lease_again, &lb, 3000));
    CHECK_INT(lb.status, CHAT_EBUSY);
    /* and closing does not release what is no longer ours */
    CHECK(peer_close(&b, loop));
    CHECK_STR(raw_str("GET chat:nodeid:%u", lb.id, v, sizeof v),
              "0123456789abcdef0123456789abcdef");

    /* expired while Redis was away, still free: taken again, no loss reported */
    r = raw("DEL chat:nodeid:%u", la.id);
    CHECK(r);
    freeReplyObject(r);
    run_for(loop, 300);
    CHECK_STR(raw_str("GET chat:nodeid:%u", la.id, v, sizeof v), a.bus->instance);
    CHECK_INT(la.calls, 1);
    CHECK(peer_close(&a, loop));
    CHECK(loop_finish(loop));
}

/* ---- outages ---------------------------------------------------------------------------- */

static bool p_both_down(void *arg) {
    peer_t **p = arg;
    return p_down(p[0]) && p_down(p[1]);
}

typedef struct ups_arg {
    peer_t *p;
    int want;
} ups_arg_t;
static bool p_ups(void *a) { return ((ups_arg_t *)a)->p->ups >= ((ups_arg_t *)a)->want; }

/* Redis restarts: both buses report down once, then up once B has resubscribed; a publish
 * made while Redis was down reaches B after the reconnect. */
static void test_restart(void) {
    uv_loop_t *loop = loop_new();
    peer_t a, b;
    CHECK(loop);
    CHECK_INT(peer_open(&a, loop, redis_url), 0);
    CHECK_INT(peer_open(&b, loop, redis_url), 0);
    CHECK(run_until(loop, p_up, &a, 3000));
    CHECK(run_until(loop, p_up, &b, 3000));
    CHECK(run_until(loop, p_cmd, &a, 3000));
    CHECK_INT(bus_subscribe(b.bus, "x"), 0);
    CHECK_INT(bus_subscribe(b.bus, "w"), 0);
    CHECK(wait_numsub(loop, "chat:x", 1, 2000));

    redis_kill(0);
    peer_t *both[2] = {&a, &b};
    CHECK(run_until(loop, p_both_down, both, 3000));
    run_for(loop, 300); /* a few failed reconnects: still reported once */
    CHECK_STR(a.hist, "UD");
    CHECK_STR(b.hist, "UD");

    bus_node_t self = {.connections = 1};
    snprintf(self.id, sizeof self.id, "%s", a.bus->instance);
    list_ans_t ans = {0};
    CHECK_INT(bus_heartbeat(a.bus, &self, 3000), CHAT_EIO);
    CHECK_INT(bus_list_nodes(a.bus, on_list, &ans), CHAT_EIO);
    /* A's command connection stays down until B has resubscribed, so the order is known */
    bus_redis__hold_cmd(a.bus, true);
    CHECK_INT(bus_publish(a.bus, "x", "while-down", 10), 0);
    CHECK_INT(bus_redis__queued(a.bus), 1);
    CHECK_INT(bus_subscribe(b.bus, "v"), 0);   /* joined during the outage */
    CHECK_INT(bus_unsubscribe(b.bus, "w"), 0); /* left during the outage */

    CHECK(redis_start(0, redis_port, NULL, NULL, NULL));
    ups_arg_t ub = {&b, 2};
    CHECK(run_until(loop, p_ups, &ub, 8000));
    CHECK_INT(numsub("chat:x"), 1); /* up means resubscribed */
    CHECK_INT(numsub("chat:v"), 1);
    CHECK_INT(numsub("chat:w"), 0);
    CHECK_STR(b.hist, "UDU");
    CHECK_INT(b.n, 0);
    CHECK_INT(bus_redis__queued(a.bus), 1);

    bus_redis__hold_cmd(a.bus, false);
    CHECK(wait_msgs(loop, &b, 1, 5000));
    CHECK(msg_is(&b.msgs[0], "x", "while-down", 10));
    CHECK(run_until(loop, p_queue_empty, a.bus, 2000));
    ups_arg_t ua = {&a, 2};
    CHECK(run_until(loop, p_ups, &ua, 5000));
    CHECK_STR(a.hist, "UDU");

    /* only A's command connection is cut (Redis stays up, B hears everything): what A
     * publishes while it reconnects is sent once it is back */
    char name[80];
    snprintf(name, sizeof name, "name=chatd-%s-cmd ", a.bus->instance);
    redisReply *r = raw("CLIENT LIST");
    CHECK(r && r->type == REDIS_REPLY_STRING);
    const char *line = strstr(r->str, name);
    while (line && line > r->str && line[-1] != '\n') line--;
    long long id = line && strncmp(line, "id=", 3) == 0 ? atoll(line + 3) : -1;
    freeReplyObject(r);
    CHECK(id > 0);
    r = raw("CLIENT KILL ID %lld", id);
    CHECK(r && r->type == REDIS_REPLY_INTEGER && r->integer == 1);
    freeReplyObject(r);
    bool cut = false;
    for (int i = 0; i < 400 && !cut; i++) {
        uv_run(loop, UV_RUN_NOWAIT);
        cut = bus_heartbeat(a.bus, &self, 3000) == CHAT_EIO;
        if (!cut) usleep(2000);
    }
    CHECK(cut);
    CHECK_INT(bus_publish(a.bus, "x", "partial-cut", 11), 0);
    CHECK(wait_msgs(loop, &b, 2, 5000));
    CHECK(msg_is(&b.msgs[1], "x", "partial-cut", 11));
    CHECK_STR(b.hist, "UDU"); /* B's subscriber connection never noticed */

    CHECK(peer_close(&a, loop));
    CHECK(peer_close(&b, loop));
    CHECK(loop_finish(loop));
}

/* Redis stops answering (SIGSTOP: the sockets stay open, nothing is read). With
 * commands outstanding and no reply for the stall time, A drops both connections, reports
 * down, and once Redis answers again resends what it published meanwhile. */
static void test_stall(void) {
    uv_loop_t *loop = loop_new();
    peer_t a, b;
    CHECK(loop);
    CHECK_INT(peer_open(&a, loop, redis_url), 0);
    CHECK_INT(peer_open(&b, loop, redis_url), 0);
    CHECK(run_until(loop, p_up, &a, 3000));
    CHECK(run_until(loop, p_up, &b, 3000));
    CHECK(run_until(loop, p_cmd, &a, 3000));
    CHECK_INT(bus_subscribe(b.bus, "s"), 0);
    CHECK(wait_numsub(loop, "chat:s", 1, 2000));
    bus_redis__set_limits(a.bus, 0, 0, 300);
    bus_node_t self = {.connections = 1};
    snprintf(self.id, sizeof self.id, "%s", a.bus->instance);

    CHECK_INT(kill(redis_pids[0], SIGSTOP), 0);
    CHECK_INT(bus_publish(a.bus, "s", "during-stall", 12), 0);
    bool down = false;
    for (int i = 0; i < 60 && !down; i++) { /* the server's heartbeat timer, sped up */
        bus_heartbeat(a.bus, &self, 3000);
        down = run_until(loop, p_down, &a, 50);
    }
    int rc = kill(redis_pids[0], SIGCONT);
    CHECK(down);
    CHECK_INT(rc, 0);
    CHECK_STR(a.hist, "UD");
    CHECK_STR(b.hist, "U"); /* B sent nothing, so it had nothing to miss */

    ups_arg_t ua = {&a, 2};
    CHECK(run_until(loop, p_ups, &ua, 8000));
    CHECK(wait_msgs(loop, &b, 1, 5000)); /* maybe twice: sent on both connections */
    CHECK(msg_is(&b.msgs[0], "s", "during-stall", 12));
    CHECK(run_until(loop, p_queue_empty, a.bus, 3000));
    CHECK(peer_close(&a, loop));
    CHECK(peer_close(&b, loop));
    CHECK(loop_finish(loop));
}

/* While the command connection is down the queue keeps the newest max_msgs publishes. */
static void test_queue_bound(void) {
    uv_loop_t *loop = loop_new();
    peer_t a, b;
    CHECK(loop);
    CHECK_INT(peer_open(&a, loop, redis_url), 0);
    bus_redis__hold_cmd(a.bus, true); /* before the first loop turn: never connects */
    bus_redis__set_limits(a.bus, 5, 0, 0);
    CHECK_INT(peer_open(&b, loop, redis_url), 0);
    CHECK(run_until(loop, p_up, &b, 3000));
    CHECK_INT(bus_subscribe(b.bus, "q"), 0);
    CHECK(wait_numsub(loop, "chat:q", 1, 2000));
    CHECK(run_until(loop, p_up, &a, 3000)); /* A's subscriber side is up all the same */
    char buf[16];
    for (int i = 0; i < 8; i++) {
        snprintf(buf, sizeof buf, "q%d", i);
        CHECK_INT(bus_publish(a.bus, "q", buf, 2), 0);
    }
    CHECK_INT(bus_redis__queued(a.bus), 5);
    CHECK(bus_redis__queue_ok(a.bus));
    run_for(loop, 100);
    CHECK_INT(b.n, 0);
    bus_redis__hold_cmd(a.bus, false);
    CHECK(wait_msgs(loop, &b, 5, 3000));
    run_for(loop, 100);
    CHECK_INT(b.n, 5);
    for (int i = 0; i < 5; i++) {
        snprintf(buf, sizeof buf, "q%d", i + 3);
        CHECK(msg_is(&b.msgs[i], "q", buf, 2));
    }

    /* close sends what was queued before it */
    bus_redis__set_limits(a.bus, 100000, 0, 0);
    for (int i = 0; i < 100; i++) {
        snprintf(buf, sizeof buf, "c%02d", i);
        CHECK_INT(bus_publish(a.bus, "q", buf, 3), 0);
    }
    CHECK(peer_close(&a, loop));
    CHECK(wait_msgs(loop, &b, 105, 3000));
    for (int i = 0; i < 100; i++) {
        snprintf(buf, sizeof buf, "c%02d", i);
        CHECK(msg_is(&b.msgs[5 + i], "q", buf, 3));
    }
    CHECK(peer_close(&b, loop));
    CHECK(loop_finish(loop));
}

/* No Redis at all: the bus opens, reports down once, refuses discovery with CHAT_EIO,
 * queues publishes, and closes. */
static void test_close_disconnected(void) {
    uv_loop_t *loop = loop_new();
    peer_t a;
    char url[64];
    CHECK(loop);
    int port = free_port();
    CHECK(port > 0);
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", port);
    CHECK_INT(peer_open(&a, loop, url), 0);
    CHECK(run_until(loop, p_down, &a, 2000)); /* a refused connect is seen at once */
    run_for(loop, 400);
    CHECK_STR(a.hist, "D");
    bus_node_t self = {.connections = 0};
    snprintf(self.id, sizeof self.id, "%s", a.bus->instance);
    list_ans_t ans = {0};
    CHECK_INT(bus_heartbeat(a.bus, &self, 3000), CHAT_EIO);
    CHECK_INT(bus_deregister(a.bus, self.id), CHAT_EIO);
    CHECK_INT(bus_list_nodes(a.bus, on_list, &ans), CHAT_EIO);
    CHECK_INT(bus_publish(a.bus, "x", "lost", 4), 0);
    CHECK_INT(bus_subscribe(a.bus, "x"), 0);
    uint64_t t0 = uv_now(loop);
    CHECK(peer_close(&a, loop));
    CHECK(uv_now(loop) - t0 < 1500);
    CHECK_INT(ans.calls, 0);

    /* closed before the loop ever ran */
    CHECK_INT(peer_open(&a, loop, url), 0);
    CHECK(peer_close(&a, loop));
    CHECK_STR(a.hist, ""); /* no callback once closing */

    /* a host name (resolved on the thread pool), closed while connecting or up */
    snprintf(url, sizeof url, "redis://localhost:%d", redis_port);
    CHECK_INT(peer_open(&a, loop, url), 0);
    CHECK(run_until(loop, p_up, &a, 3000));
    CHECK(peer_close(&a, loop));
    CHECK_INT(peer_open(&a, loop, url), 0);
    run_for(loop, 1);
    CHECK(peer_close(&a, loop));
    CHECK(loop_finish(loop));
}

/* AUTH (with and without a user name) and SELECT on every connection. */
static void test_auth_select(void) {
    uv_loop_t *loop = loop_new();
    peer_t a, b, c;
    char url[128];
    CHECK(loop);
    int port = free_port();
    CHECK(port > 0);
    CHECK(redis_start(1, port, "--requirepass", "s3cr:et w", "s3cr:et w"));
    snprintf(url, sizeof url, "redis://:s3cr%%3Aet%%20w@127.0.0.1:%d/3", port);
    CHECK_INT(peer_open(&a, loop, url), 0);
    snprintf(url, sizeof url, "redis://default:s3cr%%3aet%%20w@127.0.0.1:%d/3", port);
    CHECK_INT(peer_open(&b, loop, url), 0);
    CHECK(run_until(loop, p_up, &a, 3000));
    CHECK(run_until(loop, p_up, &b, 3000));
    CHECK(run_until(loop, p_cmd, &a, 3000));
    CHECK_INT(bus_subscribe(b.bus, "s"), 0);
    run_for(loop, 100);
    CHECK_INT(bus_publish(a.bus, "s", "authed", 6), 0);
    CHECK(wait_msgs(loop, &b, 1, 2000));
    CHECK(msg_is(&b.msgs[0], "s", "authed", 6));

    bus_node_t self = {.connections = 2};
    snprintf(self.id, sizeof self.id, "%s", a.bus->instance);
    CHECK_INT(bus_heartbeat(a.bus, &self, 5000), 0);
    run_for(loop, 100);
    redisContext *rc = raw_connect(port);
    CHECK(rc);
    redisReply *r = redisCommand(rc, "AUTH %s", "s3cr:et w");
    CHECK(r && r->type == REDIS_REPLY_STATUS);
    freeReplyObject(r);
    r = redisCommand(rc, "EXISTS chat:node:%s", self.id); /* not in db 0 */
    CHECK(r && r->type == REDIS_REPLY_INTEGER && r->integer == 0);
    freeReplyObject(r);
    r = redisCommand(rc, "SELECT 3");
    freeReplyObject(r);
    r = redisCommand(rc, "EXISTS chat:node:%s", self.id);
    CHECK(r && r->type == REDIS_REPLY_INTEGER && r->integer == 1);
    freeReplyObject(r);
    redisFree(rc);

    /* a wrong password never comes up */
    snprintf(url, sizeof url, "redis://:wrong@127.0.0.1:%d", port);
    CHECK_INT(peer_open(&c, loop, url), 0);
    CHECK(run_until(loop, p_down, &c, 3000));
    run_for(loop, 300);
    CHECK_INT(c.ups, 0);
    CHECK_INT(bus_heartbeat(c.bus, &self, 5000), CHAT_EIO);
    CHECK(peer_close(&c, loop));
    /* nor does a missing one */
    snprintf(url, sizeof url, "redis://127.0.0.1:%d", port);
    CHECK_INT(peer_open(&c, loop, url), 0);
    CHECK(run_until(loop, p_down, &c, 3000));
    CHECK_INT(c.ups, 0);
    CHECK(peer_close(&c, loop));

    CHECK(peer_close(&a, loop));
    CHECK(peer_close(&b, loop));
    CHECK(loop_finish(loop));
    redis_kill(1);
}

int main(void) {
    signal(SIGPIPE, SIG_IGN);
    signal(SIGALRM, on_alarm);
    alarm(240);
    log_set_level(CHAT_LOG_ERROR + 1); /* quiet: the tests provoke every failure on purpose */
    if (getenv("TEST_VERBOSE")) log_set_level(CHAT_LOG_DEBUG);
    snprintf(tmpdir, sizeof tmpdir, "/tmp/test_bus_redis_XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    atexit(cleanup);
    redis_port = free_port();
    snprintf(redis_url, sizeof redis_url, "redis://127.0.0.1:%d", redis_port);
    if (redis_port <= 0 || !redis_start(0, redis_port, NULL, NULL, NULL)) {
        fprintf(stderr, "test_bus_redis: cannot start %s\n", REDIS_BIN);
        return 1; /* a failure, not a skip */
    }
    RUN(test_url_parse);
    RUN(test_pubsub);
    RUN(test_nodes);
    RUN(test_presence);
    RUN(test_lease);
    RUN(test_queue_bound);
    RUN(test_restart);
    RUN(test_stall);
    RUN(test_close_disconnected);
    RUN(test_auth_select);
    return test_summary("test_bus_redis");
}
