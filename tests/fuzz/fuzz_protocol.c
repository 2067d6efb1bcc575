/* libFuzzer: the chat protocol decoder on arbitrary client text, and the encoder on what
 * it accepts. Invariants: decoding never crashes or leaks; an accepted message encodes to
 * valid JSON that decodes back to the same text and client_id; a ping carries no text; a
 * token:refresh carries a non-empty token without U+0000 and no text; proto_peek reads back
 * the id of every event we encode (whatever the chat id holds) and never reads out of bounds. */
#include <stdlib.h>
#include <string.h>

#include "chat/chat_internal.h"

static void roundtrip(const proto_cmd_t *c) {
    store_msg_t m = {.id = c->message_id ? c->message_id : 1,
                     .chat_id = c->client_id ? (char *)c->client_id : "fuzz",
                     .user_from = "user",
                     .message = (char *)c->message,
                     .client_id = (char *)c->client_id,
                     .created_at = 1795940400123LL};
    sbuf_t sb = {0};
    proto_put_msg(&sb, "message:message", &m);
    if (sb.oom) abort();
    json_error_t err;
    json_t *j = json_loadb(sb.p, sb.len, 0, &err);
    if (!j) abort(); /* we produced invalid JSON */
    bool is_new;
    uint64_t id;
    if (!proto_peek((const uint8_t *)sb.p, sb.len, &is_new, &id) || !is_new || id != m.id) abort();
    if (c->message) {
        json_t *t = json_object_get(j, "message");
        if (!json_is_string(t) || json_string_length(t) != c->message_len ||
            memcmp(json_string_value(t), c->message, c->message_len) != 0)
            abort();
    }
    if (c->client_id &&
        strcmp(json_string_value(json_object_get(j, "client_id")), c->client_id) != 0)
        abort();
    json_decref(j);
    sbuf_free(&sb);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static const unsigned modes[] = {
        (1u << PROTO_MESSAGE) | (1u << PROTO_EDIT) | (1u << PROTO_DELETE) | (1u << PROTO_PING) |
            (1u << PROTO_TOKEN_REFRESH) | (1u << PROTO_READ) | (1u << PROTO_TYPING) |
            (1u << PROTO_PRESENCE_GET),
        (1u << PROTO_MESSAGE) | PROTO_IMPLICIT_MESSAGE,
    };
    bool is_new;
    uint64_t id;
    (void)proto_peek(data, size, &is_new, &id);
    for (size_t i = 0; i < 2; i++) {
        proto_cmd_t c;
        int rc = proto_decode(data, size, modes[i], &c);
        if (rc == 0 &&
            (c.kind == PROTO_PING || c.kind == PROTO_TYPING || c.kind == PROTO_PRESENCE_GET)) {
            if (c.message) abort(); /* these carry nothing we act on */
        } else if (rc == 0 && c.kind == PROTO_READ) {
            if (c.message || !c.message_id) abort(); /* a read names a message, nothing else */
        } else if (rc == 0 && c.kind == PROTO_TOKEN_REFRESH) {
            if (c.message || !c.token || !c.token_len || strlen(c.token) != c.token_len) abort();
        } else if (rc == 0) {
            if (c.kind != PROTO_DELETE && (!c.message || !c.message_len)) abort();
            if (c.kind != PROTO_MESSAGE && !c.message_id) abort();
            roundtrip(&c);
        } else if (rc == CHAT_EPROTO) {
            if (!c.error) abort();
        } else if (rc != CHAT_EINVAL) {
            abort();
        }
        if (rc != CHAT_EINVAL) proto_cmd_free(&c);
    }
    return 0;
}
