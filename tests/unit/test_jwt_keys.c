/* Unit tests for the public-key half of src/chat/jwt.c: key sets (PEM, JWKS, secret),
 * jwt_verify_keys with RS256 and ES256, alg confusion, iss/aud, kid, jwt_sign_ex.
 *
 * Keys are generated here with OpenSSL's API, and the tokens for the verify tests are
 * built and signed here too (OpenSSL's base64 and EVP_DigestSign, our own DER to r||s), so
 * a bug in jwt.c's encoder or signer cannot hide itself.
 */
#include "chat/chat.h"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/pem.h>

#include "test.h"

#define NOW 1700000000LL
#define CLAIMS "{\"sub\":\"alice\",\"exp\":1800000000}"

static EVP_PKEY *rsa1, *rsa2, *ec1, *ec2, *rsa_small, *ec384;

/* ---- an independent token builder ------------------------------------------------------ */

static char *b64url(const void *in, size_t n) {
    char *out = malloc(4 * ((n + 2) / 3) + 1);
    int len = EVP_EncodeBlock((unsigned char *)out, in, (int)n);
    while (len > 0 && out[len - 1] == '=') len--;
    out[len] = '\0';
    for (int i = 0; i < len; i++) {
        if (out[i] == '+') out[i] = '-';
        if (out[i] == '/') out[i] = '_';
    }
    return out;
}

static char *signing_input(const char *header, const char *payload) {
    char *h = b64url(header, strlen(header)), *p = b64url(payload, strlen(payload));
    char *s = malloc(strlen(h) + strlen(p) + 2);
    sprintf(s, "%s.%s", h, p);
    free(h);
    free(p);
    return s;
}

static char *join_sig(char *signing, const unsigned char *sig, size_t n) {
    char *s64 = b64url(sig, n);
    char *tok = malloc(strlen(signing) + strlen(s64) + 2);
    sprintf(tok, "%s.%s", signing, s64);
    free(s64);
    free(signing);
    return tok;
}

/* The DER signature of data under key (SHA-256). */
static unsigned char *der_sign(EVP_PKEY *key, const char *data, size_t *len) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, key);
    EVP_DigestSign(ctx, NULL, len, (const unsigned char *)data, strlen(data));
    unsigned char *sig = malloc(*len);
    EVP_DigestSign(ctx, sig, len, (const unsigned char *)data, strlen(data));
    EVP_MD_CTX_free(ctx);
    return sig;
}

/* RS256 token (PKCS#1 v1.5 signature as is). */
static char *rs_token(EVP_PKEY *key, const char *header, const char *payload) {
    char *signing = signing_input(header, payload);
    size_t n;
    unsigned char *sig = der_sign(key, signing, &n);
    char *tok = join_sig(signing, sig, n);
    free(sig);
    return tok;
}

/* ES256: the DER ECDSA-Sig-Value becomes r||s (32 bytes each). raw_len other than 64 cuts
 * or pads that; raw_len 0 keeps the DER form (which JOSE forbids). */
static char *es_token_len(EVP_PKEY *key, const char *header, const char *payload, size_t raw_len) {
    char *signing = signing_input(header, payload);
    size_t n;
    unsigned char *der = der_sign(key, signing, &n);
    char *tok;
    if (raw_len == 0) {
        tok = join_sig(signing, der, n);
    } else {
        const unsigned char *p = der;
        ECDSA_SIG *es = d2i_ECDSA_SIG(NULL, &p, (long)n);
        unsigned char raw[128] = {0};
        BN_bn2binpad(ECDSA_SIG_get0_r(es), raw, 32);
        BN_bn2binpad(ECDSA_SIG_get0_s(es), raw + 32, 32);
        ECDSA_SIG_free(es);
        tok = join_sig(signing, raw, raw_len);
    }
    free(der);
    return tok;
}

static char *es_token(EVP_PKEY *key, const char *header, const char *payload) {
    return es_token_len(key, header, payload, 64);
}

