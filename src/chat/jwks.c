/* jwks: the keys chatd trusts for tokens, and how a JWKS URL's keys stay fresh.
 *
 * The one idea: verification never waits for the network. A worker thread does the one
 * blocking thing (an HTTP GET with libcurl's easy interface, bounded by timeouts and a
 * size cap) and hands the body back through a uv_async; the loop thread parses it and
 * swaps the key set, so the key sets are only ever touched on the loop thread and need no
 * lock. Fetches happen at start, every refresh_s, and when a token names a kid we do not
 * hold, but never more than one at a time nor two within min_interval_s: a flood of
 * tokens with made-up kids costs the identity provider at most one request per interval.
 * A failed fetch keeps the last good keys and is retried after min_interval_s.
 */
#include "chat.h"

#include <curl/curl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define JWKS_MAX_BODY (1u << 20) /* a JWKS is a few KB; refuse to buffer more */
#define JWKS_MAX_PEM (1u << 20)
#define JWKS_TIMEOUT_S 10L
#define JWKS_CONNECT_TIMEOUT_S 5L

struct jwks {
    uv_loop_t *loop;
    jwt_keyset_t *fixed;   /* the secret and the PEM keys */
    jwt_keyset_t *fetched; /* the last good JWKS; NULL before the first */
    jwt_policy_t policy;
    const char *url;
    uint64_t refresh_ms, min_ms;

    /* loop thread only */
    uv_timer_t timer;
    uv_async_t async;
    int open_handles;
    bool in_flight;
    bool fetched_once;
    uint64_t last_start; /* uv_now of the last fetch's start */

    /* shared with the worker, under mu */
    uv_thread_t thread;
    bool thread_started;
    uv_mutex_t mu;
    uv_cond_t cv;
    bool want, done;
    atomic_bool stop;
    long status;
    char *body;
    size_t body_len;
    char curl_err[CURL_ERROR_SIZE];
};

/* ---- the worker thread ----------------------------------------------------------------- */

static size_t jwks__write(char *data, size_t size, size_t nmemb, void *arg) {
    sbuf_t *b = arg;
    size_t n = size * nmemb;
    if (n > JWKS_MAX_BODY - b->len) return 0; /* too big: curl aborts the transfer */
    sbuf_put(b, data, n);
    return b->oom ? 0 : n;
}

/* Called by curl during the transfer: a non-zero answer aborts it, so jwks_close does not
 * wait for a slow provider. */
static int jwks__progress(void *arg, curl_off_t a, curl_off_t b, curl_off_t c, curl_off_t d) {
    jwks_t *j = arg;
    return atomic_load(&j->stop) ? 1 : 0;
}

static void jwks__worker(void *arg) {
    jwks_t *j = arg;
    CURL *curl = curl_easy_init(); /* kept across fetches: keep-alive to the provider */
    for (;;) {
        uv_mutex_lock(&j->mu);
        while (!j->want && !atomic_load(&j->stop)) uv_cond_wait(&j->cv, &j->mu);
        bool stop = atomic_load(&j->stop);
        j->want = false;
        uv_mutex_unlock(&j->mu);
        if (stop) break;

        sbuf_t body = {0}; /* its bytes go to j->body, which frees them */
        char errbuf[CURL_ERROR_SIZE] = "";
        long status = 0;
        CURLcode rc = CURLE_FAILED_INIT;
        if (curl) {
            curl_easy_reset(curl);
            curl_easy_setopt(curl, CURLOPT_URL, j->url);
            curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "http,https");
            curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
            curl_easy_setopt(curl, CURLOPT_TIMEOUT, JWKS_TIMEOUT_S);
            curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT, JWKS_CONNECT_TIMEOUT_S);
            curl_easy_setopt(curl, CURLOPT_USERAGENT, "chatd");
            curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, jwks__write);
            curl_easy_setopt(curl, CURLOPT_WRITEDATA, &body);
            curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
            curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, jwks__progress);
            curl_easy_setopt(curl, CURLOPT_XFERINFODATA, j);
            curl_easy_setopt(curl, CURLOPT_ERRORBUFFER, errbuf);
            rc = curl_easy_perform(curl);
            if (rc == CURLE_OK) curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &status);
        }
        if (rc != CURLE_OK && !errbuf[0])
            snprintf(errbuf, sizeof errbuf, "%s", curl_easy_strerror(rc));

        uv_mutex_lock(&j->mu);
        free(j->body);
        j->body = body.p;
        j->body_len = body.len;
        j->status = rc == CURLE_OK ? status : 0;
        snprintf(j->curl_err, sizeof j->curl_err, "%s", errbuf);
        j->done = true;
        uv_mutex_unlock(&j->mu);
        uv_async_send(&j->async);
    }
    if (curl) curl_easy_cleanup(curl);
}

