/* cql codec: native protocol v4 frames to bytes and back, with no I/O and no state.
 *
 * The one idea: the decoder trusts nothing. Every length read from the wire is checked
 * against the bytes that are really left before anything is allocated or read, so a
 * truncated or hostile frame is a clean CHAT_EPROTO, never an over-read or a huge
 * allocation (a row count of 2^31 in a ten-byte body is refused before malloc). Decoded
 * strings and values are views into the caller's body buffer; only the arrays that hold
 * those views are allocated. */
#include "cql_internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* ---- names ------------------------------------------------------------------------------ */

/* indexed by the protocol's value */
static const char *const CL_NAMES[] = {
    "ANY",          "ONE",         "TWO",    "THREE",        "QUORUM",    "ALL",
    "LOCAL_QUORUM", "EACH_QUORUM", "SERIAL", "LOCAL_SERIAL", "LOCAL_ONE",
};

const char *cql_consistency_name(int cl) {
    if (cl < 0 || cl >= (int)(sizeof CL_NAMES / sizeof CL_NAMES[0])) return "UNKNOWN";
    return CL_NAMES[cl];
}

int cql_consistency_parse(const char *s) {
    if (!s) return -1;
    for (int i = 0; i < (int)(sizeof CL_NAMES / sizeof CL_NAMES[0]); i++) {
        if (strcasecmp(s, CL_NAMES[i]) == 0) return i;
    }
    return -1;
}

const char *cql_error_name(int code) {
    switch (code) {
    case CQL_ERR_SERVER: return "Server_error";
    case CQL_ERR_PROTOCOL: return "Protocol_error";
    case CQL_ERR_AUTH: return "Authentication_error";
    case CQL_ERR_UNAVAILABLE: return "Unavailable";
    case CQL_ERR_OVERLOADED: return "Overloaded";
    case CQL_ERR_BOOTSTRAPPING: return "Is_bootstrapping";
    case CQL_ERR_TRUNCATE: return "Truncate_error";
    case CQL_ERR_WRITE_TIMEOUT: return "Write_timeout";
    case CQL_ERR_READ_TIMEOUT: return "Read_timeout";
    case CQL_ERR_READ_FAILURE: return "Read_failure";
    case CQL_ERR_FUNCTION_FAILURE: return "Function_failure";
    case CQL_ERR_WRITE_FAILURE: return "Write_failure";
    case CQL_ERR_SYNTAX: return "Syntax_error";
    case CQL_ERR_UNAUTHORIZED: return "Unauthorized";
    case CQL_ERR_INVALID: return "Invalid";
    case CQL_ERR_CONFIG: return "Config_error";
    case CQL_ERR_ALREADY_EXISTS: return "Already_exists";
    case CQL_ERR_UNPREPARED: return "Unprepared";
    default: return "Error";
    }
}

/* ---- header ----------------------------------------------------------------------------- */

static uint16_t be16(const uint8_t *p) { return (uint16_t)((uint16_t)p[0] << 8 | p[1]); }
static uint32_t be32(const uint8_t *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}
static uint64_t be64(const uint8_t *p) { return (uint64_t)be32(p) << 32 | be32(p + 4); }

int cql_header_decode(const uint8_t *p, size_t n, cql_header_t *h) {
    if (n < CQL_HEADER_LEN) return CHAT_EAGAIN;
    h->version = p[0];
    h->flags = p[1];
    h->stream = (int16_t)be16(p + 2);
    h->opcode = p[4];
    h->length = be32(p + 5);
    if (h->version != CQL_VERSION_RESP) return CHAT_EPROTO;
    if (h->length > CQL_MAX_BODY) return CHAT_ETOOBIG;
    return 0;
}

void cql_header_encode(uint8_t out[CQL_HEADER_LEN], const cql_header_t *h) {
    out[0] = h->version;
    out[1] = h->flags;
    out[2] = (uint8_t)((uint16_t)h->stream >> 8);
    out[3] = (uint8_t)h->stream;
    out[4] = h->opcode;
    out[5] = (uint8_t)(h->length >> 24);
    out[6] = (uint8_t)(h->length >> 16);
    out[7] = (uint8_t)(h->length >> 8);
    out[8] = (uint8_t)h->length;
}