static char *hs_token(const void *secret, size_t slen, const char *header, const char *payload) {
    char *signing = signing_input(header, payload);
    unsigned char mac[32];
    unsigned int mlen = 0;
    HMAC(EVP_sha256(), secret, (int)slen, (const unsigned char *)signing, strlen(signing), mac,
         &mlen);
    return join_sig(signing, mac, mlen);
}

/* The public half of key as PEM ("PUBLIC KEY"); malloc'd, NUL-terminated. */
static char *pub_pem(EVP_PKEY *key) {
    BIO *b = BIO_new(BIO_s_mem());
    PEM_write_bio_PUBKEY(b, key);
    char *data;
    long n = BIO_get_mem_data(b, &data);
    char *out = malloc((size_t)n + 1);
    memcpy(out, data, (size_t)n);
    out[n] = '\0';
    BIO_free(b);
    return out;
}

static char *priv_pem(EVP_PKEY *key) {
    BIO *b = BIO_new(BIO_s_mem());
    PEM_write_bio_PrivateKey(b, key, NULL, NULL, 0, NULL, NULL);
    char *data;
    long n = BIO_get_mem_data(b, &data);
    char *out = malloc((size_t)n + 1);
    memcpy(out, data, (size_t)n);
    out[n] = '\0';
    BIO_free(b);
    return out;
}

static char *bn_b64(EVP_PKEY *key, const char *param, int pad) {
    BIGNUM *bn = NULL;
    EVP_PKEY_get_bn_param(key, param, &bn);
    int n = pad ? pad : BN_num_bytes(bn);
    unsigned char buf[1024];
    BN_bn2binpad(bn, buf, n);
    BN_free(bn);
    return b64url(buf, (size_t)n);
}

/* One JWK for key: {"kty":...,"kid":kid,<extra>}. extra: "" or ,"member":value... */
static char *jwk(EVP_PKEY *key, const char *kid, const char *extra) {
    char *out = malloc(4096);
    if (EVP_PKEY_is_a(key, "RSA")) {
        char *n = bn_b64(key, OSSL_PKEY_PARAM_RSA_N, 0), *e = bn_b64(key, OSSL_PKEY_PARAM_RSA_E, 0);
        snprintf(out, 4096, "{\"kty\":\"RSA\",\"kid\":\"%s\",\"n\":\"%s\",\"e\":\"%s\"%s}", kid, n,
                 e, extra);
        free(n);
        free(e);
    } else {
        char *x = bn_b64(key, OSSL_PKEY_PARAM_EC_PUB_X, 32);
        char *y = bn_b64(key, OSSL_PKEY_PARAM_EC_PUB_Y, 32);
        snprintf(out, 4096,
                 "{\"kty\":\"EC\",\"crv\":\"P-256\",\"kid\":\"%s\",\"x\":\"%s\",\"y\":\"%s\"%s}",
                 kid, x, y, extra);
        free(x);
        free(y);
    }
    return out;
}

static jwt_keyset_t *pem_set(EVP_PKEY *key) {
    jwt_keyset_t *ks = jwt_keyset_new();
    char *pem = pub_pem(key), err[200];
    int rc = jwt_keyset_add_pem(ks, pem, strlen(pem), err, sizeof err);
    free(pem);
    if (rc < 0) {
        jwt_keyset_free(ks);
        return NULL;
    }
    return ks;
}

static int verify_with(const jwt_keyset_t *ks, const jwt_policy_t *pol, char *tok) {
    jwt_claims_t c;
    memset(&c, 0xAB, sizeof c);
    int rc = jwt_verify_keys(tok, strlen(tok), &ks, 1, pol, NOW, &c);
    if (rc < 0 && (c.sub[0] || c.chats || c.exp)) rc = 999; /* a failure leaves them empty */
    if (rc == 0 && strcmp(c.sub, "alice") != 0) rc = 998;
    jwt_claims_free(&c);
    free(tok);
    return rc;
}

#define RS "{\"alg\":\"RS256\",\"typ\":\"JWT\"}"
#define ES "{\"alg\":\"ES256\",\"typ\":\"JWT\"}"
#define HS "{\"alg\":\"HS256\",\"typ\":\"JWT\"}"

/* ---- RS256 and ES256 ------------------------------------------------------------------- */