/* ---- the loop thread ------------------------------------------------------------------- */

static void jwks__on_timer(uv_timer_t *t);

/* Starts a fetch if none is running and the last one started at least min_ms ago;
 * otherwise, if none is running, arms the timer for the earliest allowed moment. */
static void jwks__request(jwks_t *j) {
    if (!j->url || j->in_flight || atomic_load(&j->stop)) return;
    uint64_t now = uv_now(j->loop);
    if (j->fetched_once && now - j->last_start < j->min_ms) {
        uint64_t wait = j->last_start + j->min_ms - now;
        if (uv_timer_get_due_in(&j->timer) == 0 || uv_timer_get_due_in(&j->timer) > wait)
            uv_timer_start(&j->timer, jwks__on_timer, wait, 0);
        return;
    }
    j->in_flight = true;
    j->fetched_once = true;
    j->last_start = now;
    uv_timer_stop(&j->timer);
    uv_mutex_lock(&j->mu);
    j->want = true;
    uv_cond_signal(&j->cv);
    uv_mutex_unlock(&j->mu);
}

static void jwks__on_timer(uv_timer_t *t) { jwks__request(t->data); }

static void jwks__on_result(uv_async_t *a) {
    jwks_t *j = a->data;
    uv_mutex_lock(&j->mu);
    if (!j->done) {
        uv_mutex_unlock(&j->mu);
        return;
    }
    j->done = false;
    char *body = j->body;
    size_t len = j->body_len;
    long status = j->status;
    char cerr[CURL_ERROR_SIZE];
    snprintf(cerr, sizeof cerr, "%s", j->curl_err);
    j->body = NULL;
    uv_mutex_unlock(&j->mu);
    j->in_flight = false;
    if (atomic_load(&j->stop)) {
        free(body);
        return;
    }

    char err[CURL_ERROR_SIZE + 32] = "";
    int n = -1;
    jwt_keyset_t *ks = NULL;
    if (status == 200 && body) {
        ks = jwt_keyset_new();
        n = ks ? jwt_keyset_add_jwks(ks, body, len, err, sizeof err) : CHAT_ENOMEM;
        if (n == 0) snprintf(err, sizeof err, "no usable signing key (RS256 or ES256)");
    } else if (status) {
        snprintf(err, sizeof err, "HTTP status %ld", status);
    } else {
        snprintf(err, sizeof err, "%s", cerr);
    }
    free(body);
    if (n > 0) {
        jwt_keyset_free(j->fetched);
        j->fetched = ks;
        log_info("jwks fetched url=%s keys=%d", LOG_STR(j->url), n);
        uv_timer_start(&j->timer, jwks__on_timer, j->refresh_ms, 0);
    } else {
        jwt_keyset_free(ks);
        log_warn("jwks fetch failed url=%s error=%s keys_kept=%zu", LOG_STR(j->url), LOG_STR(err),
                 jwt_keyset_count(j->fetched));
        uv_timer_start(&j->timer, jwks__on_timer, j->min_ms, 0);
    }
}

/* ---- open, verify, close --------------------------------------------------------------- */

static int jwks__read_pem(jwt_keyset_t *ks, const char *path, char *err, size_t errlen) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "%s: cannot open", path);
        return CHAT_EIO;
    }
    char *buf = malloc(JWKS_MAX_PEM);
    size_t n = buf ? fread(buf, 1, JWKS_MAX_PEM, f) : 0;
    fclose(f);
    if (!buf) return CHAT_ENOMEM;
    char why[160] = "";
    int rc = n == JWKS_MAX_PEM ? CHAT_ETOOBIG : jwt_keyset_add_pem(ks, buf, n, why, sizeof why);
    free(buf);
    if (rc == CHAT_ETOOBIG) snprintf(err, errlen, "%s: larger than 1 MiB", path);
    else if (rc < 0) snprintf(err, errlen, "%s: %s", path, why);
    return rc;
}