void cql_frame_set_stream(uint8_t *frame, int16_t stream) {
    frame[2] = (uint8_t)((uint16_t)stream >> 8);
    frame[3] = (uint8_t)stream;
}

/* ---- encoding --------------------------------------------------------------------------- */

static void put_u8(sbuf_t *sb, uint8_t v) { sbuf_put(sb, &v, 1); }
static void put_u16(sbuf_t *sb, uint16_t v) {
    uint8_t b[2] = {(uint8_t)(v >> 8), (uint8_t)v};
    sbuf_put(sb, b, 2);
}
static void put_i32(sbuf_t *sb, int32_t v) {
    uint32_t u = (uint32_t)v;
    uint8_t b[4] = {(uint8_t)(u >> 24), (uint8_t)(u >> 16), (uint8_t)(u >> 8), (uint8_t)u};
    sbuf_put(sb, b, 4);
}
static void put_i64(sbuf_t *sb, int64_t v) {
    put_i32(sb, (int32_t)(uint32_t)((uint64_t)v >> 32));
    put_i32(sb, (int32_t)(uint32_t)(uint64_t)v);
}
/* [string]: the caller checked n <= 0xffff */
static void put_string(sbuf_t *sb, const char *s, size_t n) {
    put_u16(sb, (uint16_t)n);
    sbuf_put(sb, s, n);
}

cql_value_t cql_text(const char *s) {
    if (!s) return cql_null();
    return (cql_value_t){.kind = CQL_V_BYTES, .p = s, .n = strlen(s)};
}

static bool consistency_ok(int cl) { return cl >= CQL_ANY && cl <= CQL_LOCAL_ONE; }

size_t cql__frame_begin(sbuf_t *sb, int16_t stream, uint8_t opcode) {
    size_t at = sb->len;
    uint8_t hdr[CQL_HEADER_LEN];
    cql_header_t h = {.version = CQL_VERSION_REQ, .stream = stream, .opcode = opcode};
    cql_header_encode(hdr, &h);
    sbuf_put(sb, hdr, sizeof hdr);
    return at;
}

int cql__frame_end(sbuf_t *sb, size_t at) {
    if (sb->oom) return 0;
    size_t body = sb->len - at - CQL_HEADER_LEN;
    if (body > CQL_MAX_BODY) {
        sb->len = at;
        return CHAT_ETOOBIG;
    }
    uint8_t *p = (uint8_t *)sb->p + at + 5;
    p[0] = (uint8_t)(body >> 24);
    p[1] = (uint8_t)(body >> 16);
    p[2] = (uint8_t)(body >> 8);
    p[3] = (uint8_t)body;
    return 0;
}

int cql_encode_options(sbuf_t *sb, int16_t stream) {
    return cql__frame_end(sb, cql__frame_begin(sb, stream, CQL_OP_OPTIONS));
}

int cql_encode_startup(sbuf_t *sb, int16_t stream, const char *const *kv) {
    size_t n = 0;
    bool has_version = false;
    for (; kv[2 * n]; n++) {
        if (!kv[2 * n + 1] || strlen(kv[2 * n]) > 0xffff || strlen(kv[2 * n + 1]) > 0xffff)
            return CHAT_EINVAL;
        if (strcmp(kv[2 * n], "CQL_VERSION") == 0) has_version = true;
    }
    if (!has_version || n > 0xffff) return CHAT_EINVAL;
    size_t at = cql__frame_begin(sb, stream, CQL_OP_STARTUP);
    put_u16(sb, (uint16_t)n);
    for (size_t i = 0; i < n; i++) {
        put_string(sb, kv[2 * i], strlen(kv[2 * i]));
        put_string(sb, kv[2 * i + 1], strlen(kv[2 * i + 1]));
    }
    return cql__frame_end(sb, at);
}

int cql_encode_auth_response(sbuf_t *sb, int16_t stream, const void *token, size_t n) {
    if (n > INT32_MAX) return CHAT_EINVAL;
    size_t at = cql__frame_begin(sb, stream, CQL_OP_AUTH_RESPONSE);
    put_i32(sb, (int32_t)n);
    sbuf_put(sb, token, n);
    return cql__frame_end(sb, at);
}

void cql__put_long_string(sbuf_t *sb, const char *s, size_t n) {
    put_i32(sb, (int32_t)n);
    sbuf_put(sb, s, n);
}

