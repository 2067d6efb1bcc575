/* jwt: JSON Web Tokens (RFC 7519 / RFC 7515 compact form), HS256 with a secret and RS256 /
 * ES256 with public keys (PEM or JWKS), and the chat id rule.
 *
 * The one idea: trust nothing in a token until its signature proves who minted it, and
 * never let a token pick how it is checked. jwt_verify (a secret only) checks the shape
 * and the HMAC before it parses any JSON. jwt_verify_keys must read the header first (its
 * alg and kid choose among the keys), so it parses it strictly and bounded, but the
 * algorithm is a property of each key, fixed when the key is loaded: a token's alg can only
 * select keys of that algorithm, never make an RSA key act as an HMAC secret. Signatures
 * use OpenSSL's EVP; JWKs become keys through OpenSSL 3's EVP_PKEY_fromdata. base64url is
 * decoded strictly (no padding, canonical trailing bits) so a token has one spelling.
 */
#include "chat.h"

#include <jansson.h>
#include <math.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* Longer tokens are refused before any work: they bound memory, HMAC time and the
 * size of the "chats" claim. */
#define JWT_MAX_TOKEN 8192
#define JWT_MAX_SUB 128
#define JWT_MAC_LEN 32     /* SHA-256 */
#define JWT_MAC_B64_LEN 43 /* 32 bytes in unpadded base64url */

/* base64url of {"alg":"HS256","typ":"JWT"}: every token we mint has this header. */
static const char jwt_header_b64[] = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

static const char b64url_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* ---- base64url (RFC 4648 section 5, no padding) ---------------------------------------- */

static int b64url_value(unsigned char c) {
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '-') return 62;
    if (c == '_') return 63;
    return -1;
}

static size_t b64url_encoded_len(size_t n) { return n / 3 * 4 + (n % 3 ? n % 3 + 1 : 0); }

/* Writes b64url_encoded_len(n) characters to out (no NUL). */
static void b64url_encode(const uint8_t *in, size_t n, char *out) {
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        acc = (acc << 8) | in[i];
        bits += 8;
        while (bits >= 6) {
            bits -= 6;
            out[o++] = b64url_alphabet[(acc >> bits) & 63];
        }
        acc &= (1u << bits) - 1;
    }
    if (bits > 0) out[o++] = b64url_alphabet[(acc << (6 - bits)) & 63];
}

/* Decodes n characters into out (room for n * 3 / 4 bytes). Rejects padding, characters
 * outside the alphabet, an impossible length (n % 4 == 1) and non-zero unused trailing
 * bits: accepting those would give one token several valid spellings. */
static int b64url_decode(const char *in, size_t n, uint8_t *out, size_t *outlen) {
    if (n % 4 == 1) return CHAT_EINVAL;
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64url_value((unsigned char)in[i]);
        if (v < 0) return CHAT_EINVAL;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (uint8_t)(acc >> bits);
        }
        acc &= (1u << bits) - 1;
    }
    if (acc != 0) return CHAT_EINVAL;
    *outlen = o;
    return 0;
}

/* ---- validation rules ------------------------------------------------------------------ */

bool chat_id_valid(const char *s, size_t n) {
    if (!s || n == 0 || n > 128) return false;
    if ((n == 1 && s[0] == '.') || (n == 2 && s[0] == '.' && s[1] == '.')) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                  c == '_' || c == '.' || c == '-';
        if (!ok) return false;
    }
    return true;
}

/* A user id ends up in logs and in every event's user_from: no C0 controls or DEL. */
static bool sub_valid(const char *s, size_t n) {
    if (!s || n == 0 || n > JWT_MAX_SUB) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c < 0x20 || c == 0x7f) return false;
    }
    return true;
}

static int hmac_sha256(const char *secret, const void *data, size_t n, uint8_t mac[JWT_MAC_LEN]) {
    size_t klen = strlen(secret);
    unsigned int mlen = 0;
    if (klen > INT32_MAX) return CHAT_EINVAL;
    if (!HMAC(EVP_sha256(), secret, (int)klen, data, n, mac, &mlen) || mlen != JWT_MAC_LEN)
        return CHAT_EINVAL;
    return 0;
}

/* A NumericDate (RFC 7519: integer or real seconds) as int64. Reals round up: for an
 * integer `now`, ceil(x) > now exactly when x > now, so exp and nbf checks on the stored
 * integer agree with the checks on the real value. Out-of-range values saturate. */
static int numeric_date(const json_t *v, int64_t *out) {
    if (json_is_integer(v)) {
        *out = (int64_t)json_integer_value(v);
        return 0;
    }
    if (!json_is_real(v)) return CHAT_EINVAL;
    double d = json_real_value(v);
    if (!isfinite(d)) return CHAT_EINVAL;
    if (d >= 9.2e18) {
        *out = INT64_MAX;
    } else if (d <= -9.2e18) {
        *out = INT64_MIN;
    } else {
        int64_t t = (int64_t)d; /* truncates toward zero */
        if ((double)t < d) t++;
        *out = t;
    }
    return 0;
}

