/* cql: our asynchronous client for the Cassandra native protocol, version 4, on libuv.
 *
 * Two halves behind one header:
 * - the codec (codec.c): pure functions from bytes to frames and back, no I/O, so that the
 *   unit tests check exact byte layouts from the spec and the fuzzer drives the decoder;
 * - the client (client.c): contact points, a pool of connections per node, requests
 *   multiplexed on stream ids (many in flight, answers matched out of order), prepared
 *   statements per connection, timeouts, reconnection with backoff.
 *
 * The one idea: everything happens on the loop thread and nothing waits. Name resolution,
 * connect, reads and writes are libuv requests; a request's answer arrives as a callback
 * whose views (rows, strings) point into the connection's read buffer and are valid only
 * during that callback: copy what you keep.
 *
 * Errors follow the project's rule: a function that takes a callback and returns a negative
 * CHAT_E* code will never call it; one that returns 0 calls it exactly once.
 */
#ifndef CHAT_CQL_H
#define CHAT_CQL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "core/core.h"

/* ---- protocol constants --------------------------------------------------------------- */

#define CQL_VERSION_REQ 0x04
#define CQL_VERSION_RESP 0x84
#define CQL_HEADER_LEN 9
#define CQL_MAX_BODY (256u << 20) /* the spec's frame limit */
#define CQL_MAX_STREAMS 32768

enum cql_opcode {
    CQL_OP_ERROR = 0x00,
    CQL_OP_STARTUP = 0x01,
    CQL_OP_READY = 0x02,
    CQL_OP_AUTHENTICATE = 0x03,
    CQL_OP_OPTIONS = 0x05,
    CQL_OP_SUPPORTED = 0x06,
    CQL_OP_QUERY = 0x07,
    CQL_OP_RESULT = 0x08,
    CQL_OP_PREPARE = 0x09,
    CQL_OP_EXECUTE = 0x0A,
    CQL_OP_REGISTER = 0x0B,
    CQL_OP_EVENT = 0x0C,
    CQL_OP_BATCH = 0x0D,
    CQL_OP_AUTH_CHALLENGE = 0x0E,
    CQL_OP_AUTH_RESPONSE = 0x0F,
    CQL_OP_AUTH_SUCCESS = 0x10,
};

enum cql_frame_flag {
    CQL_FLAG_COMPRESSION = 0x01,
    CQL_FLAG_TRACING = 0x02,
    CQL_FLAG_CUSTOM_PAYLOAD = 0x04,
    CQL_FLAG_WARNING = 0x08,
};

enum cql_consistency {
    CQL_ANY = 0x0000,
    CQL_ONE = 0x0001,
    CQL_TWO = 0x0002,
    CQL_THREE = 0x0003,
    CQL_QUORUM = 0x0004,
    CQL_ALL = 0x0005,
    CQL_LOCAL_QUORUM = 0x0006,
    CQL_EACH_QUORUM = 0x0007,
    CQL_SERIAL = 0x0008,
    CQL_LOCAL_SERIAL = 0x0009,
    CQL_LOCAL_ONE = 0x000A,
};

/* Column type option ids (section 4.2.5.2). */
enum cql_type {
    CQL_T_CUSTOM = 0x0000,
    CQL_T_ASCII = 0x0001,
    CQL_T_BIGINT = 0x0002,
    CQL_T_BLOB = 0x0003,
    CQL_T_BOOLEAN = 0x0004,
    CQL_T_COUNTER = 0x0005,
    CQL_T_DECIMAL = 0x0006,
    CQL_T_DOUBLE = 0x0007,
    CQL_T_FLOAT = 0x0008,
    CQL_T_INT = 0x0009,
    CQL_T_TIMESTAMP = 0x000B,
    CQL_T_UUID = 0x000C,
    CQL_T_VARCHAR = 0x000D,
    CQL_T_VARINT = 0x000E,
    CQL_T_TIMEUUID = 0x000F,
    CQL_T_INET = 0x0010,
    CQL_T_DATE = 0x0011,
    CQL_T_TIME = 0x0012,
    CQL_T_SMALLINT = 0x0013,
    CQL_T_TINYINT = 0x0014,
    CQL_T_LIST = 0x0020,
    CQL_T_MAP = 0x0021,
    CQL_T_SET = 0x0022,
    CQL_T_UDT = 0x0030,
    CQL_T_TUPLE = 0x0031,
};

