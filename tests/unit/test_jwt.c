/* Unit tests for src/chat/jwt.c: HS256 verify/sign and chat_id_valid.
 *
 * Known vectors come from outside our code (Python's hmac/hashlib/base64, and the
 * well-known jwt.io example); tokens for the negative cases are built here with OpenSSL's
 * own base64 (EVP_EncodeBlock) and HMAC, so a bug in jwt.c's encoder cannot hide itself.
 */
#include "chat/chat.h"

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "test.h"

#define SECRET "unit-test-secret"
#define NOW 1700000000LL

/* Produced with Python 3.11:
 *   def b64(b): return base64.urlsafe_b64encode(b).rstrip(b'=').decode()
 *   h = b64(b'{"alg":"HS256","typ":"JWT"}')
 *   p = b64(json.dumps(CLAIMS, separators=(',', ':')).encode())
 *   sig = b64(hmac.new(SECRET, (h + '.' + p).encode(), hashlib.sha256).digest())
 * VECTOR1: SECRET b"vector-secret-1", CLAIMS {"sub":"alice","iat":1700000000,"exp":1700003600}
 * VECTOR2: SECRET b"vector-secret-2", CLAIMS {"sub":"bob","iat":1700000000,
 *          "chats":["general","550e8400-e29b-41d4-a716-446655440000"]} */
static const char VECTOR1[] = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
                              "eyJzdWIiOiJhbGljZSIsImlhdCI6MTcwMDAwMDAwMCwiZXhwIjoxNzAwMDAzNjAwfQ."
                              "IieCBvD0Yf2RswBw8L2gDkBY4yBXglv3ZU0kHagLAXU";
static const char VECTOR2[] =
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiJib2IiLCJpYXQiOjE3MDAwMDAwMDAsImNoYXRzIjpbImdlbmVyYWwiLCI1NTBlODQwMC1lMjliLTQx"
    "ZDQtYTcxNi00NDY2NTU0NDAwMDAiXX0."
    "puIFiNmUM_g5XXKYUa1gnv50mzGy2ywY13ZceOR5SBA";
/* The example token shown on jwt.io (secret "your-256-bit-secret"), checked with Python. */
static const char JWTIO[] =
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9."
    "eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ."
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c";

/* ---- helpers: an independent token builder --------------------------------------------- */

/* base64url without padding via OpenSSL's standard base64. out: malloc'd. */
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

/* "h64.p64.HMAC(secret, h64.p64)": signs the parts exactly as given, malformed or not. */
static char *sign_parts(const char *h64, const char *p64, const char *secret) {
    size_t n = strlen(h64) + 1 + strlen(p64);
    char *signing = malloc(n + 1);
    snprintf(signing, n + 1, "%s.%s", h64, p64);
    unsigned char mac[32];
    unsigned int mlen = 0;
    HMAC(EVP_sha256(), secret, (int)strlen(secret), (const unsigned char *)signing, n, mac, &mlen);
    char *sig = b64url(mac, mlen);
    char *tok = malloc(n + 1 + strlen(sig) + 1);
    sprintf(tok, "%s.%s", signing, sig);
    free(signing);
    free(sig);
    return tok;
}

static char *make_token(const char *header, const char *payload, const char *secret) {
    char *h = b64url(header, strlen(header)), *p = b64url(payload, strlen(payload));
    char *tok = sign_parts(h, p, secret);
    free(h);
    free(p);
    return tok;
}

#define HS256 "{\"alg\":\"HS256\",\"typ\":\"JWT\"}"

/* Verify a token built from header and payload JSON, signed with SECRET, at NOW. */
static int verify_json(const char *header, const char *payload, jwt_claims_t *c) {
    char *tok = make_token(header, payload, SECRET);
    int rc = jwt_verify(tok, strlen(tok), SECRET, NOW, c);
    free(tok);
    return rc;
}

/* Same, discarding the claims; asserts a failure leaves them empty. */
static int verify_code(const char *header, const char *payload) {
    jwt_claims_t c;
    memset(&c, 0xAB, sizeof c);
    int rc = verify_json(header, payload, &c);
    if (rc < 0 && (c.sub[0] != '\0' || c.chats != NULL || c.exp != 0)) return 999;
    jwt_claims_free(&c);
    return rc;
}