static void test_rs256_pem(void) {
    jwt_keyset_t *ks = pem_set(rsa1);
    CHECK(ks);
    CHECK_INT(jwt_keyset_count(ks), 1);
    CHECK_INT(verify_with(ks, NULL, rs_token(rsa1, RS, CLAIMS)), 0);
    /* another key's signature, and a tampered payload */
    CHECK_INT(verify_with(ks, NULL, rs_token(rsa2, RS, CLAIMS)), CHAT_EINVAL);
    char *t = rs_token(rsa1, RS, CLAIMS);
    char *dot = strchr(t, '.');
    dot[2] = dot[2] == 'A' ? 'B' : 'A';
    CHECK_INT(verify_with(ks, NULL, t), CHAT_EINVAL);
    /* a signature one byte short of the modulus */
    t = rs_token(rsa1, RS, CLAIMS);
    t[strlen(t) - 3] = '\0';
    CHECK_INT(verify_with(ks, NULL, t), CHAT_EINVAL);
    /* expired: the claims are checked as for HS256 */
    CHECK_INT(verify_with(ks, NULL, rs_token(rsa1, RS, "{\"sub\":\"alice\",\"exp\":1600000000}")),
              CHAT_EEXPIRED);
    jwt_keyset_free(ks);
}

static void test_es256_pem(void) {
    jwt_keyset_t *ks = pem_set(ec1);
    CHECK(ks);
    CHECK_INT(verify_with(ks, NULL, es_token(ec1, ES, CLAIMS)), 0);
    CHECK_INT(verify_with(ks, NULL, es_token(ec2, ES, CLAIMS)), CHAT_EINVAL);
    jwt_keyset_free(ks);
}

/* JOSE's ES256 signature is exactly 64 bytes of r||s: the DER form, and every other length,
 * is refused even when it carries a valid signature. */
static void test_es256_lengths(void) {
    jwt_keyset_t *ks = pem_set(ec1);
    CHECK(ks);
    CHECK_INT(verify_with(ks, NULL, es_token_len(ec1, ES, CLAIMS, 0)), CHAT_EINVAL); /* DER */
    static const size_t lens[] = {1, 32, 63, 65, 66, 96, 128};
    for (size_t i = 0; i < sizeof lens / sizeof *lens; i++)
        CHECK_INT(verify_with(ks, NULL, es_token_len(ec1, ES, CLAIMS, lens[i])), CHAT_EINVAL);
    /* r = 0 and s = 0: not a signature */
    char *signing = signing_input(ES, CLAIMS);
    unsigned char zero[64] = {0};
    CHECK_INT(verify_with(ks, NULL, join_sig(signing, zero, 64)), CHAT_EINVAL);
    jwt_keyset_free(ks);
}

/* ---- alg confusion --------------------------------------------------------------------- */

static void test_alg_confusion(void) {
    jwt_keyset_t *rs = pem_set(rsa1), *es = pem_set(ec1);
    CHECK(rs && es);
    /* the classic: HS256 keyed with the RSA public key's PEM (or DER) bytes */
    char *pem = pub_pem(rsa1);
    CHECK_INT(verify_with(rs, NULL, hs_token(pem, strlen(pem), HS, CLAIMS)), CHAT_EINVAL);
    unsigned char *der = NULL;
    int dlen = i2d_PUBKEY(rsa1, &der);
    CHECK_INT(verify_with(rs, NULL, hs_token(der, (size_t)dlen, HS, CLAIMS)), CHAT_EINVAL);
    OPENSSL_free(der);
    free(pem);
    pem = pub_pem(ec1);
    CHECK_INT(verify_with(es, NULL, hs_token(pem, strlen(pem), HS, CLAIMS)), CHAT_EINVAL);
    free(pem);
    /* a valid RS256 signature relabelled ES256 and the other way round */
    CHECK_INT(verify_with(rs, NULL, rs_token(rsa1, ES, CLAIMS)), CHAT_EINVAL);
    CHECK_INT(verify_with(es, NULL, es_token(ec1, RS, CLAIMS)), CHAT_EINVAL);
    /* alg none (empty signature, and a signature anyway), other algorithms, no alg */
    char *signing = signing_input("{\"alg\":\"none\"}", CLAIMS);
    char *tok = malloc(strlen(signing) + 2);
    sprintf(tok, "%s.", signing);
    free(signing);
    CHECK_INT(verify_with(rs, NULL, tok), CHAT_EINVAL);
    CHECK_INT(verify_with(rs, NULL, rs_token(rsa1, "{\"alg\":\"none\"}", CLAIMS)), CHAT_EINVAL);
    CHECK_INT(verify_with(rs, NULL, rs_token(rsa1, "{\"alg\":\"RS512\"}", CLAIMS)), CHAT_EINVAL);
    CHECK_INT(verify_with(rs, NULL, rs_token(rsa1, "{\"alg\":\"PS256\"}", CLAIMS)), CHAT_EINVAL);
    CHECK_INT(verify_with(rs, NULL, rs_token(rsa1, "{\"typ\":\"JWT\"}", CLAIMS)), CHAT_EINVAL);
    CHECK_INT(verify_with(rs, NULL, rs_token(rsa1, "{\"alg\":\"RS256\",\"crit\":[\"x\"]}", CLAIMS)),
              CHAT_EINVAL);
    jwt_keyset_free(rs);
    jwt_keyset_free(es);
}