void cql__put_short_bytes(sbuf_t *sb, const uint8_t *p, size_t n) {
    put_u16(sb, (uint16_t)n);
    sbuf_put(sb, p, n);
}

int cql_encode_prepare(sbuf_t *sb, int16_t stream, const char *query) {
    size_t qn = strlen(query);
    if (qn > INT32_MAX) return CHAT_EINVAL;
    size_t at = cql__frame_begin(sb, stream, CQL_OP_PREPARE);
    cql__put_long_string(sb, query, qn);
    return cql__frame_end(sb, at);
}

static int put_value(sbuf_t *sb, const cql_value_t *v) {
    switch (v->kind) {
    case CQL_V_NULL: put_i32(sb, -1); return 0;
    case CQL_V_UNSET: put_i32(sb, -2); return 0;
    case CQL_V_INT:
        if (v->i < INT32_MIN || v->i > INT32_MAX) return CHAT_ERANGE;
        put_i32(sb, 4);
        put_i32(sb, (int32_t)v->i);
        return 0;
    case CQL_V_BIGINT:
        put_i32(sb, 8);
        put_i64(sb, v->i);
        return 0;
    case CQL_V_BOOL:
        put_i32(sb, 1);
        put_u8(sb, v->i ? 1 : 0);
        return 0;
    case CQL_V_UUID:
        if (v->n != 16 || !v->p) return CHAT_EINVAL;
        put_i32(sb, 16);
        sbuf_put(sb, v->p, 16);
        return 0;
    case CQL_V_BYTES:
        if (v->n > INT32_MAX || (!v->p && v->n)) return CHAT_EINVAL;
        put_i32(sb, (int32_t)v->n);
        sbuf_put(sb, v->p, v->n);
        return 0;
    }
    return CHAT_EINVAL;
}

int cql_encode_params(sbuf_t *sb, const cql_value_t *vals, size_t n_vals, const cql_params_t *p,
                      int consistency, int serial) {
    if (!consistency_ok(consistency) || n_vals > 0xffff) return CHAT_EINVAL;
    if (serial != CQL_SERIAL && serial != CQL_LOCAL_SERIAL) return CHAT_EINVAL;
    cql_params_t none = CQL_PARAMS_DEFAULT;
    if (!p) p = &none;
    uint8_t flags = 0;
    if (n_vals) flags |= 0x01;
    if (p->page_size > 0) flags |= 0x04;
    if (p->paging_state.p && p->paging_state.n >= 0) flags |= 0x08;
    /* Always say which serial level we mean: the server ignores it for anything but a
     * conditional statement, and its own default (SERIAL) is not ours to pick. */
    flags |= 0x10;
    if (p->timestamp_us > 0) flags |= 0x20;
    size_t start = sb->len;
    put_u16(sb, (uint16_t)consistency);
    put_u8(sb, flags);
    if (n_vals) {
        put_u16(sb, (uint16_t)n_vals);
        for (size_t i = 0; i < n_vals; i++) {
            int rc = put_value(sb, &vals[i]);
            if (rc) {
                sb->len = start;
                return rc;
            }
        }
    }
    if (flags & 0x04) put_i32(sb, p->page_size);
    if (flags & 0x08) {
        put_i32(sb, p->paging_state.n);
        sbuf_put(sb, p->paging_state.p, (size_t)p->paging_state.n);
    }
    put_u16(sb, (uint16_t)serial);
    if (flags & 0x20) put_i64(sb, p->timestamp_us);
    return 0;
}

int cql__put_batch_values(sbuf_t *sb, const cql_value_t *vals, size_t n_vals) {
    if (n_vals > 0xffff) return CHAT_EINVAL;
    size_t start = sb->len;
    put_u16(sb, (uint16_t)n_vals);
    for (size_t i = 0; i < n_vals; i++) {
        int rc = put_value(sb, &vals[i]);
        if (rc) {
            sb->len = start;
            return rc;
        }
    }
    return 0;
}

