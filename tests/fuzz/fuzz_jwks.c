/* fuzz_jwks: the public-key half of jwt.c: jwt_verify_keys (RS256, ES256, HS256 chosen by
 * the key), JWKS documents and PEM buffers, with fixed keys and clock.
 *
 * The one idea: the first byte says what the rest is. 0: a token, checked against a PEM
 * set (RSA, EC, a secret) and a JWKS set (the same public keys under kids r1 and e1).
 * 1: header JSON '\n' claims JSON that the harness encodes and signs itself with the key
 * the second byte picks (RSA, EC or the secret) whatever the header says, which reaches
 * the checks behind the signature and the alg-confusion invariant: a token that verifies
 * names, in its alg, the algorithm of the key that signed it. 2: a JWKS document. 3: a PEM
 * buffer. The keys below are test keys made for this harness and nothing else.
 */
#include <jansson.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "chat/chat.h"

#define SECRET "fuzz-secret"
#define NOW 1700000000LL
#define ISSUER "https://idp.example/realms/chat"
#define AUDIENCE "chat"
#define MAX_PART 8192

static const char RSA_PRIV[] = "-----BEGIN PRIVATE KEY-----\n"
                               "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCnjPFVot0t2mJh\n"
                               "F5gQRVoFPI/kJl1vz9ldcgsdRzP8MxnsrukCHcsGwhPsdalhHgYn4Bme7yPkzEEs\n"
                               "IRgAYii+z+fp6itFvmCJ/RsaX8dRfji5/sw8AXEHanuDU/ZpBi63jjXoSbzG8gG3\n"
                               "mLx0WOMxUpShLPnkj3tJ8n+Am6UZXN7nuRH0C0bb7lSANcYhel3wFPG8VIQVbW2S\n"
                               "YvJnXxu9at+UQqkOVOWJYBNktopgYR5sqI2aQIfn48fry5hqIcNvUXf/LUlTTERI\n"
                               "aDIvlAYQkn2xH99V/wqYMuQEBb8JzdqgrsHRRA3O9rkB0RDCzPRHe6OEnlu8JWFG\n"
                               "rZJ71DJPAgMBAAECggEAUi4StvaldpaNN2Mbritd7oCYcQaSQMPZMPi9U9R3PoWP\n"
                               "+yOFXQjg6oUpwYqqk9xml4tW9boEyHWYp7zpqVJ7+q896GD3bYNllXjkIMkGmcWH\n"
                               "rE65vNrWJhWH1E/L5hJmuphRf4gfRBMyXWtYT9bDRI9lIDLPtNfdWFVNTXbKAUhc\n"
                               "yXGF99bdcWSS5K9UhejKUsbzbW1GjIfvyYGWCl9f5m9wyjbDpn9Wzqfx++zQsJki\n"
                               "mS931AF0UmFnpQ7ttmIvSvaqe2azZMrz89JceVqd3PrbL4n4dHvIk1MF28ay2GP3\n"
                               "QtMM2/eHTKMySQx/7c23EUIVXDG04CLEN5fnu17e0QKBgQDekLLW/gvefxjzdmU5\n"
                               "JrZ/LXBimW+XrTcd1xypxRqQ5Rr4OesaVNaVqK0m96Jsq/t1n/KS4qd+iUxQmyeC\n"
                               "/NRNGQp3waIaj8PxAdKbqwABfZHUE1TNGTCs9idw1Je2dEpOQwCZpThhb1zjdezl\n"
                               "9Hl6KbHn1jNbkGknZOa/I/dPMQKBgQDAuISCQInWGNgqCFwD6JnDLy63tcb/sIaW\n"
                               "H0SdaU9Dhkinl3IXPfWWRJX6JSo4JFlWYp8THoPKOFCP4mTqLwldReREaHXeWdjT\n"
                               "660jpZmwxZmwsn6YvAuvNCsIqvm4xpTwyDyUj/29+wj6FmVDsfUAK9XbgN8BGI6F\n"
                               "i57oPyI5fwKBgQCnvyG73uAtQ1gX781dJOt5sVK6TfEIvdoD2KTW5CMgwDzyiBzF\n"
                               "zNmrFOXkr9Iw2/L79aDLyp75RRxKyJYgKNUOgugb2MqIAIFrPbdx8pFfjjgCQsuw\n"
                               "heLlCeYyKVlrf/ydPezO4PM8pMW6/p+dtgR06cYX+Z7dzVskAO3VdJMqkQKBgA+F\n"
                               "TLaot/EUIySPc8mky+1aOWr2Ksag0tX4QrBisM2BXQySN9ADX2nwsBtrLtFCrCc2\n"
                               "3hTOGlMI4gQUeYgarahjXpTbzNJRbhLzIgiC57PC1jPSzDtEubQsgWK7Uk09QPV7\n"
                               "StW0Gv1X4Eszzof7Jv4SibCZ2lvePGwo6G1P2FPFAoGAKT4kRJXrBoPzgzZo/0Kq\n"
                               "3JGLSnFIevAohATVWuxhcctDmO4v+yksBD/X02TGn7aWR2kqWbf5mcqIE+Iot56R\n"
                               "LsvZ96Kv1qwVsinKmsnzfEN8bkn24vCdZ84zht9xZlwpC4Gyovk5SMTLNHe1sUuF\n"
                               "gwL29HcRKg8no3t8oVcpPs8=\n"
                               "-----END PRIVATE KEY-----\n";