/* A set holding a secret and a public key: each token is checked only with the key of its
 * algorithm, and the secret still works. */
static void test_mixed_set(void) {
    jwt_keyset_t *ks = pem_set(rsa1);
    CHECK(ks);
    CHECK_INT(jwt_keyset_add_secret(ks, "s3cret"), 0);
    CHECK_INT(verify_with(ks, NULL, hs_token("s3cret", 6, HS, CLAIMS)), 0);
    CHECK_INT(verify_with(ks, NULL, rs_token(rsa1, RS, CLAIMS)), 0);
    char *pem = pub_pem(rsa1);
    CHECK_INT(verify_with(ks, NULL, hs_token(pem, strlen(pem), HS, CLAIMS)), CHAT_EINVAL);
    free(pem);
    CHECK_INT(jwt_keyset_add_secret(ks, ""), CHAT_EINVAL);
    jwt_keyset_free(ks);
}

/* ---- iss and aud ----------------------------------------------------------------------- */

static void test_iss_aud(void) {
    jwt_keyset_t *ks = pem_set(rsa1);
    CHECK(ks);
    jwt_policy_t iss = {.issuer = "https://idp.example/realms/chat"};
    jwt_policy_t aud = {.audience = "chat"};
    jwt_policy_t both = {.issuer = "https://idp.example/realms/chat", .audience = "chat"};
#define WITH(pol, claims) verify_with(ks, pol, rs_token(rsa1, RS, claims))
    CHECK_INT(WITH(&iss, "{\"sub\":\"alice\",\"iss\":\"https://idp.example/realms/chat\"}"), 0);
    CHECK_INT(WITH(&iss, "{\"sub\":\"alice\"}"), CHAT_EINVAL);
    CHECK_INT(WITH(&iss, "{\"sub\":\"alice\",\"iss\":\"https://evil.example/realms/chat\"}"),
              CHAT_EINVAL);
    CHECK_INT(WITH(&iss, "{\"sub\":\"alice\",\"iss\":[\"https://idp.example/realms/chat\"]}"),
              CHAT_EINVAL);
    CHECK_INT(WITH(&aud, "{\"sub\":\"alice\",\"aud\":\"chat\"}"), 0);
    CHECK_INT(WITH(&aud, "{\"sub\":\"alice\",\"aud\":[\"account\",\"chat\"]}"), 0);
    CHECK_INT(WITH(&aud, "{\"sub\":\"alice\",\"aud\":[\"account\"]}"), CHAT_EINVAL);
    CHECK_INT(WITH(&aud, "{\"sub\":\"alice\",\"aud\":\"chat2\"}"), CHAT_EINVAL);
    CHECK_INT(WITH(&aud, "{\"sub\":\"alice\",\"aud\":[]}"), CHAT_EINVAL);
    CHECK_INT(WITH(&aud, "{\"sub\":\"alice\",\"aud\":7}"), CHAT_EINVAL);
    CHECK_INT(WITH(&aud, "{\"sub\":\"alice\"}"), CHAT_EINVAL);
    CHECK_INT(WITH(&both, "{\"sub\":\"alice\",\"aud\":\"chat\"}"), CHAT_EINVAL);
    CHECK_INT(
        WITH(&both,
             "{\"sub\":\"alice\",\"iss\":\"https://idp.example/realms/chat\",\"aud\":\"chat\"}"),
        0);
    /* not configured: not checked */
    CHECK_INT(WITH(NULL, "{\"sub\":\"alice\",\"iss\":\"anyone\",\"aud\":\"any\"}"), 0);
#undef WITH
    jwt_keyset_free(ks);
}