int cql__put_batch_tail(sbuf_t *sb, const cql_params_t *p, int consistency, int serial) {
    if (!consistency_ok(consistency)) return CHAT_EINVAL;
    if (serial != CQL_SERIAL && serial != CQL_LOCAL_SERIAL) return CHAT_EINVAL;
    /* v4: the flags are one byte; the four low bits (values, skip metadata, paging) have no
     * meaning for a batch and must stay 0. The serial level is always named, as for QUERY. */
    uint8_t flags = 0x10;
    if (p && p->timestamp_us > 0) flags |= 0x20;
    put_u16(sb, (uint16_t)consistency);
    put_u8(sb, flags);
    put_u16(sb, (uint16_t)serial);
    if (flags & 0x20) put_i64(sb, p->timestamp_us);
    return 0;
}

int cql_encode_batch(sbuf_t *sb, int16_t stream, int type, const uint8_t *id, size_t id_len,
                     const cql_value_t *vals, size_t n_per, size_t n_stmts, const cql_params_t *p,
                     int consistency, int serial) {
    if (type < CQL_BATCH_LOGGED || type > CQL_BATCH_COUNTER || id_len > 0xffff || n_stmts == 0 ||
        n_stmts > 0xffff || n_per > 0xffff) {
        return CHAT_EINVAL;
    }
    size_t at = cql__frame_begin(sb, stream, CQL_OP_BATCH);
    put_u8(sb, (uint8_t)type);
    put_u16(sb, (uint16_t)n_stmts);
    int rc = 0;
    for (size_t i = 0; i < n_stmts && rc == 0; i++) {
        put_u8(sb, 1); /* kind: a prepared id */
        cql__put_short_bytes(sb, id, id_len);
        rc = cql__put_batch_values(sb, vals + i * n_per, n_per);
    }
    if (rc == 0) rc = cql__put_batch_tail(sb, p, consistency, serial);
    if (rc) {
        sb->len = at;
        return rc;
    }
    return cql__frame_end(sb, at);
}

int cql_encode_query(sbuf_t *sb, int16_t stream, const char *query, const cql_value_t *vals,
                     size_t n_vals, const cql_params_t *p, int consistency, int serial) {
    size_t qn = strlen(query);
    if (qn > INT32_MAX) return CHAT_EINVAL;
    size_t at = cql__frame_begin(sb, stream, CQL_OP_QUERY);
    cql__put_long_string(sb, query, qn);
    int rc = cql_encode_params(sb, vals, n_vals, p, consistency, serial);
    if (rc) {
        sb->len = at;
        return rc;
    }
    return cql__frame_end(sb, at);
}

int cql_encode_execute(sbuf_t *sb, int16_t stream, const uint8_t *id, size_t id_len,
                       const cql_value_t *vals, size_t n_vals, const cql_params_t *p,
                       int consistency, int serial) {
    if (id_len > 0xffff) return CHAT_EINVAL;
    size_t at = cql__frame_begin(sb, stream, CQL_OP_EXECUTE);
    cql__put_short_bytes(sb, id, id_len);
    int rc = cql_encode_params(sb, vals, n_vals, p, consistency, serial);
    if (rc) {
        sb->len = at;
        return rc;
    }
    return cql__frame_end(sb, at);
}

/* ---- decoding --------------------------------------------------------------------------- */

typedef struct rd {
    const uint8_t *p;
    size_t n, off;
    bool bad;
} rd_t;

static size_t rd_left(const rd_t *r) { return r->n - r->off; }

static bool rd_need(rd_t *r, size_t k) {
    if (r->bad || rd_left(r) < k) {
        r->bad = true;
        return false;
    }
    return true;
}

static uint8_t rd_u8(rd_t *r) {
    if (!rd_need(r, 1)) return 0;
    return r->p[r->off++];
}

static uint16_t rd_u16(rd_t *r) {
    if (!rd_need(r, 2)) return 0;
    uint16_t v = be16(r->p + r->off);
    r->off += 2;
    return v;
}

static int32_t rd_i32(rd_t *r) {
    if (!rd_need(r, 4)) return 0;
    int32_t v = (int32_t)be32(r->p + r->off);
    r->off += 4;
    return v;
}

static const uint8_t *rd_raw(rd_t *r, size_t k) {
    if (!rd_need(r, k)) return NULL;
    const uint8_t *p = r->p + r->off;
    r->off += k;
    return p;
}