/* ---- verify ---------------------------------------------------------------------------- */

static int check_header(const uint8_t *p, size_t n) {
    int rc = CHAT_EINVAL;
    json_t *h = json_loadb((const char *)p, n, JSON_REJECT_DUPLICATES, NULL);
    if (!json_is_object(h)) goto out;
    const char *alg = json_string_value(json_object_get(h, "alg"));
    if (!alg || strcmp(alg, "HS256") != 0) goto out;
    json_t *typ = json_object_get(h, "typ");
    if (typ && (!json_is_string(typ) || strcasecmp(json_string_value(typ), "JWT") != 0)) goto out;
    /* RFC 7515 4.1.11: "crit" names extensions we must understand; we understand none. */
    if (json_object_get(h, "crit")) goto out;
    rc = 0;
out:
    json_decref(h);
    return rc;
}

static int read_chats(const json_t *arr, char ***out) {
    if (!json_is_array(arr)) return CHAT_EINVAL;
    size_t n = json_array_size(arr);
    char **chats = calloc(n + 1, sizeof(*chats));
    if (!chats) return CHAT_ENOMEM;
    int rc = 0;
    for (size_t i = 0; i < n; i++) {
        const json_t *v = json_array_get(arr, i);
        const char *s = json_string_value(v);
        size_t len = json_string_length(v);
        if (!s || !chat_id_valid(s, len)) {
            rc = CHAT_EINVAL;
            break;
        }
        chats[i] = malloc(len + 1);
        if (!chats[i]) {
            rc = CHAT_ENOMEM;
            break;
        }
        memcpy(chats[i], s, len + 1);
    }
    if (rc < 0) {
        for (size_t i = 0; chats[i]; i++) free(chats[i]);
        free(chats);
        return rc;
    }
    *out = chats;
    return 0;
}

/* aud (RFC 7519 4.1.3): a string, or an array of strings; want must be one of them. */
static bool aud_matches(const json_t *aud, const char *want) {
    if (json_is_string(aud)) return strcmp(json_string_value(aud), want) == 0;
    if (!json_is_array(aud)) return false;
    for (size_t i = 0; i < json_array_size(aud); i++) {
        const char *a = json_string_value(json_array_get(aud, i));
        if (a && strcmp(a, want) == 0) return true;
    }
    return false;
}

static int read_claims(const uint8_t *p, size_t n, int64_t now, const jwt_policy_t *policy,
                       jwt_claims_t *out) {
    int rc = CHAT_EINVAL;
    json_t *c = json_loadb((const char *)p, n, JSON_REJECT_DUPLICATES, NULL);
    if (!json_is_object(c)) goto out;

    json_t *sub = json_object_get(c, "sub");
    if (!json_is_string(sub)) goto out;
    size_t sublen = json_string_length(sub);
    if (!sub_valid(json_string_value(sub), sublen)) goto out;
    memcpy(out->sub, json_string_value(sub), sublen);
    out->sub[sublen] = '\0';

    json_t *v;
    bool has_exp = false, has_nbf = false;
    int64_t nbf = 0;
    if ((v = json_object_get(c, "iat")) && numeric_date(v, &out->iat) < 0) goto out;
    if ((v = json_object_get(c, "exp"))) {
        if (numeric_date(v, &out->exp) < 0) goto out;
        has_exp = true;
    }
    if ((v = json_object_get(c, "nbf"))) {
        if (numeric_date(v, &nbf) < 0) goto out;
        has_nbf = true;
    }
    if ((v = json_object_get(c, "chats")) && (rc = read_chats(v, &out->chats)) < 0) goto out;

    rc = CHAT_EINVAL;
    if (policy && policy->issuer) {
        const char *iss = json_string_value(json_object_get(c, "iss"));
        if (!iss || strcmp(iss, policy->issuer) != 0) goto out;
    }
    if (policy && policy->audience && !aud_matches(json_object_get(c, "aud"), policy->audience))
        goto out;
    if (has_nbf && nbf > now) goto out;
    rc = CHAT_EEXPIRED;
    if (has_exp && out->exp <= now) goto out;
    rc = 0;
out:
    json_decref(c);
    return rc;
}

/* The three parts of a compact JWS, "header.payload.signature", and the length of the
 * signed input (header, dot, payload). */
typedef struct jwt_parts {
    const char *payload, *sig;
    size_t hlen, plen, slen, signed_len;
} jwt_parts_t;

/* Split token[0..len); false unless it has two dots and a non-empty header and payload (a
 * third dot lands in the signature and fails its decoding). */
