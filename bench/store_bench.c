/* store_bench: durable appends per second and history-page latency of one message store,
 * driven through store.h exactly as chatd drives it (one loop, callbacks on it).
 *
 *   store_bench --store URL [--appends N] [--inflight W] [--chats K] [--client-ids]
 *               [--pages P] [--page-size L] [--warmup N] [--migrate]
 *
 * Phase 0, warm-up (--warmup N, default 0): N appends and N/10 pages on other chats, not
 * measured; a JVM serves its first requests interpreted, so Cassandra needs this to be
 * measured at its working speed (SQLite does not care).
 * Phase 1, appends: N appends spread over K chats with W in flight at any moment (a new one
 * is submitted as each completes). A completion is a durable acknowledgement (SQLite: after
 * the fsync'd commit of its group; Cassandra: after the write was acknowledged at the
 * configured consistency). Reports appends/s and the per-append latency p50/p99.
 * Phase 2, history: P HISTORY requests of L messages, one at a time, each before a random
 * message of the busiest chat (so pages start anywhere, not only at the cached newest end).
 * Reports p50/p99 of their latency.
 *
 * The one idea: measure what a user waits for. An append's latency runs from submit to the
 * durable callback, a page's from submit to the callback with the rows, both on the same
 * loop a server would use; nothing is batched by the benchmark that chatd would not batch.
 *
 * Output: human lines on stderr, one JSON object on stdout.
 */
#include "store/store.h"

#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct bench {
    uv_loop_t *loop;
    store_t *store;
    id_gen_t ids;
    int n, inflight, chats, pages, page_size, warmup;
    bool client_ids;
    int submitted, done, failed, ok;
    uint64_t *lat_ns; /* per append */
    uint64_t *t_sub;  /* submit time per slot */
    store_req_t *reqs;
    char (*chat_names)[32];
    char (*cids)[32];
    uint64_t *chat0_ids; /* ids appended to chat 0, for history starting points */
    int n_chat0;
    uint64_t t0, t1;
} bench_t;

static uint64_t now_ns(void) { return uv_hrtime(); }

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct_ms(uint64_t *v, int n, double p) {
    if (n <= 0) return 0;
    int i = (int)(p * (n - 1) + 0.5);
    return (double)v[i] / 1e6;
}

static void submit_append(bench_t *b, int slot);

static void on_append(store_req_t *r) {
    bench_t *b = r->data;
    int slot = (int)(r - b->reqs);
    uint64_t t = now_ns();
    if (r->status) {
        if (b->failed++ < 5) fprintf(stderr, "append failed: %s\n", chat_strerror(r->status));
    } else {
        b->lat_ns[b->ok++] = t - b->t_sub[slot];
        if (r->chat_id == b->chat_names[0] && b->n_chat0 < b->n) {
            b->chat0_ids[b->n_chat0++] = r->msg.id;
        }
    }
    b->done++;
    store_req_cleanup(r);
    if (b->submitted < b->n) submit_append(b, slot);
}

static void submit_append(bench_t *b, int slot) {
    int i = b->submitted++;
    store_req_t *r = &b->reqs[slot];
    int64_t at;
    uint64_t id = id_next(&b->ids, &at);
    static const char text[] = "a benchmark message of about a hundred bytes, which is what a chat "
                               "line usually is, give or take";
    *r = (store_req_t){
        .op = STORE_APPEND,
        .chat_id = b->chat_names[i % b->chats],
        .user = "bench",
        .text = text,
        .id = id,
        .at = at,
        .data = b,
        .cb = on_append,
    };
    if (b->client_ids) {
        snprintf(b->cids[slot], sizeof b->cids[slot], "b%d", i);
        r->client_id = b->cids[slot];
    }
    b->t_sub[slot] = now_ns();
    int rc = store_submit(b->store, r);
    if (rc) {
        fprintf(stderr, "submit failed: %s\n", chat_strerror(rc));
        exit(1);
    }
}

typedef struct page_state {
    bool done;
    int status;
    size_t n;
} page_state_t;

static void on_page(store_req_t *r) {
    page_state_t *p = r->data;
    p->done = true;
    p->status = r->status;
    p->n = r->n_msgs;
}