static cql_str_t rd_string(rd_t *r) {
    cql_str_t s = {"", 0};
    uint16_t n = rd_u16(r);
    const uint8_t *p = rd_raw(r, n);
    if (p) s = (cql_str_t){(const char *)p, n};
    return s;
}

/* [bytes]: n < 0 is null */
static cql_bytes_t rd_bytes(rd_t *r) {
    cql_bytes_t b = {NULL, -1};
    int32_t n = rd_i32(r);
    if (r->bad || n < 0) return b;
    const uint8_t *p = rd_raw(r, (size_t)n);
    if (p) b = (cql_bytes_t){p, n};
    return b;
}

static cql_bytes_t rd_short_bytes(rd_t *r) {
    cql_bytes_t b = {NULL, -1};
    uint16_t n = rd_u16(r);
    const uint8_t *p = rd_raw(r, n);
    if (p) b = (cql_bytes_t){p, n};
    return b;
}

/* [string list] into a new array; each [string] takes at least 2 bytes, which bounds n. */
static cql_str_t *rd_string_list(rd_t *r, uint16_t *count, int *err) {
    uint16_t n = rd_u16(r);
    *count = 0;
    if (r->bad || n == 0) return NULL;
    if ((size_t)n * 2 > rd_left(r)) {
        r->bad = true;
        return NULL;
    }
    cql_str_t *v = calloc(n, sizeof *v);
    if (!v) {
        *err = CHAT_ENOMEM;
        return NULL;
    }
    for (uint16_t i = 0; i < n; i++) v[i] = rd_string(r);
    *count = n;
    return v;
}

/* An [option] type; returns its id and skips its parameters (collections, UDTs and tuples
 * nest: depth is bounded so that a hostile frame cannot recurse without end). */
#define TYPE_DEPTH_MAX 16

static uint16_t rd_type(rd_t *r, int depth) {
    uint16_t id = rd_u16(r);
    if (r->bad) return id;
    if (depth > TYPE_DEPTH_MAX) {
        r->bad = true;
        return id;
    }
    switch (id) {
    case CQL_T_CUSTOM: rd_string(r); break;
    case CQL_T_LIST:
    case CQL_T_SET: rd_type(r, depth + 1); break;
    case CQL_T_MAP:
        rd_type(r, depth + 1);
        rd_type(r, depth + 1);
        break;
    case CQL_T_UDT: {
        rd_string(r);
        rd_string(r);
        uint16_t n = rd_u16(r);
        for (uint16_t i = 0; i < n && !r->bad; i++) {
            rd_string(r);
            rd_type(r, depth + 1);
        }
        break;
    }
    case CQL_T_TUPLE: {
        uint16_t n = rd_u16(r);
        for (uint16_t i = 0; i < n && !r->bad; i++) rd_type(r, depth + 1);
        break;
    }
    default:
        /* a native type: no parameters; an unknown id is kept and its values stay opaque
         * bytes, which is all a newer server can ask of an older client */
        break;
    }
    return id;
}

/* <global_table_spec>?<col_spec_1>...<col_spec_n> for n columns */
static cql_colspec_t *rd_colspecs(rd_t *r, int32_t flags, int32_t n, int *err) {
    if (n <= 0) return NULL;
    /* each spec is at least a [string] name and a [short] type */
    if ((size_t)n > rd_left(r) / 4) {
        r->bad = true;
        return NULL;
    }
    cql_colspec_t *cols = calloc((size_t)n, sizeof *cols);
    if (!cols) {
        *err = CHAT_ENOMEM;
        return NULL;
    }
    cql_str_t gks = {"", 0}, gtable = {"", 0};
    bool global = flags & 0x0001;
    if (global) {
        gks = rd_string(r);
        gtable = rd_string(r);
    }
    for (int32_t i = 0; i < n && !r->bad; i++) {
        if (global) {
            cols[i].keyspace = gks;
            cols[i].table = gtable;
        } else {
            cols[i].keyspace = rd_string(r);
            cols[i].table = rd_string(r);
        }
        cols[i].name = rd_string(r);
        cols[i].type = rd_type(r, 0);
    }
    return cols;
}

