/* indexer: consume, index in bulk, commit; /metrics on a thread of its own (indexer.h).
 *
 * The one idea: a batch's offsets are committed only when every record of it is settled:
 * indexed, refused by the engine as older than what it holds (409: a replay), or, when it can
 * never be indexed (bad JSON, a field of the wrong type), copied to the dead-letter topic and
 * acknowledged by Kafka there. Anything else (the engine away, overloaded, answering 5xx) is
 * retried with backoff for as long as it takes: the lag grows, nothing is skipped, and a
 * crash at any point only means the uncommitted records are indexed again, which the
 * external versions make a no-op.
 *
 * The consumer never polls while a batch is being retried, so max.poll.interval.ms is set to
 * a day: an engine outage must not count as a stuck consumer (heartbeats go on from
 * librdkafka's own thread, so the group keeps us).
 */
#include "indexer.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <librdkafka/rdkafka.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "core/core.h"
#include "search/search_os.h"
#include "stream/stream.h"

#define BACKOFF_MIN_MS 100
#define BACKOFF_MAX_MS 5000
#define HTTP_TIMEOUT_S 30L
#define MAX_PARTITIONS 1024
/* bulk latency histogram buckets, seconds */
static const double LAT_BUCKETS[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};
#define N_BUCKETS (sizeof LAT_BUCKETS / sizeof LAT_BUCKETS[0])

typedef struct metrics {
    _Atomic uint64_t records, indexed, stale, dead, bulks, bulk_errors, item_retries, commit_errors,
        dlq_errors;
    _Atomic uint64_t lat_count, lat_sum_us, lat_bucket[N_BUCKETS];
} metrics_t;

typedef struct ix {
    const indexer_opts_t *o;
    volatile sig_atomic_t *stop;
    char base[300];
    char alias[SEARCH_OS_ALIAS_MAX + 1];
    const char *topic;
    char dlq[256];
    rd_kafka_t *rk;  /* the consumer */
    rd_kafka_t *dlp; /* the dead-letter producer */
    CURL *curl;
    metrics_t m;
    int listen_fd;
    pthread_t mthread;
    bool mthread_on;
    _Atomic int dlq_pending, dlq_failed;
    bool fatal; /* stopped by an error, not a signal: exit status 1 */
    /* Indices known to exist, be searchable and carry the alias (ensure_index): a month's
     * index each, so a handful; the oldest name is forgotten when it is full. */
    char ready[16][SEARCH_OS_ALIAS_MAX + 16];
    unsigned n_ready, next_ready;
} ix_t;

/* ---- time ------------------------------------------------------------------------------ */

static int64_t mono_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Sleep ms, waking early on a stop. */
static void nap(ix_t *ix, int ms) {
    int64_t end = mono_ms() + ms;
    while (!*ix->stop && mono_ms() < end) {
        struct timespec ts = {0, 20 * 1000000};
        nanosleep(&ts, NULL);
    }
}

/* ---- HTTP to the engine ---------------------------------------------------------------- */

/* curl's write callback: the body into an sbuf_t (0 on no memory: curl aborts). */
static size_t on_body(char *data, size_t size, size_t nmemb, void *arg) {
    sbuf_t *b = arg;
    size_t n = size * nmemb;
    sbuf_put(b, data, n);
    return b->oom ? 0 : n;
}

/* One request; the HTTP status (0: no answer, errbuf says why) and the body in *resp (the
 * caller frees it: sbuf_free). */