static const char RSA_PUB[] = "-----BEGIN PUBLIC KEY-----\n"
                              "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAp4zxVaLdLdpiYReYEEVa\n"
                              "BTyP5CZdb8/ZXXILHUcz/DMZ7K7pAh3LBsIT7HWpYR4GJ+AZnu8j5MxBLCEYAGIo\n"
                              "vs/n6eorRb5gif0bGl/HUX44uf7MPAFxB2p7g1P2aQYut4416Em8xvIBt5i8dFjj\n"
                              "MVKUoSz55I97SfJ/gJulGVze57kR9AtG2+5UgDXGIXpd8BTxvFSEFW1tkmLyZ18b\n"
                              "vWrflEKpDlTliWATZLaKYGEebKiNmkCH5+PH68uYaiHDb1F3/y1JU0xESGgyL5QG\n"
                              "EJJ9sR/fVf8KmDLkBAW/Cc3aoK7B0UQNzva5AdEQwsz0R3ujhJ5bvCVhRq2Se9Qy\n"
                              "TwIDAQAB\n"
                              "-----END PUBLIC KEY-----\n";
static const char EC_PRIV[] = "-----BEGIN PRIVATE KEY-----\n"
                              "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg3t4Uq5VgI2a0XLjv\n"
                              "qEsCDqC2N+yqtVw1gNSM4fDLOyKhRANCAATgQZ4UUyAyv6QSnfFpqNH+zJUggV1j\n"
                              "wxIvqsQ5pnEn8flN6iOp4QD6/emDfiRGQAD2x2PKAV1JkDGb4Mtd4TwP\n"
                              "-----END PRIVATE KEY-----\n";
static const char EC_PUB[] = "-----BEGIN PUBLIC KEY-----\n"
                             "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE4EGeFFMgMr+kEp3xaajR/syVIIFd\n"
                             "Y8MSL6rEOaZxJ/H5TeojqeEA+v3pg34kRkAA9sdjygFdSZAxm+DLXeE8Dw==\n"
                             "-----END PUBLIC KEY-----\n";
