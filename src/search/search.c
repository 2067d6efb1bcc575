/* search: picks a backend by name, parses queries, builds FTS5 expressions and highlights.
 *
 * The query text is untrusted: it is parsed here into terms, and a backend only ever sees
 * terms. The FTS5 expression is built from them with every term a quoted string, so no
 * user text is ever read by FTS5 as its own syntax (operators, column filters, prefixes),
 * and a malformed query is our 400, never an engine error. */
#include "search_internal.h"
#include "search_os.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int search__new(search_t **out, const search_ops_t *ops, uv_loop_t *loop, store_t *store, char *err,
                size_t errlen) {
    search_t *s = calloc(1, sizeof *s);
    if (!s) {
        search__set_err(err, errlen, "out of memory");
        return CHAT_ENOMEM;
    }
    s->ops = ops;
    s->loop = loop;
    s->store = store;
    *out = s;
    return 0;
}

void search__set_err(char *err, size_t errlen, const char *fmt, ...) {
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* ---- the query ------------------------------------------------------------------------ */

static bool is_blank(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

int search_query_parse(search_query_t *out, const char *q, size_t n, const char **why) {
    memset(out, 0, sizeof *out);
    if (n > SEARCH_Q_MAX) {
        *why = "q must be at most 256 bytes";
        return CHAT_EINVAL;
    }
    /* Control characters (NUL included) would cut a term short in a C string or garble
     * the answer's highlight; nobody types them into a search box. */
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)q[i];
        if ((c < 0x20 && !is_blank(q[i])) || c == 0x7f) {
            *why = "q must not hold control characters";
            return CHAT_EINVAL;
        }
    }
    size_t w = 0; /* into out->buf: each term's text, NUL-terminated; fits, as the terms
                   * are never longer than q and there is one NUL per term */
    for (size_t i = 0; i < n;) {
        while (i < n && is_blank(q[i])) i++;
        if (i == n) break;
        bool exclude = false;
        if (q[i] == '-' && i + 1 < n && !is_blank(q[i + 1])) {
            exclude = true;
            i++;
        }
        if (out->n_terms == SEARCH_TERMS_MAX) {
            *why = "q must hold at most 8 words or phrases";
            return CHAT_EINVAL;
        }
        search_term_t *t = &out->terms[out->n_terms];
        size_t start = w;
        if (q[i] == '"') {
            const char *close = memchr(q + i + 1, '"', n - i - 1);
            if (!close) {
                *why = "q has an unbalanced quote: a phrase is \"words between quotes\"";
                return CHAT_EINVAL;
            }
            size_t end = (size_t)(close - q);
            bool blank = false;
            for (size_t j = i + 1; j < end; j++) {
                if (is_blank(q[j])) {
                    blank = w > start; /* leading blanks dropped, inner runs become one */
                    continue;
                }
                if (blank) out->buf[w++] = ' ';
                blank = false;
                out->buf[w++] = q[j];
            }
            if (w == start) {
                *why = "q has an empty phrase";
                return CHAT_EINVAL;
            }
            t->phrase = true;
            i = end + 1;
        } else {
            while (i < n && !is_blank(q[i]) && q[i] != '"') out->buf[w++] = q[i++];
        }
        t->text = out->buf + start;
        t->len = w - start;
        t->exclude = exclude;
        out->buf[w++] = '\0';
        out->n_terms++;
        if (!exclude) out->n_positive++;
    }
    if (out->n_terms == 0) {
        *why = "q must hold 1 to 8 words or phrases separated by blanks";
        return CHAT_EINVAL;
    }
    if (out->n_positive == 0) {
        *why = "q needs a word or phrase to look for, not only -exclusions";
        return CHAT_EINVAL;
    }
    return 0;
}

/* ---- FTS5 ----------------------------------------------------------------------------- */

/* FTS5's unicode61 tokenizer indexes letters and digits; an ASCII punctuation-only term is
 * no token at all. Non-ASCII bytes are counted as letters: most are, and a term that turns
 * out to have no token just matches nothing. */