/* ---- JWKS and kid ---------------------------------------------------------------------- */

static void test_jwks_kid(void) {
    char *k1 = jwk(rsa1, "r1", ""), *k2 = jwk(ec1, "e1", ",\"use\":\"sig\",\"alg\":\"ES256\"");
    char doc[10000];
    snprintf(doc, sizeof doc, "{\"keys\":[%s,%s]}", k1, k2);
    free(k1);
    free(k2);
    jwt_keyset_t *ks = jwt_keyset_new();
    char err[200];
    CHECK_INT(jwt_keyset_add_jwks(ks, doc, strlen(doc), err, sizeof err), 2);
    CHECK_INT(verify_with(ks, NULL, rs_token(rsa1, "{\"alg\":\"RS256\",\"kid\":\"r1\"}", CLAIMS)),
              0);
    CHECK_INT(verify_with(ks, NULL, es_token(ec1, "{\"alg\":\"ES256\",\"kid\":\"e1\"}", CLAIMS)),
              0);
    /* no kid: every key of the algorithm is tried */
    CHECK_INT(verify_with(ks, NULL, rs_token(rsa1, RS, CLAIMS)), 0);
    /* a kid nobody has: CHAT_ENOTFOUND, so that the caller may refresh */
    CHECK_INT(verify_with(ks, NULL, rs_token(rsa1, "{\"alg\":\"RS256\",\"kid\":\"r2\"}", CLAIMS)),
              CHAT_ENOTFOUND);
    /* a known kid but the wrong key behind the signature, or the other key's kid */
    CHECK_INT(verify_with(ks, NULL, rs_token(rsa2, "{\"alg\":\"RS256\",\"kid\":\"r1\"}", CLAIMS)),
              CHAT_EINVAL);
    CHECK_INT(verify_with(ks, NULL, rs_token(rsa1, "{\"alg\":\"RS256\",\"kid\":\"e1\"}", CLAIMS)),
              CHAT_EINVAL);
    /* kid must be a non-empty string */
    CHECK_INT(verify_with(ks, NULL, rs_token(rsa1, "{\"alg\":\"RS256\",\"kid\":1}", CLAIMS)),
              CHAT_EINVAL);
    CHECK_INT(verify_with(ks, NULL, rs_token(rsa1, "{\"alg\":\"RS256\",\"kid\":\"\"}", CLAIMS)),
              CHAT_EINVAL);
    jwt_keyset_free(ks);
}

/* Keys that are not for signing with RS256/ES256 are skipped, documents that are not a
 * JWKS are refused. */
