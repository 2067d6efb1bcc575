/* fuzz_tls: arbitrary bytes from a client through the TLS transport of conn.c, on a real
 * loop and a real socket: our read path into the memory BIO, the handshake pump, the error
 * path (the alert, or the plain-HTTP 400), the close, the ALPN callback of tls.c.
 *
 * OpenSSL's own parsers are fuzzed by OpenSSL; this is about what we built around them.
 * The first input byte picks how the rest is cut into writes (1, 7, 64 bytes or all at
 * once), as the network would cut it. Every input must end with the connection closed and
 * its memory given back (ASan's leak check at exit sees any SSL object or BIO left).
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/core.h"

static void require(bool ok) {
    if (!ok) abort();
}

static uv_loop_t loop;
static conn_server_t srv;
static tls_ctx_t *tls;
static size_t opened;

/* A handshake that completes (a corpus could hold one) reaches a handler that echoes. */
static void h_open(conn_t *c) { opened++; }
static void h_read(conn_t *c, uint8_t *d, size_t n) { conn_send_copy(c, d, n); }
static void h_close(conn_t *c) {}
static const conn_handler_t handler = {.on_open = h_open, .on_read = h_read, .on_close = h_close};

/* A throwaway EC P-256 key and self-signed certificate, as PEM files tls_ctx_new reads. */
static void make_identity(char *cert_path, char *key_path) {
    EVP_PKEY *k = EVP_EC_gen("P-256");
    X509 *x = X509_new();
    require(k && x);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_gmtime_adj(X509_getm_notBefore(x), 0);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_set_pubkey(x, k);
    X509_NAME *nm = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(nm, "CN", MBSTRING_ASC, (const unsigned char *)"fuzz", -1, -1, 0);
    X509_set_issuer_name(x, nm);
    require(X509_sign(x, k, EVP_sha256()) > 0);
    int fc = mkstemp(cert_path), fk = mkstemp(key_path);
    require(fc >= 0 && fk >= 0);
    FILE *f = fdopen(fc, "w"), *g = fdopen(fk, "w");
    require(f && g && PEM_write_X509(f, x) &&
            PEM_write_PrivateKey(g, k, NULL, NULL, 0, NULL, NULL));
    fclose(f);
    fclose(g);
    X509_free(x);
    EVP_PKEY_free(k);
}

static void setup(void) {
    char cert[] = "/tmp/fuzz_tls_certXXXXXX", key[] = "/tmp/fuzz_tls_keyXXXXXX", err[256];
    make_identity(cert, key);
    tls = tls_ctx_new(cert, key, err, sizeof err);
    unlink(cert);
    unlink(key);
    require(tls != NULL);
    require(uv_loop_init(&loop) == 0);
    conn_server_opts_t o = {.host = "127.0.0.1", .port = 0, .handler = &handler, .tls = tls};
    require(conn_server_init(&srv, &loop, &o) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!tls) setup();
    if (size == 0 || size > 65536) return 0;
    static const size_t cuts[] = {1, 7, 64, 65536};
    size_t cut = cuts[data[0] & 3];
    data++;
    size--;

    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)srv.port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    require(fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0);
    /* accepted: the server has one connection (the loop runs until it sees it) */
    while (srv.n_conns == 0) uv_run(&loop, UV_RUN_ONCE);
    for (size_t off = 0; off < size; off += cut) {
        size_t n = size - off < cut ? size - off : cut;
        if (send(fd, data + off, n, MSG_NOSIGNAL) < 0) break; /* the server closed already */
        uv_run(&loop, UV_RUN_NOWAIT);
    }
    shutdown(fd, SHUT_WR); /* whatever the server waits for, it sees the end now */
    while (srv.n_conns) {
        uv_run(&loop, UV_RUN_NOWAIT);
        char sink[4096];
        if (recv(fd, sink, sizeof sink, MSG_DONTWAIT) == 0) break;
    }
    while (srv.n_conns) uv_run(&loop, UV_RUN_ONCE);
    close(fd);
    return 0;
}