bool search__has_token(const char *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c >= 0x80 || (c >= '0' && c <= '9') || ((c | 0x20) >= 'a' && (c | 0x20) <= 'z'))
            return true;
    }
    return false;
}

/* A FTS5 string: "..." with every " doubled (the only character special inside one). */
static void put_quoted(sbuf_t *out, const char *p, size_t n) {
    sbuf_puts(out, "\"");
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '"') sbuf_puts(out, "\"");
        sbuf_put(out, p + i, 1);
    }
    sbuf_puts(out, "\"");
}

/* hex(), as SQLite's hex() writes it in the triggers: one token of [0-9A-F]. */
static void put_hex_quoted(sbuf_t *out, const char *s) {
    static const char hx[] = "0123456789ABCDEF";
    sbuf_puts(out, "\"");
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        char two[2] = {hx[*p >> 4], hx[*p & 15]};
        sbuf_put(out, two, 2);
    }
    sbuf_puts(out, "\"");
}

int search_fts_expr(sbuf_t *out, const search_query_t *q, const char *const *chats, size_t n_chats,
                    const char *from, const char **why) {
    size_t pos = 0;
    for (size_t i = 0; i < q->n_terms; i++)
        if (!q->terms[i].exclude && search__has_token(q->terms[i].text, q->terms[i].len)) pos++;
    if (pos == 0) {
        *why = "q needs a word or phrase with a letter or digit in it";
        return CHAT_EINVAL;
    }
    if (n_chats) {
        sbuf_puts(out, "chat : (");
        for (size_t i = 0; i < n_chats; i++) {
            if (i) sbuf_puts(out, " OR ");
            put_hex_quoted(out, chats[i]);
        }
        sbuf_puts(out, ") AND ");
    }
    if (from) {
        sbuf_puts(out, "author : ");
        put_hex_quoted(out, from);
        sbuf_puts(out, " AND ");
    }
    sbuf_puts(out, "message : ((");
    size_t k = 0;
    for (size_t i = 0; i < q->n_terms; i++) {
        const search_term_t *t = &q->terms[i];
        if (t->exclude || !search__has_token(t->text, t->len)) continue;
        if (k++) sbuf_puts(out, " AND ");
        put_quoted(out, t->text, t->len);
    }
    sbuf_puts(out, ")");
    for (size_t i = 0; i < q->n_terms; i++) {
        const search_term_t *t = &q->terms[i];
        if (!t->exclude || !search__has_token(t->text, t->len)) continue;
        sbuf_puts(out, " NOT ");
        put_quoted(out, t->text, t->len);
    }
    sbuf_puts(out, ")");
    return 0;
}

/* ---- highlights ----------------------------------------------------------------------- */

static void put_html(sbuf_t *out, const char *p, size_t n) {
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        const char *rep = NULL;
        switch (p[i]) {
        case '&': rep = "&amp;"; break;
        case '<': rep = "&lt;"; break;
        case '>': rep = "&gt;"; break;
        case '"': rep = "&quot;"; break;
        case '\'': rep = "&#39;"; break;
        default: continue;
        }
        sbuf_put(out, p + run, i - run);
        sbuf_puts(out, rep);
        run = i + 1;
    }
    sbuf_put(out, p + run, n - run);
}

void search_html_marked(sbuf_t *out, const char *text, size_t n, const char *plain,
                        size_t plain_n) {
    if (plain && (memchr(plain, '\x01', plain_n) || memchr(plain, '\x02', plain_n))) {
        put_html(out, plain, plain_n);
        return;
    }
    size_t run = 0;
    for (size_t i = 0; i < n; i++) {
        if (text[i] != '\x01' && text[i] != '\x02') continue;
        put_html(out, text + run, i - run);
        sbuf_puts(out, text[i] == '\x01' ? "<em>" : "</em>");
        run = i + 1;
    }
    put_html(out, text + run, n - run);
}

static unsigned char lower(unsigned char c) {
    return c >= 'A' && c <= 'Z' ? (unsigned char)(c + 32) : c;
}

