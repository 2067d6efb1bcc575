/* search_os: the document format of the OpenSearch / Elasticsearch index, shared by the
 * writer (chat-indexer, src/indexer/) and the reader (the search backend in chatd), so the
 * two cannot drift apart. Pure functions: no I/O, no threads.
 *
 * One document per message, id = message_id, written with external versions (the Kafka
 * record's `version` header, the outbox sequence), so a replayed older event never
 * overwrites a newer one. A delete is a tombstone document (deleted: true, no text) with its
 * own version: a replayed edit after it is refused as older and cannot bring the text back.
 * Indices are monthly, "ALIAS-YYYY.MM" by the month the message was created (its id's time,
 * so an edit a month later goes to the index holding the original), all behind ALIAS, which
 * the index template adds them to.
 *
 * Only REST calls that Elasticsearch 8/9 and OpenSearch 2/3 both answer alike are built here:
 * _index_template (composable templates), _bulk with version_type=external, _search with
 * bool/match/match_phrase/terms/range, sort, highlight.
 */
#ifndef CHAT_SEARCH_OS_H
#define CHAT_SEARCH_OS_H

#include <stddef.h>
#include <stdint.h>

#include "core/core.h"
#include "search/search.h"

#define SEARCH_OS_DEFAULT_ALIAS "chat-messages"
#define SEARCH_OS_ALIAS_MAX 64

/* "opensearch://host:port[/ALIAS]" or "elasticsearch://host:port[/ALIAS]" (also with an
 * http:// or https:// scheme, for a TLS front end) into "http://host:port" (or the https
 * one) in base, and ALIAS (default SEARCH_OS_DEFAULT_ALIAS) in alias (at least
 * SEARCH_OS_ALIAS_MAX + 1 bytes). 0, or CHAT_EINVAL with a static reason in *why. */
int search_os_url(const char *url, char *base, size_t n, char *alias, size_t alias_n,
                  const char **why);

/* Whether alias is a usable index name prefix: 1..SEARCH_OS_ALIAS_MAX of [a-z0-9._-],
 * not starting with '-', '_' or '.'. */
bool search_os_alias_valid(const char *alias);

/* Append the index template's JSON (PUT /_index_template/ALIAS) to out: the pattern
 * "ALIAS-*", the folding analyzer, the mapping; replicas per index. Not the alias: the
 * indexer adds an index to it once the index can answer. */
void search_os_template(sbuf_t *out, const char *alias, int replicas);

/* The index a message lives in: "ALIAS-YYYY.MM" from the month of its id's time (UTC). */
void search_os_index(char *out, size_t n, const char *alias, uint64_t message_id);

/* Append the two _bulk NDJSON lines (action, document) for one Kafka record: value is the
 * JSON event (message:message, message:edit or message:delete), version its `version`
 * header. 0 when appended; CHAT_EINVAL with a static reason in *why when the record is not
 * a chat event we can index (a poison record: bad JSON, a missing or mistyped field, an
 * unknown event, a version of 0); nothing appended then. *message_id gets the id (may be
 * NULL). */
int search_os_bulk_record(sbuf_t *out, const char *alias, const char *value, size_t n,
                          uint64_t version, uint64_t *message_id, const char **why);

/* Append the _search body for req's query, chats, from, before and limit (limit + 1 hits,
 * to know whether there are more): words by match (all of them), phrases by match_phrase,
 * exclusions as must_not, deleted documents filtered out, newest first, the whole text
 * highlighted. Built from the parsed terms, never from q's text as a query language. 0, or CHAT_EINVAL with *why (no word with a letter or digit). */
int search_os_query(sbuf_t *out, const search_req_t *req, const char **why);

/* Fill req's outputs (hits, more, next_before, scanned) from a _search answer's body. 0,
 * CHAT_EIO (not the answer we expect), or CHAT_ENOMEM. req->query gives the terms for the
 * highlight when the engine sends none. */
int search_os_parse_hits(search_req_t *req, const char *body, size_t n);

/* Parse "YYYY-MM-DDTHH:MM:SS[.mmm]Z" into Unix ms. 0, or CHAT_EINVAL. */
int search_os_parse_time(const char *s, int64_t *ms);

#endif
