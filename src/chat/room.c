/* room: rooms (this node's members of one chat), the hash table that finds them, the held
 * queue of live events, the duplicate filter between the store and the bus, and the one
 * function that delivers an event to members (room.h says why each exists). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat/room.h"

/* ---- held events ------------------------------------------------------------------------ */

int held_push(held_queue_t *q, buf_t *frame, bool is_new, uint64_t id) {
    held_event_t *h = malloc(sizeof(*h));
    if (!h) return CHAT_ENOMEM;
    *h = (held_event_t){.frame = buf_ref(frame), .id = id, .is_new = is_new};
    if (q->tail) q->tail->next = h;
    else q->head = h;
    q->tail = h;
    q->bytes += frame->len;
    return 0;
}

held_event_t *held_pop(held_queue_t *q) {
    held_event_t *h = q->head;
    if (!h) return NULL;
    q->head = h->next;
    if (!q->head) q->tail = NULL;
    q->bytes -= h->frame->len;
    h->next = NULL;
    return h;
}

void held_free_one(held_event_t *h) {
    if (!h) return;
    buf_unref(h->frame);
    free(h);
}

void held_clear(held_queue_t *q) {
    held_event_t *h;
    while ((h = held_pop(q))) held_free_one(h);
}

/* ---- the table ------------------------------------------------------------------------------ */

uint32_t chat_hash(const char *s) {
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++) h = (h ^ (uint8_t)*s) * 16777619u;
    return h;
}

void room_table_init(room_table_t *t) { memset(t, 0, sizeof(*t)); }

static void room__free(room_t *r) {
    held_clear(&r->held);
    room_free_filter(r);
    free(r->chat_id);
    free(r);
}

void room_table_free(room_table_t *t) {
    for (size_t i = 0; i < t->cap; i++)
        while (t->buckets[i]) {
            room_t *r = t->buckets[i];
            t->buckets[i] = r->hnext;
            room__free(r);
        }
    free(t->buckets);
    t->buckets = NULL;
    t->cap = t->n = 0;
}

room_t *room_find(room_table_t *t, const char *chat_id) {
    if (!t->cap) return NULL;
    uint32_t h = chat_hash(chat_id);
    for (room_t *r = t->buckets[h & (t->cap - 1)]; r; r = r->hnext)
        if (r->hash == h && strcmp(r->chat_id, chat_id) == 0) return r;
    return NULL;
}

room_t *room_next(room_table_t *t, room_t *prev) {
    if (prev && prev->hnext) return prev->hnext;
    for (size_t i = prev ? (prev->hash & (t->cap - 1)) + 1 : 0; i < t->cap; i++)
        if (t->buckets[i]) return t->buckets[i];
    return NULL;
}

static int room__grow(room_table_t *t) {
    size_t ncap = t->cap ? t->cap * 2 : 64;
    room_t **nt = calloc(ncap, sizeof(*nt));
    if (!nt) return CHAT_ENOMEM;
    for (size_t i = 0; i < t->cap; i++) {
        room_t *r = t->buckets[i];
        while (r) {
            room_t *next = r->hnext;
            r->hnext = nt[r->hash & (ncap - 1)];
            nt[r->hash & (ncap - 1)] = r;
            r = next;
        }
    }
    free(t->buckets);
    t->buckets = nt;
    t->cap = ncap;
    return 0;
}

int room_join(room_table_t *t, room_member_t *m, const char *chat_id) {
    room_t *r = room_find(t, chat_id);
    if (!r) {
        if (!t->cap || t->n + 1 > t->cap * 3 / 4)
            if (room__grow(t) < 0) return CHAT_ENOMEM;
        r = calloc(1, sizeof(*r));
        if (!r || !(r->chat_id = strdup(chat_id))) {
            free(r);
            return CHAT_ENOMEM;
        }
        queue_init(&r->members);
        r->hash = chat_hash(chat_id);
        r->gen = ++t->gen;
        r->hnext = t->buckets[r->hash & (t->cap - 1)];
        t->buckets[r->hash & (t->cap - 1)] = r;
        t->n++;
        r->subscribed = t->on_open ? t->on_open(t->ud, chat_id) == 1 : true;
    }
    m->room = r;
    queue_insert_head(&r->members, &m->link);
    r->n++;
    return 0;
}

void room_leave(room_table_t *t, room_member_t *m) {
    room_t *r = m->room;
    if (!r) return;
    queue_remove(&m->link);
    m->room = NULL;
    if (--r->n) return;
    room_t **pp = &t->buckets[r->hash & (t->cap - 1)];
    while (*pp != r) pp = &(*pp)->hnext;
    *pp = r->hnext;
    t->n--;
    if (t->on_close) t->on_close(t->ud, r->chat_id);
    room__free(r);
}

room_member_t *room_first(room_t *r) {
    return queue_empty(&r->members) ? NULL
                                    : queue_data(queue_head(&r->members), room_member_t, link);
}

room_member_t *room_member_next(room_t *r, room_member_t *m) {
    return m->link.next == &r->members ? NULL : queue_data(m->link.next, room_member_t, link);
}

/* ---- delivery ------------------------------------------------------------------------------- */

size_t room_deliver(room_table_t *t, room_t *r, chat_frames_t *f, bool is_new, uint64_t id,
                    room_filter_fn filter, const void *arg) {
    size_t n = 0;
    room_member_t *next;
    for (room_member_t *m = room_first(r); m; m = next) {
        next = room_member_next(r, m); /* a delivery may close m, never unlink it at once */
        if ((!filter || filter(m, arg)) && t->deliver(m, f, is_new, id) == 0) n++;
    }
    t->delivered += n;
    return n;
}

