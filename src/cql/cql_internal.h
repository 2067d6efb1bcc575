/* cql: what codec.c and client.c share; not part of the layer's contract. */
#ifndef CHAT_CQL_INTERNAL_H
#define CHAT_CQL_INTERNAL_H

#include "cql.h"

/* Append a request frame header for opcode on stream, its length left to patch; returns
 * the header's offset. The body follows, then cql__frame_end. */
size_t cql__frame_begin(sbuf_t *sb, int16_t stream, uint8_t opcode);
/* Patch the body length into the header at `at`. CHAT_ETOOBIG (frame removed) past
 * CQL_MAX_BODY; 0 otherwise, also after an allocation failure: callers check sb->oom. */
int cql__frame_end(sbuf_t *sb, size_t at);

/* The start of a QUERY body (the query as a [long string]) and of an EXECUTE body (the
 * prepared id as [short bytes]); the parameters follow, as cql_encode_params writes them.
 * The client keeps a request's parameters encoded once and appends them to each frame it
 * sends for it (a re-prepare sends it again). n must fit the field (the caller checks). */
void cql__put_long_string(sbuf_t *sb, const char *s, size_t n);
void cql__put_short_bytes(sbuf_t *sb, const uint8_t *p, size_t n);

/* BATCH pieces the client sends once per statement and once per batch (the prepared id of
 * each statement is written between them at send time: it differs per connection):
 * <n><value_1>...<value_n> of one statement, and <consistency><flags><serial>[<timestamp>]
 * after the last one. CHAT_EINVAL/CHAT_ERANGE for a value that cannot be sent (nothing
 * appended then); sb->oom as usual. */
int cql__put_batch_values(sbuf_t *sb, const cql_value_t *vals, size_t n_vals);
int cql__put_batch_tail(sbuf_t *sb, const cql_params_t *p, int consistency, int serial);

#endif