static bool jwt_split(const char *token, size_t len, jwt_parts_t *p) {
    const char *dot1 = memchr(token, '.', len);
    if (!dot1) return false;
    const char *dot2 = memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - token));
    if (!dot2) return false;
    p->payload = dot1 + 1;
    p->sig = dot2 + 1;
    p->hlen = (size_t)(dot1 - token);
    p->plen = (size_t)(dot2 - p->payload);
    p->slen = len - (size_t)(p->sig - token);
    p->signed_len = (size_t)(dot2 - token);
    return p->hlen != 0 && p->plen != 0;
}

/* The signature held: decode the payload into buf (room for plen bytes) and read its claims
 * into out. 0, or an error with out released and zeroed. */
static int jwt_payload_claims(const jwt_parts_t *p, uint8_t *buf, int64_t now,
                              const jwt_policy_t *policy, jwt_claims_t *out) {
    size_t n = 0;
    int rc = CHAT_EINVAL;
    if (b64url_decode(p->payload, p->plen, buf, &n) == 0 &&
        (rc = read_claims(buf, n, now, policy, out)) == 0)
        return 0;
    jwt_claims_free(out);
    memset(out, 0, sizeof(*out));
    return rc;
}

int jwt_verify(const char *token, size_t len, const char *secret, int64_t now, jwt_claims_t *out) {
    if (!out) return CHAT_EINVAL;
    memset(out, 0, sizeof(*out));
    if (!token || !secret || !*secret || len == 0 || len > JWT_MAX_TOKEN) return CHAT_EINVAL;

    jwt_parts_t p;
    if (!jwt_split(token, len, &p) || p.slen != JWT_MAC_B64_LEN) return CHAT_EINVAL;

    uint8_t mac[JWT_MAC_LEN], given[JWT_MAC_LEN];
    size_t glen = 0;
    if (b64url_decode(p.sig, p.slen, given, &glen) < 0 || glen != JWT_MAC_LEN) return CHAT_EINVAL;
    if (hmac_sha256(secret, token, p.signed_len, mac) < 0) return CHAT_EINVAL;
    if (CRYPTO_memcmp(mac, given, JWT_MAC_LEN) != 0) return CHAT_EINVAL;

    /* Signed by us from here on; still checked, since a secret may be shared with
     * other issuers that mint other algorithms or claims. */
    uint8_t *buf = malloc(p.hlen > p.plen ? p.hlen : p.plen);
    if (!buf) return CHAT_ENOMEM;
    size_t n = 0;
    int rc = CHAT_EINVAL;
    if (b64url_decode(token, p.hlen, buf, &n) == 0 && (rc = check_header(buf, n)) == 0)
        rc = jwt_payload_claims(&p, buf, now, NULL, out);
    free(buf);
    return rc;
}

void jwt_claims_free(jwt_claims_t *c) {
    if (!c || !c->chats) return;
    for (size_t i = 0; c->chats[i]; i++) free(c->chats[i]);
    free(c->chats);
    c->chats = NULL;
}

bool jwt_allows_chat(const jwt_claims_t *c, const char *chat_id) {
    if (!c || !chat_id) return false;
    if (!c->chats) return true;
    for (size_t i = 0; c->chats[i]; i++)
        if (strcmp(c->chats[i], chat_id) == 0) return true;
    return false;
}

/* ---- sign ------------------------------------------------------------------------------ */

static json_t *claims_json(const char *sub, int64_t now, int64_t ttl, const char *const *chats) {
    json_t *p = json_object();
    if (!p) return NULL;
    /* json_stringn refuses invalid UTF-8: the NULL then fails the set */
    if (json_object_set_new(p, "sub", json_stringn(sub, strlen(sub))) < 0) goto fail;
    if (json_object_set_new(p, "iat", json_integer((json_int_t)now)) < 0) goto fail;
    if (ttl > 0) {
        if (now > INT64_MAX - ttl) goto fail;
        if (json_object_set_new(p, "exp", json_integer((json_int_t)(now + ttl))) < 0) goto fail;
    }
    if (chats) {
        json_t *arr = json_array();
        if (json_object_set_new(p, "chats", arr) < 0) goto fail;
        for (size_t i = 0; chats[i]; i++) {
            if (!chat_id_valid(chats[i], strlen(chats[i]))) goto fail;
            if (json_array_append_new(arr, json_string(chats[i])) < 0) goto fail;
        }
    }
    return p;
fail:
    json_decref(p);
    return NULL;
}