/* Rows metadata: <flags><columns_count>[<paging_state>][<specs>] */
static void rd_rows_meta(rd_t *r, cql_rows_t *rows, int *err) {
    rows->flags = rd_i32(r);
    rows->n_cols = rd_i32(r);
    rows->paging_state = (cql_bytes_t){NULL, -1};
    if (r->bad) return;
    if (rows->n_cols < 0) {
        r->bad = true;
        return;
    }
    if (rows->flags & 0x0002) rows->paging_state = rd_bytes(r);
    if (!(rows->flags & 0x0004)) rows->cols = rd_colspecs(r, rows->flags, rows->n_cols, err);
}

static void rd_rows(rd_t *r, cql_rows_t *rows, int *err) {
    rd_rows_meta(r, rows, err);
    if (r->bad || *err) return;
    rows->n_rows = rd_i32(r);
    if (r->bad) return;
    if (rows->n_rows < 0) {
        r->bad = true;
        return;
    }
    if (rows->n_rows == 0 || rows->n_cols == 0) return;
    /* every cell is at least its 4-byte length */
    uint64_t cells = (uint64_t)rows->n_rows * (uint64_t)rows->n_cols;
    if (cells > rd_left(r) / 4) {
        r->bad = true;
        return;
    }
    rows->cells = malloc((size_t)cells * sizeof *rows->cells);
    if (!rows->cells) {
        *err = CHAT_ENOMEM;
        return;
    }
    for (uint64_t i = 0; i < cells && !r->bad; i++) rows->cells[i] = rd_bytes(r);
}

static void rd_error(rd_t *r, cql_response_t *resp) {
    cql_error_info_t *e = &resp->error;
    e->code = rd_i32(r);
    e->message = rd_string(r);
    e->consistency = -1;
    e->data_present = -1;
    if (r->bad) return;
    switch (e->code) {
    case CQL_ERR_UNAVAILABLE:
        e->consistency = rd_u16(r);
        e->required = rd_i32(r);
        e->alive = rd_i32(r);
        break;
    case CQL_ERR_WRITE_TIMEOUT:
        e->consistency = rd_u16(r);
        e->received = rd_i32(r);
        e->blockfor = rd_i32(r);
        e->write_type = rd_string(r);
        break;
    case CQL_ERR_READ_TIMEOUT:
        e->consistency = rd_u16(r);
        e->received = rd_i32(r);
        e->blockfor = rd_i32(r);
        e->data_present = rd_u8(r);
        break;
    case CQL_ERR_READ_FAILURE:
        e->consistency = rd_u16(r);
        e->received = rd_i32(r);
        e->blockfor = rd_i32(r);
        e->num_failures = rd_i32(r);
        e->data_present = rd_u8(r);
        break;
    case CQL_ERR_WRITE_FAILURE:
        e->consistency = rd_u16(r);
        e->received = rd_i32(r);
        e->blockfor = rd_i32(r);
        e->num_failures = rd_i32(r);
        e->write_type = rd_string(r);
        break;
    case CQL_ERR_FUNCTION_FAILURE:
        /* the argument types that follow are not worth an allocation */
        e->keyspace = rd_string(r);
        e->table = rd_string(r);
        break;
    case CQL_ERR_ALREADY_EXISTS:
        e->keyspace = rd_string(r);
        e->table = rd_string(r);
        break;
    case CQL_ERR_UNPREPARED: e->unprepared_id = rd_short_bytes(r); break;
    default: break;
    }
}

static void rd_schema_change(rd_t *r, cql_response_t *resp) {
    resp->schema_change.change = rd_string(r);
    resp->schema_change.target = rd_string(r);
    cql_str_t t = resp->schema_change.target;
    resp->schema_change.keyspace = rd_string(r);
    if (t.n == 8 && memcmp(t.p, "KEYSPACE", 8) == 0) return;
    /* TABLE, TYPE, FUNCTION, AGGREGATE: then a name (functions also list argument types,
     * which we skip like any trailing bytes) */
    resp->schema_change.name = rd_string(r);
}

