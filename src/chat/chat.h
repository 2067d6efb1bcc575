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

#include "core/core.h"

/* ---- JWT (RFC 7519): HS256 with a secret (jwt_verify), key sets below ----------------- */
typedef struct jwt_claims {
    char sub[129]; /* the user id; 1..128 bytes, no control characters */
    int64_t exp;   /* seconds since the epoch, 0 if absent */
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
int jwt_verify(const char *token, size_t len, const char *secret, int64_t now, jwt_claims_t *out);
void jwt_claims_free(jwt_claims_t *c);
/* True if the claims allow chat_id (no chats claim, or chat_id is listed). */
bool jwt_allows_chat(const jwt_claims_t *c, const char *chat_id);
/* Mint an HS256 token with sub, iat=now, exp=now+ttl (ttl <= 0: no exp), and chats (NULL or
 * a NULL-terminated list). Returns a malloc'd NUL-terminated string the caller frees, or
 * NULL on OOM or invalid input. */
char *jwt_sign(const char *sub, int64_t now, int64_t ttl, const char *const *chats,
               const char *secret);

/* ---- key sets: RS256, ES256 and HS256 chosen by the KEY -------------------------------- */
/* A set of verification keys. Each key has exactly one algorithm, fixed when it is added
 * (an RSA key: RS256; an EC P-256 key: ES256; a secret: HS256) and an optional kid. A
 * token's "alg" only filters the keys (it must equal the key's algorithm); it never makes
 * a key be used another way, so an RSA public key can never become an HMAC secret. */
typedef struct jwt_keyset jwt_keyset_t;
/* An empty set (free with jwt_keyset_free), or NULL on OOM. */
jwt_keyset_t *jwt_keyset_new(void);
void jwt_keyset_free(jwt_keyset_t *ks);
size_t jwt_keyset_count(const jwt_keyset_t *ks);
/* Adds an HS256 secret (copied). 0, CHAT_EINVAL (empty) or CHAT_ENOMEM. */
int jwt_keyset_add_secret(jwt_keyset_t *ks, const char *secret);
/* Adds every "PUBLIC KEY" block of a PEM buffer: RSA of 2048 bits or more (RS256) or EC
 * P-256 (ES256); no kid. 0, or CHAT_EINVAL with a reason in err (no public key, another
 * key type); on error nothing is added. The buffer stays the caller's. */
int jwt_keyset_add_pem(jwt_keyset_t *ks, const char *pem, size_t len, char *err, size_t errlen);
/* Adds the signing keys of a JWKS document (RFC 7517 {"keys":[...]}): kty RSA (n, e) and
 * kty EC crv P-256 (x, y), with their kid. Keys that are not for us are skipped, not
 * errors: "use" other than "sig", an "alg" other than RS256/ES256 for that kty, other kty
 * or curves, RSA under 2048 bits. Returns the number of keys added (>= 0), or CHAT_EINVAL
 * with err if the document is not a JWKS (or holds more than 100 keys). */
int jwt_keyset_add_jwks(jwt_keyset_t *ks, const char *json, size_t len, char *err, size_t errlen);

/* What the claims must also say; NULL members are not checked. aud may be a string or an
 * array of strings in the token; it must equal (contain) audience. */
typedef struct jwt_policy {
    const char *issuer;
    const char *audience;
} jwt_policy_t;

/* Verify token against the keys of nsets key sets (NULL sets are skipped) at time now.
 * The header's alg must be RS256, ES256 or HS256 and is used only to pick keys of that
 * algorithm; with a "kid" only keys with that kid (or with none) are tried. ES256
 * signatures are JOSE's 64-byte r||s. Then the claims are checked as jwt_verify does,
 * plus policy (may be NULL). On success fills *out (free with jwt_claims_free). Returns 0,
 * CHAT_EINVAL, CHAT_EEXPIRED, or CHAT_ENOTFOUND: the token names a kid no set holds (the
 * caller may refresh its keys). */
int jwt_verify_keys(const char *token, size_t len, const jwt_keyset_t *const *sets, size_t nsets,
                    const jwt_policy_t *policy, int64_t now, jwt_claims_t *out);

/* What to mint: exactly one of secret (HS256) or key_pem (a PEM private key, RSA: RS256,
 * EC P-256: ES256). kid, iss, aud: NULL to leave out. chats: NULL or NULL-terminated. */
typedef struct jwt_mint {
    const char *sub;
    int64_t now, ttl; /* iat = now, exp = now + ttl (ttl <= 0: no exp) */
    const char *const *chats;
    const char *secret;
    const char *key_pem;
    size_t key_pem_len;
    const char *kid, *iss, *aud;
} jwt_mint_t;
/* A malloc'd NUL-terminated token the caller frees, or NULL with a reason in err. */
char *jwt_sign_ex(const jwt_mint_t *m, char *err, size_t errlen);

/* ---- JWKS: the keys chatd trusts and how they stay fresh (jwks.c) --------------------- */
typedef struct jwks jwks_t;
typedef struct jwks_config {
    const char *secret;           /* HS256 secret or NULL */
    const char *const *pem_files; /* n_pem PEM files of public keys, read at open */
    size_t n_pem;
    const char *url;               /* JWKS URL (http or https) or NULL */
    const char *issuer, *audience; /* checked when non-NULL */
    unsigned refresh_s;            /* periodic refetch (default 300) */
    unsigned min_interval_s;       /* least time between two fetches (default 30) */
} jwks_config_t;
/* Reads the PEM files and, with a url, starts fetching it on a worker thread (the first
 * fetch right away). The strings in cfg must outlive the jwks_t. On success *out is owned
 * by the caller (jwks_close); on failure err says why. */
int jwks_open(jwks_t **out, uv_loop_t *loop, const jwks_config_t *cfg, char *err, size_t errlen);
/* jwt_verify_keys against the secret, the PEM keys and the last fetched JWKS, with the
 * configured issuer and audience. An unknown kid asks for a refetch (at most one per
 * min_interval_s) and returns CHAT_ENOTFOUND. Loop thread only. */
int jwks_verify(jwks_t *j, const char *token, size_t len, int64_t now, jwt_claims_t *out);
/* Stops the worker (an ongoing fetch is aborted), closes the handles; the memory is freed
 * once the loop has run their close callbacks. */
void jwks_close(jwks_t *j);

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
    /* public keys, JWKS, issuer/audience: NULL if none is configured (then tokens are
     * HS256 with jwt_secret, as jwt_verify checks them); owned by the caller */
    jwks_t *jwks;
    const char *web_root;   /* static files served at / */
    const char *public_url; /* this node's WebSocket base URL for discovery; NULL: derived
                                 * (wss:// with tls) */
    /* TLS on the listening port (HTTPS and WSS), borrowed; NULL: plain HTTP. Handshakes get
     * header_timeout_ms to finish. */
    tls_ctx_t *tls;
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
    size_t max_message_bytes;      /* message limit, WebSocket frame or REST body (default 65536) */
    size_t max_outbound_bytes;     /* per-connection queued output limit (default 4 MiB) */
    size_t max_body_bytes;         /* HTTP request body limit (default 1 MiB) */
    unsigned idle_timeout_ms;      /* ping after this much silence, close if no answer */
    unsigned header_timeout_ms;    /* a request head must arrive within this (default 10 s) */
    size_t max_connections;        /* open connections; 0: from the open-files limit */
    size_t max_connections_per_ip; /* 0: no limit */
    unsigned replay_limit;         /* most messages replayed for ?since= (default 1000) */
    /* Kafka (src/stream/): every stored change to this topic; NULL brokers: no relay and no
     * outbox. outbox_max_rows: past it, changes are refused (0: no limit). */
    const char *kafka_brokers;
    const char *kafka_topic;
    uint64_t outbox_max_rows;
    /* sends (messages, edits, deletes, typing) per second per user on this node, WebSocket
     * and REST together; 0: no limit. rate_burst: sends in a burst, 0: twice rate_limit (at least 1) */
    double rate_limit;
    double rate_burst;
    /* permessage-deflate (RFC 7692) with clients that offer it; false: every offer is
     * declined (chatd's default is on, main.c) */
    bool compression;
    /* presence: a user's last connection to a chat closing is a presence:leave only if no
     * new one opens within presence_grace_ms (0: at once); presence:join/leave are not sent
     * in a chat with more than presence_max_members users online (0: never sent) */
    unsigned presence_grace_ms;
    size_t presence_max_members;
    int log_level;
} chat_config_t;

typedef struct chat_server chat_server_t;

/* Open the store, the bus, and listen. On success *out is owned by the caller;
 * chat_server_port() is the bound port. err gets a readable reason on failure; the loop
 * must then still run until it ends, to release what was opened (handles close later). */
int chat_server_start(chat_server_t **out, uv_loop_t *loop, const chat_config_t *cfg, char *err,
                      size_t errlen);
int chat_server_port(const chat_server_t *s);
/* The node id inside this node's message ids (leased, with a Redis bus). */
unsigned chat_server_node_id(const chat_server_t *s);
/* Graceful stop: stop accepting, close every WebSocket with close_code (1001 on shutdown),
 * finish the store's writes, then call done on the loop thread and free the server. */
void chat_server_shutdown(chat_server_t *s, uint16_t close_code, void (*done)(void *), void *arg);

#endif
