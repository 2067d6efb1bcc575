/* room: this node's members of one chat, and what reaches them.
 *
 * A room exists while it has members; its first member subscribes the node to the chat (the
 * table's on_open hook) and its last unsubscribes (on_close), so the bus sees one
 * subscription per node per chat however many clients join. A room passes a live event to
 * every member through ONE function, room_deliver (the table's deliver hook: session.c in
 * the server, a fake in the unit tests); a filter picks the members where only some get it
 * (presence events, read positions).
 *
 * Duplicates between the store (catch-up reads) and the bus are removed by the room's
 * filter, room_admit: exact for the ids of the last ROOM_RECENT_MS, by per-origin marks
 * (every node stores and publishes its own messages in id order) for older ones.
 *
 * Depends on core (buf_t) only: no loop, bus, store or connection.
 */
#ifndef CHAT_ROOM_H
#define CHAT_ROOM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/core.h"

/* What can still be in flight between a store write and its delivery through the bus
 * (the longest a publish may trail its commit): resume windows and exact dedupe span it. */
#define IN_FLIGHT_MS 10000
#define ROOM_RECENT_MS IN_FLIGHT_MS
/* A room holds at most this many bytes of live events while it catches up. */
#define ROOM_HELD_MAX(max_outbound) ((max_outbound)*4)

/* ---- the held-event queue ----------------------------------------------------------------- */
/* Live events kept back while a store read goes first: a room's catch-up, a session's
 * replay. Each event holds a reference to its frame. */
typedef struct held_event {
    struct held_event *next;
    buf_t *frame;
    uint64_t id;
    bool is_new; /* message:message (the others change a message already sent) */
} held_event_t;

typedef struct held_queue {
    held_event_t *head, *tail;
    size_t bytes; /* of the frames held */
} held_queue_t;

/* Append an event (takes a reference to frame). 0, or CHAT_ENOMEM (nothing held). */
int held_push(held_queue_t *q, buf_t *frame, bool is_new, uint64_t id);
/* Take the oldest event off the queue, NULL if empty; the caller frees it (held_free_one). */
held_event_t *held_pop(held_queue_t *q);
/* Release an event taken by held_pop (and its frame reference). */
void held_free_one(held_event_t *h);
/* Empty the queue, releasing every frame. */
void held_clear(held_queue_t *q);

/* ---- the encodings of one event ------------------------------------------------------------ */
/* The plain frame (borrowed) and, made on the first member that negotiated
 * permessage-deflate (session.c, chat_frames_pick), its compressed form (owned: whoever
 * made the struct calls buf_unref(zipped) when the event is done). Two at most, whatever the
 * number of members. */
typedef struct chat_frames {
    buf_t *plain;
    buf_t *zipped; /* NULL until made, or when not worth it (ws_zip_frame) */
    bool tried;
} chat_frames_t;

/* ---- rooms ---------------------------------------------------------------------------------- */
typedef struct room room_t;

/* A member's link into its room; embedded in the member (session_t). */
typedef struct room_member {
    queue_t link; /* in its room's members */
    room_t *room; /* NULL when in no room */
} room_member_t;

/* The newest message id seen in a room from one origin node. */
typedef struct room_mark {
    uint16_t node;
    uint64_t id;
} room_mark_t;

struct room {
    char *chat_id;
    queue_t members; /* room_member_t.link; walk with room_first / room_member_next */
    size_t n;
    room_t *hnext;
    uint32_t hash;
    uint64_t gen; /* distinguishes this room from an earlier one of the same chat */
    room_mark_t *marks;
    uint16_t n_marks;
    /* every message:message id admitted whose time is within ROOM_RECENT_MS of now, sorted:
     * for those the filter is exact, so one that arrives after a newer one of its origin
     * (a catch-up read that saw a later write of a node before an earlier one became
     * visible, a retry re-sent after its node died) still passes once */
    uint64_t *recent;
    uint32_t n_recent, recent_cap;
    bool catching_up;  /* reading what the bus missed: live events wait in held */
    bool held_dropped; /* held overflowed and was dropped: the catch-up reads on */
    bool subscribed;   /* the bus confirmed the subscription: resumes may read */
    held_queue_t held; /* bounded by the table's held_max */
};

