/* Unit tests of the JSON protocol: what is accepted, what is a bad_request, what closes
 * the connection, and the exact bytes of the events we send. */
#include "chat/chat_internal.h"
#include "test.h"

#define ALL ((1u << PROTO_MESSAGE) | (1u << PROTO_EDIT) | (1u << PROTO_DELETE))

static int decode(const char *s, unsigned allow, proto_cmd_t *c) {
    return proto_decode((const uint8_t *)s, strlen(s), allow, c);
}

static void test_message(void) {
    proto_cmd_t c;
    CHECK_INT(decode("{\"event\":\"message:message\",\"message\":\"hello\",\"client_id\":\"c-1\","
                     "\"extra\":[1,2]}",
                     ALL, &c),
              0);
    CHECK_INT(c.kind, PROTO_MESSAGE);
    CHECK_STR(c.message, "hello");
    CHECK_INT(c.message_len, 5);
    CHECK_STR(c.client_id, "c-1");
    proto_cmd_free(&c);
    /* the seed's ChatMessage: event and message only */
    CHECK_INT(
        decode("{\"event\":\"message:message\",\"message\":\"\\u00e9\\ud83d\\ude00\"}", ALL, &c),
        0);
    CHECK_STR(c.message, "\xc3\xa9\xf0\x9f\x98\x80");
    CHECK(c.client_id == NULL);
    proto_cmd_free(&c);
}

static void test_edit_delete_ids(void) {
    proto_cmd_t c;
    CHECK_INT(decode("{\"event\":\"message:edit\",\"message\":\"x\",\"message_id\":"
                     "\"7261835409563648\"}",
                     ALL, &c),
              0);
    CHECK_INT(c.kind, PROTO_EDIT);
    CHECK(c.message_id == 7261835409563648ULL);
    proto_cmd_free(&c);
    CHECK_INT(decode("{\"event\":\"message:delete\",\"message_id\":42}", ALL, &c), 0);
    CHECK_INT(c.kind, PROTO_DELETE);
    CHECK(c.message_id == 42);
    CHECK(c.message == NULL);
    proto_cmd_free(&c);
}

/* ping: accepted where allowed (the WebSocket), nothing else read from it; an unknown
 * event where it is not (the REST body). */
static void test_ping(void) {
    proto_cmd_t c;
    CHECK_INT(decode("{\"event\":\"ping\",\"message\":5}", ALL | (1u << PROTO_PING), &c), 0);
    CHECK_INT(c.kind, PROTO_PING);
    CHECK(c.message == NULL);
    proto_cmd_free(&c);
    CHECK_INT(decode("{\"event\":\"ping\"}", ALL, &c), CHAT_EPROTO);
    CHECK_STR(c.error, "unknown event");
    proto_cmd_free(&c);
}

/* typing and presence:get carry nothing we act on; the REST body knows neither. */
static void test_typing_presence(void) {
    proto_cmd_t c;
    unsigned ws = ALL | (1u << PROTO_TYPING) | (1u << PROTO_PRESENCE_GET);
    CHECK_INT(decode("{\"event\":\"typing\",\"message\":5}", ws, &c), 0);
    CHECK_INT(c.kind, PROTO_TYPING);
    CHECK(c.message == NULL);
    proto_cmd_free(&c);
    CHECK_INT(decode("{\"event\":\"presence:get\"}", ws, &c), 0);
    CHECK_INT(c.kind, PROTO_PRESENCE_GET);
    proto_cmd_free(&c);
    CHECK_INT(decode("{\"event\":\"typing\"}", ALL | PROTO_IMPLICIT_MESSAGE, &c), CHAT_EPROTO);
    CHECK_STR(c.error, "unknown event");
    proto_cmd_free(&c);
    CHECK_INT(decode("{\"event\":\"presence\"}", ws, &c), CHAT_EPROTO);
    proto_cmd_free(&c);
}

/* token:refresh: the token is handed over as sent (session.c checks it); a missing, empty
 * or non-string token is a bad_request, and the REST body does not know the event. */