static const char JWKS_DOC[] =
    "{\"keys\":[{\"kty\":\"RSA\",\"kid\":\"r1\",\"use\":\"sig\",\"alg\":\"RS256\",\"n\":"
    "\"p4zxVaLdLdpiYReYEEVaBTyP5C"
    "Zdb8_ZXXILHUcz_DMZ7K7pAh3LBsIT7HWpYR4GJ-AZnu8j5MxBLCEYAGIovs_n6eorRb5gif0bGl_HUX44uf7MPAFx"
    "B2p7g1P2aQYut4416Em8xvIBt5i8dFjjMVKUoSz55I97SfJ_gJulGVze57kR9AtG2-5UgDXGIXpd8BTxvFSEFW1tkm"
    "LyZ18bvWrflEKpDlTliWATZLaKYGEebKiNmkCH5-PH68uYaiHDb1F3_y1JU0xESGgyL5QGEJJ9sR_fVf8KmDLkBAW_"
    "Cc3aoK7B0UQNzva5AdEQwsz0R3ujhJ5bvCVhRq2Se9QyTw\",\"e\":\"AQAB\"},{\"kty\":\"EC\",\"kid\":"
    "\"e1\",\"crv\":\""
    "P-256\",\"x\":\"4EGeFFMgMr-kEp3xaajR_syVIIFdY8MSL6rEOaZxJ_E\",\"y\":\"-U3qI6nhAPr96YN-"
    "JEZAAPbHY8oB"
    "XUmQMZvgy13hPA8\"}]}";

static void check(int cond) {
    if (!cond) __builtin_trap();
}

static jwt_keyset_t *pem_set, *jwks_set;
static EVP_PKEY *rsa_priv, *ec_priv;
static const jwt_policy_t policy = {ISSUER, AUDIENCE};

static EVP_PKEY *load_priv(const char *pem) {
    BIO *b = BIO_new_mem_buf(pem, -1);
    EVP_PKEY *k = PEM_read_bio_PrivateKey(b, NULL, NULL, NULL);
    BIO_free(b);
    check(k != NULL);
    return k;
}

static void init(void) {
    if (pem_set) return;
    char err[200];
    pem_set = jwt_keyset_new();
    jwks_set = jwt_keyset_new();
    check(jwt_keyset_add_pem(pem_set, RSA_PUB, strlen(RSA_PUB), err, sizeof err) == 0);
    check(jwt_keyset_add_pem(pem_set, EC_PUB, strlen(EC_PUB), err, sizeof err) == 0);
    check(jwt_keyset_add_secret(pem_set, SECRET) == 0);
    check(jwt_keyset_add_jwks(jwks_set, JWKS_DOC, strlen(JWKS_DOC), err, sizeof err) == 2);
    rsa_priv = load_priv(RSA_PRIV);
    ec_priv = load_priv(EC_PRIV);
}

/* What every verified token must satisfy; claims_json: its decoded claims, when known. */
static void check_claims(const jwt_claims_t *c, const char *claims_json, size_t n) {
    size_t len = strlen(c->sub);
    check(len >= 1 && len <= 128);
    for (size_t i = 0; i < len; i++) check((unsigned char)c->sub[i] >= 0x20 && c->sub[i] != 0x7f);
    check(c->exp == 0 || c->exp > NOW);
    for (size_t i = 0; c->chats && c->chats[i]; i++)
        check(chat_id_valid(c->chats[i], strlen(c->chats[i])));
    if (!claims_json) return;
    json_t *j = json_loadb(claims_json, n, 0, NULL);
    check(j != NULL);
    const char *iss = json_string_value(json_object_get(j, "iss"));
    check(iss && strcmp(iss, ISSUER) == 0);
    json_decref(j);
}

static int verify(const char *tok, size_t len, const char *claims_json, size_t cn) {
    const jwt_keyset_t *sets[] = {pem_set, jwks_set};
    jwt_claims_t c;
    int rc = jwt_verify_keys(tok, len, sets, 2, &policy, NOW, &c);
    check(rc == 0 || rc == CHAT_EINVAL || rc == CHAT_EEXPIRED || rc == CHAT_ENOTFOUND ||
          rc == CHAT_ENOMEM);
    if (rc == 0) {
        check_claims(&c, claims_json, cn);
        jwt_claims_free(&c);
    } else {
        check(c.sub[0] == '\0' && c.chats == NULL && c.exp == 0 && c.iat == 0);
    }
    return rc;
}

static size_t b64url(const uint8_t *in, size_t n, char *out) {
    int len = EVP_EncodeBlock((unsigned char *)out, in, (int)n);
    while (len > 0 && out[len - 1] == '=') len--;
    out[len] = '\0';
    for (int i = 0; i < len; i++) {
        if (out[i] == '+') out[i] = '-';
        if (out[i] == '/') out[i] = '_';
    }
    return (size_t)len;
}