static void test_jwks_skips(void) {
    char *enc = jwk(rsa1, "enc", ",\"use\":\"enc\",\"alg\":\"RSA-OAEP\"");
    char *rs384 = jwk(rsa1, "rs384", ",\"alg\":\"RS384\"");
    char *small = jwk(rsa_small, "small", "");
    char *es_as_rs = jwk(ec1, "mislabelled", ",\"alg\":\"RS256\"");
    char *good = jwk(ec2, "good", "");
    /* a P-256 point off the curve: y + 1 */
    BIGNUM *y = NULL;
    EVP_PKEY_get_bn_param(ec1, OSSL_PKEY_PARAM_EC_PUB_Y, &y);
    BN_add_word(y, 1);
    unsigned char yb[32];
    BN_bn2binpad(y, yb, 32);
    BN_free(y);
    char *yb64 = b64url(yb, 32), *x64 = bn_b64(ec1, OSSL_PKEY_PARAM_EC_PUB_X, 32);
    char off[400];
    snprintf(off, sizeof off,
             "{\"kty\":\"EC\",\"crv\":\"P-256\",\"kid\":\"off\",\"x\":\"%s\",\"y\":\"%s\"}", x64,
             yb64);
    free(yb64);
    free(x64);
    char doc[20000];
    snprintf(doc, sizeof doc,
             "{\"keys\":[%s,%s,%s,%s,%s,{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"},"
             "{\"kty\":\"EC\",\"crv\":\"P-384\",\"x\":\"AA\",\"y\":\"AA\"},"
             "{\"kty\":\"RSA\",\"n\":\"!!\",\"e\":\"AQAB\"},7,%s]}",
             enc, rs384, small, es_as_rs, off, good);
    free(enc);
    free(rs384);
    free(small);
    free(es_as_rs);
    free(good);
    jwt_keyset_t *ks = jwt_keyset_new();
    char err[200];
    CHECK_INT(jwt_keyset_add_jwks(ks, doc, strlen(doc), err, sizeof err), 1);
    CHECK_INT(verify_with(ks, NULL, es_token(ec2, "{\"alg\":\"ES256\",\"kid\":\"good\"}", CLAIMS)),
              0);
    CHECK_INT(verify_with(ks, NULL, rs_token(rsa1, "{\"alg\":\"RS256\",\"kid\":\"enc\"}", CLAIMS)),
              CHAT_ENOTFOUND);
    static const char *bad[] = {
        "", "[]", "{}", "{\"keys\":{}}", "{\"keys\":[]", "null", "{\"keys\":[],\"keys\":[]}"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        CHECK_INT(jwt_keyset_add_jwks(ks, bad[i], strlen(bad[i]), err, sizeof err), CHAT_EINVAL);
    CHECK_INT(jwt_keyset_add_jwks(ks, "{\"keys\":[]}", 11, err, sizeof err), 0);
    CHECK_INT(jwt_keyset_count(ks), 1);
    jwt_keyset_free(ks);
}

static void test_pem_errors(void) {
    jwt_keyset_t *ks = jwt_keyset_new();
    char err[200] = "";
    char *pem = priv_pem(rsa1); /* a private key only: no PUBLIC KEY block */
    CHECK_INT(jwt_keyset_add_pem(ks, pem, strlen(pem), err, sizeof err), CHAT_EINVAL);
    CHECK(strstr(err, "PUBLIC KEY"));
    free(pem);
    CHECK_INT(jwt_keyset_add_pem(ks, "garbage", 7, err, sizeof err), CHAT_EINVAL);
    pem = pub_pem(rsa_small);
    CHECK_INT(jwt_keyset_add_pem(ks, pem, strlen(pem), err, sizeof err), CHAT_EINVAL);
    CHECK(strstr(err, "2048"));
    free(pem);
    pem = pub_pem(ec384);
    CHECK_INT(jwt_keyset_add_pem(ks, pem, strlen(pem), err, sizeof err), CHAT_EINVAL);
    free(pem);
    CHECK_INT(jwt_keyset_count(ks), 0);
    /* two keys in one file: both are added; a bad one after a good one adds neither */
    char *a = pub_pem(rsa1), *b = pub_pem(ec1), *c = pub_pem(ec384);
    char both[8000];
    snprintf(both, sizeof both, "%s%s", a, b);
    CHECK_INT(jwt_keyset_add_pem(ks, both, strlen(both), err, sizeof err), 0);
    CHECK_INT(jwt_keyset_count(ks), 2);
    snprintf(both, sizeof both, "%s%s", a, c);
    CHECK_INT(jwt_keyset_add_pem(ks, both, strlen(both), err, sizeof err), CHAT_EINVAL);
    CHECK_INT(jwt_keyset_count(ks), 2);
    free(a);
    free(b);
    free(c);
    jwt_keyset_free(ks);
}

/* ---- jwt_sign_ex ----------------------------------------------------------------------- */

