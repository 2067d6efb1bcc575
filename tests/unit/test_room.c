/* Unit tests of rooms (src/chat/room.c): membership and the table, delivery through one
 * function with a filter, the held queue a room keeps while its bus catch-up reads the
 * store (bounded: past the bound the held events are dropped and the catch-up reads on), the
 * replay of a catch-up followed by the held events, and the per-origin duplicate filter.
 * Members are plain structs and delivery is a fake that records what each member got: no
 * loop, listener, store or bus. */
#include "chat/room.h"
#include "test.h"

typedef struct fake_member {
    room_member_t link; /* first: the fake deliver casts back */
    int tag;
    uint64_t got[64];
    bool got_new[64];
    size_t n_got;
} fake_member_t;

static int fake_deliver(room_member_t *m, chat_frames_t *f, bool is_new, uint64_t id) {
    fake_member_t *fm = (fake_member_t *)m;
    if (!f->plain || fm->n_got == 64) return -1;
    fm->got_new[fm->n_got] = is_new;
    fm->got[fm->n_got++] = id;
    return 0;
}

static int opened, closed;
static int fake_open(void *ud, const char *chat_id) {
    opened++;
    return 1;
}
static void fake_close(void *ud, const char *chat_id) { closed++; }

static void table_init(room_table_t *t, size_t held_max) {
    room_table_init(t);
    t->deliver = fake_deliver;
    t->held_max = held_max;
    t->on_open = fake_open;
    t->on_close = fake_close;
    opened = closed = 0;
}

static buf_t *frame_of(size_t n) {
    buf_t *b = buf_new(n);
    if (!b) return NULL;
    memset(b->data, 'x', n);
    b->len = n;
    return b;
}

/* An id as node `node` mints it at Unix time ms. */
static uint64_t id_at(int64_t ms, unsigned node, unsigned seq) {
    return ((uint64_t)(ms - ID_EPOCH_MS) << 22) | ((uint64_t)node << 12) | seq;
}

/* 1,000 events of 1 KiB arrive during a catch-up with a 64 KiB bound: the room never holds
 * more than its bound, and says it dropped some. */
static void test_held_queue_is_bounded(void) {
    room_table_t t;
    table_init(&t, ROOM_HELD_MAX(16 * 1024));
    fake_member_t a = {.tag = 1};
    CHECK_INT(room_join(&t, &a.link, "general"), 0);
    room_t *r = a.link.room;
    r->catching_up = true;
    size_t max_seen = 0;
    for (uint64_t i = 1; i <= 1000; i++) {
        buf_t *f = frame_of(1024);
        CHECK(f);
        CHECK_INT(room_broadcast(&t, r, f, true, i), 0); /* held, not delivered */
        buf_unref(f);
        if (r->held.bytes > max_seen) max_seen = r->held.bytes;
    }
    CHECK(max_seen <= t.held_max);
    CHECK(r->held_dropped);
    CHECK_INT(a.n_got, 0);
    /* what is held is the newest events, in order: the catch-up's read covers the rest */
    CHECK(r->held.head);
    uint64_t prev = 0, n = 0;
    for (held_event_t *h = r->held.head; h; h = h->next, n++) {
        CHECK(h->id > prev);
        prev = h->id;
    }
    CHECK_INT(prev, 1000);
    CHECK_INT(n * 1024, r->held.bytes);
    room_leave(&t, &a.link); /* frees what is held */
    room_table_free(&t);
}

/* Under the bound nothing is dropped. */
static void test_under_the_bound_nothing_is_dropped(void) {
    room_table_t t;
    table_init(&t, ROOM_HELD_MAX(16 * 1024));
    fake_member_t a = {.tag = 1};
    CHECK_INT(room_join(&t, &a.link, "general"), 0);
    room_t *r = a.link.room;
    r->catching_up = true;
    for (uint64_t i = 1; i <= 32; i++) {
        buf_t *f = frame_of(1024);
        CHECK(f);
        room_broadcast(&t, r, f, true, i);
        buf_unref(f);
    }
    CHECK(!r->held_dropped);
    CHECK_INT(r->held.bytes, 32 * 1024);
    room_leave(&t, &a.link);
    room_table_free(&t);
}

/* One room per chat, made by its first member (one subscription) and freed with its last
 * (one unsubscription); the table finds and walks every room as it grows. */