enum cql_result_kind {
    CQL_RESULT_VOID = 0x0001,
    CQL_RESULT_ROWS = 0x0002,
    CQL_RESULT_SET_KEYSPACE = 0x0003,
    CQL_RESULT_PREPARED = 0x0004,
    CQL_RESULT_SCHEMA_CHANGE = 0x0005,
};

/* ERROR codes (section 9). */
enum cql_error_code {
    CQL_ERR_SERVER = 0x0000,
    CQL_ERR_PROTOCOL = 0x000A,
    CQL_ERR_AUTH = 0x0100,
    CQL_ERR_UNAVAILABLE = 0x1000,
    CQL_ERR_OVERLOADED = 0x1001,
    CQL_ERR_BOOTSTRAPPING = 0x1002,
    CQL_ERR_TRUNCATE = 0x1003,
    CQL_ERR_WRITE_TIMEOUT = 0x1100,
    CQL_ERR_READ_TIMEOUT = 0x1200,
    CQL_ERR_READ_FAILURE = 0x1300,
    CQL_ERR_FUNCTION_FAILURE = 0x1400,
    CQL_ERR_WRITE_FAILURE = 0x1500,
    CQL_ERR_SYNTAX = 0x2000,
    CQL_ERR_UNAUTHORIZED = 0x2100,
    CQL_ERR_INVALID = 0x2200,
    CQL_ERR_CONFIG = 0x2300,
    CQL_ERR_ALREADY_EXISTS = 0x2400,
    CQL_ERR_UNPREPARED = 0x2500,
};

/* "LOCAL_QUORUM" for CQL_LOCAL_QUORUM; "UNKNOWN" for anything else. */
const char *cql_consistency_name(int cl);
/* Parse a consistency name, any case ("local_quorum", "ONE"); -1 if unknown. */
int cql_consistency_parse(const char *s);
/* "Unavailable", "Write_timeout", ... as the spec names them; "Error" if unknown. */
const char *cql_error_name(int code);

/* ---- views ------------------------------------------------------------------------------ */

/* A string inside a frame body: not NUL-terminated. */
typedef struct cql_str {
    const char *p;
    size_t n;
} cql_str_t;

/* A [bytes] inside a frame body; n < 0 is null (n == -2 only in requests: "not set"). */
typedef struct cql_bytes {
    const uint8_t *p;
    int32_t n;
} cql_bytes_t;

/* ---- frame header ----------------------------------------------------------------------- */

typedef struct cql_header {
    uint8_t version; /* 0x04 request, 0x84 response */
    uint8_t flags;
    int16_t stream;
    uint8_t opcode;
    uint32_t length; /* of the body */
} cql_header_t;

/* Decode the 9-byte header at p[0..n). CHAT_EAGAIN if n < 9; CHAT_EPROTO if the version
 * byte is not a v4 response (a server answering another version puts it there);
 * CHAT_ETOOBIG if the body is over CQL_MAX_BODY. */
int cql_header_decode(const uint8_t *p, size_t n, cql_header_t *h);
void cql_header_encode(uint8_t out[CQL_HEADER_LEN], const cql_header_t *h);

/* ---- values bound to markers ------------------------------------------------------------ */

/* One bound value. Pointers are borrowed: they must stay valid until the encoding call
 * returns (requests copy the encoded bytes at once). */
typedef struct cql_value {
    enum {
        CQL_V_NULL,
        CQL_V_UNSET, /* leaves the column as it is (protocol v4 "not set") */
        CQL_V_INT,
        CQL_V_BIGINT, /* also timestamp (ms) and counter */
        CQL_V_BOOL,
        CQL_V_BYTES, /* text, varchar, ascii, blob: the raw bytes */
        CQL_V_UUID,  /* uuid, timeuuid: 16 bytes */
    } kind;
    int64_t i;
    const void *p;
    size_t n;
} cql_value_t;

static inline cql_value_t cql_null(void) { return (cql_value_t){.kind = CQL_V_NULL}; }
static inline cql_value_t cql_unset(void) { return (cql_value_t){.kind = CQL_V_UNSET}; }
static inline cql_value_t cql_int(int32_t v) { return (cql_value_t){.kind = CQL_V_INT, .i = v}; }
static inline cql_value_t cql_bigint(int64_t v) {
    return (cql_value_t){.kind = CQL_V_BIGINT, .i = v};
}
static inline cql_value_t cql_timestamp(int64_t ms) { return cql_bigint(ms); }
static inline cql_value_t cql_bool(bool v) { return (cql_value_t){.kind = CQL_V_BOOL, .i = v}; }
static inline cql_value_t cql_blob(const void *p, size_t n) {
    return (cql_value_t){.kind = CQL_V_BYTES, .p = p, .n = n};
}
/* NULL s gives a CQL null. */
cql_value_t cql_text(const char *s);
static inline cql_value_t cql_uuid(const uint8_t u[16]) {
    return (cql_value_t){.kind = CQL_V_UUID, .p = u, .n = 16};
}

