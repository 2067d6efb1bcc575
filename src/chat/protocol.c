/* protocol: the seed's JSON events, decoded with jansson and encoded by hand.
 *
 * Decoding is strict about what we act on and lenient about what we ignore: unknown
 * fields pass (clients may be newer than us), but a known field of the wrong type is a
 * bad_request, never a guess. Encoding is a single pass into an sbuf: the event of a
 * message is built once and its bytes go to every member.
 */
#include <inttypes.h>
#include <string.h>

#include "chat_internal.h"

static int proto__id(json_t *v, uint64_t *out) {
    if (json_is_string(v)) /* id_parse stops at nothing: a NUL inside fails as a non-digit */
        return id_parse(json_string_value(v), json_string_length(v), out) == 0 && *out ? 0 : -1;
    if (json_is_integer(v) && json_integer_value(v) > 0) {
        *out = (uint64_t)json_integer_value(v);
        return 0;
    }
    return -1;
}

static int proto__fail(proto_cmd_t *cmd, const char *why) {
    cmd->error = why;
    return CHAT_EPROTO;
}

int proto_decode(const uint8_t *data, size_t len, unsigned allow_events, proto_cmd_t *cmd) {
    memset(cmd, 0, sizeof(*cmd));
    json_error_t jerr;
    /* "\u0000" is valid JSON: parse it, then refuse it in the fields we keep (below), so a
     * client learns why (bad_request) instead of being cut off as if it sent garbage. */
    json_t *root = json_loadb((const char *)data, len, JSON_ALLOW_NUL, &jerr);
    if (!root) return CHAT_EINVAL;
    if (!json_is_object(root)) {
        json_decref(root);
        return CHAT_EINVAL;
    }
    cmd->root = root;

    json_t *cid = json_object_get(root, "client_id");
    if (cid && !json_is_null(cid)) {
        if (!json_is_string(cid) || json_string_length(cid) == 0 ||
            json_string_length(cid) > PROTO_MAX_CLIENT_ID ||
            strlen(json_string_value(cid)) != json_string_length(cid))
            return proto__fail(cmd, "client_id must be a string of 1 to 128 bytes");
        cmd->client_id = json_string_value(cid);
    }
    json_t *mid = json_object_get(root, "message_id");
    bool mid_ok = mid && proto__id(mid, &cmd->message_id) == 0;

    json_t *ev = json_object_get(root, "event");
    const char *e = json_string_value(ev);
    if (e && strlen(e) != json_string_length(ev)) e = "";
    if (!ev && (allow_events & PROTO_IMPLICIT_MESSAGE)) e = "message:message";
    else if (!e) return proto__fail(cmd, "missing \"event\"");
    if (strcmp(e, "message:message") == 0) cmd->kind = PROTO_MESSAGE;
    else if (strcmp(e, "message:edit") == 0) cmd->kind = PROTO_EDIT;
    else if (strcmp(e, "message:delete") == 0) cmd->kind = PROTO_DELETE;
    else if (strcmp(e, "ping") == 0) cmd->kind = PROTO_PING;
    else if (strcmp(e, "token:refresh") == 0) cmd->kind = PROTO_TOKEN_REFRESH;
    else if (strcmp(e, "typing") == 0) cmd->kind = PROTO_TYPING;
    else if (strcmp(e, "presence:get") == 0) cmd->kind = PROTO_PRESENCE_GET;
    else if (strcmp(e, "read") == 0) cmd->kind = PROTO_READ;
    if (!cmd->kind || !(allow_events & (1u << cmd->kind))) return proto__fail(cmd, "unknown event");
    if (cmd->kind == PROTO_PING || cmd->kind == PROTO_TYPING || cmd->kind == PROTO_PRESENCE_GET)
        return 0;
    if (cmd->kind == PROTO_TOKEN_REFRESH) {
        json_t *t = json_object_get(root, "token");
        if (!t) return proto__fail(cmd, "missing \"token\"");
        if (!json_is_string(t) || json_string_length(t) == 0 ||
            strlen(json_string_value(t)) != json_string_length(t))
            return proto__fail(cmd, "\"token\" must be a non-empty string");
        cmd->token = json_string_value(t);
        cmd->token_len = json_string_length(t);
        return 0;
    }

    if (cmd->kind == PROTO_READ) {
        /* only the string form: a JSON number above 2^53 has already lost digits in a
         * JavaScript client, and a position moved to a neighbour's id would be wrong */
        if (!mid) return proto__fail(cmd, "missing \"message_id\"");
        if (!mid_ok || !json_is_string(mid)) {
            cmd->message_id = 0;
            return proto__fail(cmd, "message_id must be a decimal id string");
        }
        return 0;
    }
    if (cmd->kind != PROTO_MESSAGE && !mid_ok) {
        cmd->message_id = 0;
        return proto__fail(cmd, mid ? "message_id must be a decimal id string"
                                    : "missing \"message_id\"");
    }
    if (cmd->kind != PROTO_DELETE) {
        json_t *m = json_object_get(root, "message");
        if (!m) return proto__fail(cmd, "missing \"message\"");
        if (!json_is_string(m)) return proto__fail(cmd, "\"message\" must be a string");
        if (json_string_length(m) == 0) return proto__fail(cmd, "\"message\" is empty");
        if (strlen(json_string_value(m)) != json_string_length(m))
            return proto__fail(cmd, "\"message\" must not contain U+0000");
        cmd->message = json_string_value(m);
        cmd->message_len = json_string_length(m);
    }
    return 0;
}