static long http_call(ix_t *ix, const char *method, const char *path, const char *ctype,
                      const char *data, size_t len, sbuf_t *resp, char *errbuf) {
    char url[600];
    snprintf(url, sizeof url, "%s%s", ix->base, path);
    CURL *c = ix->curl;
    curl_easy_reset(c);
    struct curl_slist *h = NULL;
    char ct[64];
    snprintf(ct, sizeof ct, "Content-Type: %s", ctype);
    h = curl_slist_append(h, ct);
    /* no "Expect: 100-continue" for a large body: the engine need not answer it, and curl
     * would wait a second for it on every bulk */
    struct curl_slist *h2 = h ? curl_slist_append(h, "Expect:") : NULL;
    if (h2) h = h2;
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, HTTP_TIMEOUT_S);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 5L);
    curl_easy_setopt(c, CURLOPT_PROXY, "");
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, resp);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
    if (data) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, data);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    }
    errbuf[0] = '\0';
    long status = 0;
    CURLcode rc = curl_easy_perform(c);
    if (rc == CURLE_OK) curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    else if (!errbuf[0]) snprintf(errbuf, CURL_ERROR_SIZE, "%s", curl_easy_strerror(rc));
    curl_slist_free_all(h);
    return status;
}

/* PUT the index template, retrying while the engine is away. 0, or 1: refused for good. */
static int install_template(ix_t *ix) {
    sbuf_t t = {0};
    search_os_template(&t, ix->alias, ix->o->replicas);
    if (t.oom) return 1;
    char path[128], err[CURL_ERROR_SIZE];
    snprintf(path, sizeof path, "/_index_template/%s", ix->alias);
    int backoff = BACKOFF_MIN_MS;
    int rc = 1;
    while (!*ix->stop) {
        sbuf_t resp = {0};
        long st = http_call(ix, "PUT", path, "application/json", t.p, t.len, &resp, err);
        if (st == 200) {
            log_info("template_installed name=%s pattern=%s-*", ix->alias, ix->alias);
            rc = 0;
        } else if (st >= 400 && st < 500 && st != 408 && st != 429) {
            log_error("template_refused status=%ld body=%s", st, LOG_STR(resp.p));
        } else {
            log_warn("template_retry status=%ld err=%s backoff_ms=%d", st, LOG_STR(err), backoff);
            sbuf_free(&resp);
            nap(ix, backoff);
            backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
            continue;
        }
        sbuf_free(&resp);
        break;
    }
    sbuf_free(&t);
    return *ix->stop ? 1 : rc;
}

/* ---- the month's index --------------------------------------------------------------- */

/* The template gives an index its settings but not the alias: an index created by the first
 * bulk into it would join the alias before its shard could answer, and searches in that
 * moment (about 130 ms here, each month) fail with "all shards failed". So an index is created
 * here first (its PUT returns once the primary shard is active), waited on if another indexer
 * was creating it, and only then added to the alias. Retried while the engine is away;
 * false when stopped. */
static bool ensure_index(ix_t *ix, const char *index) {
    for (unsigned i = 0; i < ix->n_ready; i++)
        if (strcmp(ix->ready[i], index) == 0) return true;
    char path[SEARCH_OS_ALIAS_MAX + 128], err[CURL_ERROR_SIZE], body[2 * SEARCH_OS_ALIAS_MAX + 128];
    int backoff = BACKOFF_MIN_MS;
    while (!*ix->stop) {
        sbuf_t resp = {0};
        snprintf(path, sizeof path, "/%s", index);
        long st = http_call(ix, "PUT", path, "application/json", "{}", 2, &resp, err);
        bool ok = st == 200 || (st == 400 && resp.p && strstr(resp.p, "resource_already_exists"));
        sbuf_free(&resp);
        if (ok) {
            snprintf(path, sizeof path, "/_cluster/health/%s?wait_for_status=yellow&timeout=30s",
                     index);
            st = http_call(ix, "GET", path, "application/json", NULL, 0, &resp, err);
            ok = st == 200 && resp.p && !strstr(resp.p, "\"timed_out\":true");
            sbuf_free(&resp);
        }
        if (ok) {
            snprintf(body, sizeof body,
                     "{\"actions\":[{\"add\":{\"index\":\"%s\",\"alias\":\"%s\"}}]}", index,
                     ix->alias);
            st = http_call(ix, "POST", "/_aliases", "application/json", body, strlen(body), &resp,
                           err);
            ok = st == 200;
            sbuf_free(&resp);
        }
        if (ok) {
            log_info("index_ready index=%s alias=%s", index, ix->alias);
            snprintf(ix->ready[ix->next_ready], sizeof ix->ready[0], "%s", index);
            ix->next_ready = (ix->next_ready + 1) % 16;
            if (ix->n_ready < 16) ix->n_ready++;
            return true;
        }
        log_warn("index_retry index=%s status=%ld err=%s backoff_ms=%d", index, st, LOG_STR(err),
                 backoff);
        nap(ix, backoff);
        backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
    }
    return false;
}