char *jwt_sign(const char *sub, int64_t now, int64_t ttl, const char *const *chats,
               const char *secret) {
    if (!sub || !secret || !*secret || !sub_valid(sub, strlen(sub))) return NULL;
    char *token = NULL, *payload = NULL;
    json_t *claims = claims_json(sub, now, ttl, chats);
    if (!claims) goto out;
    /* jansson keeps insertion order, so the bytes are sub, iat, exp, chats */
    payload = json_dumps(claims, JSON_COMPACT);
    if (!payload) goto out;

    size_t plen = strlen(payload);
    size_t hlen = sizeof(jwt_header_b64) - 1;
    size_t pblen = b64url_encoded_len(plen);
    size_t total = hlen + 1 + pblen + 1 + JWT_MAC_B64_LEN;
    /* never mint what jwt_verify would refuse */
    if (total > JWT_MAX_TOKEN) goto out;
    token = malloc(total + 1);
    if (!token) goto out;
    memcpy(token, jwt_header_b64, hlen);
    token[hlen] = '.';
    b64url_encode((const uint8_t *)payload, plen, token + hlen + 1);
    size_t signed_len = hlen + 1 + pblen;
    uint8_t mac[JWT_MAC_LEN];
    if (hmac_sha256(secret, token, signed_len, mac) < 0) {
        free(token);
        token = NULL;
        goto out;
    }
    token[signed_len] = '.';
    b64url_encode(mac, JWT_MAC_LEN, token + signed_len + 1);
    token[total] = '\0';
    OPENSSL_cleanse(mac, sizeof mac);
out:
    free(payload);
    json_decref(claims);
    return token;
}

/* ---- key sets: RS256, ES256, HS256 ------------------------------------------------------ */

#define JWT_MAX_KID 256
#define JWT_MAX_JWKS_KEYS 100
#define JWT_MIN_RSA_BITS 2048
#define JWT_ES256_SIG_LEN 64 /* JOSE: r || s, 32 bytes each (RFC 7518 3.4) */

typedef enum { JWT_HS256, JWT_RS256, JWT_ES256 } jwt_alg_t;

static const char *const jwt_alg_names[] = {"HS256", "RS256", "ES256"};

typedef struct jwt_key {
    jwt_alg_t alg;  /* the only algorithm this key is ever used with */
    char *kid;      /* NULL: matches any kid */
    char *secret;   /* JWT_HS256 */
    EVP_PKEY *pkey; /* JWT_RS256, JWT_ES256 */
} jwt_key_t;

struct jwt_keyset {
    jwt_key_t *keys;
    size_t n, cap;
};

jwt_keyset_t *jwt_keyset_new(void) { return calloc(1, sizeof(jwt_keyset_t)); }

static void key_clear(jwt_key_t *k) {
    free(k->kid);
    if (k->secret) {
        OPENSSL_cleanse(k->secret, strlen(k->secret));
        free(k->secret);
    }
    EVP_PKEY_free(k->pkey);
}

void jwt_keyset_free(jwt_keyset_t *ks) {
    if (!ks) return;
    for (size_t i = 0; i < ks->n; i++) key_clear(&ks->keys[i]);
    free(ks->keys);
    free(ks);
}

size_t jwt_keyset_count(const jwt_keyset_t *ks) { return ks ? ks->n : 0; }

/* Takes ownership of kid, secret and pkey (freed here on failure). */
static int keyset_push(jwt_keyset_t *ks, jwt_alg_t alg, char *kid, char *secret, EVP_PKEY *pkey) {
    if (ks->n == ks->cap) {
        size_t cap = ks->cap ? ks->cap * 2 : 4;
        jwt_key_t *k = realloc(ks->keys, cap * sizeof(*k));
        if (!k) {
            jwt_key_t tmp = {alg, kid, secret, pkey};
            key_clear(&tmp);
            return CHAT_ENOMEM;
        }
        ks->keys = k;
        ks->cap = cap;
    }
    ks->keys[ks->n++] = (jwt_key_t){alg, kid, secret, pkey};
    return 0;
}

int jwt_keyset_add_secret(jwt_keyset_t *ks, const char *secret) {
    if (!ks || !secret || !*secret) return CHAT_EINVAL;
    char *copy = strdup(secret);
    if (!copy) return CHAT_ENOMEM;
    return keyset_push(ks, JWT_HS256, NULL, copy, NULL);
}

/* Which algorithm a public key is good for: RS256 for RSA >= 2048 bits, ES256 for EC on
 * P-256; -1 for anything else (other curves, small RSA, Ed25519, DSA...). */
static int pkey_alg(EVP_PKEY *pkey) {
    if (EVP_PKEY_is_a(pkey, "RSA"))
        return EVP_PKEY_get_bits(pkey) >= JWT_MIN_RSA_BITS ? JWT_RS256 : -1;
    if (EVP_PKEY_is_a(pkey, "EC")) {
        char group[64];
        size_t glen = 0;
        if (!EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                            &glen))
            return -1;
        return strcmp(group, "prime256v1") == 0 ? JWT_ES256 : -1;
    }
    return -1;
}

