/* test_search_os: the OpenSearch / Elasticsearch document format shared by chat-indexer and
 * chatd: URLs, monthly index names, the _bulk lines of each event (and the poison records
 * refused), the query built from parsed terms, and the reading of an answer with its
 * highlights. */
#include <jansson.h>

#include "search/search_internal.h"
#include "search/search_os.h"
#include "test.h"

static void test_urls(void) {
    char base[300], alias[SEARCH_OS_ALIAS_MAX + 1];
    const char *why;
    CHECK_INT(
        search_os_url("opensearch://127.0.0.1:9200", base, sizeof base, alias, sizeof alias, &why),
        0);
    CHECK_STR(base, "http://127.0.0.1:9200");
    CHECK_STR(alias, "chat-messages");
    CHECK_INT(search_os_url("elasticsearch://es:9200/my-chats", base, sizeof base, alias,
                            sizeof alias, &why),
              0);
    CHECK_STR(base, "http://es:9200");
    CHECK_STR(alias, "my-chats");
    CHECK_INT(
        search_os_url("https://es.example:443/", base, sizeof base, alias, sizeof alias, &why), 0);
    CHECK_STR(base, "https://es.example:443");
    const char *bad[] = {
        "opensearch://", "opensearch://h:1/Upper", "opensearch://h:1/a/b",  "opensearch://h:1?x=1",
        "ftp://h:1",     "opensearch://u@h:1",     "opensearch://h:1/_all", "sqlite"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        why = NULL;
        CHECK_INT(search_os_url(bad[i], base, sizeof base, alias, sizeof alias, &why), CHAT_EINVAL);
        CHECK(why != NULL);
    }
}

static void test_index_by_the_month_of_the_id(void) {
    char idx[96];
    /* an id minted at 2026-11-30T13:43:17.756Z: its month, whatever the edit's time */
    uint64_t id = (uint64_t)(1796046197756LL - ID_EPOCH_MS) << 22;
    search_os_index(idx, sizeof idx, "chat-messages", id);
    CHECK_STR(idx, "chat-messages-2026.11");
    id = (uint64_t)(1798761600000LL - ID_EPOCH_MS) << 22; /* 2027-01-01T00:00:00Z */
    search_os_index(idx, sizeof idx, "c", id);
    CHECK_STR(idx, "c-2027.01");
}

/* The two lines of one record, parsed. */
static int bulk(const char *ev, uint64_t version, json_t **action, json_t **doc, const char **why) {
    sbuf_t sb = {0};
    *why = NULL;
    int rc = search_os_bulk_record(&sb, "chat-messages", ev, strlen(ev), version, NULL, why);
    *action = *doc = NULL;
    if (rc == 0) {
        sbuf_put(&sb, "", 1);
        char *nl = strchr(sb.p, '\n');
        *nl = '\0';
        *action = json_loads(sb.p, 0, NULL);
        *doc = json_loads(nl + 1, 0, NULL);
        if (sb.p[sb.len - 2] != '\n') rc = -99; /* the body ends each line */
    } else if (sb.len) {
        rc = -98; /* nothing appended on refusal */
    }
    sbuf_free(&sb);
    return rc;
}

static void test_bulk_lines_of_each_event(void) {
    json_t *a, *d;
    const char *why;
    CHECK_INT(bulk("{\"event\":\"message:message\",\"chat_id\":\"general\",\"message_id\":"
                   "\"917917514350985216\",\"user_from\":\"alice\",\"message\":\"caf\\u00e9 <b>\","
                   "\"created_at\":\"2026-12-07T23:16:29.504Z\",\"client_id\":\"c-1\"}",
                   7, &a, &d, &why),
              0);
    json_t *ix = json_object_get(a, "index");
    CHECK_STR(json_string_value(json_object_get(ix, "_id")), "917917514350985216");
    CHECK_STR(json_string_value(json_object_get(ix, "_index")), "chat-messages-2026.12");
    CHECK_INT(json_integer_value(json_object_get(ix, "version")), 7);
    CHECK_STR(json_string_value(json_object_get(ix, "version_type")), "external");
    CHECK_STR(json_string_value(json_object_get(d, "text")), "café <b>");
    CHECK_INT(json_integer_value(json_object_get(d, "created_at")), 1796685389504LL);
    CHECK_INT(json_integer_value(json_object_get(d, "message_id")), 917917514350985216LL);
    CHECK(json_is_false(json_object_get(d, "deleted")));
    CHECK_STR(json_string_value(json_object_get(d, "client_id")), "c-1");
    json_decref(a);
    json_decref(d);

    CHECK_INT(bulk("{\"event\":\"message:edit\",\"chat_id\":\"general\",\"message_id\":"
                   "\"917917514350985216\",\"user_from\":\"alice\",\"message\":\"new\","
                   "\"created_at\":\"2026-12-07T23:16:29.504Z\",\"edited_at\":"
                   "\"2027-02-01T00:00:00Z\"}",
                   9, &a, &d, &why),
              0);
    /* the edit goes to the original's month, not the edit's */
    CHECK_STR(json_string_value(json_object_get(json_object_get(a, "index"), "_index")),
              "chat-messages-2026.12");
    CHECK_INT(json_integer_value(json_object_get(d, "edited_at")), 1801440000000LL);
    json_decref(a);
    json_decref(d);

    /* a delete is a tombstone: deleted, no text, with its own version */
    CHECK_INT(bulk("{\"event\":\"message:delete\",\"chat_id\":\"general\",\"message_id\":"
                   "\"917917514350985216\",\"user_from\":\"alice\","
                   "\"created_at\":\"2026-12-07T23:16:29.504Z\",\"deleted_at\":"
                   "\"2026-12-08T00:00:00.1Z\"}",
                   11, &a, &d, &why),
              0);
    CHECK(json_is_true(json_object_get(d, "deleted")));
    CHECK(json_object_get(d, "text") == NULL);
    CHECK_INT(json_integer_value(json_object_get(d, "deleted_at")), 1796688000100LL);
    CHECK_INT(json_integer_value(json_object_get(json_object_get(a, "index"), "version")), 11);
    json_decref(a);
    json_decref(d);
}

