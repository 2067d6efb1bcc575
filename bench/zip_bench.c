/* zip_bench: what permessage-deflate costs the server per event, alone, through ws.h exactly
 * as chatd calls it: ws_zip_frame (compress one broadcast frame) and ws_zip_inflate (one
 * client message), over chat events whose text is random words, for several text sizes.
 *
 *   zip_bench [--events N]
 *
 * The one idea: the load benchmarks on this shared 2-core machine cannot resolve a cost of
 * a few microseconds per event among everything else a delivery costs, so it is measured here
 * on its own; a delivery pays it divided by the compressing members of the chat.
 *
 * Output: one line per size on stderr, one JSON object on stdout.
 */
#include "ws/ws.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *const WORDS[] = {
    "the",    "of",     "and",    "to",   "in",  "is",    "you",    "that",    "it",       "he",
    "was",    "for",    "on",     "are",  "as",  "with",  "they",   "at",      "be",       "this",
    "have",   "from",   "or",     "one",  "had", "by",    "but",    "not",     "what",     "all",
    "were",   "we",     "when",   "your", "can", "said",  "there",  "meeting", "tomorrow", "lunch",
    "deploy", "thanks", "sounds", "good", "see", "later", "review", "ok"};

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts); /* CPU, not wall: the machine is shared */
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* A message:message event as chatd encodes it, with text_len bytes of random words. */
static size_t make_event(char *out, size_t cap, size_t text_len, uint64_t *rng) {
    char text[70000];
    size_t n = 0;
    while (n < text_len) {
        *rng ^= *rng << 13, *rng ^= *rng >> 7, *rng ^= *rng << 17;
        const char *w = WORDS[*rng % (sizeof WORDS / sizeof *WORDS)];
        size_t k = strlen(w);
        if (n + k + 1 > text_len) k = text_len - n - (n ? 1 : 0);
        if (n) text[n++] = ' ';
        memcpy(text + n, w, k);
        n += k;
    }
    int len = snprintf(out, cap,
                       "{\"event\":\"message:message\",\"chat_id\":\"bench-1\",\"message_id\":"
                       "\"7291036471947264%03u\",\"user_from\":\"bench-u17\",\"client_id\":"
                       "\"c-0b6f0bd2a1f94d3c\",\"message\":\"%.*s\",\"created_at\":"
                       "\"2026-12-07T23:12:51.123Z\"}",
                       (unsigned)(*rng % 1000), (int)n, text);
    return len < 0 ? 0 : (size_t)len;
}

int main(int argc, char **argv) {
    unsigned events = 20000;
    static const struct option lo[] = {{"events", 1, 0, 'e'}, {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (ch != 'e' || !(events = (unsigned)strtoul(optarg, NULL, 10))) {
            fprintf(stderr, "usage: zip_bench [--events N]\n");
            return 2;
        }
    }
    ws_zip_t *z = ws_zip_new();
    if (!z) return 1;
    static const size_t sizes[] = {20, 100, 300, 1000, 4000};
    enum { POOL = 64 }; /* distinct events, so no branch predictor learns one */
    static char ev[POOL][80000];
    static size_t ev_len[POOL];
    printf("{\"events\":%u,\"window_bits\":%d,\"sizes\":[", events, WS_DEFLATE_WINDOW_BITS);
    for (size_t si = 0; si < sizeof sizes / sizeof *sizes; si++) {
        uint64_t rng = 0x9E3779B97F4A7C15ull ^ sizes[si];
        size_t plain_bytes = 0, zip_bytes = 0;
        for (int i = 0; i < POOL; i++) ev_len[i] = make_event(ev[i], sizeof ev[i], sizes[si], &rng);
        buf_t *frames[POOL], *zipped[POOL];
        for (int i = 0; i < POOL; i++) frames[i] = ws_frame_new(WS_OP_TEXT, ev[i], ev_len[i]);
        double t0 = now_s();
        for (unsigned i = 0; i < events; i++) {
            buf_t *f = ws_zip_frame(z, frames[i % POOL]);
            plain_bytes += frames[i % POOL]->len;
            zip_bytes += f ? f->len : frames[i % POOL]->len;
            buf_unref(f);
        }
        double t_zip = (now_s() - t0) / events;
        for (int i = 0; i < POOL; i++) zipped[i] = ws_zip_frame(z, frames[i]);
        double t_inf = 0;
        if (zipped[0]) {
            t0 = now_s();
            for (unsigned i = 0; i < events; i++) {
                const buf_t *f = zipped[i % POOL];
                size_t l7 = f->data[1] & 0x7F, hl = l7 < 126 ? 2 : l7 == 126 ? 4 : 10;
                uint8_t *out;
                size_t out_len;
                if (ws_zip_inflate(z, f->data + hl, f->len - hl, 65536, &out, &out_len)) return 1;
            }
            t_inf = (now_s() - t0) / events;
        }
        fprintf(stderr,
                "text %5zu B: event frame %5zu B -> %5zu B (%.0f%%), compress %.2f us, "
                "inflate %.2f us\n",
                sizes[si], plain_bytes / events, zip_bytes / events,
                100.0 * (double)zip_bytes / (double)plain_bytes, t_zip * 1e6, t_inf * 1e6);
        printf("%s{\"text_bytes\":%zu,\"frame_bytes\":%zu,\"compressed_bytes\":%zu,"
               "\"compress_us\":%.3f,\"inflate_us\":%.3f}",
               si ? "," : "", sizes[si], plain_bytes / events, zip_bytes / events, t_zip * 1e6,
               t_inf * 1e6);
        for (int i = 0; i < POOL; i++) {
            buf_unref(frames[i]);
            buf_unref(zipped[i]);
        }
    }
    printf("]}\n");
    ws_zip_free(z);
    return 0;
}
