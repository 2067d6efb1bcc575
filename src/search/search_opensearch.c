/* search_opensearch: search through the OpenSearch / Elasticsearch index that chat-indexer
 * fills (`--search opensearch://host:port[/ALIAS]`, or elasticsearch://).
 *
 * The one idea: the loop never waits for the engine. A worker thread runs a libcurl multi
 * handle (many searches at once over kept-alive connections); the loop thread only builds
 * the request body, queues it, and later takes the answer back through a uv_async. The
 * answer is parsed on the worker too (search_os_parse_hits), so the loop gets hits ready to
 * send. Every request has a timeout, so every callback comes: the server's shutdown waits
 * for the peers that asked, and close() is only called once none is in flight.
 *
 * The engine away, slow past the timeout, or answering anything but 200 is CHAT_EIO for the
 * caller (503 search_unavailable); its own error text is logged, never passed to a client.
 */
#include <curl/curl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "search_internal.h"
#include "search_os.h"

#define OS_TIMEOUT_MS 10000L
#define OS_CONNECT_TIMEOUT_MS 2000L
#define OS_MAX_BODY (16u << 20)

typedef struct os_job {
    queue_t link; /* on todo or done */
    search_req_t *req;
    sbuf_t body; /* the request, NUL-terminated */
    sbuf_t resp;
    CURL *easy;
    struct curl_slist *hdrs;
    char err[CURL_ERROR_SIZE];
} os_job_t;

typedef struct os_search {
    search_t base; /* first: the search_t the domain holds */
    char url[512];
    char alias[SEARCH_OS_ALIAS_MAX + 1];
    uv_async_t async;
    uv_thread_t thread;
    uv_mutex_t mu;
    queue_t todo, done; /* of os_job_t, under mu */
    atomic_bool stop;
    CURLM *multi;
    int64_t last_err_log;
} os_search_t;

static size_t os__write(char *data, size_t size, size_t nmemb, void *arg) {
    os_job_t *j = arg;
    size_t n = size * nmemb;
    if (j->resp.len + n > OS_MAX_BODY) return 0;
    sbuf_put(&j->resp, data, n);
    return j->resp.oom ? 0 : n;
}

/* On the worker: the transfer ended; turn its answer into the request's outputs. */
static void os__finish(os_search_t *s, os_job_t *j, CURLcode cc) {
    search_req_t *req = j->req;
    long status = 0;
    if (cc == CURLE_OK) curl_easy_getinfo(j->easy, CURLINFO_RESPONSE_CODE, &status);
    if (cc == CURLE_OK && status == 200) {
        req->status = search_os_parse_hits(req, j->resp.p ? j->resp.p : "", j->resp.len);
        if (req->status == CHAT_EIO) log_error("search_engine_answer_unreadable url=%s", s->url);
    } else {
        req->status = CHAT_EIO;
        /* one line per 10 s while it is away; the engine's text stays in the log */
        int64_t now = time_now_ms();
        if (now - s->last_err_log >= 10000 || (cc == CURLE_OK && status < 500)) {
            s->last_err_log = now;
            char body[200];
            snprintf(body, sizeof body, "%.*s", (int)(j->resp.len < 199 ? j->resp.len : 199),
                     j->resp.p ? j->resp.p : "");
            log_warn("search_engine_failed url=%s status=%ld err=%s body=%s", s->url, status,
                     LOG_STR(cc == CURLE_OK ? ""
                             : j->err[0]    ? j->err
                                            : curl_easy_strerror(cc)),
                     LOG_STR(body));
        }
    }
    curl_multi_remove_handle(s->multi, j->easy);
    curl_easy_cleanup(j->easy);
    j->easy = NULL;
    curl_slist_free_all(j->hdrs);
    j->hdrs = NULL;
    uv_mutex_lock(&s->mu);
    queue_insert_tail(&s->done, &j->link);
    uv_mutex_unlock(&s->mu);
    uv_async_send(&s->async);
}

static void os__start(os_search_t *s, os_job_t *j) {
    CURL *e = curl_easy_init();
    j->hdrs = curl_slist_append(NULL, "Content-Type: application/json");
    /* no "Expect: 100-continue" (a body over 1 KiB): it would cost a round trip, or a
     * second when the engine does not answer it */
    struct curl_slist *h2 = j->hdrs ? curl_slist_append(j->hdrs, "Expect:") : NULL;
    if (h2) j->hdrs = h2;
    if (!e || !j->hdrs) {
        if (e) curl_easy_cleanup(e);
        j->easy = NULL;
        snprintf(j->err, sizeof j->err, "out of memory");
        j->req->status = CHAT_ENOMEM;
        uv_mutex_lock(&s->mu);
        queue_insert_tail(&s->done, &j->link);
        uv_mutex_unlock(&s->mu);
        uv_async_send(&s->async);
        return;
    }
    j->easy = e;
    curl_easy_setopt(e, CURLOPT_URL, s->url);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_PROXY, "");
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, OS_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, OS_CONNECT_TIMEOUT_MS);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, j->hdrs);
    curl_easy_setopt(e, CURLOPT_POSTFIELDS, j->body.p);
    curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)j->body.len);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, os__write);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, j);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, j->err);
    curl_easy_setopt(e, CURLOPT_PRIVATE, j);
    curl_multi_add_handle(s->multi, e);
}