/* The JOSE signature of data with signer 0 (RSA), 1 (EC, r||s) or 2 (the secret). */
static size_t sign(int signer, const char *data, size_t n, uint8_t out[512]) {
    if (signer == 2) {
        unsigned int mlen = 0;
        HMAC(EVP_sha256(), SECRET, (int)strlen(SECRET), (const unsigned char *)data, n, out, &mlen);
        return mlen;
    }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    uint8_t der[512];
    size_t dl = sizeof der;
    check(ctx &&
          EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, signer ? ec_priv : rsa_priv) == 1 &&
          EVP_DigestSign(ctx, der, &dl, (const unsigned char *)data, n) == 1);
    EVP_MD_CTX_free(ctx);
    if (signer == 0) {
        memcpy(out, der, dl);
        return dl;
    }
    const uint8_t *p = der;
    ECDSA_SIG *es = d2i_ECDSA_SIG(NULL, &p, (long)dl);
    check(es != NULL);
    BN_bn2binpad(ECDSA_SIG_get0_r(es), out, 32);
    BN_bn2binpad(ECDSA_SIG_get0_s(es), out + 32, 32);
    ECDSA_SIG_free(es);
    return 64;
}

static void signed_pass(const uint8_t *data, size_t size) {
    if (size < 1) return;
    int signer = data[0] % 3;
    static const char *const algs[] = {"RS256", "ES256", "HS256"};
    data++, size--;
    const uint8_t *nl = memchr(data, '\n', size);
    if (!nl) return;
    size_t hn = (size_t)(nl - data), pn = size - hn - 1;
    if (hn > MAX_PART || pn > MAX_PART) return;
    char *tok = malloc(4 * ((hn + 2) / 3) + 4 * ((pn + 2) / 3) + 4 * 512 / 3 + 16);
    if (!tok) return;
    size_t n = b64url(data, hn, tok);
    tok[n++] = '.';
    n += b64url(nl + 1, pn, tok + n);
    uint8_t sig[512];
    size_t sl = sign(signer, tok, n, sig);
    tok[n++] = '.';
    n += b64url(sig, sl, tok + n);
    if (verify(tok, n, (const char *)nl + 1, pn) == 0) {
        /* no alg confusion: what verified says the signer's algorithm */
        json_t *h = json_loadb((const char *)data, hn, 0, NULL);
        const char *alg = json_string_value(json_object_get(h, "alg"));
        check(alg && strcmp(alg, algs[signer]) == 0);
        json_decref(h);
    }
    free(tok);
}

static void jwks_pass(const uint8_t *data, size_t size) {
    jwt_keyset_t *ks = jwt_keyset_new();
    if (!ks) return;
    char err[200];
    int rc = jwt_keyset_add_jwks(ks, (const char *)data, size, err, sizeof err);
    check(rc >= 0 || rc == CHAT_EINVAL || rc == CHAT_ENOMEM);
    check(jwt_keyset_count(ks) == (rc > 0 ? (size_t)rc : 0));
    jwt_keyset_free(ks);
}

static void pem_pass(const uint8_t *data, size_t size) {
    jwt_keyset_t *ks = jwt_keyset_new();
    if (!ks) return;
    char err[200];
    int rc = jwt_keyset_add_pem(ks, (const char *)data, size, err, sizeof err);
    check(rc == 0 || rc == CHAT_EINVAL || rc == CHAT_ENOMEM);
    check(rc == 0 ? jwt_keyset_count(ks) > 0 : jwt_keyset_count(ks) == 0);
    jwt_keyset_free(ks);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    init();
    if (size < 1) return 0;
    /* a copy of exactly the bytes, so ASan sees any read past the given length */
    size_t n = size - 1;
    char *rest = malloc(n ? n : 1);
    if (!rest) return 0;
    memcpy(rest, data + 1, n);
    switch (data[0] % 4) {
    case 0: verify(rest, n, NULL, 0); break;
    case 1: signed_pass((const uint8_t *)rest, n); break;
    case 2: jwks_pass((const uint8_t *)rest, n); break;
    default: pem_pass((const uint8_t *)rest, n); break;
    }
    free(rest);
    return 0;
}