/* ---- request encoding ------------------------------------------------------------------- */

/* What follows the query string (QUERY) or the prepared id (EXECUTE). */
typedef struct cql_params {
    int consistency;          /* -1: the client's default */
    int serial_consistency;   /* -1: the client's default; always sent, used by the server
                               only for conditional statements (IF ...) */
    int32_t page_size;        /* > 0: ask for pages of this many rows */
    cql_bytes_t paging_state; /* p != NULL: continue after this state (copied at submit) */
    int64_t timestamp_us;     /* > 0: the default write timestamp, microseconds */
    unsigned timeout_ms;      /* 0: the client's default */
} cql_params_t;

#define CQL_PARAMS_DEFAULT ((cql_params_t){.consistency = -1, .serial_consistency = -1})

/* Each encoder appends one complete request frame (header and body) to sb with the given
 * stream id. Check sb->oom once afterwards; CHAT_EINVAL for a value that cannot be sent
 * (a string over 2 GB, a bad consistency), nothing useful appended then. */
int cql_encode_options(sbuf_t *sb, int16_t stream);
/* options: NULL-terminated key, value, key, value, ...; CQL_VERSION is required. */
int cql_encode_startup(sbuf_t *sb, int16_t stream, const char *const *kv);
int cql_encode_auth_response(sbuf_t *sb, int16_t stream, const void *token, size_t n);
int cql_encode_prepare(sbuf_t *sb, int16_t stream, const char *query);
/* consistency and serial must be real levels here (no -1). */
int cql_encode_query(sbuf_t *sb, int16_t stream, const char *query, const cql_value_t *vals,
                     size_t n_vals, const cql_params_t *p, int consistency, int serial);
int cql_encode_execute(sbuf_t *sb, int16_t stream, const uint8_t *id, size_t id_len,
                       const cql_value_t *vals, size_t n_vals, const cql_params_t *p,
                       int consistency, int serial);
/* BATCH types (section 4.1.7). */
enum cql_batch_type { CQL_BATCH_LOGGED = 0, CQL_BATCH_UNLOGGED = 1, CQL_BATCH_COUNTER = 2 };
/* A BATCH of n_stmts executions of the one prepared statement id, statement i bound to
 * vals[i * n_per .. (i + 1) * n_per). Of p only timestamp_us is used (a batch has no paging);
 * consistency and serial must be real levels. CHAT_EINVAL for no statement, more than 65535,
 * or a bad type or level. */
int cql_encode_batch(sbuf_t *sb, int16_t stream, int type, const uint8_t *id, size_t id_len,
                     const cql_value_t *vals, size_t n_per, size_t n_stmts, const cql_params_t *p,
                     int consistency, int serial);
/* The <query_parameters> part alone (what QUERY and EXECUTE share). */
int cql_encode_params(sbuf_t *sb, const cql_value_t *vals, size_t n_vals, const cql_params_t *p,
                      int consistency, int serial);
/* Rewrite the stream id of an encoded frame. */
void cql_frame_set_stream(uint8_t *frame, int16_t stream);

/* ---- response decoding ------------------------------------------------------------------ */

typedef struct cql_colspec {
    cql_str_t keyspace, table, name;
    uint16_t type; /* enum cql_type of the column (the outer type of a collection) */
} cql_colspec_t;

/* Rows metadata and the cells of a Rows result, row-major. */
typedef struct cql_rows {
    int32_t flags;
    int32_t n_cols;
    cql_colspec_t *cols;      /* NULL when the result had No_metadata */
    cql_bytes_t paging_state; /* n < 0: no more pages */
    int32_t n_rows;
    cql_bytes_t *cells; /* n_rows * n_cols */
} cql_rows_t;

typedef struct cql_kvs {
    cql_str_t key;
    cql_str_t *vals;
    uint16_t n_vals;
} cql_kvs_t;