int jwt_keyset_add_pem(jwt_keyset_t *ks, const char *pem, size_t len, char *err, size_t errlen) {
    if (!ks || !pem || len > INT32_MAX) return CHAT_EINVAL;
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (!bio) return CHAT_ENOMEM;
    size_t before = ks->n;
    int rc = 0;
    EVP_PKEY *pkey;
    while ((pkey = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL))) {
        int alg = pkey_alg(pkey);
        if (alg < 0) {
            snprintf(err, errlen,
                     "unsupported public key (%s, %d bits): use RSA of 2048 bits "
                     "or more, or EC P-256",
                     EVP_PKEY_get0_type_name(pkey), EVP_PKEY_get_bits(pkey));
            EVP_PKEY_free(pkey);
            rc = CHAT_EINVAL;
            break;
        }
        if ((rc = keyset_push(ks, (jwt_alg_t)alg, NULL, NULL, pkey)) < 0) break;
    }
    ERR_clear_error(); /* the loop ends on "no more PEM blocks" */
    BIO_free(bio);
    if (rc == 0 && ks->n == before) {
        snprintf(err, errlen,
                 "no PUBLIC KEY block (a PEM public key, as openssl pkey -pubout "
                 "writes it)");
        rc = CHAT_EINVAL;
    }
    if (rc < 0) {
        while (ks->n > before) key_clear(&ks->keys[--ks->n]);
    }
    return rc;
}

/* A JWK member that is base64url of at most max bytes; returns a malloc'd buffer. */
static uint8_t *jwk_bytes(const json_t *jwk, const char *name, size_t max, size_t *outlen) {
    const char *v = json_string_value(json_object_get(jwk, name));
    if (!v) return NULL;
    size_t n = strlen(v);
    if (n == 0 || n / 4 * 3 > max) return NULL;
    uint8_t *out = malloc(n * 3 / 4 + 1);
    if (!out) return NULL;
    if (b64url_decode(v, n, out, outlen) < 0) {
        free(out);
        return NULL;
    }
    return out;
}

/* kty RSA: n and e become a public key through OpenSSL 3's provider interface. */
static EVP_PKEY *jwk_rsa(const json_t *jwk) {
    size_t nlen = 0, elen = 0;
    uint8_t *n = jwk_bytes(jwk, "n", 1024, &nlen); /* up to 8192-bit moduli */
    uint8_t *e = jwk_bytes(jwk, "e", 8, &elen);
    EVP_PKEY *pkey = NULL;
    BIGNUM *bn = NULL, *be = NULL;
    OSSL_PARAM_BLD *bld = NULL;
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    if (!n || !e || nlen == 0 || elen == 0) goto out;
    bn = BN_bin2bn(n, (int)nlen, NULL);
    be = BN_bin2bn(e, (int)elen, NULL);
    if (!bn || !be || BN_is_zero(be) || !BN_is_odd(bn)) goto out;
    if (!(bld = OSSL_PARAM_BLD_new())) goto out;
    if (!OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, bn) ||
        !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, be))
        goto out;
    if (!(params = OSSL_PARAM_BLD_to_param(bld))) goto out;
    if (!(ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL))) goto out;
    if (EVP_PKEY_fromdata_init(ctx) <= 0 ||
        EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) <= 0)
        pkey = NULL;
out:
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(bn);
    BN_free(be);
    free(n);
    free(e);
    return pkey;
}

/* kty EC, crv P-256: x and y (32 bytes each) as the uncompressed point 04||x||y; a point
 * off the curve is refused by the public key check. */
static EVP_PKEY *jwk_ec(const json_t *jwk) {
    size_t xlen = 0, ylen = 0;
    uint8_t *x = jwk_bytes(jwk, "x", 32, &xlen);
    uint8_t *y = jwk_bytes(jwk, "y", 32, &ylen);
    EVP_PKEY *pkey = NULL;
    EVP_PKEY_CTX *ctx = NULL, *chk = NULL;
    if (!x || !y || xlen != 32 || ylen != 32) goto out;
    uint8_t pt[65];
    pt[0] = 0x04;
    memcpy(pt + 1, x, 32);
    memcpy(pt + 33, y, 32);
    char group[] = "prime256v1";
    OSSL_PARAM params[] = {
        OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group - 1),
        OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_PUB_KEY, pt, sizeof pt),
        OSSL_PARAM_END,
    };
    if (!(ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL))) goto out;
    if (EVP_PKEY_fromdata_init(ctx) <= 0 ||
        EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) <= 0) {
        pkey = NULL;
        goto out;
    }
    if (!(chk = EVP_PKEY_CTX_new_from_pkey(NULL, pkey, NULL)) || EVP_PKEY_public_check(chk) != 1) {
        EVP_PKEY_free(pkey);
        pkey = NULL;
    }
out:
    EVP_PKEY_CTX_free(chk);
    EVP_PKEY_CTX_free(ctx);
    free(x);
    free(y);
    return pkey;
}