static void test_poison_records_are_refused(void) {
    const char *ok =
        "{\"event\":\"message:message\",\"chat_id\":\"g\",\"message_id\":\"5\","
        "\"user_from\":\"a\",\"message\":\"x\",\"created_at\":\"2026-12-07T23:16:29Z\"}";
    const char *bad[] = {
        "{not json",
        "[]",
        "{}",
        "null",
        "{\"event\":\"message:other\",\"chat_id\":\"g\",\"message_id\":\"5\",\"user_from\":\"a\","
        "\"message\":\"x\",\"created_at\":\"2026-12-07T23:16:29Z\"}",
        "{\"event\":\"message:message\",\"chat_id\":\"g\",\"message_id\":5,\"user_from\":\"a\","
        "\"message\":\"x\",\"created_at\":\"2026-12-07T23:16:29Z\"}",
        "{\"event\":\"message:message\",\"chat_id\":\"g\",\"message_id\":\"5\",\"user_from\":\"a\","
        "\"created_at\":\"2026-12-07T23:16:29Z\"}",
        "{\"event\":\"message:message\",\"chat_id\":\"g\",\"message_id\":\"5\",\"user_from\":\"a\","
        "\"message\":\"x\",\"created_at\":\"yesterday\"}",
        "{\"event\":\"message:delete\",\"chat_id\":\"g\",\"message_id\":\"5\",\"user_from\":\"a\","
        "\"created_at\":\"2026-12-07T23:16:29Z\"}",
        "{\"event\":\"message:message\",\"chat_id\":\"g\",\"chat_id\":\"h\",\"message_id\":\"5\","
        "\"user_from\":\"a\",\"message\":\"x\",\"created_at\":\"2026-12-07T23:16:29Z\"}",
    };
    json_t *a, *d;
    const char *why;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_INT(bulk(bad[i], 3, &a, &d, &why), CHAT_EINVAL);
        CHECK(why != NULL);
    }
    CHECK_INT(bulk(ok, 0, &a, &d, &why), CHAT_EINVAL); /* no version */
    CHECK_INT(bulk(ok, 3, &a, &d, &why), 0);
    json_decref(a);
    json_decref(d);
}

static void test_query_is_built_from_terms(void) {
    search_query_t q;
    const char *why;
    const char *text = "caf\xc3\xa9 \"red fox\" -\"} OR {\" -hen !!!";
    CHECK_INT(search_query_parse(&q, text, strlen(text), &why), 0);
    const char *chats[] = {"general", "a\"b"};
    search_req_t r = {
        .query = &q, .chats = chats, .n_chats = 2, .from = "alice", .before = 42, .limit = 20};
    sbuf_t sb = {0};
    CHECK_INT(search_os_query(&sb, &r, &why), 0);
    sbuf_put(&sb, "", 1);
    json_t *j = json_loads(sb.p, 0, NULL);
    sbuf_free(&sb);
    CHECK(j != NULL);
    CHECK_INT(json_integer_value(json_object_get(j, "size")), 21);
    json_t *b = json_object_get(json_object_get(j, "query"), "bool");
    json_t *must = json_object_get(b, "must"), *not = json_object_get(b, "must_not");
    CHECK_INT(json_array_size(must), 2); /* "!!!" has no token: left out */
    CHECK_STR(json_string_value(json_object_get(
                  json_object_get(json_array_get(must, 1), "match_phrase"), "text")),
              "red fox");
    CHECK_INT(json_array_size(not ), 2);
    CHECK_STR(json_string_value(
                  json_object_get(json_object_get(json_array_get(not, 0), "match_phrase"), "text")),
              "} OR {");
    json_t *f = json_object_get(b, "filter");
    CHECK_STR(json_string_value(json_array_get(
                  json_object_get(json_object_get(json_array_get(f, 0), "terms"), "chat_id"), 1)),
              "a\"b");
    json_decref(j);

    CHECK_INT(search_query_parse(&q, "!!! -x", 6, &why), 0);
    sbuf_t sb2 = {0};
    CHECK_INT(search_os_query(&sb2, &r, &why), CHAT_EINVAL);
    sbuf_free(&sb2);
}

