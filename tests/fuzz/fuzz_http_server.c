/* fuzz_http_server: raw bytes through the HTTP/1.1 connection driver (http/server.h) over a
 * real loopback socket, with the trivial handler of tests/unit/http_harness.h (answers at
 * once, later for /wait, a raw hand-off for /upgrade).
 *
 * The first input byte picks how the rest is cut into writes ('0'..'5': 1, 3, 16, 61, 256
 * bytes, or all at once), the loop running between them. Invariants: what comes back is
 * HTTP answers (or the hand-off's "UP:"), and once the client is gone every connection's
 * state is freed (ASan reports the rest).
 */
#include "../unit/http_harness.h"

static hh_t h;
static char out[1 << 20];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static bool started;
    if (!started) {
        log_set_level(CHAT_LOG_ERROR + 1);
        if (hh_start(&h, 1 << 20) < 0) abort();
        h.auto_answer = true;
        started = true;
    }
    if (size < 1) return 0;
    static const size_t cuts[] = {1, 3, 16, 61, 256};
    size_t cut = data[0] >= '0' && data[0] < '5' ? cuts[data[0] - '0'] : size;
    data++, size--;
    int fd = hh_client(&h);
    if (fd < 0) abort();
    for (size_t off = 0; off < size; off += cut) {
        size_t n = size - off < cut ? size - off : cut;
        if (hh_send(&h, fd, data + off, n) < 0) break; /* the server closed */
        hh_pump(&h);
    }
    bool eof;
    size_t len = hh_read(&h, fd, out, sizeof out, NULL, 0, &eof);
    if (len && strncmp(out, "HTTP/1.1 ", 9) != 0 && strncmp(out, "UP:", 3) != 0) abort();
    hh_reset(fd);
    for (int i = 0; i < 100000 && h.n_freed < h.n_open; i++) hh_pump(&h);
    if (h.n_freed != h.n_open) abort();
    return 0;
}
