/* tls_seal: what sealing costs chatd per flush and per frame, without the network. A server
 * SSL of chatd's own context (tls.c) and a client SSL finish a handshake through memory
 * BIOs; then the server seals N frames of 150 bytes per flush, as conn.c does at each loop
 * turn (one SSL_write of the coalesced frames, the write BIO's bytes copied into one
 * buffer), and the process CPU time per flush and per frame is printed.
 *
 * The one idea: on a shared machine the fan-out benchmark's CPU figures swing with the
 * neighbours; this loop is all CPU of one thread and repeats to within a few percent.
 *
 *   build/tls_seal CERT.pem KEY.pem       (bench/tls_compare runs it with its certificate)
 */
#include <openssl/ssl.h>
#include <stdio.h>
#include <time.h>

#include "core/core.h"
#include "core/tls_internal.h"

static void move(SSL *from, SSL *to) {
    char buf[16384];
    int n;
    while ((n = BIO_read(SSL_get_wbio(from), buf, sizeof buf)) > 0)
        BIO_write(SSL_get_rbio(to), buf, n);
}

static double cpu_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: tls_seal CERT.pem KEY.pem\n");
        return 2;
    }
    char err[512];
    tls_ctx_t *t = tls_ctx_new(argv[1], argv[2], err, sizeof err);
    if (!t) {
        fprintf(stderr, "tls_seal: %s\n", err);
        return 2;
    }
    SSL_CTX *cctx = SSL_CTX_new(TLS_client_method());
    SSL *s = SSL_new(tls_ctx_ssl(t)), *c = SSL_new(cctx);
    SSL_set_bio(s, BIO_new(BIO_s_mem()), BIO_new(BIO_s_mem()));
    SSL_set_bio(c, BIO_new(BIO_s_mem()), BIO_new(BIO_s_mem()));
    SSL_set_accept_state(s);
    SSL_set_connect_state(c);
    for (int i = 0; i < 8 && !(SSL_is_init_finished(s) && SSL_is_init_finished(c)); i++) {
        SSL_do_handshake(c);
        move(c, s);
        SSL_do_handshake(s);
        move(s, c);
    }
    if (!SSL_is_init_finished(s)) {
        fprintf(stderr, "tls_seal: the handshake did not finish\n");
        return 1;
    }
    printf("%s %s\n", SSL_get_version(s), SSL_CIPHER_get_name(SSL_get_current_cipher(s)));
    static unsigned char frames[16 * 150];
    for (int per = 1; per <= 16; per *= 4) {
        int n = 400000 / per;
        double t0 = cpu_now();
        for (int i = 0; i < n; i++) {
            size_t w;
            BIO *wb = SSL_get_wbio(s);
            if (SSL_write_ex(s, frames, sizeof frames / 16 * (size_t)per, &w) != 1) return 1;
            size_t pend = BIO_ctrl_pending(wb);
            buf_t *b = buf_new(pend);
            if (!b || BIO_read(wb, b->data, (int)pend) != (int)pend) return 1;
            buf_unref(b);
        }
        double dt = cpu_now() - t0;
        printf("%2d frames of 150 B per flush: %4.0f ns per flush, %4.0f ns per frame\n", per,
               dt / n * 1e9, dt / n / per * 1e9);
    }
    SSL_free(s);
    SSL_free(c);
    SSL_CTX_free(cctx);
    tls_ctx_free(t);
    return 0;
}