int jwt_keyset_add_jwks(jwt_keyset_t *ks, const char *json, size_t len, char *err, size_t errlen) {
    if (!ks || !json) return CHAT_EINVAL;
    json_t *doc = json_loadb(json, len, JSON_REJECT_DUPLICATES, NULL);
    json_t *keys = json_object_get(doc, "keys");
    int rc = CHAT_EINVAL;
    if (!json_is_object(doc) || !json_is_array(keys)) {
        snprintf(err, errlen, "not a JWKS: expected a JSON object with a \"keys\" array");
        goto out;
    }
    if (json_array_size(keys) > JWT_MAX_JWKS_KEYS) {
        snprintf(err, errlen, "JWKS holds %zu keys, more than %d", json_array_size(keys),
                 JWT_MAX_JWKS_KEYS);
        goto out;
    }
    size_t before = ks->n;
    rc = 0;
    for (size_t i = 0; i < json_array_size(keys); i++) {
        const json_t *jwk = json_array_get(keys, i);
        const char *kty = json_string_value(json_object_get(jwk, "kty"));
        const json_t *use = json_object_get(jwk, "use");
        const json_t *alg = json_object_get(jwk, "alg");
        const json_t *kid = json_object_get(jwk, "kid");
        if (!kty || (use && (!json_is_string(use) || strcmp(json_string_value(use), "sig"))))
            continue;
        if (kid && (!json_is_string(kid) || json_string_length(kid) == 0 ||
                    json_string_length(kid) > JWT_MAX_KID))
            continue;
        jwt_alg_t a;
        EVP_PKEY *pkey = NULL;
        if (strcmp(kty, "RSA") == 0) {
            a = JWT_RS256;
        } else if (strcmp(kty, "EC") == 0) {
            const char *crv = json_string_value(json_object_get(jwk, "crv"));
            if (!crv || strcmp(crv, "P-256") != 0) continue;
            a = JWT_ES256;
        } else {
            continue; /* "oct" (a shared secret in a public document) and the rest */
        }
        if (alg && (!json_is_string(alg) || strcmp(json_string_value(alg), jwt_alg_names[a])))
            continue;
        pkey = a == JWT_RS256 ? jwk_rsa(jwk) : jwk_ec(jwk);
        ERR_clear_error();
        if (!pkey) continue;
        if (pkey_alg(pkey) != (int)a) {
            EVP_PKEY_free(pkey);
            continue;
        }
        char *kidcopy = NULL;
        if (kid && !(kidcopy = strdup(json_string_value(kid)))) {
            EVP_PKEY_free(pkey);
            rc = CHAT_ENOMEM;
            break;
        }
        if ((rc = keyset_push(ks, a, kidcopy, NULL, pkey)) < 0) break;
    }
    if (rc < 0) {
        while (ks->n > before) key_clear(&ks->keys[--ks->n]);
        snprintf(err, errlen, "out of memory");
    } else {
        rc = (int)(ks->n - before);
    }
out:
    json_decref(doc);
    return rc;
}

/* ---- verify with a key set ------------------------------------------------------------- */

/* The parsed header of a token: the alg it claims and its kid. */
typedef struct jwt_header {
    int alg; /* jwt_alg_t, or -1 */
    char kid[JWT_MAX_KID + 1];
    bool has_kid;
} jwt_header_t;

static int parse_header(const uint8_t *p, size_t n, jwt_header_t *h) {
    int rc = CHAT_EINVAL;
    json_t *j = json_loadb((const char *)p, n, JSON_REJECT_DUPLICATES, NULL);
    if (!json_is_object(j)) goto out;
    const char *alg = json_string_value(json_object_get(j, "alg"));
    h->alg = -1;
    for (int i = 0; alg && i < 3; i++)
        if (strcmp(alg, jwt_alg_names[i]) == 0) h->alg = i;
    if (h->alg < 0) goto out; /* "none", HS512, PS256...: never */
    json_t *typ = json_object_get(j, "typ");
    if (typ && (!json_is_string(typ) || strcasecmp(json_string_value(typ), "JWT") != 0)) goto out;
    if (json_object_get(j, "crit")) goto out;
    json_t *kid = json_object_get(j, "kid");
    if (kid) {
        size_t klen = json_string_length(kid);
        if (!json_is_string(kid) || klen == 0 || klen > JWT_MAX_KID ||
            memchr(json_string_value(kid), 0, klen))
            goto out;
        memcpy(h->kid, json_string_value(kid), klen + 1);
        h->has_kid = true;
    }
    rc = 0;
out:
    json_decref(j);
    return rc;
}

/* ES256: JOSE's raw r||s becomes the DER ECDSA-Sig-Value OpenSSL verifies. Returns the DER
 * length written to *der (malloc'd), or -1. */
