/* core: error strings, refcounted buffers, logging, time and ids.
 * Everything here runs on the loop thread except logging, which is one fprintf per line
 * (stdio locks the stream, so lines from the store's threads never interleave). */
#include "core.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

const char *chat_strerror(int err) {
    switch (err) {
    case CHAT_OK: return "ok";
    case CHAT_EAGAIN: return "need more data";
    case CHAT_ENOMEM: return "out of memory";
    case CHAT_EINVAL: return "invalid input";
    case CHAT_ENOTFOUND: return "not found";
    case CHAT_EPERM: return "not allowed";
    case CHAT_EIO: return "i/o error";
    case CHAT_ETOOBIG: return "too big";
    case CHAT_EPROTO: return "protocol error";
    case CHAT_EUTF8: return "invalid utf-8";
    case CHAT_ECLOSED: return "closed";
    case CHAT_EAUTH: return "bad credentials";
    case CHAT_EEXPIRED: return "expired";
    case CHAT_EBUSY: return "busy";
    case CHAT_ERANGE: return "out of range";
    default: return "unknown error";
    }
}

buf_t *buf_new(size_t cap) {
    if (cap > UINT32_MAX) return NULL;
    buf_t *b = malloc(sizeof(*b) + cap);
    if (!b) return NULL;
    b->refs = 1;
    b->cap = (uint32_t)cap;
    b->len = 0;
    return b;
}

buf_t *buf_from(const void *p, size_t n) {
    buf_t *b = buf_new(n);
    if (!b) return NULL;
    if (n) memcpy(b->data, p, n);
    b->len = n;
    return b;
}

void buf_unref(buf_t *b) {
    if (b && --b->refs == 0) free(b);
}

static int log_level = CHAT_LOG_INFO;

void log_set_level(int level) { log_level = level; }

void log_msg(int level, const char *fmt, ...) {
    if (level < log_level) return;
    static const char *names[] = {"debug", "info", "warn", "error"};
    char ts[25], line[2048];
    time_format_ms(time_now_ms(), ts);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s %s %s\n", ts, names[level < 0 ? 0 : level > 3 ? 3 : level], line);
}

/* true when c may stand in a bare logfmt value */
static bool log__bare(unsigned char c) {
    return c > 0x20 && c < 0x7f && c != '"' && c != '\\' && c != '=';
}

/* c as it is written inside a value (quoted or not) into esc; returns its length, 1..4 */
static size_t log__esc(unsigned char c, bool quoted, char esc[4]) {
    static const char hex[] = "0123456789abcdef";
    if (!quoted || (c >= 0x20 && c < 0x7f && c != '"' && c != '\\')) {
        esc[0] = (char)c;
        return 1;
    }
    esc[0] = '\\';
    if (c == '"' || c == '\\' || c == '\n' || c == '\r' || c == '\t') {
        esc[1] = c == '\n' ? 'n' : c == '\r' ? 'r' : c == '\t' ? 't' : (char)c;
        return 2;
    }
    esc[1] = 'x';
    esc[2] = hex[c >> 4];
    esc[3] = hex[c & 15];
    return 4;
}

char *log_value(char *out, size_t cap, const char *s, size_t n) {
    if (!s) n = 0;
    bool quote = n == 0;
    for (size_t i = 0; i < n && !quote; i++) quote = !log__bare((unsigned char)s[i]);
    char esc[4];
    size_t full = quote ? 2 : 0; /* the whole value, written out, without its NUL */
    for (size_t i = 0; i < n; i++) full += log__esc((unsigned char)s[i], quote, esc);
    /* room kept back for what ends the value: "..." when it is cut, the quote, the NUL */
    const size_t tail = (full + 1 > cap ? 3 : 0) + (quote ? 1 : 0) + 1;
    size_t o = 0, i = 0;
    if (quote) out[o++] = '"';
    for (; i < n; i++) {
        size_t k = log__esc((unsigned char)s[i], quote, esc);
        if (o + k + tail > cap) break; /* never half an escape */
        memcpy(out + o, esc, k);
        o += k;
    }
    if (i < n) {
        memcpy(out + o, "...", 3);
        o += 3;
    }
    if (quote) out[o++] = '"';
    out[o] = '\0';
    return out;
}

char *log_str_(char out[LOG_VALUE_MAX], const char *s) {
    return log_value(out, LOG_VALUE_MAX, s, s ? strlen(s) : 0);
}

int64_t time_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void time_format_ms(int64_t ms, char out[25]) {
    time_t secs = (time_t)(ms / 1000);
    int milli = (int)(ms % 1000);
    if (milli < 0) {
        milli += 1000;
        secs -= 1;
    }
    struct tm tm;
    gmtime_r(&secs, &tm);
    char date[20];
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%S", &tm);
    memcpy(out, date, 19);
    out[19] = '.';
    out[20] = (char)('0' + milli / 100);
    out[21] = (char)('0' + milli / 10 % 10);
    out[22] = (char)('0' + milli % 10);
    out[23] = 'Z';
    out[24] = 0;
}

void id_gen_init(id_gen_t *g, unsigned node) {
    g->node = node & 1023u;
    g->last_ms = 0;
    g->seq = 0;
}