static void test_sign_ex(void) {
    EVP_PKEY *keys[] = {rsa1, ec1};
    for (int i = 0; i < 2; i++) {
        char *pem = priv_pem(keys[i]), err[200] = "";
        const char *chats[] = {"general", NULL};
        jwt_mint_t m = {.sub = "alice",
                        .now = NOW,
                        .ttl = 60,
                        .chats = chats,
                        .key_pem = pem,
                        .key_pem_len = strlen(pem),
                        .kid = "k",
                        .iss = "me",
                        .aud = "chat"};
        char *tok = jwt_sign_ex(&m, err, sizeof err);
        free(pem);
        CHECK(tok);
        jwt_keyset_t *ks = pem_set(keys[i]);
        jwt_policy_t pol = {.issuer = "me", .audience = "chat"};
        jwt_claims_t c;
        CHECK_INT(
            jwt_verify_keys(tok, strlen(tok), (const jwt_keyset_t *const *)&ks, 1, &pol, NOW, &c),
            0);
        CHECK_STR(c.sub, "alice");
        CHECK_INT(c.exp, NOW + 60);
        CHECK(jwt_allows_chat(&c, "general") && !jwt_allows_chat(&c, "other"));
        jwt_claims_free(&c);
        /* the header names the key's algorithm and the kid */
        char *dot = strchr(tok, '.');
        unsigned char hdr[200];
        int hl = EVP_DecodeBlock(hdr, (unsigned char *)tok, (int)(dot - tok) / 4 * 4);
        CHECK(hl > 0);
        CHECK(strstr((char *)hdr, i == 0 ? "\"alg\":\"RS256\"" : "\"alg\":\"ES256\""));
        CHECK(strstr((char *)hdr, "\"kid\":\"k\""));
        jwt_keyset_free(ks);
        free(tok);
    }
    /* HS256 through jwt_sign_ex is what jwt_verify accepts */
    char err[200];
    jwt_mint_t m = {.sub = "bob", .now = NOW, .ttl = 0, .secret = "s"};
    char *tok = jwt_sign_ex(&m, err, sizeof err);
    CHECK(tok);
    jwt_claims_t c;
    CHECK_INT(jwt_verify(tok, strlen(tok), "s", NOW, &c), 0);
    jwt_claims_free(&c);
    free(tok);
    /* a public key, a small RSA key, both or neither of secret and key: refused */
    char *pub = pub_pem(rsa1), *small = priv_pem(rsa_small);
    jwt_mint_t bad1 = {.sub = "bob", .key_pem = pub, .key_pem_len = strlen(pub)};
    jwt_mint_t bad2 = {.sub = "bob", .key_pem = small, .key_pem_len = strlen(small)};
    jwt_mint_t bad3 = {.sub = "bob", .secret = "s", .key_pem = small, .key_pem_len = strlen(small)};
    jwt_mint_t bad4 = {.sub = "bob"};
    CHECK(!jwt_sign_ex(&bad1, err, sizeof err));
    CHECK(!jwt_sign_ex(&bad2, err, sizeof err));
    CHECK(!jwt_sign_ex(&bad3, err, sizeof err));
    CHECK(!jwt_sign_ex(&bad4, err, sizeof err));
    free(pub);
    free(small);
}

int main(void) {
    rsa1 = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    rsa2 = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    rsa_small = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)1024);
    ec1 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    ec2 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    ec384 = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
    if (!rsa1 || !rsa2 || !rsa_small || !ec1 || !ec2 || !ec384) {
        fprintf(stderr, "cannot generate test keys\n");
        return 1;
    }
    RUN(test_rs256_pem);
    RUN(test_es256_pem);
    RUN(test_es256_lengths);
    RUN(test_alg_confusion);
    RUN(test_mixed_set);
    RUN(test_iss_aud);
    RUN(test_jwks_kid);
    RUN(test_jwks_skips);
    RUN(test_pem_errors);
    RUN(test_sign_ex);
    EVP_PKEY *all[] = {rsa1, rsa2, rsa_small, ec1, ec2, ec384};
    for (size_t i = 0; i < 6; i++) EVP_PKEY_free(all[i]);
    return test_summary("test_jwt_keys");
}