/* Whether the n bytes of term match text at p, ASCII case ignored (as the scan compares:
 * bytes of multibyte characters are never ASCII letters, so they compare exactly). */
static bool match_at(const char *p, const char *term, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (lower((unsigned char)p[i]) != lower((unsigned char)term[i])) return false;
    return true;
}

void search_html_terms(sbuf_t *out, const search_query_t *q, const char *text, size_t n) {
    /* Mark every byte inside some occurrence, then emit runs: overlapping and adjacent
     * matches become one <em>. No memory for the marks: no highlight, still the text. */
    unsigned char *mark = n ? calloc(n, 1) : NULL;
    if (!mark) {
        put_html(out, text, n);
        return;
    }
    for (size_t t = 0; t < q->n_terms; t++) {
        const search_term_t *term = &q->terms[t];
        if (term->exclude || term->len == 0 || term->len > n) continue;
        for (size_t i = 0; i + term->len <= n; i++)
            if (match_at(text + i, term->text, term->len)) memset(mark + i, 1, term->len);
    }
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        while (j < n && mark[j] == mark[i]) j++;
        if (mark[i]) sbuf_puts(out, "<em>");
        put_html(out, text + i, j - i);
        if (mark[i]) sbuf_puts(out, "</em>");
        i = j;
    }
    free(mark);
}

/* ---- backends ------------------------------------------------------------------------- */

/* Which backend url names for a store: 1 sqlite, 2 scan, 3 an OpenSearch/Elasticsearch
 * engine, or CHAT_EINVAL with err set. */
static int search__pick(const char *url, bool sqlite_store, const char *store_name, char *err,
                        size_t errlen) {
    if (!url || !*url) return sqlite_store ? 1 : 2;
    if (strcmp(url, "sqlite") == 0) {
        if (sqlite_store) return 1;
        search__set_err(err, errlen,
                        "--search sqlite needs the SQLite store (its FTS5 index lives in the "
                        "database); with the %s store use --search scan",
                        store_name);
        return CHAT_EINVAL;
    }
    if (strcmp(url, "scan") == 0) return 2;
    if (strncmp(url, "opensearch://", 13) == 0 || strncmp(url, "elasticsearch://", 16) == 0) {
        char base[300], alias[SEARCH_OS_ALIAS_MAX + 1];
        const char *why;
        if (search_os_url(url, base, sizeof base, alias, sizeof alias, &why) == 0) return 3;
        search__set_err(err, errlen, "--search %.100s: %s", url, why);
        return CHAT_EINVAL;
    }
    search__set_err(err, errlen,
                    "unknown --search \"%.64s\" (want sqlite, scan, opensearch://host:port or "
                    "elasticsearch://host:port)",
                    url);
    return CHAT_EINVAL;
}

int search_check(const char *url, const char *store_url, char *err, size_t errlen) {
    bool sqlite_store = store_url && strncmp(store_url, "sqlite:", 7) == 0;
    int rc = search__pick(url, sqlite_store, sqlite_store ? "sqlite" : "Cassandra", err, errlen);
    return rc < 0 ? rc : 0;
}

int search_open(search_t **out, uv_loop_t *loop, const char *url, store_t *store, char *err,
                size_t errlen) {
    *out = NULL;
    int rc =
        search__pick(url, strcmp(store->ops->name, "sqlite") == 0, store->ops->name, err, errlen);
    if (rc < 0) return rc;
    if (rc == 3) return search_opensearch_open(out, loop, url, store, err, errlen);
    return rc == 1 ? search_sqlite_open(out, loop, store, err, errlen)
                   : search_scan_open(out, loop, store, err, errlen);
}

void search_req_cleanup(search_req_t *r) {
    for (size_t i = 0; i < r->n_hits; i++) {
        store_msg_clear(&r->hits[i].msg);
        free(r->hits[i].highlight);
    }
    free(r->hits);
    r->hits = NULL;
    r->n_hits = 0;
    r->status = 0;
    r->more = false;
    r->next_before = 0;
    r->scanned = 0;
}