/* The fields of an ERROR body. */
typedef struct cql_error_info {
    int32_t code;
    cql_str_t message;
    int consistency;            /* Unavailable, timeouts, failures; -1 if absent */
    int32_t required, alive;    /* Unavailable */
    int32_t received, blockfor; /* timeouts and failures */
    int32_t num_failures;       /* Read_failure, Write_failure */
    int data_present;           /* Read_timeout, Read_failure; -1 if absent */
    cql_str_t write_type;       /* Write_timeout, Write_failure */
    cql_str_t keyspace, table;  /* Already_exists; Function_failure (keyspace, function) */
    cql_bytes_t unprepared_id;  /* Unprepared */
} cql_error_info_t;

/* One decoded response. Views point into the body given to cql_response_decode, which must
 * outlive them; the arrays are the response's own and cql_response_free() releases them. */
typedef struct cql_response {
    cql_header_t hdr;
    bool has_tracing;
    uint8_t tracing_id[16];
    cql_str_t *warnings;
    uint16_t n_warnings;

    cql_error_info_t error; /* ERROR */

    /* RESULT */
    int32_t kind;
    cql_rows_t rows;    /* Rows; the result metadata of Prepared */
    cql_str_t keyspace; /* Set_keyspace */
    struct {
        cql_bytes_t id;
        int32_t flags, n_binds, n_pk;
        cql_colspec_t *binds;
    } prepared; /* Prepared */
    struct {
        cql_str_t change, target, keyspace, name;
    } schema_change; /* Schema_change, and SCHEMA_CHANGE events */

    cql_str_t authenticator; /* AUTHENTICATE */
    cql_bytes_t token;       /* AUTH_CHALLENGE, AUTH_SUCCESS */
    cql_kvs_t *supported;    /* SUPPORTED */
    uint16_t n_supported;
    cql_str_t event_type; /* EVENT */
} cql_response_t;

/* Decode a response body (after its header h). 0, or CHAT_EPROTO for a malformed or
 * truncated body (CHAT_ENOMEM on allocation failure); *r is then already freed. Bytes after
 * what the spec describes are ignored, as the spec asks. Compressed bodies are refused
 * (CHAT_EPROTO): we never ask for compression. */
int cql_response_decode(cql_response_t *r, const cql_header_t *h, const uint8_t *body, size_t n);
void cql_response_free(cql_response_t *r);

/* A readable one-line description of an ERROR response into out: the code's name, the
 * server's message and the code-specific fields, e.g. "Unavailable (0x1000): Cannot achieve
 * consistency level QUORUM [consistency=QUORUM required=2 alive=1]". */
void cql_error_format(const cql_response_t *r, char *out, size_t n);

/* Column index by name in rows metadata; -1 if absent or there is no metadata. */
int cql_rows_col(const cql_rows_t *rows, const char *name);
static inline const cql_bytes_t *cql_rows_cell(const cql_rows_t *rows, int32_t row, int32_t col) {
    return &rows->cells[(size_t)row * (size_t)rows->n_cols + (size_t)col];
}

/* Typed reads of one cell. CHAT_ENOTFOUND for a null cell, CHAT_EPROTO for a size that does
 * not fit the type; 0 otherwise. */
int cql_cell_bigint(const cql_bytes_t *c, int64_t *out); /* bigint, timestamp, counter */
int cql_cell_int(const cql_bytes_t *c, int32_t *out);
int cql_cell_bool(const cql_bytes_t *c, bool *out);
int cql_cell_uuid(const cql_bytes_t *c, uint8_t out[16]);
int cql_cell_text(const cql_bytes_t *c, cql_str_t *out); /* text, varchar, ascii, blob */
/* A malloc'd NUL-terminated copy in *out; NULL for a null cell. CHAT_ENOMEM, or 0. */
int cql_cell_strdup(const cql_bytes_t *c, char **out);

/* ---- the client ------------------------------------------------------------------------- */

typedef struct cql_client cql_client_t;
typedef struct cql_stmt cql_stmt_t;

