/* fuzz_search_os: the two readers of untrusted bytes in the OpenSearch document format: a
 * Kafka record's value as chat-indexer reads it (anyone who can produce to the topic writes
 * it), and a _search answer as chatd reads it (the engine, or whatever answers on its port).
 * The first byte picks which.
 *
 * Invariants: a record is either refused with a reason and nothing written, or becomes
 * exactly two lines of valid JSON, the action naming an index under the alias; an answer is
 * either refused (CHAT_EIO) with no hits, or gives at most limit hits, newest first as sent,
 * each highlight HTML with only our <em> tags. */
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_html.h"
#include "search/search_internal.h"
#include "search/search_os.h"

static void record(const uint8_t *data, size_t size) {
    sbuf_t sb = {0};
    const char *why = NULL;
    uint64_t mid = 0;
    int rc = search_os_bulk_record(&sb, "chat-messages", (const char *)data, size, 7, &mid, &why);
    if (rc != 0) {
        check(rc == CHAT_EINVAL && why && *why && sb.len == 0);
        sbuf_free(&sb);
        return;
    }
    check(mid != 0 && sb.len > 2 && sb.p[sb.len - 1] == '\n');
    char *nl = memchr(sb.p, '\n', sb.len);
    check(nl && nl < sb.p + sb.len - 1);
    check(!memchr(nl + 1, '\n', (size_t)(sb.p + sb.len - 1 - (nl + 1))));
    json_t *a = json_loadb(sb.p, (size_t)(nl - sb.p), 0, NULL);
    json_t *d = json_loadb(nl + 1, (size_t)(sb.p + sb.len - 1 - (nl + 1)), 0, NULL);
    check(a && d);
    const char *idx = json_string_value(json_object_get(json_object_get(a, "index"), "_index"));
    check(idx && strncmp(idx, "chat-messages-", 14) == 0);
    json_decref(a);
    json_decref(d);
    sbuf_free(&sb);
}

static void answer(const uint8_t *data, size_t size) {
    search_query_t q;
    const char *why;
    check(search_query_parse(&q, "cafe \"red fox\" -x", 17, &why) == 0);
    const char *chats[] = {"general"};
    search_req_t r = {.query = &q, .chats = chats, .n_chats = 1, .limit = 3};
    int rc = search_os_parse_hits(&r, (const char *)data, size);
    if (rc != 0) {
        check(rc == CHAT_EIO || rc == CHAT_ENOMEM);
        check(r.n_hits == 0 && r.hits == NULL);
        return;
    }
    check(r.n_hits <= 3);
    for (size_t i = 0; i < r.n_hits; i++) {
        check(r.hits[i].msg.id != 0 && r.hits[i].msg.message && r.hits[i].highlight);
        sbuf_t h = {.p = r.hits[i].highlight, .len = strlen(r.hits[i].highlight)};
        check_html(&h);
    }
    if (r.more) check(r.n_hits == 3 && r.next_before == r.hits[2].msg.id);
    search_req_cleanup(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    log_set_level(CHAT_LOG_ERROR + 1);
    if (data[0] & 1) record(data + 1, size - 1);
    else answer(data + 1, size - 1);
    return 0;
}