static int verify_str(const char *tok, const char *secret, int64_t now) {
    jwt_claims_t c;
    int rc = jwt_verify(tok, strlen(tok), secret, now, &c);
    jwt_claims_free(&c);
    return rc;
}

/* ---- known vectors --------------------------------------------------------------------- */

static void test_vector1_verify(void) {
    jwt_claims_t c;
    CHECK_INT(jwt_verify(VECTOR1, strlen(VECTOR1), "vector-secret-1", NOW, &c), 0);
    CHECK_STR(c.sub, "alice");
    CHECK_INT(c.iat, 1700000000);
    CHECK_INT(c.exp, 1700003600);
    CHECK(c.chats == NULL);
    CHECK(jwt_allows_chat(&c, "anything"));
    jwt_claims_free(&c);
}

static void test_vector1_sign_exact(void) {
    char *t = jwt_sign("alice", NOW, 3600, NULL, "vector-secret-1");
    CHECK(t != NULL);
    int same = strcmp(t, VECTOR1) == 0;
    free(t);
    CHECK(same);
}

static void test_vector2_chats(void) {
    jwt_claims_t c;
    CHECK_INT(jwt_verify(VECTOR2, strlen(VECTOR2), "vector-secret-2", NOW + 999999, &c), 0);
    CHECK_STR(c.sub, "bob");
    CHECK_INT(c.exp, 0);
    CHECK(c.chats != NULL);
    CHECK_STR(c.chats[0], "general");
    CHECK_STR(c.chats[1], "550e8400-e29b-41d4-a716-446655440000");
    CHECK(c.chats[2] == NULL);
    int ok = jwt_allows_chat(&c, "general") && jwt_allows_chat(&c, c.chats[1]) &&
             !jwt_allows_chat(&c, "random") && !jwt_allows_chat(&c, "genera") &&
             !jwt_allows_chat(&c, "general2") && !jwt_allows_chat(&c, NULL);
    jwt_claims_free(&c);
    CHECK(c.chats == NULL);
    CHECK(ok);

    const char *chats[] = {"general", "550e8400-e29b-41d4-a716-446655440000", NULL};
    char *t = jwt_sign("bob", NOW, 0, chats, "vector-secret-2");
    CHECK(t != NULL);
    int same = strcmp(t, VECTOR2) == 0;
    free(t);
    CHECK(same);
}

static void test_jwtio_vector(void) {
    jwt_claims_t c;
    CHECK_INT(jwt_verify(JWTIO, strlen(JWTIO), "your-256-bit-secret", 1516239022, &c), 0);
    CHECK_STR(c.sub, "1234567890");
    CHECK_INT(c.iat, 1516239022);
    CHECK_INT(c.exp, 0);
    jwt_claims_free(&c);
    CHECK_INT(verify_str(JWTIO, "your-256-bit-secreT", 1516239022), CHAT_EINVAL);
}

/* ---- sign / verify --------------------------------------------------------------------- */

static void test_round_trip(void) {
    const char *chats[] = {"room-1", "room.2", NULL};
    char *t = jwt_sign("carol", NOW, 60, chats, SECRET);
    CHECK(t != NULL);
    jwt_claims_t c;
    int rc = jwt_verify(t, strlen(t), SECRET, NOW + 59, &c);
    int rc_at_exp = verify_str(t, SECRET, NOW + 60);
    int rc_after = verify_str(t, SECRET, NOW + 61);
    free(t);
    CHECK_INT(rc, 0);
    CHECK_STR(c.sub, "carol");
    CHECK_INT(c.iat, NOW);
    CHECK_INT(c.exp, NOW + 60);
    int allows = jwt_allows_chat(&c, "room-1") && jwt_allows_chat(&c, "room.2") &&
                 !jwt_allows_chat(&c, "room-3");
    jwt_claims_free(&c);
    CHECK(allows);
    CHECK_INT(rc_at_exp, CHAT_EEXPIRED);
    CHECK_INT(rc_after, CHAT_EEXPIRED);
}