/* ---- the dead-letter topic ------------------------------------------------------------- */

static void on_dlq_delivered(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque) {
    ix_t *ix = opaque;
    if (m->err) {
        log_error("dlq_delivery_failed err=%s", rd_kafka_err2str(m->err));
        atomic_store(&ix->dlq_failed, 1);
    }
    atomic_fetch_sub(&ix->dlq_pending, 1);
}

/* Copy a record to the dead-letter topic with why it was refused, and wait until Kafka has
 * it (retrying for ever: it must be there before the offset is committed). */
static void dead_letter(ix_t *ix, const rd_kafka_message_t *m, const char *why) {
    for (;;) {
        rd_kafka_headers_t *h = NULL;
        const rd_kafka_headers_t *orig = NULL;
        if (rd_kafka_message_headers(m, (rd_kafka_headers_t **)&orig) == 0 && orig)
            h = rd_kafka_headers_copy(orig);
        else h = rd_kafka_headers_new(3);
        char where[64];
        snprintf(where, sizeof where, "%s:%" PRId32 ":%" PRId64, ix->topic, m->partition,
                 m->offset);
        rd_kafka_header_add(h, "dlq_reason", -1, why, -1);
        rd_kafka_header_add(h, "dlq_source", -1, where, -1);
        atomic_store(&ix->dlq_failed, 0);
        atomic_fetch_add(&ix->dlq_pending, 1);
        rd_kafka_resp_err_t err = rd_kafka_producev(
            ix->dlp, RD_KAFKA_V_TOPIC(ix->dlq), RD_KAFKA_V_KEY(m->key, m->key_len),
            RD_KAFKA_V_VALUE(m->payload, m->len), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
            RD_KAFKA_V_HEADERS(h), RD_KAFKA_V_END);
        if (err) {
            rd_kafka_headers_destroy(h);
            atomic_fetch_sub(&ix->dlq_pending, 1);
            atomic_store(&ix->dlq_failed, 1);
        }
        while (!err && atomic_load(&ix->dlq_pending) > 0) rd_kafka_poll(ix->dlp, 100);
        if (!atomic_load(&ix->dlq_failed)) break;
        ix->m.dlq_errors++;
        if (*ix->stop) return;
        nap(ix, 1000);
    }
    ix->m.dead++;
    log_warn("dead_letter topic=%s partition=%" PRId32 " offset=%" PRId64 " reason=%s", ix->dlq,
             m->partition, m->offset, LOG_STR(why));
}

/* ---- a batch --------------------------------------------------------------------------- */

typedef struct rec {
    rd_kafka_message_t *m;
    bool settled;
    size_t off, len; /* its two lines in the batch's NDJSON */
} rec_t;

static uint64_t header_u64(const rd_kafka_message_t *m, const char *name) {
    rd_kafka_headers_t *h = NULL;
    const void *v;
    size_t n;
    if (rd_kafka_message_headers(m, &h) || !h || rd_kafka_header_get_last(h, name, &v, &n) || !v ||
        n == 0 || n > 20)
        return 0;
    uint64_t out = 0;
    return id_parse(v, n, &out) == 0 ? out : 0;
}

static void observe_latency(ix_t *ix, int64_t us) {
    ix->m.lat_count++;
    ix->m.lat_sum_us += (uint64_t)us;
    for (size_t i = 0; i < N_BUCKETS; i++)
        if ((double)us / 1e6 <= LAT_BUCKETS[i]) ix->m.lat_bucket[i]++;
}