static void test_token_refresh(void) {
    unsigned ws = ALL | (1u << PROTO_TOKEN_REFRESH);
    proto_cmd_t c;
    CHECK_INT(decode("{\"event\":\"token:refresh\",\"token\":\"a.b.c\",\"message\":\"x\"}", ws, &c),
              0);
    CHECK_INT(c.kind, PROTO_TOKEN_REFRESH);
    CHECK_STR(c.token, "a.b.c");
    CHECK_INT(c.token_len, 5);
    CHECK(c.message == NULL);
    proto_cmd_free(&c);
    static const struct {
        const char *json, *why;
    } bad[] = {
        {"{\"event\":\"token:refresh\"}", "missing \"token\""},
        {"{\"event\":\"token:refresh\",\"token\":\"\"}", "\"token\" must be a non-empty string"},
        {"{\"event\":\"token:refresh\",\"token\":42}", "\"token\" must be a non-empty string"},
        {"{\"event\":\"token:refresh\",\"token\":\"a\\u0000b\"}",
         "\"token\" must be a non-empty string"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_INT(decode(bad[i].json, ws, &c), CHAT_EPROTO);
        CHECK_STR(c.error, bad[i].why);
        proto_cmd_free(&c);
    }
    CHECK_INT(decode("{\"event\":\"token:refresh\",\"token\":\"a.b.c\"}",
                     (1u << PROTO_MESSAGE) | PROTO_IMPLICIT_MESSAGE, &c),
              CHAT_EPROTO);
    CHECK_STR(c.error, "unknown event");
    proto_cmd_free(&c);
}

/* read: a message id, as a decimal string only; the rest is a bad_request. */
static void test_read(void) {
    unsigned ws = ALL | (1u << PROTO_READ);
    proto_cmd_t c;
    CHECK_INT(decode("{\"event\":\"read\",\"message_id\":\"917917428858486784\"}", ws, &c), 0);
    CHECK_INT(c.kind, PROTO_READ);
    CHECK(c.message_id == 917917428858486784ull);
    CHECK(c.message == NULL);
    proto_cmd_free(&c);
    static const struct {
        const char *json, *why;
    } bad[] = {
        {"{\"event\":\"read\"}", "missing \"message_id\""},
        {"{\"event\":\"read\",\"message_id\":42}", "message_id must be a decimal id string"},
        {"{\"event\":\"read\",\"message_id\":\"4x\"}", "message_id must be a decimal id string"},
        {"{\"event\":\"read\",\"message_id\":\"0\"}", "message_id must be a decimal id string"},
        {"{\"event\":\"read\",\"message_id\":null}", "message_id must be a decimal id string"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_INT(decode(bad[i].json, ws, &c), CHAT_EPROTO);
        CHECK_STR(c.error, bad[i].why);
        CHECK_INT(c.message_id, 0);
        proto_cmd_free(&c);
    }
    CHECK_INT(decode("{\"event\":\"read\",\"message_id\":\"1\"}",
                     (1u << PROTO_MESSAGE) | PROTO_IMPLICIT_MESSAGE, &c),
              CHAT_EPROTO);
    CHECK_STR(c.error, "unknown event");
    proto_cmd_free(&c);
    sbuf_t sb = {0};
    proto_put_read(&sb, "general", "al\"ice", 12);
    CHECK_STR(sb.p, "{\"event\":\"read\",\"chat_id\":\"general\",\"message_id\":\"12\","
                    "\"user_from\":\"al\\\"ice\"}");
    sbuf_free(&sb);
}

static void test_bad_requests(void) {
    static const char *bad[] = {
        "{}",
        "{\"event\":\"message:shout\",\"message\":\"x\"}",
        "{\"event\":7,\"message\":\"x\"}",
        "{\"event\":\"message:message\"}",
        "{\"event\":\"message:message\",\"message\":5}",
        "{\"event\":\"message:message\",\"message\":\"\"}",
        "{\"event\":\"message:message\",\"message\":\"x\",\"client_id\":3}",
        "{\"event\":\"message:message\",\"message\":\"x\",\"client_id\":\"\"}",
        "{\"event\":\"message:edit\",\"message\":\"x\"}",
        "{\"event\":\"message:edit\",\"message\":\"x\",\"message_id\":\"12ab\"}",
        "{\"event\":\"message:edit\",\"message\":\"x\",\"message_id\":\"0\"}",
        "{\"event\":\"message:edit\",\"message\":\"x\",\"message_id\":-3}",
        "{\"event\":\"message:edit\",\"message_id\":\"5\"}",
        "{\"event\":\"message:delete\",\"message_id\":1.5}",
        "{\"event\":\"message:delete\"}",
        /* U+0000 is valid JSON but not in text we keep */
        "{\"event\":\"message:message\",\"message\":\"a\\u0000b\"}",
        "{\"event\":\"message:message\",\"message\":\"x\",\"client_id\":\"c\\u0000\"}",
        "{\"event\":\"message:message\\u0000\",\"message\":\"x\"}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        proto_cmd_t c;
        int rc = decode(bad[i], ALL, &c);
        if (rc != CHAT_EPROTO) fprintf(stderr, "  case %zu: %s\n", i, bad[i]);
        CHECK_INT(rc, CHAT_EPROTO);
        CHECK(c.error != NULL && c.error[0]);
        proto_cmd_free(&c);
    }
    /* a long client_id: 129 bytes */
    char big[300];
    snprintf(big, sizeof big,
             "{\"event\":\"message:message\",\"message\":\"x\",\"client_id\":\"%0129d\"}", 0);
    proto_cmd_t c;
    CHECK_INT(decode(big, ALL, &c), CHAT_EPROTO);
    proto_cmd_free(&c);
}

static void test_not_an_object(void) {
    static const char *bad[] = {
        "", "not json", "[1,2]", "\"str\"", "42", "null", "{\"event\":\"message:message\""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        proto_cmd_t c;
        CHECK_INT(decode(bad[i], ALL, &c), CHAT_EINVAL);
        CHECK(c.root == NULL);
    }
}

static void test_allowed_events(void) {
    proto_cmd_t c;
    /* the REST body: no event means message:message; edit is not allowed there */
    CHECK_INT(decode("{\"message\":\"hi\"}", (1u << PROTO_MESSAGE) | PROTO_IMPLICIT_MESSAGE, &c),
              0);
    CHECK_INT(c.kind, PROTO_MESSAGE);
    proto_cmd_free(&c);
    CHECK_INT(decode("{\"message\":\"hi\"}", ALL, &c), CHAT_EPROTO);
    proto_cmd_free(&c);
    CHECK_INT(decode("{\"event\":\"message:edit\",\"message\":\"x\",\"message_id\":\"1\"}",
                     (1u << PROTO_MESSAGE) | PROTO_IMPLICIT_MESSAGE, &c),
              CHAT_EPROTO);
    proto_cmd_free(&c);
}

static void test_encode_event(void) {
    store_msg_t m = {.id = 7261835409563648ULL,
                     .chat_id = "general",
                     .user_from = "al\"ice",
                     .message = "hi\n<b>",
                     .client_id = "c-1",
                     .created_at = 1795940400123LL};
    sbuf_t sb = {0};
    proto_put_msg(&sb, "message:message", &m);
    CHECK_STR(sb.p, "{\"event\":\"message:message\",\"chat_id\":\"general\",\"message_id\":"
                    "\"7261835409563648\",\"user_from\":\"al\\\"ice\",\"message\":\"hi\\n<b>\","
                    "\"created_at\":\"2026-11-29T08:20:00.123Z\",\"client_id\":\"c-1\"}");
    sbuf_free(&sb);
    m.edited_at = 1795940401000LL;
    m.client_id = NULL;
    proto_put_msg(&sb, "message:edit", &m);
    CHECK_STR(sb.p, "{\"event\":\"message:edit\",\"chat_id\":\"general\",\"message_id\":"
                    "\"7261835409563648\",\"user_from\":\"al\\\"ice\",\"message\":\"hi\\n<b>\","
                    "\"created_at\":\"2026-11-29T08:20:00.123Z\",\"edited_at\":"
                    "\"2026-11-29T08:20:01.000Z\"}");
    sbuf_free(&sb);
    /* deleted: never the text, in either form */
    m.deleted_at = 1795940402000LL;
    m.edited_at = 0;
    m.message = NULL;
    proto_put_msg(&sb, NULL, &m);
    CHECK_STR(sb.p, "{\"chat_id\":\"general\",\"message_id\":\"7261835409563648\",\"user_from\":"
                    "\"al\\\"ice\",\"created_at\":\"2026-11-29T08:20:00.123Z\",\"deleted_at\":"
                    "\"2026-11-29T08:20:02.000Z\",\"deleted\":true}");
    sbuf_free(&sb);
}

static void test_encode_error(void) {
    sbuf_t sb = {0};
    proto_put_error(&sb, "not_author", "only \"the\" author", "c-9", 12);
    CHECK_STR(sb.p, "{\"event\":\"error\",\"code\":\"not_author\",\"detail\":\"only \\\"the\\\" "
                    "author\",\"client_id\":\"c-9\",\"message_id\":\"12\"}");
    sbuf_free(&sb);
}

/* proto_peek reads back the id and kind of every event proto_put_msg writes, whatever the
 * chat id holds (quotes, backslashes, a decoy "message_id"), and refuses what it did not write. */
static void test_peek(void) {
    static const char *chats[] = {"room-1", "a\"b\\", "x\",\"message_id\":\"7", "\\"};
    static const char *events[] = {"message:message", "message:edit", "message:delete"};
    for (size_t i = 0; i < sizeof chats / sizeof chats[0]; i++) {
        for (size_t k = 0; k < 3; k++) {
            store_msg_t m = {.id = 7261835409563648ULL + i,
                             .chat_id = (char *)chats[i],
                             .user_from = "alice",
                             .message = "hi \"there\"",
                             .created_at = 1795940400123LL,
                             .client_id = "c-1"};
            if (k == 2) m.deleted_at = m.created_at + 1;
            sbuf_t sb = {0};
            proto_put_msg(&sb, events[k], &m);
            bool is_new = k != 0;
            uint64_t id = 0;
            CHECK(proto_peek((const uint8_t *)sb.p, sb.len, &is_new, &id));
            CHECK_INT(is_new, k == 0);
            CHECK_INT(id, m.id);
            /* every strict prefix is refused, not read past */
            for (size_t n = 0; n < sb.len; n++) {
                char *cut = malloc(n ? n : 1);
                CHECK(cut);
                memcpy(cut, sb.p, n);
                bool ok = proto_peek((const uint8_t *)cut, n, &is_new, &id);
                free(cut);
                /* only a cut after the id's closing quote can still be read */
                CHECK(!ok || n > (size_t)(strstr(sb.p, ",\"user_from\"") - sb.p) - 1);
            }
            sbuf_free(&sb);
        }
    }
    static const char *bad[] = {
        "",
        "{}",
        "{\"event\":\"read\",\"chat_id\":\"r\",\"user_from\":\"a\"}",
        "{\"chat_id\":\"r\",\"message_id\":\"5\"}",                                 /* no event */
        "{\"event\":\"message:message\",\"chat_id\":\"r\",\"message_id\":\"x5\"}",  /* bad id */
        "{\"event\":\"message:message\",\"chat_id\":\"r\\\",\"message_id\":\"5\"}", /* open */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        bool is_new;
        uint64_t id;
        CHECK(!proto_peek((const uint8_t *)bad[i], strlen(bad[i]), &is_new, &id));
    }
}

int main(void) {
    RUN(test_message);
    RUN(test_edit_delete_ids);
    RUN(test_ping);
    RUN(test_token_refresh);
    RUN(test_typing_presence);
    RUN(test_read);
    RUN(test_bad_requests);
    RUN(test_not_an_object);
    RUN(test_allowed_events);
    RUN(test_encode_event);
    RUN(test_encode_error);
    RUN(test_peek);
    return test_summary("test_protocol");
}
