/* chat: the domain. Sessions (one per WebSocket), rooms (the hub of local members of a
 * chat), the JSON protocol, JWT auth, and the HTTP routes of the REST API.
 *
 * The one idea: durable before delivery. An event becomes a frame only after the store
 * says it is durable; the frame is encoded once and the same bytes go to every member.
 * The domain sees storage, search and the bus only through store.h, search.h and bus.h.
 */
#ifndef CHAT_CHAT_H
#define CHAT_CHAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "../core/core.h"

/* ---- JWT (RFC 7519, HS256 only) ------------------------------------------------------- */
typedef struct jwt_claims {
    char sub[129];   /* the user id; 1..128 bytes, no control characters */
    int64_t exp;     /* seconds since the epoch, 0 if absent */
    int64_t iat;
    /* the optional "chats" claim: NULL if absent (any chat allowed), else a NULL-terminated
     * array of chat ids, owned by the claims (jwt_claims_free) */
    char **chats;
} jwt_claims_t;

/* Verify token (header.payload.signature, base64url) with secret at time now (seconds).
 * The header must say {"alg":"HS256"} (typ optional, if present "JWT"); the signature is
 * compared in constant time; exp (if present) must be > now; sub must be a non-empty string.
 * On success fills *out (free with jwt_claims_free). Returns 0, CHAT_EINVAL (malformed,
 * wrong alg, bad signature), or CHAT_EEXPIRED. */
int jwt_verify(const char *token, size_t len, const char *secret, int64_t now,
               jwt_claims_t *out);
void jwt_claims_free(jwt_claims_t *c);
/* True if the claims allow chat_id (no chats claim, or chat_id is listed). */
bool jwt_allows_chat(const jwt_claims_t *c, const char *chat_id);
/* Mint an HS256 token with sub, iat=now, exp=now+ttl (ttl <= 0: no exp), and chats (NULL or
 * a NULL-terminated list). Returns a malloc'd NUL-terminated string the caller frees, or
 * NULL on OOM or invalid input. */
char *jwt_sign(const char *sub, int64_t now, int64_t ttl, const char *const *chats,
               const char *secret);

/* ---- chat ids ------------------------------------------------------------------------- */
/* A chat id is a UUID or 1..128 of [A-Za-z0-9_.-], other than "." and "..". (A UUID is a
 * subset of the slug set, so this is the slug rule.) "." and ".." are refused because URL
 * normalisation removes such a path segment: /api/chats/../messages would never reach that
 * chat's REST API (Kafka refuses those topic names for the same reason). */
bool chat_id_valid(const char *s, size_t n);
/* The rule above, as the detail of a 400 answer. */
#define CHAT_ID_RULE "chat id must be a UUID or 1-128 of [A-Za-z0-9_.-], other than . and .."

/* ---- the server ----------------------------------------------------------------------- */
typedef struct chat_config {
    const char *host;
    int port;
    const char *store_url;
    const char *bus_url;
    /* the search backend: "sqlite", "scan"; NULL or "": the store's default (search.h) */
    const char *search_url;
    const char *jwt_secret;
    const char *web_root;       /* static files served at / */
    const char *public_url;     /* this node's WebSocket base URL for discovery; NULL: derived */
    bool dev;
    unsigned node_id;
    /* node_id was not configured: with a Redis bus the node leases a free one at start (the
     * local bus keeps node_id) */
    bool node_id_auto;
    /* The node cannot go on (its node id lease was lost): called once on the loop thread;
     * the callee shuts the server down (and exits non-zero). NULL: the server shuts itself
     * down (code 1012). */
    void (*on_fatal)(void *arg, const char *why);
    void *fatal_arg;
    size_t max_message_bytes;   /* message limit, WebSocket frame or REST body (default 65536) */
    size_t max_outbound_bytes;  /* per-connection queued output limit (default 4 MiB) */
    size_t max_body_bytes;      /* HTTP request body limit (default 1 MiB) */
    unsigned idle_timeout_ms;   /* ping after this much silence, close if no answer */
    unsigned header_timeout_ms; /* a request head must arrive within this (default 10 s) */
    size_t max_connections;     /* open connections; 0: from the open-files limit */
    size_t max_connections_per_ip; /* 0: no limit */
    unsigned replay_limit;      /* most messages replayed for ?since= (default 1000) */
    int log_level;
} chat_config_t;

typedef struct chat_server chat_server_t;

/* Open the store, the bus, and listen. On success *out is owned by the caller;
 * chat_server_port() is the bound port. err gets a readable reason on failure; the loop
 * must then still run until it ends, to release what was opened (handles close later). */
int chat_server_start(chat_server_t **out, uv_loop_t *loop, const chat_config_t *cfg,
                      char *err, size_t errlen);
int chat_server_port(const chat_server_t *s);
/* The node id inside this node's message ids (leased, with a Redis bus). */
unsigned chat_server_node_id(const chat_server_t *s);
/* Graceful stop: stop accepting, close every WebSocket with close_code (1001 on shutdown),
 * finish the store's writes, then call done on the loop thread and free the server. */
void chat_server_shutdown(chat_server_t *s, uint16_t close_code, void (*done)(void *), void *arg);

#endif
