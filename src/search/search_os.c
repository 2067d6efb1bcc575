/* search_os: the index's document format, its template, queries and answers (search_os.h).
 *
 * Every JSON document here is built with jansson from values, never by pasting user text
 * into JSON or into a query language: a query is bool clauses of match / match_phrase over
 * the parsed terms, so nothing a user types is read as query syntax, and a malformed q is
 * our 400 before any request leaves.
 */
#include "search_os.h"

#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "search_internal.h"

int search_os_url(const char *url, char *base, size_t n, char *alias, size_t alias_n,
                  const char **why) {
    static const struct {
        const char *scheme, *http;
    } map[] = {{"opensearch://", "http://"},
               {"elasticsearch://", "http://"},
               {"http://", "http://"},
               {"https://", "https://"}};
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        size_t sl = strlen(map[i].scheme);
        if (strncmp(url, map[i].scheme, sl) != 0) continue;
        const char *host = url + sl;
        size_t hl = strcspn(host, "/?#");
        if (hl == 0 || host[hl] == '?' || host[hl] == '#') {
            *why = "the search URL must be scheme://host:port[/ALIAS]";
            return CHAT_EINVAL;
        }
        for (size_t k = 0; k < hl; k++) {
            unsigned char c = (unsigned char)host[k];
            if (c <= 0x20 || c >= 0x7f || c == '@' || c == '\\') {
                *why = "the search URL's host:port holds a character it must not";
                return CHAT_EINVAL;
            }
        }
        const char *path = host[hl] == '/' && host[hl + 1] ? host + hl + 1 : NULL;
        if (path && (strlen(path) >= alias_n || !search_os_alias_valid(path))) {
            *why = "the search URL's /ALIAS must be 1 to 64 of a-z 0-9 . _ - (not starting "
                   "with - _ .)";
            return CHAT_EINVAL;
        }
        if (hl + strlen(map[i].http) + 1 > n) {
            *why = "the search URL is too long";
            return CHAT_EINVAL;
        }
        snprintf(base, n, "%s%.*s", map[i].http, (int)hl, host);
        snprintf(alias, alias_n, "%s", path ? path : SEARCH_OS_DEFAULT_ALIAS);
        return 0;
    }
    *why = "the search URL must start with opensearch:// or elasticsearch://";
    return CHAT_EINVAL;
}

