/* search: helpers shared by the backends and their tests; not part of the layer's contract
 * (the domain uses search.h only). */
#ifndef CHAT_SEARCH_INTERNAL_H
#define CHAT_SEARCH_INTERNAL_H

#include <stdarg.h>

#include "search.h"

/* Append to out the FTS5 MATCH expression for q over the messages_fts table (see
 * schema/sqlite.sql): every term a quoted string (never user text as FTS5 syntax), chats
 * and from as exact one-token column filters on their hex. Words and phrases without a
 * single letter or digit (which FTS5 would index as nothing) are left out. Returns 0, or
 * CHAT_EINVAL when no word to look for is left (then *why says so). out->oom: no memory. */
int search_fts_expr(sbuf_t *out, const search_query_t *q, const char *const *chats, size_t n_chats,
                    const char *from, const char **why);

/* Append text (n bytes) as HTML to out, where the bytes \x01 and \x02 mark where a match
 * starts and ends (FTS5's highlight()): <em> and </em> for them, every other character
 * escaped (& < > " '). A text that holds \x01 or \x02 of its own cannot be told apart from
 * the marks: pass the original message as plain (not NULL), and then only plain is escaped,
 * with no marks. */
void search_html_marked(sbuf_t *out, const char *text, size_t n, const char *plain, size_t plain_n);

/* Append text (n bytes) as HTML to out with every occurrence of q's words and phrases
 * (ASCII case ignored, as the scan matches) wrapped in <em></em>; exclusions are never
 * marked. */
void search_html_terms(sbuf_t *out, const search_query_t *q, const char *text, size_t n);

/* A backend's search_t with its ops, loop and store (borrowed: the caller's, outliving it).
 * 0, or CHAT_ENOMEM with err set. The backend's close frees it with free(). */
int search__new(search_t **out, const search_ops_t *ops, uv_loop_t *loop, store_t *store, char *err,
                size_t errlen);
/* printf into a caller's error buffer (err may be NULL or errlen 0: then nothing). */
void search__set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Whether a term holds something an index makes a token of: an ASCII letter or digit, or
 * any non-ASCII byte (most are letters; a term that has none matches nothing). */
bool search__has_token(const char *p, size_t n);

#endif