/* POST the unsettled records; settle what the answer settles. true when all are settled. */
static bool bulk_once(ix_t *ix, rec_t *r, size_t n, const sbuf_t *lines, char *why, size_t whylen) {
    sbuf_t body = {0};
    size_t idx[INDEXER_DEFAULT_BATCH * 10];
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (r[i].settled) continue;
        sbuf_put(&body, lines->p + r[i].off, r[i].len);
        idx[k++] = i;
    }
    if (k == 0) {
        sbuf_free(&body);
        return true;
    }
    if (body.oom) {
        snprintf(why, whylen, "out of memory");
        sbuf_free(&body);
        return false;
    }
    char err[CURL_ERROR_SIZE];
    sbuf_t resp = {0};
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    long st = http_call(ix, "POST", "/_bulk", "application/x-ndjson", body.p, body.len, &resp, err);
    clock_gettime(CLOCK_MONOTONIC, &b);
    sbuf_free(&body);
    ix->m.bulks++;
    if (st != 200) {
        ix->m.bulk_errors++;
        snprintf(why, whylen, "status=%ld err=%.180s", st, st ? "http" : err);
        sbuf_free(&resp);
        return false;
    }
    observe_latency(ix, (int64_t)(b.tv_sec - a.tv_sec) * 1000000 + (b.tv_nsec - a.tv_nsec) / 1000);
    json_error_t jerr;
    json_t *root = json_loadb(resp.p ? resp.p : "", resp.len, 0, &jerr);
    sbuf_free(&resp);
    json_t *items = json_object_get(root, "items");
    if (json_array_size(items) != k) {
        ix->m.bulk_errors++;
        snprintf(why, whylen, "an answer without one item per record");
        json_decref(root);
        return false;
    }
    bool all = true;
    for (size_t j = 0; j < k; j++) {
        rec_t *rc = &r[idx[j]];
        json_t *it = json_object_get(json_array_get(items, j), "index");
        json_int_t status = json_integer_value(json_object_get(it, "status"));
        if (status == 200 || status == 201) {
            ix->m.indexed++;
            rc->settled = true;
        } else if (status == 409) {
            ix->m.stale++; /* the index holds this version or a newer one */
            rc->settled = true;
        } else if (status == 400 || status == 404 || status == 413) {
            /* a document the engine will never take (a mapping conflict, a value too big):
             * retrying cannot help, and it must not hold back the partition */
            json_t *e = json_object_get(json_object_get(it, "error"), "type");
            char reason[160];
            snprintf(reason, sizeof reason, "engine refused: %ld %s", (long)status,
                     json_is_string(e) ? json_string_value(e) : "");
            dead_letter(ix, rc->m, reason);
            rc->settled = !*ix->stop;
            all = all && rc->settled;
        } else {
            ix->m.item_retries++;
            snprintf(why, whylen, "item status=%ld", (long)status);
            all = false;
        }
    }
    json_decref(root);
    return all;
}

static void commit(ix_t *ix, rec_t *r, size_t n) {
    rd_kafka_topic_partition_list_t *l = rd_kafka_topic_partition_list_new((int)n);
    for (size_t i = 0; i < n; i++) {
        rd_kafka_message_t *m = r[i].m;
        const char *t = rd_kafka_topic_name(m->rkt);
        rd_kafka_topic_partition_t *p = rd_kafka_topic_partition_list_find(l, t, m->partition);
        if (!p) p = rd_kafka_topic_partition_list_add(l, t, m->partition);
        if (m->offset + 1 > p->offset) p->offset = m->offset + 1;
    }
    rd_kafka_resp_err_t err = rd_kafka_commit(ix->rk, l, 0);
    if (err) {
        /* a rebalance took a partition away meanwhile: its new owner indexes these records
         * again, harmlessly */
        ix->m.commit_errors++;
        log_warn("commit_failed err=%s", rd_kafka_err2str(err));
    }
    rd_kafka_topic_partition_list_destroy(l);
}

