/* fuzz_jwt: jwt_verify and chat_id_valid on arbitrary bytes, fixed secret and clock.
 *
 * The one idea: random bytes almost never carry a valid MAC, so a plain token fuzzer only
 * exercises the code before the HMAC check. Each input is therefore used twice: (1) as a
 * token, and (2) split at its first '\n' into header JSON and claims JSON that the harness
 * encodes and signs itself, which reaches the header and claims checks behind the MAC.
 * Whatever verifies must satisfy the claims' invariants and survive a jwt_sign round trip.
 */
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "chat/chat.h"

#define SECRET "fuzz-secret"
#define NOW 1700000000LL
#define MAX_PART 8192 /* jwt_verify refuses longer tokens anyway */

static void check(int cond) {
    if (!cond) __builtin_trap();
}

/* The rule from chat.h, restated independently. */
static int ref_chat_id_valid(const uint8_t *s, size_t n) {
    if (n == 0 || n > 128) return 0;
    for (size_t i = 0; i < n; i++)
        if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-", s[i]) ||
            s[i] == 0)
            return 0;
    return 1;
}

static size_t list_len(char **l) {
    size_t n = 0;
    while (l && l[n]) n++;
    return n;
}

static void check_claims(const jwt_claims_t *c) {
    size_t n = strlen(c->sub);
    check(n >= 1 && n <= 128);
    for (size_t i = 0; i < n; i++) check((unsigned char)c->sub[i] >= 0x20 && c->sub[i] != 0x7f);
    check(c->exp == 0 || c->exp > NOW);
    for (size_t i = 0; c->chats && c->chats[i]; i++) {
        check(chat_id_valid(c->chats[i], strlen(c->chats[i])));
        check(jwt_allows_chat(c, c->chats[i]));
    }
    check(jwt_allows_chat(c, "no/such/chat") == (c->chats == NULL));

    /* Re-mint and verify: sub, exp and chats survive. NULL is allowed: the added iat can
     * push a token that was near the size limit over it. */
    int64_t ttl = c->exp ? c->exp - NOW : 0;
    char *t = jwt_sign(c->sub, NOW, ttl, (const char *const *)c->chats, SECRET);
    if (!t) return;
    jwt_claims_t r;
    check(jwt_verify(t, strlen(t), SECRET, NOW, &r) == 0);
    check(strcmp(r.sub, c->sub) == 0);
    check(r.exp == c->exp);
    check(r.iat == NOW);
    check((r.chats == NULL) == (c->chats == NULL));
    check(list_len(r.chats) == list_len(c->chats));
    for (size_t i = 0; c->chats && c->chats[i]; i++) check(strcmp(r.chats[i], c->chats[i]) == 0);
    jwt_claims_free(&r);
    free(t);
}

static void verify_and_check(const char *tok, size_t len) {
    jwt_claims_t c;
    int rc = jwt_verify(tok, len, SECRET, NOW, &c);
    check(rc == 0 || rc == CHAT_EINVAL || rc == CHAT_EEXPIRED || rc == CHAT_ENOMEM);
    if (rc == 0) {
        check_claims(&c);
        jwt_claims_free(&c);
        check(c.chats == NULL);
    } else {
        check(c.sub[0] == '\0' && c.chats == NULL && c.exp == 0 && c.iat == 0);
    }
}

/* Unpadded base64url of in[0..n) into out, NUL-terminated; out needs 4*(n+2)/3+1 bytes. */
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

static void signed_pass(const uint8_t *data, size_t size) {
    const uint8_t *nl = memchr(data, '\n', size);
    if (!nl) return;
    size_t hn = (size_t)(nl - data), pn = size - hn - 1;
    if (hn > MAX_PART || pn > MAX_PART) return;
    size_t cap = 4 * ((hn + 2) / 3) + 1 + 4 * ((pn + 2) / 3) + 1 + 44 + 1;
    char *tok = malloc(cap);
    if (!tok) return;
    size_t n = b64url(data, hn, tok);
    tok[n++] = '.';
    n += b64url(nl + 1, pn, tok + n);
    unsigned char mac[32];
    unsigned int mlen = 0;
    HMAC(EVP_sha256(), SECRET, (int)strlen(SECRET), (const unsigned char *)tok, n, mac, &mlen);
    tok[n++] = '.';
    n += b64url(mac, mlen, tok + n);
    verify_and_check(tok, n);
    free(tok);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* a copy of exactly size bytes, so ASan sees any read past the given length */
    char *tok = malloc(size ? size : 1);
    if (!tok) return 0;
    if (size) memcpy(tok, data, size);
    verify_and_check(tok, size);
    check(chat_id_valid(tok, size) == (ref_chat_id_valid(data, size) != 0));
    free(tok);
    signed_pass(data, size);
    return 0;
}