static void rd_result(rd_t *r, cql_response_t *resp, int *err) {
    resp->kind = rd_i32(r);
    if (r->bad) return;
    switch (resp->kind) {
    case CQL_RESULT_VOID: break;
    case CQL_RESULT_ROWS: rd_rows(r, &resp->rows, err); break;
    case CQL_RESULT_SET_KEYSPACE: resp->keyspace = rd_string(r); break;
    case CQL_RESULT_PREPARED: {
        resp->prepared.id = rd_short_bytes(r);
        resp->prepared.flags = rd_i32(r);
        resp->prepared.n_binds = rd_i32(r);
        resp->prepared.n_pk = rd_i32(r);
        if (r->bad) return;
        if (resp->prepared.n_binds < 0 || resp->prepared.n_pk < 0 ||
            (size_t)resp->prepared.n_pk > rd_left(r) / 2) {
            r->bad = true;
            return;
        }
        rd_raw(r, (size_t)resp->prepared.n_pk * 2); /* pk indexes: for token routing only */
        resp->prepared.binds = rd_colspecs(r, resp->prepared.flags, resp->prepared.n_binds, err);
        if (r->bad || *err) return;
        rd_rows_meta(r, &resp->rows, err);
        break;
    }
    case CQL_RESULT_SCHEMA_CHANGE: rd_schema_change(r, resp); break;
    default: r->bad = true; break;
    }
}

static void rd_supported(rd_t *r, cql_response_t *resp, int *err) {
    uint16_t n = rd_u16(r);
    if (r->bad || n == 0) return;
    /* a key and an empty list take at least 4 bytes */
    if ((size_t)n * 4 > rd_left(r)) {
        r->bad = true;
        return;
    }
    resp->supported = calloc(n, sizeof *resp->supported);
    if (!resp->supported) {
        *err = CHAT_ENOMEM;
        return;
    }
    resp->n_supported = n;
    for (uint16_t i = 0; i < n && !r->bad && !*err; i++) {
        resp->supported[i].key = rd_string(r);
        resp->supported[i].vals = rd_string_list(r, &resp->supported[i].n_vals, err);
    }
}

void cql_response_free(cql_response_t *r) {
    free(r->warnings);
    free(r->rows.cols);
    free(r->rows.cells);
    free(r->prepared.binds);
    if (r->supported) {
        for (uint16_t i = 0; i < r->n_supported; i++) free(r->supported[i].vals);
        free(r->supported);
    }
    memset(r, 0, sizeof *r);
}

int cql_response_decode(cql_response_t *resp, const cql_header_t *h, const uint8_t *body,
                        size_t n) {
    memset(resp, 0, sizeof *resp);
    resp->hdr = *h;
    resp->rows.paging_state = (cql_bytes_t){NULL, -1};
    resp->error.consistency = -1;
    resp->error.data_present = -1;
    if (h->flags & CQL_FLAG_COMPRESSION) return CHAT_EPROTO;
    rd_t r = {.p = body, .n = n};
    int err = 0;
    if (h->flags & CQL_FLAG_TRACING) {
        const uint8_t *id = rd_raw(&r, 16);
        if (id) {
            memcpy(resp->tracing_id, id, 16);
            resp->has_tracing = true;
        }
    }
    if (h->flags & CQL_FLAG_WARNING) resp->warnings = rd_string_list(&r, &resp->n_warnings, &err);
    if (h->flags & CQL_FLAG_CUSTOM_PAYLOAD) {
        /* [bytes map]: skipped, nothing of ours uses it */
        uint16_t k = rd_u16(&r);
        for (uint16_t i = 0; i < k && !r.bad; i++) {
            rd_string(&r);
            rd_bytes(&r);
        }
    }
    if (!r.bad && !err) {
        switch (h->opcode) {
        case CQL_OP_ERROR: rd_error(&r, resp); break;
        case CQL_OP_READY: break;
        case CQL_OP_AUTHENTICATE: resp->authenticator = rd_string(&r); break;
        case CQL_OP_SUPPORTED: rd_supported(&r, resp, &err); break;
        case CQL_OP_RESULT: rd_result(&r, resp, &err); break;
        case CQL_OP_EVENT:
            resp->event_type = rd_string(&r);
            if (!r.bad && resp->event_type.n == 13 &&
                memcmp(resp->event_type.p, "SCHEMA_CHANGE", 13) == 0) {
                rd_schema_change(&r, resp);
            }
            break;
        case CQL_OP_AUTH_CHALLENGE:
        case CQL_OP_AUTH_SUCCESS: resp->token = rd_bytes(&r); break;
        default: r.bad = true; break; /* a request opcode, or unknown */
        }
    }
    if (err || r.bad) {
        cql_response_free(resp);
        return err ? err : CHAT_EPROTO;
    }
    return 0;
}

