/* tls_internal.h: what conn.c needs of tls.c (the OpenSSL context); not for other layers. */
#ifndef CHAT_TLS_INTERNAL_H
#define CHAT_TLS_INTERNAL_H

#include <openssl/ssl.h>

#include "core.h"

/* The current context; borrowed (SSL_new takes its own reference). */
SSL_CTX *tls_ctx_ssl(const tls_ctx_t *t);

#endif
