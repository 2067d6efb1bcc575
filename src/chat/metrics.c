/* metrics: the counters and histograms of one server, and their Prometheus rendering
 * (GET /metrics). Recording is a few adds on the loop thread; nothing here allocates. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "chat_internal.h"
#include "stream/stream.h"

/* ---- metrics -------------------------------------------------------------------------- */

static const double lat_bounds[METRIC_LAT_BUCKETS] = {
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0};

void chat_hist_record(metric_hist_t *h, double secs) {
    h->count++;
    h->sum += secs;
    for (int i = 0; i < METRIC_LAT_BUCKETS; i++)
        if (secs <= lat_bounds[i]) {
            h->buckets[i]++;
            break;
        }
}

static void chat__hist_render(sbuf_t *sb, const char *name, const char *help,
                              const metric_hist_t *h) {
    sbuf_printf(sb, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
    uint64_t cum = 0;
    for (int i = 0; i < METRIC_LAT_BUCKETS; i++) {
        cum += h->buckets[i];
        sbuf_printf(sb, "%s_bucket{le=\"%g\"} %" PRIu64 "\n", name, lat_bounds[i], cum);
    }
    sbuf_printf(sb, "%s_bucket{le=\"+Inf\"} %" PRIu64 "\n", name, h->count);
    sbuf_printf(sb, "%s_sum %.6f\n", name, h->sum);
    sbuf_printf(sb, "%s_count %" PRIu64 "\n", name, h->count);
}

void chat_record_latency(chat_server_t *s, uint64_t t0) {
    chat_hist_record(&s->m.store_lat, (double)(uv_hrtime() - t0) / 1e9);
}

void chat_record_close(chat_server_t *s, uint16_t code) {
    if (code >= 1000 && code < 1000 + CLOSE_CODE_SLOTS) s->m.closes[code - 1000]++;
    else s->m.closes[CLOSE_CODE_SLOTS]++;
}

void chat_metrics_render(chat_server_t *s, sbuf_t *sb) {
    sbuf_metric(sb, "chat_connections", "gauge", "Open WebSocket connections.", s->n_sessions);
    sbuf_metric(sb, "chat_http_connections", "gauge", "Open connections still speaking HTTP.",
                s->n_peers - s->n_sessions);
    sbuf_metric(sb, "chat_rooms", "gauge", "Chats with at least one member on this node.",
                s->rooms.n);
    sbuf_metric(sb, "chat_websocket_opened_total", "counter", "WebSocket connections accepted.",
                s->m.ws_opened);
    sbuf_metric(sb, "chat_websocket_deflate_total", "counter",
                "WebSocket connections accepted with permessage-deflate.", s->m.ws_deflate);
    sbuf_metric(
        sb, "chat_deflate_frames_total", "counter",
        "Frames compressed (one per event, whatever the number of compressing members it went to).",
        s->m.deflate_frames);
    sbuf_metric(sb, "chat_deflate_deliveries_total", "counter",
                "Compressed frames queued to members.", s->m.deflate_out);
    sbuf_metric(sb, "chat_messages_in_total", "counter", "Chat events received from clients.",
                s->m.messages_in);
    sbuf_metric(sb, "chat_messages_out_total", "counter",
                "Event frames queued to WebSocket members.",
                s->m.messages_out + s->rooms.delivered);
    sbuf_metric(sb, "chat_http_requests_total", "counter", "HTTP requests answered.",
                s->m.http_requests);
    sbuf_metric(sb, "chat_store_errors_total", "counter", "Store requests that failed.",
                s->m.store_errors);
    sbuf_metric(sb, "chat_rate_limited_total", "counter", "Sends refused by --rate-limit.",
                s->m.rate_limited);
    chat__hist_render(sb, "chat_store_latency_seconds", "Time from store submit to completion.",
                      &s->m.store_lat);
    store_metrics(s->store, sb);
    if (s->stream) stream_metrics(s->stream, sb);
    if (s->idle_metrics) {
        chat__hist_render(sb, "chat_loop_turn_seconds",
                          "Work of each event loop turn, its wait for events excluded.",
                          &s->m.loop_busy);
        sbuf_puts(sb, "# HELP chat_loop_idle_seconds_total Time the event loop waited for "
                      "events (busy = elapsed - idle).\n"
                      "# TYPE chat_loop_idle_seconds_total counter\n");
        sbuf_printf(sb, "chat_loop_idle_seconds_total %.6f\n",
                    (double)uv_metrics_idle_time(s->loop) / 1e9);
    }
    sbuf_puts(sb, "# HELP chat_ws_closes_total WebSocket connections closed, by close code "
                  "(1006: dropped without a close frame).\n"
                  "# TYPE chat_ws_closes_total counter\n");
    for (int i = 0; i < CLOSE_CODE_SLOTS; i++)
        if (s->m.closes[i])
            sbuf_printf(sb, "chat_ws_closes_total{code=\"%d\"} %" PRIu64 "\n", 1000 + i,
                        s->m.closes[i]);
    if (s->m.closes[CLOSE_CODE_SLOTS])
        sbuf_printf(sb, "chat_ws_closes_total{code=\"other\"} %" PRIu64 "\n",
                    s->m.closes[CLOSE_CODE_SLOTS]);
}
