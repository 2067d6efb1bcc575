/* Unit tests of a room's held queue: the live events a room keeps back while its bus
 * catch-up reads the store. The queue is bounded (ROOM_HELD_MAX): past the bound the held
 * events are dropped, and the room remembers that so that the catch-up reads on instead
 * (everything held was stored before it was published). No loop, bus or store is needed:
 * a room that is catching up only holds. */
#include "chat/chat_internal.h"
#include "test.h"

static buf_t *frame_of(size_t n) {
    buf_t *b = buf_new(n);
    if (!b) return NULL;
    memset(b->data, 'x', n);
    b->len = n;
    return b;
}

/* 1,000 events of 1 KiB arrive during a catch-up with --max-outbound-bytes 16 KiB: the
 * room never holds more than its bound, and says it dropped some. */
static void test_held_queue_is_bounded(void) {
    chat_server_t *s = calloc(1, sizeof *s);
    room_t *r = calloc(1, sizeof *r);
    CHECK(s && r);
    s->cfg.max_outbound_bytes = 16 * 1024;
    r->chat_id = (char *)"general"; /* only logged */
    r->catching_up = true;
    size_t max_seen = 0;
    for (uint64_t i = 1; i <= 1000; i++) {
        buf_t *f = frame_of(1024);
        CHECK(f);
        CHECK_INT(chat_room_broadcast(s, r, f, true, i), 0); /* held, not delivered */
        buf_unref(f);
        if (r->held_bytes > max_seen) max_seen = r->held_bytes;
    }
    CHECK(max_seen <= ROOM_HELD_MAX(s->cfg.max_outbound_bytes));
    CHECK(r->held_dropped);
    /* what is held is the newest events, in order: the catch-up's read covers the rest */
    CHECK(r->held);
    uint64_t prev = 0, n = 0;
    for (held_event_t *h = r->held; h; h = h->next, n++) {
        CHECK(h->id > prev);
        prev = h->id;
    }
    CHECK_INT(prev, 1000);
    CHECK_INT(n * 1024, r->held_bytes);
    chat_room_free_held(r);
    CHECK_INT(r->held_bytes, 0);
    free(r);
    free(s);
}

/* Under the bound nothing is dropped. */
static void test_under_the_bound_nothing_is_dropped(void) {
    chat_server_t *s = calloc(1, sizeof *s);
    room_t *r = calloc(1, sizeof *r);
    CHECK(s && r);
    s->cfg.max_outbound_bytes = 16 * 1024;
    r->chat_id = (char *)"general"; /* only logged */
    r->catching_up = true;
    for (uint64_t i = 1; i <= 32; i++) {
        buf_t *f = frame_of(1024);
        CHECK(f);
        chat_room_broadcast(s, r, f, true, i);
        buf_unref(f);
    }
    CHECK(!r->held_dropped);
    CHECK_INT(r->held_bytes, 32 * 1024);
    chat_room_free_held(r);
    free(r);
    free(s);
}

int main(void) {
    log_set_level(CHAT_LOG_ERROR); /* the overflow warning, once per drop */
    RUN(test_held_queue_is_bounded);
    RUN(test_under_the_bound_nothing_is_dropped);
    return test_summary("test_room");
}