static int es256_der(const uint8_t *sig, size_t slen, uint8_t **der) {
    if (slen != JWT_ES256_SIG_LEN) return -1;
    ECDSA_SIG *es = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(sig, 32, NULL), *s = BN_bin2bn(sig + 32, 32, NULL);
    if (!es || !r || !s || !ECDSA_SIG_set0(es, r, s)) {
        BN_free(r);
        BN_free(s);
        ECDSA_SIG_free(es);
        return -1;
    }
    *der = NULL;
    int n = i2d_ECDSA_SIG(es, der);
    ECDSA_SIG_free(es);
    return n > 0 ? n : -1;
}

static bool key_verifies(const jwt_key_t *k, const char *data, size_t n, const uint8_t *sig,
                         size_t slen) {
    if (k->alg == JWT_HS256) {
        uint8_t mac[JWT_MAC_LEN];
        if (slen != JWT_MAC_LEN || hmac_sha256(k->secret, data, n, mac) < 0) return false;
        return CRYPTO_memcmp(mac, sig, JWT_MAC_LEN) == 0;
    }
    uint8_t *der = NULL;
    const uint8_t *s = sig;
    size_t sl = slen;
    if (k->alg == JWT_ES256) {
        int dl = es256_der(sig, slen, &der);
        if (dl < 0) return false;
        s = der;
        sl = (size_t)dl;
    } else if (slen != (size_t)EVP_PKEY_get_size(k->pkey)) {
        return false; /* RS256: the signature is exactly the modulus length */
    }
    bool ok = false;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (ctx && EVP_DigestVerifyInit(ctx, NULL, EVP_sha256(), NULL, k->pkey) == 1 &&
        EVP_DigestVerify(ctx, s, sl, (const unsigned char *)data, n) == 1)
        ok = true;
    EVP_MD_CTX_free(ctx);
    OPENSSL_free(der);
    ERR_clear_error();
    return ok;
}

int jwt_verify_keys(const char *token, size_t len, const jwt_keyset_t *const *sets, size_t nsets,
                    const jwt_policy_t *policy, int64_t now, jwt_claims_t *out) {
    if (!out) return CHAT_EINVAL;
    memset(out, 0, sizeof(*out));
    if (!token || len == 0 || len > JWT_MAX_TOKEN) return CHAT_EINVAL;
    jwt_parts_t p;
    if (!jwt_split(token, len, &p) || p.slen == 0) return CHAT_EINVAL;

    /* One buffer for the decoded parts; none is longer than the token. The header is read
     * before the signature is checked (its alg and kid pick the key), so it is parsed as
     * strictly as the claims, and a bounded size keeps that cheap. */
    int rc = CHAT_ENOMEM;
    uint8_t *buf = malloc(len);
    if (!buf) goto fail;
    size_t n = 0;
    jwt_header_t h = {0};
    rc = CHAT_EINVAL;
    if (b64url_decode(token, p.hlen, buf, &n) < 0 || parse_header(buf, n, &h) < 0) goto fail;
    if (b64url_decode(p.sig, p.slen, buf, &n) < 0) goto fail;

    bool kid_known = false, ok = false;
    for (size_t si = 0; si < nsets && !ok; si++) {
        const jwt_keyset_t *ks = sets[si];
        for (size_t i = 0; ks && i < ks->n && !ok; i++) {
            const jwt_key_t *k = &ks->keys[i];
            bool same_kid = h.has_kid && k->kid && strcmp(k->kid, h.kid) == 0;
            if (same_kid) kid_known = true;
            /* the key decides: a token claiming HS256 never meets an RSA or EC key */
            if ((int)k->alg != h.alg) continue;
            if (h.has_kid && k->kid && !same_kid) continue;
            ok = key_verifies(k, token, p.signed_len, buf, n);
        }
    }
    if (!ok) {
        rc = h.has_kid && !kid_known ? CHAT_ENOTFOUND : CHAT_EINVAL;
        goto fail;
    }
    rc = jwt_payload_claims(&p, buf, now, policy, out);
fail: /* out holds nothing before the claims are read */
    free(buf);
    return rc;
}

/* ---- sign with a key ------------------------------------------------------------------- */

/* JOSE signature of data with pkey (RS256: PKCS#1 v1.5; ES256: DER converted to r||s).
 * Returns a malloc'd signature and its length in *slen, or NULL. */