/* Index one batch of records until every one is settled, then commit. */
static void process(ix_t *ix, rec_t *r, size_t n) {
    sbuf_t lines = {0};
    for (size_t i = 0; i < n; i++) {
        rd_kafka_message_t *m = r[i].m;
        ix->m.records++;
        uint64_t version = header_u64(m, "version");
        const char *why = NULL;
        size_t before = lines.len;
        uint64_t mid = 0;
        int rc = version ? search_os_bulk_record(&lines, ix->alias, m->payload ? m->payload : "",
                                                 m->payload ? m->len : 0, version, &mid, &why)
                         : CHAT_EINVAL;
        if (rc == 0) {
            char index[SEARCH_OS_ALIAS_MAX + 16];
            search_os_index(index, sizeof index, ix->alias, mid);
            if (!ensure_index(ix, index)) break; /* stopped: nothing is committed */
        }
        if (!version) why = "no usable version header";
        if (rc == CHAT_EINVAL) {
            dead_letter(ix, m, why);
            r[i].settled = !*ix->stop;
        } else if (rc < 0 || lines.oom) {
            /* out of memory: stop without committing; a restart indexes the batch again */
            log_error("index_encode_failed err=%s: stopping", chat_strerror(CHAT_ENOMEM));
            ix->fatal = true;
            *ix->stop = 1;
        }
        r[i].off = before;
        r[i].len = lines.len - before;
    }
    int backoff = BACKOFF_MIN_MS;
    char why[256] = "";
    bool logged = false;
    while (!*ix->stop && !lines.oom) {
        if (bulk_once(ix, r, n, &lines, why, sizeof why)) break;
        if (!logged || backoff == BACKOFF_MAX_MS) {
            log_warn("bulk_retry %s backoff_ms=%d", why, backoff);
            logged = true;
        }
        nap(ix, backoff);
        backoff = backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : backoff * 2;
    }
    sbuf_free(&lines);
    if (*ix->stop) return; /* not committed: the next run indexes them again */
    if (logged) log_info("bulk_recovered records=%zu", n);
    commit(ix, r, n);
}

/* ---- /metrics -------------------------------------------------------------------------- */

static void metrics_text(ix_t *ix, sbuf_t *sb) {
    metrics_t *m = &ix->m;
    sbuf_metric(sb, "chat_indexer_records_total", "counter", "Kafka records consumed.", m->records);
    sbuf_metric(sb, "chat_indexer_docs_indexed_total", "counter", "Documents the engine wrote.",
                m->indexed);
    sbuf_metric(sb, "chat_indexer_docs_stale_total", "counter",
                "Records the engine refused as older than the document it holds (replays).",
                m->stale);
    sbuf_metric(sb, "chat_indexer_dead_letters_total", "counter",
                "Records copied to the dead-letter topic (poison: never indexable).", m->dead);
    sbuf_metric(sb, "chat_indexer_bulk_requests_total", "counter", "_bulk requests sent.",
                m->bulks);
    sbuf_metric(sb, "chat_indexer_bulk_errors_total", "counter",
                "_bulk requests that failed as a whole (engine away, 5xx): retried.",
                m->bulk_errors);
    sbuf_metric(sb, "chat_indexer_item_retries_total", "counter",
                "Documents the engine answered with a retryable error (429, 5xx).",
                m->item_retries);
    sbuf_metric(sb, "chat_indexer_commit_errors_total", "counter",
                "Offset commits that failed (a rebalance): those records are indexed again.",
                m->commit_errors);
    sbuf_metric(sb, "chat_indexer_dlq_errors_total", "counter",
                "Failed deliveries to the dead-letter topic (retried).", m->dlq_errors);
    sbuf_puts(sb, "# HELP chat_indexer_bulk_latency_seconds Time of a successful _bulk request.\n"
                  "# TYPE chat_indexer_bulk_latency_seconds histogram\n");
    for (size_t i = 0; i < N_BUCKETS; i++)
        sbuf_printf(sb, "chat_indexer_bulk_latency_seconds_bucket{le=\"%g\"} %" PRIu64 "\n",
                    LAT_BUCKETS[i], (uint64_t)m->lat_bucket[i]);
    sbuf_printf(sb,
                "chat_indexer_bulk_latency_seconds_bucket{le=\"+Inf\"} %" PRIu64
                "\nchat_indexer_bulk_latency_seconds_sum %.6f\n"
                "chat_indexer_bulk_latency_seconds_count %" PRIu64 "\n",
                (uint64_t)m->lat_count, (double)m->lat_sum_us / 1e6, (uint64_t)m->lat_count);

    /* Lag per assigned partition: the high watermark less the group's committed offset
     * (asked of the group coordinator now, so it stays put while a batch is retried). */
    sbuf_puts(sb, "# HELP chat_indexer_consumer_lag Records of a partition not yet committed "
                  "(indexed) by the group.\n# TYPE chat_indexer_consumer_lag gauge\n");
    rd_kafka_topic_partition_list_t *a = NULL;
    if (rd_kafka_assignment(ix->rk, &a) == 0 && a) {
        rd_kafka_committed(ix->rk, a, 2000);
        for (int i = 0; i < a->cnt; i++) {
            rd_kafka_topic_partition_t *p = &a->elems[i];
            int64_t lo = -1, hi = -1;
            /* the consumer's own view first (kept by its fetches, which go on while a batch
             * is retried); the brokers only when it has none yet */
            if ((rd_kafka_get_watermark_offsets(ix->rk, p->topic, p->partition, &lo, &hi) ||
                 hi < 0) &&
                rd_kafka_query_watermark_offsets(ix->rk, p->topic, p->partition, &lo, &hi, 2000))
                continue;
            int64_t done = p->offset >= 0 ? p->offset : lo;
            sbuf_printf(sb,
                        "chat_indexer_consumer_lag{topic=\"%s\",partition=\"%" PRId32 "\"} %" PRId64
                        "\n",
                        p->topic, p->partition, hi > done ? hi - done : 0);
        }
        rd_kafka_topic_partition_list_destroy(a);
    }
}