/* Queue one event to member m in the encoding it wants (taken from f). 0 if it took it. */
typedef int (*room_deliver_fn)(room_member_t *m, chat_frames_t *f, bool is_new, uint64_t id);
/* Which members get an event (NULL: all). */
typedef bool (*room_filter_fn)(const room_member_t *m, const void *arg);

typedef struct room_table {
    room_t **buckets;
    size_t cap, n; /* n: rooms */
    uint64_t gen;
    size_t held_max; /* bytes a catching-up room holds (ROOM_HELD_MAX) */
    /* the one way an event reaches a member (session.c's chat_session_deliver in the
     * server); files below session.c also send one member its own answer through it */
    room_deliver_fn deliver;
    /* a room was made / emptied (subscribe, unsubscribe); on_open returns 1 if the chat's
     * events flow already (the room is subscribed), else 0. Either may be NULL. */
    int (*on_open)(void *ud, const char *chat_id);
    void (*on_close)(void *ud, const char *chat_id);
    void *ud;
    uint64_t delivered; /* deliveries made by room_deliver (chat_messages_out_total) */
} room_table_t;

uint32_t chat_hash(const char *s); /* FNV-1a of a NUL-terminated string */

/* An empty table: the caller fills deliver, held_max and the hooks; room_table_free frees
 * every room left (their members are not touched). */
void room_table_init(room_table_t *t);
void room_table_free(room_table_t *t);
room_t *room_find(room_table_t *t, const char *chat_id);
/* Add m to the room of chat_id, made if needed (chat_id is copied). 0, or CHAT_ENOMEM. */
int room_join(room_table_t *t, room_member_t *m, const char *chat_id);
/* Take m out of its room (none: nothing); the last member frees the room. */
void room_leave(room_table_t *t, room_member_t *m);
/* Walk the rooms: the first with prev NULL, then the next; NULL at the end. The table must
 * not change during the walk. */
room_t *room_next(room_table_t *t, room_t *prev);
/* r's first member, and the one after m (NULL past the last); borrowed. A walk may close
 * the member it is at (closing never unlinks it at once), so take the next one first. */
room_member_t *room_first(room_t *r);
room_member_t *room_member_next(room_t *r, room_member_t *m);

/* Pass or drop an event by the room's marks and recent ids; true if it is new to this
 * room (and it is recorded as seen). */
bool room_admit(room_t *r, bool is_new, uint64_t id);
/* Free the room's filter state (marks, recent ids). */
void room_free_filter(room_t *r);

/* Queue the event in f to every member that filter (NULL: all) picks, already admitted.
 * f stays the caller's (and so does f->zipped). Returns deliveries. */
size_t room_deliver(room_table_t *t, room_t *r, chat_frames_t *f, bool is_new, uint64_t id,
                    room_filter_fn filter, const void *arg);
/* The same for one plain frame (borrowed): its compressed form, if a member wants one, is
 * made here and released after. */
size_t room_deliver_frame(room_table_t *t, room_t *r, buf_t *frame, bool is_new, uint64_t id,
                          room_filter_fn filter, const void *arg);
/* A frame (borrowed) to member m alone, through the deliver hook (held behind its replay,
 * compressed if it negotiated that): a member's own answer. 0 if it took it. */
int room_deliver_one(room_table_t *t, room_member_t *m, buf_t *frame);
/* A live event: held while the room catches up (bounded: past held_max what is held is
 * dropped and held_dropped set, as a store read covers them), else admitted by the filter
 * and delivered to every member. frame stays the caller's. Returns deliveries. */
size_t room_broadcast(room_table_t *t, room_t *r, buf_t *frame, bool is_new, uint64_t id);
/* The catch-up ended: what was held goes through the filter, to every member. */
void room_release_held(room_table_t *t, room_t *r);

#endif