void proto_cmd_free(proto_cmd_t *cmd) {
    json_decref(cmd->root);
    cmd->root = NULL;
}

static void proto__put_time(sbuf_t *sb, const char *key, int64_t ms) {
    char ts[25];
    time_format_ms(ms, ts);
    sbuf_printf(sb, ",\"%s\":\"%s\"", key, ts);
}

void proto_put_msg(sbuf_t *sb, const char *event, const store_msg_t *m) {
    sbuf_puts(sb, "{");
    if (event) sbuf_printf(sb, "\"event\":\"%s\",", event);
    sbuf_puts(sb, "\"chat_id\":");
    sbuf_json_str(sb, m->chat_id, strlen(m->chat_id));
    sbuf_printf(sb, ",\"message_id\":\"%" PRIu64 "\",\"user_from\":", m->id);
    sbuf_json_str(sb, m->user_from, strlen(m->user_from));
    if (m->message && !m->deleted_at) {
        sbuf_puts(sb, ",\"message\":");
        sbuf_json_str(sb, m->message, strlen(m->message));
    }
    proto__put_time(sb, "created_at", m->created_at);
    if (m->edited_at) proto__put_time(sb, "edited_at", m->edited_at);
    if (m->deleted_at) proto__put_time(sb, "deleted_at", m->deleted_at);
    if (!event) sbuf_puts(sb, m->deleted_at ? ",\"deleted\":true" : ",\"deleted\":false");
    if (m->client_id) {
        sbuf_puts(sb, ",\"client_id\":");
        sbuf_json_str(sb, m->client_id, strlen(m->client_id));
    }
    sbuf_puts(sb, "}");
}

/* Reads what proto_put_msg wrote with an event, in its order: {"event":"NAME","chat_id":STR,
 * "message_id":"ID",... Kept next to the encoder so the two change together. */
bool proto_peek(const uint8_t *p, size_t n, bool *is_new, uint64_t *id) {
    static const char ev[] = "{\"event\":\"";
    static const char chat[] = "\",\"chat_id\":\"";
    static const char key[] = ",\"message_id\":\"";
    static const char new_name[] = "message:message";
    const uint8_t *end = p + n;
    if (n < sizeof ev - 1 || memcmp(p, ev, sizeof ev - 1) != 0) return false;
    const uint8_t *name = p + sizeof ev - 1;
    const uint8_t *q = memchr(name, '"', (size_t)(end - name)); /* names need no escapes */
    if (!q) return false;
    *is_new = (size_t)(q - name) == sizeof new_name - 1 &&
              memcmp(name, new_name, sizeof new_name - 1) == 0;
    if ((size_t)(end - q) < sizeof chat - 1 || memcmp(q, chat, sizeof chat - 1) != 0) return false;
    /* the chat id is a JSON string: its end is the first quote not escaped */
    for (q += sizeof chat - 1; q < end && *q != '"'; q++)
        if (*q == '\\') q++;
    if (q >= end) return false;
    q++;
    if ((size_t)(end - q) < sizeof key - 1 || memcmp(q, key, sizeof key - 1) != 0) return false;
    q += sizeof key - 1;
    const uint8_t *e = memchr(q, '"', (size_t)(end - q));
    return e && id_parse((const char *)q, (size_t)(e - q), id) == 0;
}

void proto_put_event(sbuf_t *sb, store_op_t op, const store_msg_t *m) {
    /* the same names as the broadcast in session.c (chat__event_name) */
    proto_put_msg(sb,
                  op == STORE_EDIT     ? "message:edit"
                  : op == STORE_DELETE ? "message:delete"
                                       : "message:message",
                  m);
}

void proto_put_read(sbuf_t *sb, const char *chat_id, const char *user, uint64_t message_id) {
    sbuf_puts(sb, "{\"event\":\"read\",\"chat_id\":");
    sbuf_json_str(sb, chat_id, strlen(chat_id));
    sbuf_printf(sb, ",\"message_id\":\"%" PRIu64 "\",\"user_from\":", message_id);
    sbuf_json_str(sb, user, strlen(user));
    sbuf_puts(sb, "}");
}

void proto_put_error(sbuf_t *sb, const char *code, const char *detail, const char *client_id,
                     uint64_t message_id) {
    sbuf_printf(sb, "{\"event\":\"error\",\"code\":\"%s\",\"detail\":", code);
    sbuf_json_str(sb, detail, strlen(detail));
    if (client_id) {
        sbuf_puts(sb, ",\"client_id\":");
        sbuf_json_str(sb, client_id, strlen(client_id));
    }
    if (message_id) sbuf_printf(sb, ",\"message_id\":\"%" PRIu64 "\"", message_id);
    sbuf_puts(sb, "}");
}