static void on_closed(void *arg) { *(bool *)arg = true; }

static void usage(void) {
    fputs("usage: store_bench --store URL [--appends N] [--inflight W] [--chats K] "
          "[--client-ids] [--pages P] [--page-size L] [--warmup N] [--migrate]\n",
          stderr);
    exit(2);
}

int main(int argc, char **argv) {
    bench_t b = {.n = 50000, .inflight = 256, .chats = 100, .pages = 2000, .page_size = 50};
    const char *url = NULL;
    bool migrate = false;
    static const struct option opts[] = {
        {"store", required_argument, 0, 's'},     {"appends", required_argument, 0, 'n'},
        {"inflight", required_argument, 0, 'w'},  {"chats", required_argument, 0, 'k'},
        {"client-ids", no_argument, 0, 'c'},      {"pages", required_argument, 0, 'p'},
        {"page-size", required_argument, 0, 'l'}, {"migrate", no_argument, 0, 'm'},
        {"warmup", required_argument, 0, 'u'},    {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (c) {
        case 's': url = optarg; break;
        case 'n': b.n = atoi(optarg); break;
        case 'w': b.inflight = atoi(optarg); break;
        case 'k': b.chats = atoi(optarg); break;
        case 'c': b.client_ids = true; break;
        case 'p': b.pages = atoi(optarg); break;
        case 'l': b.page_size = atoi(optarg); break;
        case 'm': migrate = true; break;
        case 'u': b.warmup = atoi(optarg); break;
        default: usage();
        }
    }
    if (!url || b.n < 1 || b.inflight < 1 || b.chats < 1 || b.pages < 0 || b.page_size < 1 ||
        b.warmup < 0) {
        usage();
    }
    if (b.inflight > b.n) b.inflight = b.n;
    log_set_level(CHAT_LOG_WARN);
    char err[512] = "";
    store_t *s = NULL;
    if (migrate) {
        if (store_open(&s, NULL, url, err, sizeof err) || store_migrate(s)) {
            fprintf(stderr, "migrate %s failed: %s\n", url, err);
            return 1;
        }
        store_close(s, NULL, NULL);
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    b.loop = &loop;
    if (store_open(&b.store, &loop, url, err, sizeof err)) {
        fprintf(stderr, "open %s failed: %s\n", url, err);
        return 1;
    }
    id_gen_init(&b.ids, 1);
    int most = b.n > b.warmup ? b.n : b.warmup;
    b.lat_ns = calloc((size_t)most, sizeof *b.lat_ns);
    b.t_sub = calloc((size_t)b.inflight, sizeof *b.t_sub);
    b.reqs = calloc((size_t)b.inflight, sizeof *b.reqs);
    b.cids = calloc((size_t)b.inflight, sizeof *b.cids);
    b.chat_names = calloc((size_t)b.chats, sizeof *b.chat_names);
    b.chat0_ids = calloc((size_t)most, sizeof *b.chat0_ids);
    /* a run-unique prefix, so repeated runs on one store do not collide on client ids */
    unsigned run = (unsigned)(time(NULL) ^ (uv_hrtime() >> 10));
    for (int i = 0; i < b.chats; i++) {
        snprintf(b.chat_names[i], sizeof b.chat_names[i], "bench-%x-%d", run, i);
    }

    /* phase 0: warm-up on other chats, the same way as the measured phases */
    if (b.warmup > 0) {
        int n = b.n;
        for (int i = 0; i < b.chats; i++) {
            snprintf(b.chat_names[i], sizeof b.chat_names[i], "warm-%x-%d", run, i);
        }
        b.n = b.warmup;
        int w = b.inflight < b.n ? b.inflight : b.n;
        for (int i = 0; i < w; i++) submit_append(&b, i);
        while (b.done < b.n) uv_run(&loop, UV_RUN_ONCE);
        for (int i = 0; i < b.warmup / 10 && b.n_chat0 > 0; i++) {
            page_state_t ps = {0};
            store_req_t r = {.op = STORE_HISTORY,
                             .chat_id = b.chat_names[0],
                             .id = b.chat0_ids[rand() % b.n_chat0] + 1,
                             .limit = b.page_size + 1,
                             .data = &ps,
                             .cb = on_page};
            if (store_submit(b.store, &r)) break;
            while (!ps.done) uv_run(&loop, UV_RUN_ONCE);
            store_req_cleanup(&r);
        }
        fprintf(stderr, "warm-up: %d appends, %d pages (%d failed)\n", b.done, b.warmup / 10,
                b.failed);
        b.n = n;
        b.submitted = b.done = b.failed = b.ok = b.n_chat0 = 0;
        for (int i = 0; i < b.chats; i++) {
            snprintf(b.chat_names[i], sizeof b.chat_names[i], "bench-%x-%d", run, i);
        }
    }

    /* phase 1: appends */
    b.t0 = now_ns();
    for (int i = 0; i < b.inflight; i++) submit_append(&b, i);
    while (b.done < b.n) uv_run(&loop, UV_RUN_ONCE);
    b.t1 = now_ns();
    int ok = b.ok;
    double secs = (double)(b.t1 - b.t0) / 1e9;
    qsort(b.lat_ns, (size_t)ok, sizeof *b.lat_ns, cmp_u64);
    double rate = ok / secs;
    fprintf(stderr,
            "appends: %d ok, %d failed in %.2f s: %.0f/s; latency p50 %.2f ms p99 %.2f ms\n", ok,
            b.failed, secs, rate, pct_ms(b.lat_ns, ok, 0.5), pct_ms(b.lat_ns, ok, 0.99));

    /* phase 2: history pages, one at a time, before random ids of chat 0 */
    uint64_t *plat = calloc((size_t)(b.pages ? b.pages : 1), sizeof *plat);
    srand(42);
    int pages_ok = 0;
    size_t rows = 0;
    for (int i = 0; i < b.pages && b.n_chat0 > 0; i++) {
        page_state_t ps = {0};
        store_req_t r = {
            .op = STORE_HISTORY,
            .chat_id = b.chat_names[0],
            .id = b.chat0_ids[rand() % b.n_chat0] + 1,
            .limit = b.page_size + 1, /* as chatd asks: one more, to know if a page follows */
            .data = &ps,
            .cb = on_page,
        };
        uint64_t t = now_ns();
        if (store_submit(b.store, &r)) break;
        while (!ps.done) uv_run(&loop, UV_RUN_ONCE);
        if (ps.status == 0) {
            plat[pages_ok++] = now_ns() - t;
            rows += ps.n;
        }
        store_req_cleanup(&r);
    }
    qsort(plat, (size_t)pages_ok, sizeof *plat, cmp_u64);
    fprintf(stderr,
            "history: %d pages of up to %d (%.1f rows on average): p50 %.2f ms p99 %.2f ms\n",
            pages_ok, b.page_size + 1, pages_ok ? (double)rows / pages_ok : 0.0,
            pct_ms(plat, pages_ok, 0.5), pct_ms(plat, pages_ok, 0.99));

    const char *backend = strncmp(url, "cassandra:", 10) == 0 ? "cassandra" : "sqlite";
    printf("{\"backend\":\"%s\",\"warmup\":%d,\"appends\":%d,\"failed\":%d,\"inflight\":%d,"
           "\"chats\":%d,\"client_ids\":%s,\"appends_per_s\":%.0f,\"append_p50_ms\":%.3f,"
           "\"append_p99_ms\":%.3f,\"pages\":%d,\"page_size\":%d,\"page_p50_ms\":%.3f,"
           "\"page_p99_ms\":%.3f}\n",
           backend, b.warmup, ok, b.failed, b.inflight, b.chats, b.client_ids ? "true" : "false",
           rate, pct_ms(b.lat_ns, ok, 0.5), pct_ms(b.lat_ns, ok, 0.99), pages_ok, b.page_size,
           pct_ms(plat, pages_ok, 0.5), pct_ms(plat, pages_ok, 0.99));

    bool closed = false;
    store_close(b.store, on_closed, &closed);
    while (!closed) uv_run(&loop, UV_RUN_ONCE);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    free(plat);
    free(b.lat_ns);
    free(b.t_sub);
    free(b.reqs);
    free(b.cids);
    free(b.chat_names);
    free(b.chat0_ids);
    return b.failed ? 1 : 0;
}