static void jwks__free(jwks_t *j) {
    jwt_keyset_free(j->fixed);
    jwt_keyset_free(j->fetched);
    free(j->body);
    if (j->url) {
        uv_cond_destroy(&j->cv);
        uv_mutex_destroy(&j->mu);
    }
    free(j);
}

static void jwks__on_close(uv_handle_t *h) {
    jwks_t *j = h->data;
    if (--j->open_handles == 0) jwks__free(j);
}

int jwks_open(jwks_t **out, uv_loop_t *loop, const jwks_config_t *cfg, char *err, size_t errlen) {
    jwks_t *j = calloc(1, sizeof(*j));
    if (!j || !(j->fixed = jwt_keyset_new())) {
        free(j);
        snprintf(err, errlen, "out of memory");
        return CHAT_ENOMEM;
    }
    j->loop = loop;
    j->policy.issuer = cfg->issuer;
    j->policy.audience = cfg->audience;
    j->min_ms = (uint64_t)(cfg->min_interval_s ? cfg->min_interval_s : 30) * 1000;
    j->refresh_ms = (uint64_t)(cfg->refresh_s ? cfg->refresh_s : 300) * 1000;
    if (j->refresh_ms < j->min_ms) j->refresh_ms = j->min_ms;
    int rc = 0;
    if (cfg->secret && *cfg->secret && (rc = jwt_keyset_add_secret(j->fixed, cfg->secret)) < 0)
        snprintf(err, errlen, "out of memory");
    for (size_t i = 0; rc == 0 && i < cfg->n_pem; i++)
        rc = jwks__read_pem(j->fixed, cfg->pem_files[i], err, errlen);
    if (rc < 0) {
        jwks__free(j);
        return rc;
    }
    log_info("jwt_keys static=%zu jwks_url=%s issuer=%s audience=%s", jwt_keyset_count(j->fixed),
             LOG_STR(cfg->url ? cfg->url : "-"), LOG_STR(cfg->issuer ? cfg->issuer : "-"),
             LOG_STR(cfg->audience ? cfg->audience : "-"));
    if (cfg->url && *cfg->url) {
        if (strncmp(cfg->url, "http://", 7) != 0 && strncmp(cfg->url, "https://", 8) != 0) {
            snprintf(err, errlen, "jwks-url must start with http:// or https://");
            jwks__free(j);
            return CHAT_EINVAL;
        }
        if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
            snprintf(err, errlen, "cannot initialise libcurl");
            jwks__free(j);
            return CHAT_EIO;
        }
        j->url = cfg->url;
        uv_mutex_init(&j->mu);
        uv_cond_init(&j->cv);
        uv_timer_init(loop, &j->timer);
        uv_async_init(loop, &j->async, jwks__on_result);
        j->timer.data = j->async.data = j;
        j->open_handles = 2;
        if (uv_thread_create(&j->thread, jwks__worker, j) != 0) {
            snprintf(err, errlen, "cannot start the JWKS thread");
            atomic_store(&j->stop, true);
            jwks_close(j);
            return CHAT_EIO;
        }
        j->thread_started = true;
        jwks__request(j);
    }
    *out = j;
    return 0;
}

int jwks_verify(jwks_t *j, const char *token, size_t len, int64_t now, jwt_claims_t *out) {
    const jwt_keyset_t *sets[2] = {j->fixed, j->fetched};
    int rc = jwt_verify_keys(token, len, sets, 2, &j->policy, now, out);
    if (rc == CHAT_ENOTFOUND) {
        if (!j->url) return CHAT_EINVAL; /* nothing to refresh: just a bad token */
        jwks__request(j);
    }
    return rc;
}

void jwks_close(jwks_t *j) {
    if (!j) return;
    if (!j->url) {
        jwks__free(j);
        return;
    }
    uv_mutex_lock(&j->mu);
    atomic_store(&j->stop, true);
    uv_cond_signal(&j->cv);
    uv_mutex_unlock(&j->mu);
    if (j->thread_started) uv_thread_join(&j->thread);
    j->thread_started = false;
    curl_global_cleanup();
    uv_close((uv_handle_t *)&j->timer, jwks__on_close);
    uv_close((uv_handle_t *)&j->async, jwks__on_close);
}
