/* core/queue: the one intrusive doubly linked list of the tree (in the spirit of nginx's
 * ngx_queue_t and libuv's QUEUE).
 *
 * A queue_t is embedded in the element; a list is a circular ring through one more queue_t,
 * the head (a sentinel), so inserting and removing never test for an end and an element can
 * unlink itself in O(1) without knowing which list it is on. queue_data() gets from the link
 * back to the element. Header only: every operation is a few pointer moves.
 *
 * Ownership: the list owns nothing. Whoever frees an element removes it first; a head going
 * away leaves its elements linked to freed memory unless they were removed (or the caller
 * frees them all while walking with QUEUE_FOREACH_SAFE).
 *
 * "Not on a list" is a link pointing at itself (queue_init, queue_remove) or a zeroed link
 * (a calloc'd element): queue_linked() says no for both and queue_remove() of such a link
 * does nothing, so an element's own teardown may remove it unconditionally.
 */
#ifndef CHAT_CORE_QUEUE_H
#define CHAT_CORE_QUEUE_H

#include <stdbool.h>
#include <stddef.h>

typedef struct queue {
    struct queue *next, *prev;
} queue_t;

/* The element of type `type` whose member `field` is the link `q`. */
#define queue_data(q, type, field) ((type *)(void *)((char *)(q)-offsetof(type, field)))

/* Walk the links of head h in order; the body must not unlink q (use the _SAFE form). */
#define QUEUE_FOREACH(q, h) for ((q) = (h)->next; (q) != (h); (q) = (q)->next)

/* Walk allowing the body to unlink or free q: n holds the next link. */
#define QUEUE_FOREACH_SAFE(q, n, h) \
    for ((q) = (h)->next, (n) = (q)->next; (q) != (h); (q) = (n), (n) = (q)->next)

/* An empty head, or a link that is on no list. */
static inline void queue_init(queue_t *q) {
    q->next = q;
    q->prev = q;
}

static inline bool queue_empty(const queue_t *h) { return h->next == h; }

/* Whether the element link q is on some list (false for a zeroed or initialised link). */
static inline bool queue_linked(const queue_t *q) { return q->next != NULL && q->next != q; }

/* The first / last link of head h; h itself when the list is empty. */
static inline queue_t *queue_head(const queue_t *h) { return h->next; }

static inline queue_t *queue_tail(const queue_t *h) { return h->prev; }

/* n goes first on h. n must not be on a list. */
static inline void queue_insert_head(queue_t *h, queue_t *n) {
    n->next = h->next;
    n->prev = h;
    h->next->prev = n;
    h->next = n;
}

/* n goes last on h. n must not be on a list. */
static inline void queue_insert_tail(queue_t *h, queue_t *n) {
    n->prev = h->prev;
    n->next = h;
    h->prev->next = n;
    h->prev = n;
}

/* Unlink q from whatever list it is on and leave it initialised; nothing if it is on none. */
static inline void queue_remove(queue_t *q) {
    if (!queue_linked(q)) {
        queue_init(q);
        return;
    }
    q->prev->next = q->next;
    q->next->prev = q->prev;
    queue_init(q);
}

/* Every element of from goes, in order, to the tail of to; from is left empty. */
static inline void queue_move_tail(queue_t *from, queue_t *to) {
    if (queue_empty(from)) return;
    from->next->prev = to->prev;
    to->prev->next = from->next;
    from->prev->next = to;
    to->prev = from->prev;
    queue_init(from);
}

#endif