static void test_sign_no_ttl(void) {
    char *t = jwt_sign("dave", NOW, 0, NULL, SECRET);
    CHECK(t != NULL);
    jwt_claims_t c;
    int rc = jwt_verify(t, strlen(t), SECRET, INT64_MAX, &c);
    free(t);
    CHECK_INT(rc, 0);
    CHECK_INT(c.exp, 0);
    CHECK(c.chats == NULL);
    jwt_claims_free(&c);
    t = jwt_sign("dave", NOW, -5, NULL, SECRET);
    CHECK(t != NULL);
    rc = jwt_verify(t, strlen(t), SECRET, NOW + 1000000, &c);
    free(t);
    CHECK_INT(rc, 0);
    CHECK_INT(c.exp, 0);
}

static void test_sign_unicode_sub(void) {
    char *t = jwt_sign("zo\xc3\xab", NOW, 10, NULL, SECRET);
    CHECK(t != NULL);
    jwt_claims_t c;
    int rc = jwt_verify(t, strlen(t), SECRET, NOW, &c);
    free(t);
    CHECK_INT(rc, 0);
    CHECK_STR(c.sub, "zo\xc3\xab");
}

static void test_sign_rejects(void) {
    char long_sub[130];
    memset(long_sub, 'u', 129);
    long_sub[129] = '\0';
    const char *bad_chats[] = {"ok", "not/ok", NULL};
    const char *empty_chat[] = {"", NULL};
    CHECK(jwt_sign(NULL, NOW, 10, NULL, SECRET) == NULL);
    CHECK(jwt_sign("", NOW, 10, NULL, SECRET) == NULL);
    CHECK(jwt_sign(long_sub, NOW, 10, NULL, SECRET) == NULL);
    CHECK(jwt_sign("a\tb", NOW, 10, NULL, SECRET) == NULL);
    CHECK(jwt_sign("a\x7f", NOW, 10, NULL, SECRET) == NULL);
    CHECK(jwt_sign("bad\xff", NOW, 10, NULL, SECRET) == NULL); /* not UTF-8 */
    CHECK(jwt_sign("alice", NOW, 10, bad_chats, SECRET) == NULL);
    CHECK(jwt_sign("alice", NOW, 10, empty_chat, SECRET) == NULL);
    CHECK(jwt_sign("alice", NOW, 10, NULL, NULL) == NULL);
    CHECK(jwt_sign("alice", NOW, 10, NULL, "") == NULL);
    CHECK(jwt_sign("alice", NOW, INT64_MAX, NULL, SECRET) == NULL); /* exp overflows */
    long_sub[128] = '\0';
    char *t = jwt_sign(long_sub, NOW, 10, NULL, SECRET); /* 128 bytes is fine */
    CHECK(t != NULL);
    free(t);
}

static void test_wrong_secret(void) {
    CHECK_INT(verify_str(VECTOR1, "vector-secret-2", NOW), CHAT_EINVAL);
    CHECK_INT(verify_str(VECTOR1, "vector-secret-", NOW), CHAT_EINVAL);
    CHECK_INT(verify_str(VECTOR1, "", NOW), CHAT_EINVAL);
    /* an empty secret is refused even for a token MAC'd with the empty key */
    char *t = sign_parts("eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiJhIn0", "");
    int rc = verify_str(t, "", NOW);
    free(t);
    CHECK_INT(rc, CHAT_EINVAL);
    jwt_claims_t c;
    CHECK_INT(jwt_verify(VECTOR1, strlen(VECTOR1), NULL, NOW, &c), CHAT_EINVAL);
}

static void test_tampered(void) {
    /* VECTOR1's header and signature around a payload saying "mallory" */
    const char *forged = "{\"sub\":\"mallory\",\"iat\":1700000000,\"exp\":1700003600}";
    char *p = b64url(forged, strlen(forged));
    char tok[512];
    snprintf(tok, sizeof tok, "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.%s.%s", p,
             "IieCBvD0Yf2RswBw8L2gDkBY4yBXglv3ZU0kHagLAXU");
    free(p);
    CHECK_INT(verify_str(tok, "vector-secret-1", NOW), CHAT_EINVAL);
    /* one flipped character in each part */
    size_t n = strlen(VECTOR1);
    size_t at[] = {5, 40, n - 10};
    for (size_t i = 0; i < 3; i++) {
        memcpy(tok, VECTOR1, n + 1);
        tok[at[i]] = tok[at[i]] == 'A' ? 'B' : 'A';
        CHECK_INT(verify_str(tok, "vector-secret-1", NOW), CHAT_EINVAL);
    }
    /* the unused low bits of the last signature character: same MAC, other spelling */
    memcpy(tok, VECTOR1, n + 1);
    CHECK(tok[n - 1] == 'U');
    tok[n - 1] = 'V';
    CHECK_INT(verify_str(tok, "vector-secret-1", NOW), CHAT_EINVAL);
    /* the original still verifies: the failures above are the edits' doing */
    CHECK_INT(verify_str(VECTOR1, "vector-secret-1", NOW), 0);
}