static uint8_t *pkey_sign(EVP_PKEY *pkey, jwt_alg_t alg, const char *data, size_t n, size_t *slen) {
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    uint8_t *der = NULL, *out = NULL;
    size_t dl = 0;
    if (!ctx || EVP_DigestSignInit(ctx, NULL, EVP_sha256(), NULL, pkey) != 1 ||
        EVP_DigestSign(ctx, NULL, &dl, (const unsigned char *)data, n) != 1 ||
        !(der = malloc(dl)) || EVP_DigestSign(ctx, der, &dl, (const unsigned char *)data, n) != 1)
        goto out;
    if (alg == JWT_RS256) {
        out = der;
        der = NULL;
        *slen = dl;
        goto out;
    }
    const uint8_t *p = der;
    ECDSA_SIG *es = d2i_ECDSA_SIG(NULL, &p, (long)dl);
    if (!es) goto out;
    if ((out = malloc(JWT_ES256_SIG_LEN)) &&
        (BN_bn2binpad(ECDSA_SIG_get0_r(es), out, 32) != 32 ||
         BN_bn2binpad(ECDSA_SIG_get0_s(es), out + 32, 32) != 32)) {
        free(out);
        out = NULL;
    }
    ECDSA_SIG_free(es);
    *slen = JWT_ES256_SIG_LEN;
out:
    free(der);
    EVP_MD_CTX_free(ctx);
    ERR_clear_error();
    return out;
}

static char *b64url_dup(const void *in, size_t n) {
    char *s = malloc(b64url_encoded_len(n) + 1);
    if (!s) return NULL;
    b64url_encode(in, n, s);
    s[b64url_encoded_len(n)] = '\0';
    return s;
}

char *jwt_sign_ex(const jwt_mint_t *m, char *err, size_t errlen) {
    char *token = NULL, *hjson = NULL, *pjson = NULL, *h64 = NULL, *p64 = NULL, *s64 = NULL;
    uint8_t *sig = NULL;
    size_t siglen = 0;
    EVP_PKEY *pkey = NULL;
    json_t *header = NULL, *claims = NULL;
    jwt_alg_t alg = JWT_HS256;
    if (!m || !m->sub || !sub_valid(m->sub, strlen(m->sub))) {
        snprintf(err, errlen, "invalid user id");
        goto out;
    }
    if ((m->secret && *m->secret) == (m->key_pem != NULL)) {
        snprintf(err, errlen, "give exactly one of a secret or a private key");
        goto out;
    }
    if (m->key_pem) {
        BIO *bio = BIO_new_mem_buf(m->key_pem, (int)m->key_pem_len);
        pkey = bio ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
        BIO_free(bio);
        ERR_clear_error();
        int a = pkey ? pkey_alg(pkey) : -1;
        if (a < 0) {
            snprintf(err, errlen,
                     "need a PEM private key: RSA of 2048 bits or more, or EC "
                     "P-256");
            goto out;
        }
        alg = (jwt_alg_t)a;
    }
    header = json_object();
    if (!header || json_object_set_new(header, "alg", json_string(jwt_alg_names[alg])) < 0 ||
        json_object_set_new(header, "typ", json_string("JWT")) < 0 ||
        (m->kid && json_object_set_new(header, "kid", json_string(m->kid)) < 0))
        goto oom;
    if (!(claims = claims_json(m->sub, m->now, m->ttl, m->chats))) {
        snprintf(err, errlen, "invalid claims (a chat id, or the expiry)");
        goto out;
    }
    if ((m->iss && json_object_set_new(claims, "iss", json_string(m->iss)) < 0) ||
        (m->aud && json_object_set_new(claims, "aud", json_string(m->aud)) < 0))
        goto oom;
    if (!(hjson = json_dumps(header, JSON_COMPACT)) || !(pjson = json_dumps(claims, JSON_COMPACT)))
        goto oom;
    if (!(h64 = b64url_dup(hjson, strlen(hjson))) || !(p64 = b64url_dup(pjson, strlen(pjson))))
        goto oom;
    size_t silen = strlen(h64) + 1 + strlen(p64);
    char *signing = malloc(silen + 1);
    if (!signing) goto oom;
    snprintf(signing, silen + 1, "%s.%s", h64, p64);
    if (alg == JWT_HS256) {
        uint8_t mac[JWT_MAC_LEN];
        if (hmac_sha256(m->secret, signing, silen, mac) == 0) {
            s64 = b64url_dup(mac, sizeof mac);
            siglen = sizeof mac;
        }
    } else if ((sig = pkey_sign(pkey, alg, signing, silen, &siglen))) {
        s64 = b64url_dup(sig, siglen);
    }
    if (s64 && silen + 1 + strlen(s64) <= JWT_MAX_TOKEN &&
        (token = malloc(silen + 1 + strlen(s64) + 1)))
        sprintf(token, "%s.%s", signing, s64);
    else snprintf(err, errlen, "cannot sign (token too long, or a signing failure)");
    free(signing);
    goto out;
oom:
    snprintf(err, errlen, "out of memory");
out:
    EVP_PKEY_free(pkey);
    json_decref(header);
    json_decref(claims);
    free(hjson);
    free(pjson);
    free(h64);
    free(p64);
    free(s64);
    free(sig);
    return token;
}