static void test_rooms_and_membership(void) {
    room_table_t t;
    table_init(&t, 1 << 20);
    fake_member_t a = {.tag = 1}, b = {.tag = 2}, c = {.tag = 3};
    CHECK_INT(room_join(&t, &a.link, "general"), 0);
    CHECK_INT(room_join(&t, &b.link, "general"), 0);
    CHECK_INT(room_join(&t, &c.link, "random"), 0);
    CHECK_INT(opened, 2);
    CHECK_INT(t.n, 2);
    CHECK(a.link.room == b.link.room);
    CHECK(a.link.room != c.link.room);
    CHECK(room_find(&t, "general") == a.link.room);
    CHECK(room_find(&t, "nobody") == NULL);
    CHECK_INT(a.link.room->n, 2);
    CHECK(a.link.room->subscribed);
    room_leave(&t, &a.link);
    CHECK(a.link.room == NULL);
    CHECK_INT(closed, 0); /* b is still there */
    CHECK_INT(room_find(&t, "general")->n, 1);
    room_leave(&t, &b.link);
    CHECK_INT(closed, 1);
    CHECK(room_find(&t, "general") == NULL);
    room_leave(&t, &b.link); /* in no room: nothing */
    CHECK_INT(closed, 1);

    /* 300 rooms: past several growths of the table, each found, each walked once */
    static fake_member_t many[300];
    char name[32];
    for (int i = 0; i < 300; i++) {
        snprintf(name, sizeof name, "chat-%d", i);
        CHECK_INT(room_join(&t, &many[i].link, name), 0);
    }
    CHECK_INT(t.n, 301);
    for (int i = 0; i < 300; i++) {
        snprintf(name, sizeof name, "chat-%d", i);
        CHECK(room_find(&t, name) == many[i].link.room);
    }
    size_t walked = 0;
    for (room_t *r = room_next(&t, NULL); r; r = room_next(&t, r)) walked++;
    CHECK_INT(walked, 301);
    for (int i = 0; i < 300; i++) room_leave(&t, &many[i].link);
    room_leave(&t, &c.link);
    CHECK_INT(t.n, 0);
    CHECK_INT(closed, 302);
    CHECK(room_next(&t, NULL) == NULL);
    room_table_free(&t);
}

static bool even_tag(const room_member_t *m, const void *arg) {
    return ((const fake_member_t *)m)->tag % 2 == 0;
}

/* room_deliver reaches every member, or those the filter picks, and counts deliveries. */
static void test_deliver_with_a_filter(void) {
    room_table_t t;
    table_init(&t, 1 << 20);
    fake_member_t m[4] = {{.tag = 1}, {.tag = 2}, {.tag = 3}, {.tag = 4}};
    for (int i = 0; i < 4; i++) CHECK_INT(room_join(&t, &m[i].link, "general"), 0);
    room_t *r = m[0].link.room;
    buf_t *fr = frame_of(10);
    CHECK(fr);
    chat_frames_t f = {.plain = fr};
    CHECK_INT(room_deliver(&t, r, &f, false, 7, NULL, NULL), 4);
    CHECK_INT(room_deliver(&t, r, &f, false, 8, even_tag, NULL), 2);
    CHECK_INT(t.delivered, 6);
    CHECK_INT(m[0].n_got, 1);
    CHECK_INT(m[1].n_got, 2);
    CHECK_INT(m[1].got[1], 8);
    CHECK_INT(m[3].got[1], 8);
    buf_unref(fr);
    for (int i = 0; i < 4; i++) room_leave(&t, &m[i].link);
    room_table_free(&t);
}

/* A catch-up: live events arrive while the room reads the store; the store's messages are
 * delivered first, then the held ones, the duplicates of what the read delivered dropped,
 * the edits passed through. Every member gets each message once, in that order. */