void cql_error_format(const cql_response_t *r, char *out, size_t n) {
    if (!n) return;
    const cql_error_info_t *e = &r->error;
    int msg_n = e->message.n > 400 ? 400 : (int)e->message.n;
    int k = snprintf(out, n, "%s (0x%04x): %.*s", cql_error_name(e->code), (unsigned)e->code, msg_n,
                     e->message.p ? e->message.p : "");
    if (k < 0 || (size_t)k >= n) return;
    char *p = out + k;
    size_t left = n - (size_t)k;
    switch (e->code) {
    case CQL_ERR_UNAVAILABLE:
        snprintf(p, left, " [consistency=%s required=%" PRId32 " alive=%" PRId32 "]",
                 cql_consistency_name(e->consistency), e->required, e->alive);
        break;
    case CQL_ERR_WRITE_TIMEOUT:
    case CQL_ERR_WRITE_FAILURE:
        snprintf(p, left,
                 " [consistency=%s received=%" PRId32 " blockfor=%" PRId32 " failures=%" PRId32
                 " write_type=%.*s]",
                 cql_consistency_name(e->consistency), e->received, e->blockfor, e->num_failures,
                 (int)(e->write_type.n > 32 ? 32 : e->write_type.n),
                 e->write_type.p ? e->write_type.p : "");
        break;
    case CQL_ERR_READ_TIMEOUT:
    case CQL_ERR_READ_FAILURE:
        snprintf(p, left,
                 " [consistency=%s received=%" PRId32 " blockfor=%" PRId32 " failures=%" PRId32
                 " data_present=%d]",
                 cql_consistency_name(e->consistency), e->received, e->blockfor, e->num_failures,
                 e->data_present);
        break;
    case CQL_ERR_ALREADY_EXISTS:
        snprintf(p, left, " [keyspace=%.*s table=%.*s]",
                 (int)(e->keyspace.n > 64 ? 64 : e->keyspace.n), e->keyspace.p ? e->keyspace.p : "",
                 (int)(e->table.n > 64 ? 64 : e->table.n), e->table.p ? e->table.p : "");
        break;
    default: break;
    }
}

/* ---- cells ------------------------------------------------------------------------------- */

int cql_rows_col(const cql_rows_t *rows, const char *name) {
    if (!rows->cols) return -1;
    size_t n = strlen(name);
    for (int32_t i = 0; i < rows->n_cols; i++) {
        if (rows->cols[i].name.n == n && memcmp(rows->cols[i].name.p, name, n) == 0) return i;
    }
    return -1;
}

int cql_cell_bigint(const cql_bytes_t *c, int64_t *out) {
    if (c->n < 0) return CHAT_ENOTFOUND;
    if (c->n != 8) return CHAT_EPROTO;
    *out = (int64_t)be64(c->p);
    return 0;
}

int cql_cell_int(const cql_bytes_t *c, int32_t *out) {
    if (c->n < 0) return CHAT_ENOTFOUND;
    if (c->n != 4) return CHAT_EPROTO;
    *out = (int32_t)be32(c->p);
    return 0;
}

int cql_cell_bool(const cql_bytes_t *c, bool *out) {
    if (c->n < 0) return CHAT_ENOTFOUND;
    if (c->n != 1) return CHAT_EPROTO;
    *out = c->p[0] != 0;
    return 0;
}

int cql_cell_uuid(const cql_bytes_t *c, uint8_t out[16]) {
    if (c->n < 0) return CHAT_ENOTFOUND;
    if (c->n != 16) return CHAT_EPROTO;
    memcpy(out, c->p, 16);
    return 0;
}

int cql_cell_text(const cql_bytes_t *c, cql_str_t *out) {
    if (c->n < 0) return CHAT_ENOTFOUND;
    *out = (cql_str_t){(const char *)c->p, (size_t)c->n};
    return 0;
}

int cql_cell_strdup(const cql_bytes_t *c, char **out) {
    *out = NULL;
    if (c->n < 0) return 0;
    char *s = malloc((size_t)c->n + 1);
    if (!s) return CHAT_ENOMEM;
    if (c->n) memcpy(s, c->p, (size_t)c->n);
    s[c->n] = '\0';
    *out = s;
    return 0;
}