static void *metrics_main(void *arg) {
    ix_t *ix = arg;
    for (;;) {
        int fd = accept(ix->listen_fd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            return NULL; /* the listening socket was shut down: the end */
        }
        struct timeval tv = {5, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char req[2048];
        size_t got = 0;
        while (got < sizeof req - 1) {
            ssize_t r = read(fd, req + got, sizeof req - 1 - got);
            if (r <= 0) break;
            got += (size_t)r;
            req[got] = '\0';
            if (strstr(req, "\r\n\r\n")) break;
        }
        req[got] = '\0';
        sbuf_t body = {0}, out = {0};
        int status = 200;
        if (strncmp(req, "GET /metrics ", 13) == 0) metrics_text(ix, &body);
        else if (strncmp(req, "GET /healthz ", 13) == 0) sbuf_puts(&body, "ok\n");
        else {
            status = 404;
            sbuf_puts(&body, "only GET /metrics and GET /healthz here\n");
        }
        sbuf_printf(&out,
                    "HTTP/1.1 %d %s\r\nContent-Type: text/plain; version=0.0.4\r\n"
                    "Content-Length: %zu\r\nConnection: close\r\n\r\n",
                    status, status == 200 ? "OK" : "Not Found", body.len);
        sbuf_put(&out, body.p, body.len);
        for (size_t w = 0; !out.oom && w < out.len;) {
            ssize_t r = write(fd, out.p + w, out.len - w);
            if (r <= 0) break;
            w += (size_t)r;
        }
        sbuf_free(&body);
        sbuf_free(&out);
        close(fd);
    }
}

static int metrics_listen(ix_t *ix) {
    const char *host = ix->o->metrics_host ? ix->o->metrics_host : "0.0.0.0";
    struct sockaddr_in sa = {.sin_family = AF_INET,
                             .sin_port = htons((uint16_t)ix->o->metrics_port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        log_error("metrics_bad_host host=%s", LOG_STR(host));
        return -1;
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) || listen(fd, 16)) {
        log_error("metrics_listen_failed host=%s port=%d err=%s", host, ix->o->metrics_port,
                  strerror(errno));
        if (fd >= 0) close(fd);
        return -1;
    }
    socklen_t sl = sizeof sa;
    getsockname(fd, (struct sockaddr *)&sa, &sl);
    ix->listen_fd = fd;
    log_info("metrics_listening host=%s port=%d", host, ntohs(sa.sin_port));
    return 0;
}

/* ---- Kafka ----------------------------------------------------------------------------- */

static void kafka_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {
    if (level <= 3) log_warn("kafka_log fac=%s msg=%s", LOG_STR(fac), LOG_STR(buf));
}

static int conf_set(rd_kafka_conf_t *c, const char *k, const char *v) {
    char why[256];
    if (rd_kafka_conf_set(c, k, v, why, sizeof why) == RD_KAFKA_CONF_OK) return 0;
    log_error("kafka_config %s=%s: %s", k, LOG_STR(v), LOG_STR(why));
    return -1;
}

static int kafka_open(ix_t *ix) {
    char why[512];
    rd_kafka_conf_t *c = rd_kafka_conf_new();
    char poll_iv[16];
    snprintf(poll_iv, sizeof poll_iv, "%d", 86400000);
    if (conf_set(c, "bootstrap.servers", ix->o->brokers) ||
        conf_set(c, "group.id", ix->o->group ? ix->o->group : INDEXER_DEFAULT_GROUP) ||
        conf_set(c, "enable.auto.commit", "false") ||
        conf_set(c, "enable.auto.offset.store", "false") ||
        conf_set(c, "auto.offset.reset", "earliest") ||
        conf_set(c, "max.poll.interval.ms", poll_iv) ||
        /* a killed instance's partitions go to the others (or to its restart) after this,
         * not after the client's default 45 s */
        conf_set(c, "session.timeout.ms", "10000") ||
        conf_set(c, "heartbeat.interval.ms", "1000") ||
        conf_set(c, "reconnect.backoff.max.ms", "1000") ||
        conf_set(c, "client.id", "chat-indexer")) {
        rd_kafka_conf_destroy(c);
        return -1;
    }
    rd_kafka_conf_set_log_cb(c, kafka_log);
    ix->rk = rd_kafka_new(RD_KAFKA_CONSUMER, c, why, sizeof why);
    if (!ix->rk) {
        rd_kafka_conf_destroy(c);
        log_error("kafka_consumer_failed err=%s", LOG_STR(why));
        return -1;
    }
    rd_kafka_poll_set_consumer(ix->rk);
    rd_kafka_topic_partition_list_t *t = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(t, ix->topic, RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t err = rd_kafka_subscribe(ix->rk, t);
    rd_kafka_topic_partition_list_destroy(t);
    if (err) {
        log_error("kafka_subscribe_failed topic=%s err=%s", LOG_STR(ix->topic),
                  rd_kafka_err2str(err));
        return -1;
    }

    c = rd_kafka_conf_new();
    if (conf_set(c, "bootstrap.servers", ix->o->brokers) ||
        conf_set(c, "enable.idempotence", "true") || conf_set(c, "acks", "all") ||
        conf_set(c, "message.timeout.ms", "0") || conf_set(c, "linger.ms", "0") ||
        conf_set(c, "client.id", "chat-indexer-dlq")) {
        rd_kafka_conf_destroy(c);
        return -1;
    }
    rd_kafka_conf_set_opaque(c, ix);
    rd_kafka_conf_set_dr_msg_cb(c, on_dlq_delivered);
    rd_kafka_conf_set_log_cb(c, kafka_log);
    ix->dlp = rd_kafka_new(RD_KAFKA_PRODUCER, c, why, sizeof why);
    if (!ix->dlp) {
        rd_kafka_conf_destroy(c);
        log_error("kafka_producer_failed err=%s", LOG_STR(why));
        return -1;
    }
    return 0;
}

/* ---- run ------------------------------------------------------------------------------- */

int indexer_run(const indexer_opts_t *o, volatile sig_atomic_t *stop) {
    ix_t *ix = calloc(1, sizeof *ix);
    if (!ix) return 1;
    ix->o = o;
    ix->stop = stop;
    ix->listen_fd = -1;
    ix->topic = o->topic ? o->topic : STREAM_DEFAULT_TOPIC;
    snprintf(ix->dlq, sizeof ix->dlq, "%s", o->dlq_topic ? o->dlq_topic : "");
    if (!ix->dlq[0]) snprintf(ix->dlq, sizeof ix->dlq, "%.200s.dlq", ix->topic);
    int status = 1;
    int batch_max = o->batch > 0 ? o->batch : INDEXER_DEFAULT_BATCH;
    if (batch_max > INDEXER_DEFAULT_BATCH * 10) batch_max = INDEXER_DEFAULT_BATCH * 10;
    rec_t *recs = calloc((size_t)batch_max, sizeof *recs);
    const char *why = NULL;
    if (!recs) goto out;
    if (search_os_url(o->search_url ? o->search_url : "", ix->base, sizeof ix->base, ix->alias,
                      sizeof ix->alias, &why) < 0) {
        log_error("bad_search_url url=%s reason=%s", LOG_STR(o->search_url), LOG_STR(why));
        goto out;
    }
    if (!(ix->curl = curl_easy_init())) goto out;
    if (metrics_listen(ix) < 0) goto out;
    if (kafka_open(ix) < 0) goto out;
    if (pthread_create(&ix->mthread, NULL, metrics_main, ix) == 0) ix->mthread_on = true;
    /* the dead-letter topic, so a poison record has somewhere to go from the first one;
     * if this fails (Kafka still starting) the broker creates it on first use, if allowed */
    char err[256];
    if (stream_create_topic(o->brokers, ix->dlq, 1, -1, 5000, NULL, err, sizeof err) < 0)
        log_warn("dlq_topic_not_created topic=%s err=%s", ix->dlq, LOG_STR(err));
    if (install_template(ix)) goto out;
    log_info("indexer_started brokers=%s topic=%s group=%s search=%s alias=%s dlq=%s",
             LOG_STR(o->brokers), LOG_STR(ix->topic),
             LOG_STR(o->group ? o->group : INDEXER_DEFAULT_GROUP), LOG_STR(ix->base),
             LOG_STR(ix->alias), LOG_STR(ix->dlq));
    int linger = o->linger_ms > 0 ? o->linger_ms : INDEXER_DEFAULT_LINGER_MS;
    while (!*stop) {
        size_t n = 0;
        int64_t deadline = 0;
        while (!*stop && n < (size_t)batch_max) {
            int wait = 200;
            if (n) {
                int64_t left = deadline - mono_ms();
                if (left <= 0) break;
                wait = (int)left;
            }
            rd_kafka_message_t *m = rd_kafka_consumer_poll(ix->rk, wait);
            if (!m) continue;
            if (m->err) {
                if (m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                    log_warn("kafka_consume_error err=%s", rd_kafka_message_errstr(m));
                rd_kafka_message_destroy(m);
                continue;
            }
            if (n == 0) deadline = mono_ms() + linger;
            recs[n++] = (rec_t){.m = m};
        }
        if (n) process(ix, recs, n);
        for (size_t i = 0; i < n; i++) rd_kafka_message_destroy(recs[i].m);
    }
    log_info("indexer_stopping");
    status = ix->fatal ? 1 : 0;
out:
    /* the metrics thread reads the consumer: it ends first */
    if (ix->listen_fd >= 0) shutdown(ix->listen_fd, SHUT_RDWR);
    if (ix->mthread_on) pthread_join(ix->mthread, NULL);
    if (ix->rk) {
        rd_kafka_consumer_close(ix->rk);
        rd_kafka_destroy(ix->rk);
    }
    if (ix->dlp) {
        rd_kafka_flush(ix->dlp, 5000);
        rd_kafka_destroy(ix->dlp);
    }
    if (ix->listen_fd >= 0) close(ix->listen_fd);
    if (ix->curl) curl_easy_cleanup(ix->curl);
    free(recs);
    free(ix);
    return status;
}