static void test_alg_none(void) {
    const char *claims = "{\"sub\":\"alice\"}";
    char *h = b64url("{\"alg\":\"none\",\"typ\":\"JWT\"}", 26);
    char *p = b64url(claims, strlen(claims));
    char tok[256];
    snprintf(tok, sizeof tok, "%s.%s.", h, p);
    CHECK_INT(verify_str(tok, SECRET, NOW), CHAT_EINVAL);
    free(h);
    free(p);
    /* even when signed with our secret */
    CHECK_INT(verify_code("{\"alg\":\"none\",\"typ\":\"JWT\"}", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("{\"alg\":\"None\"}", claims), CHAT_EINVAL);
}

static void test_alg_others(void) {
    const char *claims = "{\"sub\":\"alice\"}";
    CHECK_INT(verify_code("{\"alg\":\"HS256\"}", claims), 0);
    CHECK_INT(verify_code("{\"alg\":\"HS512\",\"typ\":\"JWT\"}", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("{\"alg\":\"RS256\",\"typ\":\"JWT\"}", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("{\"alg\":\"hs256\"}", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("{\"alg\":\"HS256 \"}", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("{\"typ\":\"JWT\"}", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("{\"alg\":256}", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("{\"alg\":null}", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("{\"alg\":\"HS256\",\"alg\":\"none\"}", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("[\"HS256\"]", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("\"HS256\"", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("{\"alg\":\"HS256\"", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("", claims), CHAT_EINVAL);
}

static void test_typ_and_crit(void) {
    const char *claims = "{\"sub\":\"alice\"}";
    CHECK_INT(verify_code("{\"alg\":\"HS256\",\"typ\":\"jwt\"}", claims), 0);
    CHECK_INT(verify_code("{\"typ\":\"Jwt\",\"alg\":\"HS256\",\"kid\":\"k1\"}", claims), 0);
    CHECK_INT(verify_code("{\"alg\":\"HS256\",\"typ\":\"JWS\"}", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("{\"alg\":\"HS256\",\"typ\":\"\"}", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("{\"alg\":\"HS256\",\"typ\":1}", claims), CHAT_EINVAL);
    CHECK_INT(verify_code("{\"alg\":\"HS256\",\"crit\":[\"exp\"]}", claims), CHAT_EINVAL);
}

static void test_sub(void) {
    char payload[300];
    char sub[130];
    memset(sub, 's', 129);
    sub[128] = '\0';
    snprintf(payload, sizeof payload, "{\"sub\":\"%s\"}", sub);
    jwt_claims_t c;
    CHECK_INT(verify_json(HS256, payload, &c), 0);
    CHECK_INT(strlen(c.sub), 128);
    CHECK_STR(c.sub, sub);
    sub[128] = 's';
    sub[129] = '\0';
    snprintf(payload, sizeof payload, "{\"sub\":\"%s\"}", sub);
    CHECK_INT(verify_code(HS256, payload), CHAT_EINVAL);

    CHECK_INT(verify_code(HS256, "{\"exp\":1800000000}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"\"}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":42}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":null}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":[\"a\"]}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\\u0001b\"}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\\nb\"}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\\u007fb\"}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\\u0000b\"}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"sub\":\"b\"}"), CHAT_EINVAL);
    CHECK_INT(verify_json(HS256, "{\"sub\":\"zo\\u00eb b\"}", &c), 0);
    CHECK_STR(c.sub, "zo\xc3\xab b");
}

static void test_payload_shape(void) {
    CHECK_INT(verify_code(HS256, "\"alice\""), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "[{\"sub\":\"alice\"}]"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"alice\""), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"alice\"} x"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"alice\",\"iat\":\"now\"}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"alice\",\"name\":{\"x\":[1,2]}}"), 0);
}

static void test_expired(void) {
    char payload[128];
    snprintf(payload, sizeof payload, "{\"sub\":\"a\",\"exp\":%lld}", NOW);
    CHECK_INT(verify_code(HS256, payload), CHAT_EEXPIRED);
    snprintf(payload, sizeof payload, "{\"sub\":\"a\",\"exp\":%lld}", NOW - 1);
    CHECK_INT(verify_code(HS256, payload), CHAT_EEXPIRED);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"exp\":0}"), CHAT_EEXPIRED);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"exp\":-1e300}"), CHAT_EEXPIRED);
    snprintf(payload, sizeof payload, "{\"sub\":\"a\",\"exp\":%lld.0}", NOW);
    CHECK_INT(verify_code(HS256, payload), CHAT_EEXPIRED);
    snprintf(payload, sizeof payload, "{\"sub\":\"a\",\"exp\":%lld.999}", NOW - 1);
    CHECK_INT(verify_code(HS256, payload), CHAT_EEXPIRED);
    /* exp of the wrong type is malformed, not expired */
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"exp\":\"1800000000\"}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"exp\":true}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"exp\":null}"), CHAT_EINVAL);
}

static void test_exp_future(void) {
    char payload[128];
    jwt_claims_t c;
    snprintf(payload, sizeof payload, "{\"sub\":\"a\",\"exp\":%lld}", NOW + 1);
    CHECK_INT(verify_json(HS256, payload, &c), 0);
    CHECK_INT(c.exp, NOW + 1);
    /* a real exp rounds up, so "exp > now" on the integer matches the real comparison */
    snprintf(payload, sizeof payload, "{\"sub\":\"a\",\"exp\":%lld.5}", NOW);
    CHECK_INT(verify_json(HS256, payload, &c), 0);
    CHECK_INT(c.exp, NOW + 1);
    CHECK_INT(verify_json(HS256, "{\"sub\":\"a\",\"exp\":1e300}", &c), 0);
    CHECK_INT(c.exp, INT64_MAX);
    CHECK_INT(verify_json(HS256, "{\"sub\":\"a\",\"exp\":9223372036854775807}", &c), 0);
    CHECK_INT(c.exp, INT64_MAX);
}

static void test_nbf(void) {
    char payload[128];
    snprintf(payload, sizeof payload, "{\"sub\":\"a\",\"nbf\":%lld}", NOW);
    CHECK_INT(verify_code(HS256, payload), 0);
    snprintf(payload, sizeof payload, "{\"sub\":\"a\",\"nbf\":%lld}", NOW + 1);
    CHECK_INT(verify_code(HS256, payload), CHAT_EINVAL);
    snprintf(payload, sizeof payload, "{\"sub\":\"a\",\"nbf\":%lld.1}", NOW);
    CHECK_INT(verify_code(HS256, payload), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"nbf\":\"0\"}"), CHAT_EINVAL);
}

static void test_chats_claim(void) {
    jwt_claims_t c;
    CHECK_INT(verify_json(HS256, "{\"sub\":\"a\",\"chats\":[\"x\",\"y.z\"]}", &c), 0);
    int ok = jwt_allows_chat(&c, "x") && jwt_allows_chat(&c, "y.z") && !jwt_allows_chat(&c, "y") &&
             !jwt_allows_chat(&c, "X");
    jwt_claims_free(&c);
    CHECK(ok);
    jwt_claims_free(&c); /* idempotent */

    /* an empty list allows nothing, unlike an absent claim */
    CHECK_INT(verify_json(HS256, "{\"sub\":\"a\",\"chats\":[]}", &c), 0);
    CHECK(c.chats != NULL && c.chats[0] == NULL);
    ok = !jwt_allows_chat(&c, "x");
    jwt_claims_free(&c);
    CHECK(ok);

    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"chats\":[\"ok\",\"no/slash\"]}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"chats\":[\"\"]}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"chats\":[\"a b\"]}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"chats\":[\"ok\",1]}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"chats\":\"ok\"}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"chats\":null}"), CHAT_EINVAL);
    CHECK_INT(verify_code(HS256, "{\"sub\":\"a\",\"chats\":{\"ok\":1}}"), CHAT_EINVAL);
}

static void test_malformed(void) {
    jwt_claims_t c;
    CHECK_INT(jwt_verify("", 0, SECRET, NOW, &c), CHAT_EINVAL);
    CHECK_INT(jwt_verify(NULL, 10, SECRET, NOW, &c), CHAT_EINVAL);
    CHECK_INT(jwt_verify(VECTOR1, strlen(VECTOR1), "vector-secret-1", NOW, NULL), CHAT_EINVAL);
    CHECK_INT(verify_str("garbage", SECRET, NOW), CHAT_EINVAL);
    CHECK_INT(verify_str("..", SECRET, NOW), CHAT_EINVAL);
    CHECK_INT(verify_str("a.b", SECRET, NOW), CHAT_EINVAL);
    CHECK_INT(verify_str("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhIn0", SECRET, NOW),
              CHAT_EINVAL);
    /* a 4th part, with or without a valid-looking signature before it */
    char tok[256];
    snprintf(tok, sizeof tok, "%s.x", VECTOR1);
    CHECK_INT(verify_str(tok, "vector-secret-1", NOW), CHAT_EINVAL);
    snprintf(tok, sizeof tok, "%s.", VECTOR1);
    CHECK_INT(verify_str(tok, "vector-secret-1", NOW), CHAT_EINVAL);
    char *t4 = sign_parts("eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiJhIn0.e30", SECRET);
    CHECK_INT(verify_str(t4, SECRET, NOW), CHAT_EINVAL);
    free(t4);
    /* a length that stops short of the NUL: the prefix is a different token */
    CHECK_INT(jwt_verify(VECTOR1, strlen(VECTOR1) - 1, "vector-secret-1", NOW, &c), CHAT_EINVAL);
    /* NUL inside the given length */
    memcpy(tok, VECTOR1, strlen(VECTOR1) + 1);
    tok[3] = '\0';
    CHECK_INT(jwt_verify(tok, strlen(VECTOR1), "vector-secret-1", NOW, &c), CHAT_EINVAL);
    /* empty header or payload, correctly signed */
    char *t = sign_parts("", "eyJzdWIiOiJhIn0", SECRET);
    CHECK_INT(verify_str(t, SECRET, NOW), CHAT_EINVAL);
    free(t);
    t = sign_parts("eyJhbGciOiJIUzI1NiJ9", "", SECRET);
    CHECK_INT(verify_str(t, SECRET, NOW), CHAT_EINVAL);
    free(t);
}

static void test_base64_strict(void) {
    /* {"alg":"HS256"} is eyJhbGciOiJIUzI1NiJ9; {"sub":"a"} is eyJzdWIiOiJhIn0 */
    char *t = sign_parts("eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiJhIn0", SECRET);
    CHECK_INT(verify_str(t, SECRET, NOW), 0); /* the baseline verifies */
    free(t);
    const char *bad[][2] = {
        {"eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiJhIn0="},  /* padding */
        {"eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiJhIn0=="}, /* padding */
        {"eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiJhIn1"},   /* non-zero trailing bits */
        {"eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiJhIn0AA"}, /* length 1 mod 4 */
        {"eyJhbGciOiJIUzI1NiJ9", "eyJzdWIi OiJhIn0"},  /* space */
        {"eyJhbGciOiJIUzI1NiJ9", "eyJzdWIi+iJhIn0"},   /* standard alphabet */
        {"eyJhbGciOiJIUzI1NiJ9", "eyJzdWIi/iJhIn0"},   /* standard alphabet */
        {"eyJhbGciOiJIUzI1NiJ9=", "eyJzdWIiOiJhIn0"},  /* padding in the header */
        /* {"sub":"ab"} is 12 bytes, eyJzdWIiOiJhYiJ9: a stray zero sextet after it */
        {"eyJhbGciOiJIUzI1NiJ9", "eyJzdWIiOiJhYiJ9A"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        t = sign_parts(bad[i][0], bad[i][1], SECRET);
        int rc = verify_str(t, SECRET, NOW);
        free(t);
        CHECK_INT(rc, CHAT_EINVAL);
    }
    /* padding on the signature */
    char tok[256];
    snprintf(tok, sizeof tok, "%s=", VECTOR1);
    CHECK_INT(verify_str(tok, "vector-secret-1", NOW), CHAT_EINVAL);
}

static void test_length_limit(void) {
    /* {"sub":"a","x":"xxx..."}: 18 bytes + pad. 6083 payload bytes encode to 8111
     * characters, and 36 + 1 + 8111 + 1 + 43 = 8192. */
    size_t pad = 6083 - 18;
    char *payload = malloc(pad + 32);
    for (int extra = 0; extra < 2; extra++) {
        int n = sprintf(payload, "{\"sub\":\"a\",\"x\":\"");
        memset(payload + n, 'x', pad + (size_t)extra);
        strcpy(payload + n + pad + (size_t)extra, "\"}");
        char *t = make_token(HS256, payload, SECRET);
        size_t len = strlen(t);
        int rc = verify_str(t, SECRET, NOW);
        free(t);
        if (len != 8192 + (size_t)extra || rc != (extra ? CHAT_EINVAL : 0)) {
            free(payload);
            CHECK_INT(len, 8192 + extra);
            CHECK_INT(rc, extra ? CHAT_EINVAL : 0);
        }
    }
    free(payload);
    /* and jwt_sign refuses to mint what verify would refuse */
    const char *many[1100];
    for (int i = 0; i < 1099; i++) many[i] = "chat-id";
    many[1099] = NULL;
    CHECK(jwt_sign("alice", NOW, 10, many, SECRET) == NULL);
    many[500] = NULL;
    char *t = jwt_sign("alice", NOW, 10, many, SECRET);
    CHECK(t != NULL);
    int rc = verify_str(t, SECRET, NOW);
    free(t);
    CHECK_INT(rc, 0);
}

/* ---- chat ids -------------------------------------------------------------------------- */

static void test_chat_id_valid(void) {
    char id[130];
    memset(id, 'a', sizeof id);
    CHECK(chat_id_valid(id, 1));
    CHECK(chat_id_valid(id, 128));
    CHECK(!chat_id_valid(id, 129));
    CHECK(!chat_id_valid(id, 0));
    CHECK(!chat_id_valid("", 0));
    CHECK(!chat_id_valid(NULL, 5));
    CHECK(chat_id_valid("550e8400-e29b-41d4-a716-446655440000", 36));
    CHECK(chat_id_valid("Room_1.general-2", 16));
    /* path segments that URL normalisation removes are not chat ids */
    CHECK(!chat_id_valid(".", 1));
    CHECK(!chat_id_valid("..", 2));
    CHECK(chat_id_valid("...", 3));
    CHECK(chat_id_valid(".a", 2));
    CHECK(chat_id_valid("a..", 3));
    CHECK(!chat_id_valid("a/b", 3));
    CHECK(!chat_id_valid("a b", 3));
    CHECK(!chat_id_valid("a\0b", 3));
    CHECK(!chat_id_valid("a+b", 3));
    CHECK(!chat_id_valid("a%2Fb", 5));
    CHECK(!chat_id_valid("a?b", 3));
    CHECK(!chat_id_valid("caf\xc3\xa9", 5));
    CHECK(!chat_id_valid("\xff", 1));
    CHECK(!chat_id_valid("a\n", 2));
    /* n, not the NUL, bounds the id */
    CHECK(chat_id_valid("ab/cd", 2));
}

int main(void) {
    RUN(test_vector1_verify);
    RUN(test_vector1_sign_exact);
    RUN(test_vector2_chats);
    RUN(test_jwtio_vector);
    RUN(test_round_trip);
    RUN(test_sign_no_ttl);
    RUN(test_sign_unicode_sub);
    RUN(test_sign_rejects);
    RUN(test_wrong_secret);
    RUN(test_tampered);
    RUN(test_alg_none);
    RUN(test_alg_others);
    RUN(test_typ_and_crit);
    RUN(test_sub);
    RUN(test_payload_shape);
    RUN(test_expired);
    RUN(test_exp_future);
    RUN(test_nbf);
    RUN(test_chats_claim);
    RUN(test_malformed);
    RUN(test_base64_strict);
    RUN(test_length_limit);
    RUN(test_chat_id_valid);
    return test_summary("test_jwt");
}