static void test_answers_and_highlights(void) {
    search_query_t q;
    const char *why;
    CHECK_INT(search_query_parse(&q, "cafe", 4, &why), 0);
    const char *chats[] = {"general"};
    search_req_t r = {.query = &q, .chats = chats, .n_chats = 1, .limit = 2};
    const char *body =
        "{\"hits\":{\"hits\":["
        "{\"_source\":{\"chat_id\":\"general\",\"message_id\":30,\"user_from\":\"a\","
        "\"text\":\"au caf\\u00e9 <b>&\",\"created_at\":1000,\"deleted\":false},"
        "\"highlight\":{\"text\":[\"au \\ue000caf\\u00e9\\ue001 <b>&\"]}},"
        /* no highlight from the engine: ours */
        "{\"_source\":{\"chat_id\":\"general\",\"message_id\":20,\"user_from\":\"b\","
        "\"text\":\"Cafe?\",\"created_at\":900,\"edited_at\":950,\"client_id\":\"c\"}},"
        "{\"_source\":{\"chat_id\":\"general\",\"message_id\":10,\"user_from\":\"c\","
        "\"text\":\"cafe\",\"created_at\":800}}]}}";
    CHECK_INT(search_os_parse_hits(&r, body, strlen(body)), 0);
    CHECK_INT(r.n_hits, 2);
    CHECK(r.more);
    CHECK_INT(r.next_before, 20);
    CHECK_STR(r.hits[0].highlight, "au <em>café</em> &lt;b&gt;&amp;");
    CHECK_STR(r.hits[0].msg.message, "au café <b>&");
    CHECK_STR(r.hits[1].highlight, "<em>Cafe</em>?");
    CHECK_INT(r.hits[1].msg.edited_at, 950);
    CHECK_STR(r.hits[1].msg.client_id, "c");
    search_req_cleanup(&r);

    /* a fragment that is not the text (an engine that cut it) is not trusted */
    const char *cut = "{\"hits\":{\"hits\":[{\"_source\":{\"chat_id\":\"g\",\"message_id\":3,"
                      "\"user_from\":\"a\",\"text\":\"x cafe y\",\"created_at\":1},"
                      "\"highlight\":{\"text\":[\"<script>\\ue000cafe\\ue001\"]}}]}}";
    CHECK_INT(search_os_parse_hits(&r, cut, strlen(cut)), 0);
    CHECK_STR(r.hits[0].highlight, "x <em>cafe</em> y");
    search_req_cleanup(&r);

    /* marks that do not pair up (found by fuzz_search_os) are not trusted either */
    const char *unpaired = "{\"hits\":{\"hits\":[{\"_source\":{\"chat_id\":\"g\","
                           "\"message_id\":3,\"user_from\":\"a\",\"text\":\"cafe\","
                           "\"created_at\":1},\"highlight\":{\"text\":[\"\\ue001cafe\"]}}]}}";
    CHECK_INT(search_os_parse_hits(&r, unpaired, strlen(unpaired)), 0);
    CHECK_STR(r.hits[0].highlight, "<em>cafe</em>");
    search_req_cleanup(&r);

    const char *bad[] = {"", "{}", "{\"hits\":{\"hits\":[{\"_source\":{}}]}}",
                         "{\"hits\":{\"hits\":[{\"_source\":{\"message_id\":1}}]}}"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_INT(search_os_parse_hits(&r, bad[i], strlen(bad[i])), CHAT_EIO);
        CHECK_INT(r.n_hits, 0);
    }
}

int main(void) {
    log_set_level(CHAT_LOG_WARN);
    RUN(test_urls);
    RUN(test_index_by_the_month_of_the_id);
    RUN(test_bulk_lines_of_each_event);
    RUN(test_poison_records_are_refused);
    RUN(test_query_is_built_from_terms);
    RUN(test_answers_and_highlights);
    return test_summary("test_search_os");
}