size_t room_deliver_frame(room_table_t *t, room_t *r, buf_t *frame, bool is_new, uint64_t id,
                          room_filter_fn filter, const void *arg) {
    chat_frames_t f = {.plain = frame};
    size_t n = room_deliver(t, r, &f, is_new, id, filter, arg);
    buf_unref(f.zipped);
    return n;
}

int room_deliver_one(room_table_t *t, room_member_t *m, buf_t *frame) {
    chat_frames_t f = {.plain = frame};
    int rc = t->deliver(m, &f, false, 0);
    buf_unref(f.zipped);
    return rc;
}

size_t room_broadcast(room_table_t *t, room_t *r, buf_t *frame, bool is_new, uint64_t id) {
    if (r->catching_up) {
        /* not admitted yet: the backlog goes first, then these through the filter */
        if (r->held.bytes + frame->len > t->held_max) {
            /* Every held event was stored before it was published, so a store read
             * started after this point sees them all: drop them and let the catch-up read
             * on past its page cap (cluster.c). What follows is held afresh. */
            log_warn("room_held_overflow chat=%s held=%zu: the catch-up reads them instead",
                     r->chat_id, r->held.bytes);
            held_clear(&r->held);
            r->held_dropped = true;
        }
        if (held_push(&r->held, frame, is_new, id) < 0)
            r->held_dropped = true; /* the catch-up's next read covers it */
        return 0;
    }
    if (!room_admit(r, is_new, id)) return 0;
    return room_deliver_frame(t, r, frame, is_new, id, NULL, NULL);
}

void room_release_held(room_table_t *t, room_t *r) {
    r->catching_up = false;
    r->held_dropped = false;
    held_queue_t q = r->held; /* taken whole: a delivery cannot add to what is released */
    r->held = (held_queue_t){0};
    held_event_t *h;
    while ((h = held_pop(&q))) {
        if (room_admit(r, h->is_new, h->id))
            room_deliver_frame(t, r, h->frame, h->is_new, h->id, NULL, NULL);
        held_free_one(h);
    }
}

/* ---- duplicate filter ------------------------------------------------------------------ */

static int64_t room__id_ms(uint64_t id) { return (int64_t)(id >> 22) + ID_EPOCH_MS; }

/* Recent ids (ROOM_RECENT_MS) are filtered exactly: the ids seen are kept. Older ones by the
 * per-origin mark, as a node publishes its own messages in id order and anything that old
 * that has not come through yet is not coming out of order any more. The mark alone would
 * drop a message that arrives after a newer one of its origin, which happens: a catch-up
 * read can see a node's later write while an earlier one is still being written (Cassandra
 * runs them concurrently), and a retried message whose node died before publishing it is
 * sent again by whichever node the retry reaches, in the order the retries come. */
bool room_admit(room_t *r, bool is_new, uint64_t id) {
    if (!is_new) return true; /* edits and deletes are idempotent for clients */
    int64_t cutoff = time_now_ms() - ROOM_RECENT_MS;
    uint32_t old = 0;
    while (old < r->n_recent && room__id_ms(r->recent[old]) < cutoff) old++;
    if (old) {
        memmove(r->recent, r->recent + old, sizeof(uint64_t) * (r->n_recent - old));
        r->n_recent -= old;
    }
    uint16_t node = (uint16_t)((id >> 12) & 1023);
    room_mark_t *mk = NULL;
    for (uint16_t i = 0; i < r->n_marks && !mk; i++)
        if (r->marks[i].node == node) mk = &r->marks[i];
    if (room__id_ms(id) < cutoff) {
        if (mk && id <= mk->id) return false;
    } else {
        uint32_t lo = 0, hi = r->n_recent;
        while (lo < hi) {
            uint32_t mid = lo + (hi - lo) / 2;
            if (r->recent[mid] < id) lo = mid + 1;
            else hi = mid;
        }
        if (lo < r->n_recent && r->recent[lo] == id) return false;
        if (r->n_recent == r->recent_cap) {
            uint32_t ncap = r->recent_cap ? r->recent_cap * 2 : 16;
            uint64_t *nr = realloc(r->recent, sizeof(uint64_t) * ncap);
            if (nr) {
                r->recent = nr;
                r->recent_cap = ncap;
            }
        }
        if (r->n_recent < r->recent_cap) { /* else: out of memory, the mark decides later */
            memmove(r->recent + lo + 1, r->recent + lo, sizeof(uint64_t) * (r->n_recent - lo));
            r->recent[lo] = id;
            r->n_recent++;
        } else if (mk && id <= mk->id) {
            return false;
        }
    }
    if (mk) {
        if (id > mk->id) mk->id = id;
        return true;
    }
    room_mark_t *nm = realloc(r->marks, sizeof(*nm) * (r->n_marks + 1u));
    if (!nm) return true; /* better a possible duplicate than a loss */
    r->marks = nm;
    r->marks[r->n_marks++] = (room_mark_t){.node = node, .id = id};
    return true;
}

void room_free_filter(room_t *r) {
    free(r->marks);
    r->marks = NULL;
    r->n_marks = 0;
    free(r->recent);
    r->recent = NULL;
    r->n_recent = r->recent_cap = 0;
}