bool search_os_alias_valid(const char *a) {
    size_t n = strlen(a);
    if (n == 0 || n > SEARCH_OS_ALIAS_MAX || a[0] == '-' || a[0] == '_' || a[0] == '.')
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = a[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

/* Append j's compact JSON to out and free j (NULL: out->oom). */
static void put_json(sbuf_t *out, json_t *j) {
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    if (!s) out->oom = true;
    else sbuf_puts(out, s);
    free(s);
    json_decref(j);
}

void search_os_template(sbuf_t *out, const char *alias, int replicas) {
    char pattern[SEARCH_OS_ALIAS_MAX + 3];
    snprintf(pattern, sizeof pattern, "%s-*", alias);
    /* "standard" splits text by Unicode's word rules, language-neutral; asciifolding then
     * makes "café" and "cafe" one term, lowercase "Köln" and "KOLN". The index is kept
     * sorted newest first, the order every search asks for, so a search stops after its
     * page instead of sorting every match (words every message of a chat holds). */
    json_t *t = json_pack(
        "{s:[s], s:i, s:{s:{s:{s:i, s:i, s:s, s:s, s:{s:{s:{s:s, s:s, s:[s, s]}}}}}, "
        "s:{s:s, s:{s:{s:s}, s:{s:s}, s:{s:s}, s:{s:s, s:s}, s:{s:s, s:b}, "
        "s:{s:s, s:s}, s:{s:s, s:s}, s:{s:s, s:s}, s:{s:s}}}}}",
        "index_patterns", pattern, "priority", 100, "template", "settings", "index",
        "number_of_shards", 1, "number_of_replicas", replicas, "sort.field", "message_id",
        "sort.order", "desc", "analysis", "analyzer", "chat_folding", "type", "custom", "tokenizer",
        "standard", "filter", "lowercase", "asciifolding", "mappings", "dynamic", "strict",
        "properties", "chat_id", "type", "keyword", "message_id", "type", "long", "user_from",
        "type", "keyword", "text", "type", "text", "analyzer", "chat_folding", "client_id", "type",
        "keyword", "index", 0, "created_at", "type", "date", "format", "epoch_millis", "edited_at",
        "type", "date", "format", "epoch_millis", "deleted_at", "type", "date", "format",
        "epoch_millis", "deleted", "type", "boolean");
    put_json(out, t);
}

void search_os_index(char *out, size_t n, const char *alias, uint64_t message_id) {
    time_t secs = (time_t)(id_time_ms(message_id) / 1000);
    struct tm tm;
    gmtime_r(&secs, &tm);
    snprintf(out, n, "%s-%04d.%02d", alias, tm.tm_year + 1900, tm.tm_mon + 1);
}

int search_os_parse_time(const char *s, int64_t *ms) {
    int y, mo, d, h, mi, sec, used = 0;
    if (sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &y, &mo, &d, &h, &mi, &sec, &used) != 6 ||
        used != 19)
        return CHAT_EINVAL;
    const char *p = s + 19;
    int milli = 0;
    if (*p == '.') {
        int digits = 0;
        for (p++; *p >= '0' && *p <= '9'; p++, digits++)
            if (digits < 3) milli = milli * 10 + (*p - '0');
        if (digits == 0) return CHAT_EINVAL;
        for (; digits < 3; digits++) milli *= 10;
    }
    if (strcmp(p, "Z") != 0 || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 ||
        sec > 60)
        return CHAT_EINVAL;
    struct tm tm = {.tm_year = y - 1900,
                    .tm_mon = mo - 1,
                    .tm_mday = d,
                    .tm_hour = h,
                    .tm_min = mi,
                    .tm_sec = sec};
    *ms = (int64_t)timegm(&tm) * 1000 + milli;
    return 0;
}

/* A time field of the event into doc as epoch ms; absent is fine unless required. */
static int copy_time(json_t *doc, json_t *ev, const char *key, bool required) {
    json_t *v = json_object_get(ev, key);
    if (!v) return required ? CHAT_EINVAL : 0;
    int64_t ms;
    if (!json_is_string(v) || search_os_parse_time(json_string_value(v), &ms) < 0)
        return CHAT_EINVAL;
    return json_object_set_new(doc, key, json_integer(ms)) ? CHAT_ENOMEM : 0;
}

static const char *str_field(json_t *ev, const char *key) {
    json_t *v = json_object_get(ev, key);
    return json_is_string(v) && json_string_length(v) ? json_string_value(v) : NULL;
}

int search_os_bulk_record(sbuf_t *out, const char *alias, const char *value, size_t n,
                          uint64_t version, uint64_t *message_id, const char **why) {
    if (version == 0 || version > INT64_MAX) {
        *why = "no usable version header";
        return CHAT_EINVAL;
    }
    json_error_t jerr;
    json_t *ev = json_loadb(value, n, JSON_REJECT_DUPLICATES, &jerr);
    if (!json_is_object(ev)) {
        json_decref(ev);
        *why = "the value is not a JSON object";
        return CHAT_EINVAL;
    }
    int rc = CHAT_EINVAL;
    json_t *doc = NULL, *action = NULL;
    const char *kind = str_field(ev, "event"), *chat = str_field(ev, "chat_id"),
               *mid_s = str_field(ev, "message_id"), *user = str_field(ev, "user_from"),
               *text = str_field(ev, "message");
    uint64_t mid = 0;
    bool del = kind && strcmp(kind, "message:delete") == 0;
    if (!kind ||
        (!del && strcmp(kind, "message:message") != 0 && strcmp(kind, "message:edit") != 0)) {
        *why = "not a message:message, message:edit or message:delete event";
        goto out;
    }
    if (!chat || !user || !mid_s || id_parse(mid_s, strlen(mid_s), &mid) < 0 || mid == 0 ||
        mid > INT64_MAX) {
        *why = "chat_id, user_from or message_id missing or malformed";
        goto out;
    }
    if (!del && !json_is_string(json_object_get(ev, "message"))) {
        *why = "a message or an edit without its message text";
        goto out;
    }
    doc = json_pack("{s:s, s:I, s:s, s:b}", "chat_id", chat, "message_id", (json_int_t)mid,
                    "user_from", user, "deleted", del);
    if (!doc) {
        rc = CHAT_ENOMEM;
        goto out;
    }
    /* a delete keeps no text: the tombstone only says the message is gone, and when */
    if (!del && json_object_set_new(doc, "text", json_string(text ? text : ""))) goto oom;
    const char *client = str_field(ev, "client_id");
    if (client && json_object_set_new(doc, "client_id", json_string(client))) goto oom;
    if ((rc = copy_time(doc, ev, "created_at", true)) ||
        (rc = copy_time(doc, ev, "edited_at", false)) ||
        (rc = copy_time(doc, ev, "deleted_at", del))) {
        if (rc == CHAT_EINVAL) *why = "a time field missing or not RFC 3339";
        goto out;
    }
    char index[SEARCH_OS_ALIAS_MAX + 16], id[24];
    search_os_index(index, sizeof index, alias, mid);
    snprintf(id, sizeof id, "%" PRIu64, mid);
    action = json_pack("{s:{s:s, s:s, s:I, s:s}}", "index", "_index", index, "_id", id, "version",
                       (json_int_t)version, "version_type", "external");
    if (!action) goto oom;
    sbuf_t tmp = {0};
    put_json(&tmp, action);
    action = NULL;
    sbuf_puts(&tmp, "\n");
    put_json(&tmp, doc);
    doc = NULL;
    sbuf_puts(&tmp, "\n");
    if (tmp.oom) {
        sbuf_free(&tmp);
        rc = CHAT_ENOMEM;
        goto out;
    }
    sbuf_put(out, tmp.p, tmp.len);
    sbuf_free(&tmp);
    if (message_id) *message_id = mid;
    rc = 0;
    goto out;
oom:
    rc = CHAT_ENOMEM;
out:
    json_decref(action);
    json_decref(doc);
    json_decref(ev);
    return rc;
}

/* ---- reading ------------------------------------------------------------------------ */

/* The highlighter's tags: U+E000 and U+E001 (private use). Control characters would do
 * better, but OpenSearch drops some of them from its answer. A text holding either of its
 * own gets our own highlight instead (search_html_terms). */
#define MARK_OPEN "\xee\x80\x80"
#define MARK_CLOSE "\xee\x80\x81"

/* The engine's highlighted fragment as HTML into hl: its marks become <em></em>. false when
 * it cannot be trusted (the text holds a mark of its own, the marks do not pair up, or the
 * fragment is not the whole text): the caller highlights by itself. */
static bool put_engine_highlight(sbuf_t *hl, const char *frag, size_t fn, const char *text) {
    if (strstr(text, "\xee\x80\x80") || strstr(text, "\xee\x80\x81")) return false;
    char *marked = malloc(fn + 1);
    if (!marked) return false;
    size_t w = 0;
    bool open = false, balanced = true; /* <em> and </em> alternate, never nested */
    for (size_t i = 0; i < fn;) {
        if (i + 3 <= fn && memcmp(frag + i, MARK_OPEN, 3) == 0) {
            balanced = balanced && !open;
            open = true;
            marked[w++] = '\x01';
            i += 3;
        } else if (i + 3 <= fn && memcmp(frag + i, MARK_CLOSE, 3) == 0) {
            balanced = balanced && open;
            open = false;
            marked[w++] = '\x02';
            i += 3;
        } else {
            marked[w++] = frag[i++];
        }
    }
    if (!balanced || open) {
        free(marked);
        return false;
    }
    /* without its marks the fragment must be the text itself (number_of_fragments 0) */
    size_t tn = strlen(text), k = 0;
    bool same = true;
    for (size_t i = 0; i < w && same; i++) {
        if (marked[i] == '\x01' || marked[i] == '\x02') continue;
        same = k < tn && marked[i] == text[k++];
    }
    same = same && k == tn;
    if (same) search_html_marked(hl, marked, w, text, tn);
    free(marked);
    return same;
}

static json_t *term_clause(const search_term_t *t) {
    /* a single word as match_phrase too: with one token it is a match, and a "word" the
     * analyzer splits ("e-mail") must keep its parts together, as FTS5 does */
    return json_pack("{s:{s:s%}}", "match_phrase", "text", t->text, t->len);
}

int search_os_query(sbuf_t *out, const search_req_t *req, const char **why) {
    const search_query_t *q = req->query;
    size_t pos = 0;
    for (size_t i = 0; i < q->n_terms; i++)
        if (!q->terms[i].exclude && search__has_token(q->terms[i].text, q->terms[i].len)) pos++;
    if (pos == 0) {
        *why = "q needs a word or phrase with a letter or digit in it";
        return CHAT_EINVAL;
    }
    json_t *must = json_array(), *must_not = json_array(), *filter = json_array(),
           *chats = json_array();
    for (size_t i = 0; i < q->n_terms; i++) {
        const search_term_t *t = &q->terms[i];
        if (!search__has_token(t->text, t->len)) continue;
        json_array_append_new(t->exclude ? must_not : must, term_clause(t));
    }
    for (size_t i = 0; i < req->n_chats; i++)
        json_array_append_new(chats, json_string(req->chats[i]));
    json_array_append_new(filter, json_pack("{s:{s:o}}", "terms", "chat_id", chats));
    json_array_append_new(filter, json_pack("{s:{s:b}}", "term", "deleted", 0));
    if (req->from)
        json_array_append_new(filter, json_pack("{s:{s:s}}", "term", "user_from", req->from));
    if (req->before)
        json_array_append_new(filter, json_pack("{s:{s:{s:I}}}", "range", "message_id", "lt",
                                                (json_int_t)req->before));
    json_t *body =
        json_pack("{s:i, s:b, s:{s:{s:o, s:o, s:o}}, s:[{s:{s:s}}], "
                  "s:{s:[s], s:[s], s:{s:{s:i, s:s}}}}",
                  "size", req->limit + 1, "track_total_hits", 0, "query", "bool", "must", must,
                  "must_not", must_not, "filter", filter, "sort", "message_id", "order", "desc",
                  "highlight", "pre_tags", MARK_OPEN, "post_tags", MARK_CLOSE, "fields", "text",
                  "number_of_fragments", 0, "type", "unified");
    put_json(out, body);
    return out->oom ? CHAT_ENOMEM : 0;
}

static char *dup_field(json_t *src, const char *key) {
    json_t *v = json_object_get(src, key);
    return json_is_string(v) ? strdup(json_string_value(v)) : NULL;
}

static int64_t int_field(json_t *src, const char *key) {
    json_t *v = json_object_get(src, key);
    return json_is_integer(v) ? (int64_t)json_integer_value(v) : 0;
}

int search_os_parse_hits(search_req_t *req, const char *body, size_t n) {
    json_error_t jerr;
    json_t *root = json_loadb(body, n, 0, &jerr);
    json_t *hits = json_object_get(json_object_get(root, "hits"), "hits");
    if (!json_is_array(hits)) {
        json_decref(root);
        return CHAT_EIO;
    }
    size_t total = json_array_size(hits);
    size_t keep = total > (size_t)req->limit ? (size_t)req->limit : total;
    search_hit_t *out = keep ? calloc(keep, sizeof *out) : NULL;
    int rc = keep && !out ? CHAT_ENOMEM : 0;
    size_t k = 0;
    for (size_t i = 0; rc == 0 && i < keep; i++) {
        json_t *h = json_array_get(hits, i);
        json_t *src = json_object_get(h, "_source");
        json_t *mid = json_object_get(src, "message_id");
        if (!json_is_object(src) || !json_is_integer(mid) || json_integer_value(mid) <= 0) {
            rc = CHAT_EIO;
            break;
        }
        store_msg_t *m = &out[k].msg;
        m->id = (uint64_t)json_integer_value(mid);
        m->chat_id = dup_field(src, "chat_id");
        m->user_from = dup_field(src, "user_from");
        m->message = dup_field(src, "text");
        m->client_id = dup_field(src, "client_id");
        m->created_at = int_field(src, "created_at");
        m->edited_at = int_field(src, "edited_at");
        k++;
        if (!m->chat_id || !m->user_from || !m->message) {
            rc = m->chat_id && m->user_from && json_is_string(json_object_get(src, "text"))
                     ? CHAT_ENOMEM
                     : CHAT_EIO;
            break;
        }
        json_t *frag = json_array_get(json_object_get(json_object_get(h, "highlight"), "text"), 0);
        sbuf_t hl = {0};
        if (!json_is_string(frag) || !put_engine_highlight(&hl, json_string_value(frag),
                                                           json_string_length(frag), m->message))
            search_html_terms(&hl, req->query, m->message, strlen(m->message));
        sbuf_put(&hl, "", 1);
        if (hl.oom) {
            sbuf_free(&hl);
            rc = CHAT_ENOMEM;
            break;
        }
        out[k - 1].highlight = hl.p;
    }
    json_decref(root);
    if (rc < 0) {
        for (size_t i = 0; i < k; i++) {
            store_msg_clear(&out[i].msg);
            free(out[i].highlight);
        }
        free(out);
        return rc;
    }
    req->hits = out;
    req->n_hits = keep;
    req->scanned = total;
    req->more = total > keep;
    req->next_before = req->more && keep ? out[keep - 1].msg.id : 0;
    return 0;
}
