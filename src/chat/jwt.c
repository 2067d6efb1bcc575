/* jwt: HS256 JSON Web Tokens (RFC 7519 / RFC 7515 compact form) and the chat id rule.
 *
 * The one idea: trust nothing in a token until its MAC proves we minted it. jwt_verify
 * checks the shape and the HMAC before it parses any JSON, and only then reads the header
 * (which must still say HS256: a token is never allowed to pick its own algorithm) and
 * the claims. base64url is decoded strictly (no padding, canonical trailing bits) so
 * that a token has exactly one spelling.
 */
#include "chat.h"

#include <jansson.h>
#include <math.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
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

static int hmac_sha256(const char *secret, const void *data, size_t n,
                       uint8_t mac[JWT_MAC_LEN]) {
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
    if (typ && (!json_is_string(typ) || strcasecmp(json_string_value(typ), "JWT") != 0))
        goto out;
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

static int read_claims(const uint8_t *p, size_t n, int64_t now, jwt_claims_t *out) {
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
    if (has_nbf && nbf > now) goto out;
    rc = CHAT_EEXPIRED;
    if (has_exp && out->exp <= now) goto out;
    rc = 0;
out:
    json_decref(c);
    return rc;
}

int jwt_verify(const char *token, size_t len, const char *secret, int64_t now,
               jwt_claims_t *out) {
    if (!out) return CHAT_EINVAL;
    memset(out, 0, sizeof(*out));
    if (!token || !secret || !*secret || len == 0 || len > JWT_MAX_TOKEN) return CHAT_EINVAL;

    const char *dot1 = memchr(token, '.', len);
    if (!dot1) return CHAT_EINVAL;
    const char *dot2 = memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - token));
    if (!dot2) return CHAT_EINVAL;
    const char *sig = dot2 + 1;
    size_t hlen = (size_t)(dot1 - token);
    size_t plen = (size_t)(dot2 - dot1 - 1);
    size_t slen = len - (size_t)(sig - token);
    /* a third dot lands in the signature and fails its decoding */
    if (hlen == 0 || plen == 0 || slen != JWT_MAC_B64_LEN) return CHAT_EINVAL;

    uint8_t mac[JWT_MAC_LEN], given[JWT_MAC_LEN];
    size_t glen = 0;
    if (b64url_decode(sig, slen, given, &glen) < 0 || glen != JWT_MAC_LEN) return CHAT_EINVAL;
    if (hmac_sha256(secret, token, (size_t)(dot2 - token), mac) < 0) return CHAT_EINVAL;
    if (CRYPTO_memcmp(mac, given, JWT_MAC_LEN) != 0) return CHAT_EINVAL;

    /* Signed by us from here on; still checked, since a secret may be shared with
     * other issuers that mint other algorithms or claims. */
    int rc = CHAT_ENOMEM;
    uint8_t *buf = malloc(hlen > plen ? hlen : plen);
    if (!buf) goto fail;
    size_t n = 0;
    rc = CHAT_EINVAL;
    if (b64url_decode(token, hlen, buf, &n) < 0) goto fail;
    if ((rc = check_header(buf, n)) < 0) goto fail;
    rc = CHAT_EINVAL;
    if (b64url_decode(dot1 + 1, plen, buf, &n) < 0) goto fail;
    if ((rc = read_claims(buf, n, now, out)) < 0) goto fail;
    free(buf);
    return 0;
fail:
    free(buf);
    jwt_claims_free(out);
    memset(out, 0, sizeof(*out));
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