uint64_t id_next(id_gen_t *g, int64_t *ms_out) {
    int64_t now = time_now_ms() - ID_EPOCH_MS;
    if (now < g->last_ms) now = g->last_ms; /* the clock stepped back: hold the last ms */
    if (now == g->last_ms) {
        if (++g->seq > 4095) {
            /* 4096 ids in this millisecond: borrow the next one rather than spin, so the
             * loop never stalls; ids stay unique and ordered, and drift back to the wall
             * clock as soon as the rate drops. */
            now = g->last_ms + 1;
            g->seq = 0;
        }
    } else {
        g->seq = 0;
    }
    g->last_ms = now;
    if (ms_out) *ms_out = now + ID_EPOCH_MS;
    return ((uint64_t)now << 22) | ((uint64_t)g->node << 12) | g->seq;
}

int64_t id_time_ms(uint64_t id) { return (int64_t)(id >> 22) + ID_EPOCH_MS; }

int id_parse(const char *s, size_t n, uint64_t *out) {
    if (n == 0 || n > 20) return CHAT_EINVAL;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return CHAT_EINVAL;
        unsigned d = (unsigned)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10) return CHAT_EINVAL;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

static bool sbuf_reserve(sbuf_t *sb, size_t n) {
    if (sb->oom) return false;
    if (sb->len + n + 1 <= sb->cap) return true;
    size_t ncap = sb->cap ? sb->cap : 256;
    while (ncap < sb->len + n + 1) ncap *= 2;
    char *np = realloc(sb->p, ncap);
    if (!np) {
        sb->oom = true;
        return false;
    }
    sb->p = np;
    sb->cap = ncap;
    return true;
}

void sbuf_put(sbuf_t *sb, const void *p, size_t n) {
    if (!sbuf_reserve(sb, n)) return;
    memcpy(sb->p + sb->len, p, n);
    sb->len += n;
    sb->p[sb->len] = 0;
}

void sbuf_puts(sbuf_t *sb, const char *s) { sbuf_put(sb, s, strlen(s)); }

void sbuf_printf(sbuf_t *sb, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !sbuf_reserve(sb, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(sb->p + sb->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    sb->len += (size_t)n;
}

/* a byte JSON lets through as is: printable ASCII but the quote and the backslash */
static bool json_plain(uint8_t ch) { return ch >= 0x20 && ch < 0x80 && ch != '"' && ch != '\\'; }

size_t json_escape(const char *s, size_t n, char *out) {
    static const char hex[] = "0123456789abcdef";
    const uint8_t *p = (const uint8_t *)s;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        if (json_plain(p[i])) { /* chat text is mostly this: copy the whole run at once */
            size_t j = i + 1;
            while (j < n && json_plain(p[j])) j++;
            if (out) memcpy(out + o, s + i, j - i);
            o += j - i;
            i = j;
            continue;
        }
        uint8_t ch = p[i];
        char esc[6] = {'\\', (char)ch};
        const char *w = esc;
        size_t wn = 2, step = 1;
        if (ch == '\n' || ch == '\r' || ch == '\t') {
            esc[1] = ch == '\n' ? 'n' : ch == '\r' ? 'r' : 't';
        } else if (ch < 0x20) {
            memcpy(esc, "\\u00", 4);
            esc[4] = hex[ch >> 4];
            esc[5] = hex[ch & 15];
            wn = 6;
        } else if (ch >= 0x80 && (step = utf8_seq_len(p + i, n - i)) > 0) {
            w = s + i;
            wn = step;
        } else if (ch >= 0x80) {
            /* one U+FFFD per invalid byte; the next byte is looked at afresh */
            w = "\\ufffd";
            wn = 6;
            step = 1;
        } /* else '"' or '\\': esc as set */
        if (out) memcpy(out + o, w, wn);
        o += wn;
        i += step;
    }
    return o;
}

void sbuf_json_str(sbuf_t *sb, const char *s, size_t n) {
    /* worst case every byte becomes \u00XX or \ufffd */
    if (!sbuf_reserve(sb, n * 6 + 2)) return;
    char *o = sb->p + sb->len;
    *o++ = '"';
    o += json_escape(s, n, o);
    *o++ = '"';
    sb->len = (size_t)(o - sb->p);
    sb->p[sb->len] = 0;
}

void sbuf_metric(sbuf_t *sb, const char *name, const char *type, const char *help, uint64_t v) {
    sbuf_printf(sb, "# HELP %s %s\n# TYPE %s %s\n%s %" PRIu64 "\n", name, help, name, type, name,
                v);
}

void sbuf_free(sbuf_t *sb) {
    free(sb->p);
    sb->p = NULL;
    sb->len = sb->cap = 0;
    sb->oom = false;
}

void url_redact(const char *url, char *out, size_t n) {
    if (!n) return;
    const char *auth = strstr(url, "://");
    auth = auth ? auth + 3 : url;
    const char *at = strchr(auth, '@');
    const char *slash = strchr(auth, '/');
    const char *colon = at ? memchr(auth, ':', (size_t)(at - auth)) : NULL;
    if (!at || (slash && slash < at) || !colon) {
        snprintf(out, n, "%s", url);
        return;
    }
    snprintf(out, n, "%.*s:***%s", (int)(colon - url), url, at);
}
