/* tls: the server's TLS context (OpenSSL): which protocol versions, ciphers, ALPN and
 * session tickets, and the certificate and key, reloadable while connections stay up.
 *
 * The per-connection transport (memory BIOs on the event loop) is in conn.c; this file only
 * builds SSL_CTX objects. A reload builds a whole new SSL_CTX and swaps it in: connections
 * hold a reference to the context they were accepted with (SSL_new takes one), so they keep
 * their certificate and the old context is freed with the last of them. The ticket keys are
 * carried over, so a ticket issued before a reload still resumes a session after it.
 */
#include "tls_internal.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct tls_ctx {
    SSL_CTX *ctx;
    char *cert_file, *key_file;
};

/* The first error OpenSSL queued, as text (the queue is cleared). */
static void tls__err(char *err, size_t errlen, const char *what, const char *file) {
    unsigned long e = ERR_peek_last_error();
    char reason[256] = "unknown error";
    if (e) ERR_error_string_n(e, reason, sizeof reason);
    ERR_clear_error();
    snprintf(err, errlen, "%s %s: %s", what, file, reason);
}

/* RFC 7301: the one protocol we speak is HTTP/1.1 (WebSocket upgrades ride on it). A client
 * that offers ALPN without it gets the no_application_protocol alert; one that offers no
 * ALPN at all is served as before. */
static int tls__alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                     const unsigned char *in, unsigned int inlen, void *arg) {
    (void)ssl;
    (void)arg;
    static const unsigned char h11[] = "http/1.1";
    for (unsigned i = 0; i < inlen;) {
        unsigned n = in[i];
        if (i + 1 + n > inlen) break;
        if (n == sizeof h11 - 1 && memcmp(in + i + 1, h11, n) == 0) {
            *out = in + i + 1;
            *outlen = (unsigned char)n;
            return SSL_TLSEXT_ERR_OK;
        }
        i += 1 + n;
    }
    return SSL_TLSEXT_ERR_ALERT_FATAL;
}

static SSL_CTX *tls__build(const char *cert, const char *key, char *err, size_t errlen) {
    ERR_clear_error();
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        tls__err(err, errlen, "cannot create a TLS context", "");
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    /* TLS 1.2: forward-secret AEAD suites only; TLS 1.3 suites are all AEAD already. */
    SSL_CTX_set_cipher_list(ctx, "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL");
    /* Server preference; no renegotiation (a client could make us redo the expensive half
     * of a handshake at will); no compression (CRIME). */
    SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE | SSL_OP_NO_RENEGOTIATION |
                                 SSL_OP_NO_COMPRESSION);
    /* An idle connection gives its 2 x ~17 KiB record buffers back. What stays is the SSL
     * object (about 9 KiB from SSL_new in OpenSSL 3.0) and, after the handshake, its
     * session and keys (about 7 KiB): bench/RESULTS.md, "TLS". */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    /* Resumption is by stateless tickets only: no server-side session cache, whose memory
     * would grow with every handshake. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_alpn_select_cb(ctx, tls__alpn, NULL);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        tls__err(err, errlen, "cannot load the TLS certificate", cert);
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        bool mismatch = ERR_GET_REASON(ERR_peek_last_error()) == X509_R_KEY_VALUES_MISMATCH;
        tls__err(err, errlen,
                 mismatch ? "the TLS key does not match the certificate"
                          : "cannot load the TLS key",
                 key);
        SSL_CTX_free(ctx);
        return NULL;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        tls__err(err, errlen, "the TLS key does not match the certificate", cert);
        SSL_CTX_free(ctx);
        return NULL;
    }
    return ctx;
}

tls_ctx_t *tls_ctx_new(const char *cert_file, const char *key_file, char *err, size_t errlen) {
    tls_ctx_t *t = calloc(1, sizeof(*t));
    if (!t || !(t->cert_file = strdup(cert_file)) || !(t->key_file = strdup(key_file))) {
        snprintf(err, errlen, "out of memory");
        tls_ctx_free(t);
        return NULL;
    }
    if (!(t->ctx = tls__build(cert_file, key_file, err, errlen))) {
        tls_ctx_free(t);
        return NULL;
    }
    return t;
}

int tls_ctx_reload(tls_ctx_t *t, char *err, size_t errlen) {
    SSL_CTX *n = tls__build(t->cert_file, t->key_file, err, errlen);
    if (!n) return CHAT_EINVAL;
    unsigned char keys[80]; /* OpenSSL's ticket key block: name, HMAC and AES keys */
    if (SSL_CTX_get_tlsext_ticket_keys(t->ctx, keys, sizeof keys) == 1)
        SSL_CTX_set_tlsext_ticket_keys(n, keys, sizeof keys);
    OPENSSL_cleanse(keys, sizeof keys);
    SSL_CTX_free(t->ctx); /* open connections keep their own reference */
    t->ctx = n;
    return 0;
}

void tls_ctx_free(tls_ctx_t *t) {
    if (!t) return;
    SSL_CTX_free(t->ctx);
    free(t->cert_file);
    free(t->key_file);
    free(t);
}

SSL_CTX *tls_ctx_ssl(const tls_ctx_t *t) { return t->ctx; }