typedef struct cql_client_opts {
    const char *const *hosts; /* "host", "host:port", "[v6]:port"; port 9042 by default */
    size_t n_hosts;
    const char *keyspace; /* NULL: none; else USE on every connection */
    const char *user;     /* SASL PLAIN credentials, used when the server asks */
    const char *password;
    int consistency;              /* -1: LOCAL_QUORUM */
    int serial_consistency;       /* -1: SERIAL */
    unsigned conns_per_host;      /* 0: 2 */
    unsigned max_streams;         /* per connection; 0: 1024 (at most CQL_MAX_STREAMS) */
    unsigned request_timeout_ms;  /* 0: 12000 */
    unsigned connect_timeout_ms;  /* 0: 5000: resolve, connect and handshake */
    unsigned reconnect_min_ms;    /* 0: 100: first delay after a failure, then doubled */
    unsigned reconnect_max_ms;    /* 0: 5000 */
    unsigned schema_agreement_ms; /* 0: 10000: how long to wait for agreement after DDL */
} cql_client_opts_t;

/* What a request's callback gets. Everything in it is valid only during the callback. */
typedef struct cql_result {
    int status;                 /* 0, or CHAT_EIO (server error, timeout, connection lost,
                                no host), CHAT_EAUTH (credentials refused), CHAT_ECLOSED */
    int error_code;             /* the CQL error code when the server answered ERROR, else -1 */
    const char *message;        /* readable reason when status != 0, with the host */
    const cql_response_t *resp; /* the RESULT when status == 0 */
    const char *host;           /* "127.0.0.1:9042" that answered, or NULL */
} cql_result_t;

typedef void (*cql_cb)(const cql_result_t *res, void *data);

/* Create a client and start connecting to every host at once (asynchronously). Requests may
 * be submitted right away: they wait for the first ready connection. o is copied.
 * CHAT_EINVAL for bad options (no host, unparsable host, bad consistency). */
int cql_client_new(cql_client_t **out, uv_loop_t *loop, const cql_client_opts_t *o);

/* Fail every request still waiting or in flight with CHAT_ECLOSED, close every connection
 * and timer, free the client, then call done(arg) (if not NULL) from the loop. Statements
 * are freed with it. No other call after this one. */
void cql_client_close(cql_client_t *c, void (*done)(void *), void *arg);

/* Called once, when the first connection is ready (status 0) or when every host failed its
 * first attempt (the result says why: CHAT_EAUTH for refused credentials, CHAT_EIO else).
 * Replaces any previous one; set it right after cql_client_new. */
void cql_client_on_ready(cql_client_t *c, cql_cb cb, void *data);

/* Register a statement for prepared execution. The client prepares it on each connection
 * the first time it runs there, and again if the node forgets it (UNPREPARED). The handle
 * belongs to the client. NULL on OOM. */
cql_stmt_t *cql_stmt_new(cql_client_t *c, const char *query);

/* Submit a QUERY, or an EXECUTE of a registered statement. vals are encoded before this
 * returns. 0: cb will run exactly once. CHAT_ECLOSED after close, CHAT_ENOMEM, CHAT_EINVAL.
 * A Schema_change result is reported after the cluster agrees on the schema (or the
 * agreement wait timed out, which is logged). */
int cql_query(cql_client_t *c, const char *query, const cql_value_t *vals, size_t n_vals,
              const cql_params_t *p, cql_cb cb, void *data);
int cql_execute(cql_client_t *c, cql_stmt_t *st, const cql_value_t *vals, size_t n_vals,
                const cql_params_t *p, cql_cb cb, void *data);

/* Submit a BATCH of type (enum cql_batch_type) that runs the registered statement st
 * n_stmts times, statement i bound to vals[i * n_per .. (i + 1) * n_per), all encoded before
 * this returns. The server applies a batch whose statements all fall in one partition as
 * one mutation: atomically and in isolation (readers see all of it or none). Of p:
 * consistency, serial_consistency, timestamp_us, timeout_ms. The callback runs once, as for
 * cql_execute (CHAT_EINVAL for n_stmts 0 or over 65535). */
int cql_batch(cql_client_t *c, int type, cql_stmt_t *st, const cql_value_t *vals, size_t n_per,
              size_t n_stmts, const cql_params_t *p, cql_cb cb, void *data);

typedef struct cql_client_stats {
    uint64_t requests, errors, timeouts, reprepares, connects, connect_failures;
    unsigned hosts_up, conns_ready, in_flight;
} cql_client_stats_t;
void cql_client_stats(const cql_client_t *c, cql_client_stats_t *out);

/* ---- helpers for callers ------------------------------------------------------------------ */

/* Run a loop until *flag becomes true (for synchronous tools on their own loop, such as
 * chatctl migrate; never on a server's loop). */
void cql_run_until(uv_loop_t *loop, const bool *flag);

#endif