static void test_replay_with_held_events(void) {
    room_table_t t;
    table_init(&t, 1 << 20);
    fake_member_t a = {.tag = 1}, b = {.tag = 2};
    CHECK_INT(room_join(&t, &a.link, "general"), 0);
    CHECK_INT(room_join(&t, &b.link, "general"), 0);
    room_t *r = a.link.room;
    int64_t now = time_now_ms();
    uint64_t m1 = id_at(now - 50, 2, 0), m2 = id_at(now - 40, 2, 0), m3 = id_at(now - 30, 3, 0);
    r->catching_up = true;
    buf_t *fr = frame_of(32);
    CHECK(fr);
    /* live, during the read: m2 (which the read will also return), m3, an edit of m1 */
    CHECK_INT(room_broadcast(&t, r, fr, true, m2), 0);
    CHECK_INT(room_broadcast(&t, r, fr, true, m3), 0);
    CHECK_INT(room_broadcast(&t, r, fr, false, m1), 0);
    CHECK_INT(a.n_got, 0);
    /* the read returns m1 and m2: admitted and delivered straight (as cluster.c does) */
    uint64_t read_ids[] = {m1, m2};
    for (int i = 0; i < 2; i++) {
        CHECK(room_admit(r, true, read_ids[i]));
        chat_frames_t f = {.plain = fr};
        CHECK_INT(room_deliver(&t, r, &f, true, read_ids[i], NULL, NULL), 2);
    }
    room_release_held(&t, r);
    CHECK(!r->catching_up);
    CHECK(r->held.head == NULL);
    CHECK_INT(r->held.bytes, 0);
    fake_member_t *both[] = {&a, &b};
    for (int k = 0; k < 2; k++) {
        fake_member_t *fm = both[k];
        CHECK_INT(fm->n_got, 4);
        CHECK_INT(fm->got[0], m1);
        CHECK_INT(fm->got[1], m2);
        CHECK_INT(fm->got[2], m3); /* m2's held copy was dropped */
        CHECK(fm->got_new[2]);
        CHECK_INT(fm->got[3], m1); /* the edit */
        CHECK(!fm->got_new[3]);
    }
    /* live again: a late publish of m3 is a duplicate, a new message passes */
    CHECK_INT(room_broadcast(&t, r, fr, true, m3), 0);
    CHECK_INT(room_broadcast(&t, r, fr, true, id_at(now, 3, 1)), 2);
    buf_unref(fr);
    room_leave(&t, &a.link);
    room_leave(&t, &b.link);
    room_table_free(&t);
}

/* The per-origin filter: recent ids exactly (an id that arrives after a newer one of its
 * origin still passes, once); older ones by each origin's mark. */
static void test_per_origin_dedupe(void) {
    room_table_t t;
    table_init(&t, 1 << 20);
    fake_member_t a = {.tag = 1};
    CHECK_INT(room_join(&t, &a.link, "general"), 0);
    room_t *r = a.link.room;
    int64_t now = time_now_ms();
    /* recent */
    uint64_t n1_new = id_at(now - 100, 1, 0), n1_older = id_at(now - 200, 1, 0);
    CHECK(room_admit(r, true, n1_new));
    CHECK(!room_admit(r, true, n1_new));
    CHECK(room_admit(r, true, n1_older)); /* behind its origin's newest, but not seen */
    CHECK(!room_admit(r, true, n1_older));
    CHECK(room_admit(r, false, n1_new)); /* an edit or delete always passes */
    /* older than the exact window: the mark of the origin decides */
    int64_t old = now - 3 * ROOM_RECENT_MS;
    uint64_t o5 = id_at(old, 5, 0), o5_before = id_at(old - 1000, 5, 0),
             o5_after = id_at(old + 1000, 5, 0), o6_before = id_at(old - 1000, 6, 0);
    CHECK(room_admit(r, true, o5));
    CHECK(!room_admit(r, true, o5));
    CHECK(!room_admit(r, true, o5_before)); /* at or below node 5's mark: seen */
    CHECK(room_admit(r, true, o6_before));  /* node 6 has no mark: new */
    CHECK(room_admit(r, true, o5_after));   /* above the mark */
    CHECK(!room_admit(r, true, o5_after));
    CHECK(r->n_marks >= 3);
    room_leave(&t, &a.link);
    room_table_free(&t);
}

int main(void) {
    log_set_level(CHAT_LOG_ERROR); /* the overflow warning, once per drop */
    RUN(test_held_queue_is_bounded);
    RUN(test_under_the_bound_nothing_is_dropped);
    RUN(test_rooms_and_membership);
    RUN(test_deliver_with_a_filter);
    RUN(test_replay_with_held_events);
    RUN(test_per_origin_dedupe);
    return test_summary("test_room");
}
