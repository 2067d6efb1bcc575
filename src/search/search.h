/* search: full-text search of stored messages behind one asynchronous interface.
 *
 * The domain parses the user's query once (search_query_parse: words, "quoted phrases",
 * -exclusions), names the chats it may read, and submits a search_req_t; the callback comes
 * later on the loop thread with the hits, newest first, each with an HTML highlight.
 *
 * Backends are a struct of function pointers; search_open() picks one by name:
 *   sqlite   an FTS5 index inside the SQLite store, kept by triggers in the store's own
 *            write transactions (the default with a SQLite store)
 *   scan     a bounded scan of the history pages, newest first (the default otherwise;
 *            works on any store, needs no index)
 *   opensearch://host:port[/ALIAS], elasticsearch://host:port[/ALIAS]
 *            the index chat-indexer fills from Kafka (search_os.h), asked over HTTP from a
 *            worker thread (any store)
 */
#ifndef CHAT_SEARCH_H
#define CHAT_SEARCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/core.h"
#include "store/store.h"

#define SEARCH_Q_MAX 256     /* bytes of query text */
#define SEARCH_TERMS_MAX 8   /* words and phrases, exclusions included */
#define SEARCH_CHATS_MAX 32  /* chats one request may search */
#define SEARCH_LIMIT_MAX 100 /* hits one answer may hold */

/* One term of a query: text points into the query's own buffer (NUL-terminated, as the user
 * wrote it; inside a phrase, runs of blanks are one space). */
typedef struct search_term {
    const char *text;
    size_t len;
    bool phrase;  /* it was "quoted" */
    bool exclude; /* it had a leading '-': the message must not contain it */
} search_term_t;

typedef struct search_query {
    char buf[SEARCH_Q_MAX + SEARCH_TERMS_MAX + 1];
    search_term_t terms[SEARCH_TERMS_MAX];
    size_t n_terms;
    size_t n_positive; /* terms that are not exclusions: at least 1 */
} search_query_t;

/* Parse q (n bytes, at most SEARCH_Q_MAX, valid UTF-8; the caller checks both). Terms are
 * separated by ASCII blanks; "..." is a phrase; a leading '-' excludes a word or phrase.
 * Returns 0 with *out filled (self-contained, no allocation), or CHAT_EINVAL with *why a
 * static sentence for the client: no terms, an unbalanced quote, an empty phrase, more than
 * SEARCH_TERMS_MAX terms, only exclusions, or a control character (other than a blank). */
int search_query_parse(search_query_t *out, const char *q, size_t n, const char **why);

/* One hit. msg is the message as the history gives it; highlight is its text as HTML:
 * every character escaped, the matched words wrapped in <em></em>. Both freed by
 * search_req_cleanup. */
typedef struct search_hit {
    store_msg_t msg;
    char *highlight;
} search_hit_t;

typedef struct search_req search_req_t;
typedef void (*search_cb)(search_req_t *req);

struct search_req {
    /* inputs: the caller's, valid until the callback */
    const search_query_t *query;
    const char *const *chats; /* 1..SEARCH_CHATS_MAX valid chat ids, no repeats */
    size_t n_chats;
    const char *from; /* only messages by this user; NULL: anyone */
    uint64_t before;  /* only messages older than this id; 0: from the newest */
    int limit;        /* 1..SEARCH_LIMIT_MAX */
    /* optional: asked between two store reads of a long search; false ends it early (the
     * client left), with whatever was found */
    bool (*go_on)(void *data);
    /* outputs, valid in the callback, freed by search_req_cleanup */
    int status;         /* 0, CHAT_EIO (the store failed), CHAT_ENOMEM */
    search_hit_t *hits; /* newest first, at most limit */
    size_t n_hits;
    bool more; /* older hits may exist: go on with before = next_before */
    uint64_t next_before;
    size_t scanned; /* messages read to answer (scan), or hits read (sqlite) */
    /* the caller's */
    void *data;
    search_cb cb;
    /* private to the backend */
    void *priv_;
};

typedef struct search search_t;

typedef struct search_ops {
    const char *name;
    /* Start a search. 0: cb will be called exactly once, on the loop thread. CHAT_EINVAL
     * with *why (a static sentence for the client): this backend cannot answer this query
     * (cb never called). Another negative code: cb never called, the store refused. */
    int (*submit)(search_t *s, search_req_t *req, const char **why);
    /* Free the backend. Call only when no request is in flight (after the store closed). */
    void (*close)(search_t *s);
} search_ops_t;

/* Every backend's struct starts with this. */
struct search {
    const search_ops_t *ops;
    uv_loop_t *loop;
    store_t *store; /* borrowed: the server's store, which outlives the search */
    /* the error code for a request that failed with CHAT_EIO: NULL means the store failed
     * ("store_unavailable"); an engine of its own names itself ("search_unavailable") */
    const char *down_code;
};

/* Open a search backend by name (NULL or "": the default for the store: sqlite with a
 * SQLite store, scan otherwise). On success *out is the caller's, released with
 * search_close(). CHAT_EINVAL with a readable reason in err for an unknown name, a backend
 * this build does not have, or one the store cannot serve. */
int search_open(search_t **out, uv_loop_t *loop, const char *url, store_t *store, char *err,
                size_t errlen);

/* The same checks of url as search_open, before any store is opened (so that a bad name
 * fails at once, not after connecting to the store): store_url is the store's URL. 0, or
 * CHAT_EINVAL with the reason in err. */
int search_check(const char *url, const char *store_url, char *err, size_t errlen);

static inline int search_submit(search_t *s, search_req_t *r, const char **why) {
    return s->ops->submit(s, r, why);
}
static inline void search_close(search_t *s) {
    if (s) s->ops->close(s);
}

/* Free a request's outputs (hits and their strings) so that it can be reused. */
void search_req_cleanup(search_req_t *r);

/* Backends (declared here so search.c can list them; the domain uses search_open only). */
int search_sqlite_open(search_t **out, uv_loop_t *loop, store_t *store, char *err, size_t errlen);
int search_scan_open(search_t **out, uv_loop_t *loop, store_t *store, char *err, size_t errlen);
int search_opensearch_open(search_t **out, uv_loop_t *loop, const char *url, store_t *store,
                           char *err, size_t errlen);

#endif