static void os__worker(void *arg) {
    os_search_t *s = arg;
    while (!atomic_load(&s->stop)) {
        queue_t todo;
        queue_init(&todo);
        uv_mutex_lock(&s->mu);
        queue_move_tail(&s->todo, &todo);
        uv_mutex_unlock(&s->mu);
        while (!queue_empty(&todo)) {
            os_job_t *j = queue_data(queue_head(&todo), os_job_t, link);
            queue_remove(&j->link);
            os__start(s, j);
        }
        int running = 0;
        curl_multi_perform(s->multi, &running);
        CURLMsg *msg;
        int left;
        while ((msg = curl_multi_info_read(s->multi, &left))) {
            if (msg->msg != CURLMSG_DONE) continue;
            os_job_t *j = NULL;
            curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&j);
            os__finish(s, j, msg->data.result);
        }
        curl_multi_poll(s->multi, NULL, 0, 1000, NULL);
    }
}

/* On the loop: hand finished searches back to their callers. */
static void os__on_async(uv_async_t *a) {
    os_search_t *s = a->data;
    queue_t done;
    queue_init(&done);
    uv_mutex_lock(&s->mu);
    queue_move_tail(&s->done, &done);
    uv_mutex_unlock(&s->mu);
    while (!queue_empty(&done)) {
        os_job_t *j = queue_data(queue_head(&done), os_job_t, link);
        queue_remove(&j->link);
        search_req_t *req = j->req;
        sbuf_free(&j->body);
        sbuf_free(&j->resp);
        free(j);
        req->cb(req);
    }
}

static int os_submit(search_t *base, search_req_t *req, const char **why) {
    os_search_t *s = (os_search_t *)base;
    if (!req->n_chats || req->n_chats > SEARCH_CHATS_MAX || req->limit < 1 ||
        req->limit > SEARCH_LIMIT_MAX) {
        *why = "bad search request";
        return CHAT_EINVAL;
    }
    os_job_t *j = calloc(1, sizeof *j);
    if (!j) return CHAT_ENOMEM;
    int rc = search_os_query(&j->body, req, why);
    sbuf_put(&j->body, "", 1);
    if (rc == 0 && j->body.oom) rc = CHAT_ENOMEM;
    if (rc < 0) {
        sbuf_free(&j->body);
        free(j);
        return rc;
    }
    j->body.len--; /* the NUL is not part of the request */
    req->hits = NULL;
    req->n_hits = 0;
    req->more = false;
    req->next_before = 0;
    req->scanned = 0;
    req->status = 0;
    j->req = req;
    uv_mutex_lock(&s->mu);
    queue_insert_tail(&s->todo, &j->link);
    uv_mutex_unlock(&s->mu);
    curl_multi_wakeup(s->multi);
    return 0;
}

static void os__closed(uv_handle_t *h) {
    os_search_t *s = h->data;
    uv_mutex_destroy(&s->mu);
    free(s);
    curl_global_cleanup(); /* counted: the JWKS fetcher may still use libcurl */
}

static void os_close(search_t *base) {
    os_search_t *s = (os_search_t *)base;
    atomic_store(&s->stop, true);
    curl_multi_wakeup(s->multi);
    uv_thread_join(&s->thread);
    curl_multi_cleanup(s->multi);
    uv_close((uv_handle_t *)&s->async, os__closed);
}

static const search_ops_t os_ops = {
    .name = "opensearch",
    .submit = os_submit,
    .close = os_close,
};

int search_opensearch_open(search_t **out, uv_loop_t *loop, const char *url, store_t *store,
                           char *err, size_t errlen) {
    char base[300];
    const char *why;
    os_search_t *s = calloc(1, sizeof *s);
    if (!s) {
        search__set_err(err, errlen, "out of memory");
        return CHAT_ENOMEM;
    }
    queue_init(&s->todo);
    queue_init(&s->done);
    if (search_os_url(url, base, sizeof base, s->alias, sizeof s->alias, &why) < 0) {
        search__set_err(err, errlen, "--search %.100s: %s", url, why);
        free(s);
        return CHAT_EINVAL;
    }
    /* ignore_unavailable: before the indexer wrote its first document there is no index
     * behind the alias, and that is no hits, not an error */
    snprintf(s->url, sizeof s->url, "%s/%s/_search?ignore_unavailable=true", base, s->alias);
    s->base.ops = &os_ops;
    s->base.loop = loop;
    s->base.store = store;
    s->base.down_code = "search_unavailable";
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || !(s->multi = curl_multi_init())) {
        free(s);
        search__set_err(err, errlen, "out of memory");
        return CHAT_ENOMEM;
    }
    uv_mutex_init(&s->mu);
    uv_async_init(loop, &s->async, os__on_async);
    s->async.data = s;
    if (uv_thread_create(&s->thread, os__worker, s) != 0) {
        curl_multi_cleanup(s->multi);
        uv_close((uv_handle_t *)&s->async, os__closed);
        search__set_err(err, errlen, "cannot start the search thread");
        return CHAT_ENOMEM;
    }
    log_info("search_opened backend=opensearch url=%s", s->url);
    *out = &s->base;
    return 0;
}
