/* chat-indexer: wiring only. Reads flags and CHAT_* environment variables (flags win) and
 * runs the Kafka -> OpenSearch / Elasticsearch sink (src/indexer/) until SIGTERM or SIGINT. */
#include <curl/curl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/core.h"
#include "indexer/indexer.h"
#include "search/search_os.h"
#include "stream/stream.h"

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig) {
    (void)sig;
    stop_flag = 1;
}

static void usage(FILE *f) {
    fprintf(
        f,
        "usage: chat-indexer --kafka BROKERS --search URL [options]\n"
        "\n"
        "Every option can also be set in the environment (the flag wins).\n"
        "  --kafka BROKERS       CHAT_KAFKA            host:port[,host:port] (required)\n"
        "  --search URL          CHAT_SEARCH           opensearch://host:port[/ALIAS] or "
        "elasticsearch://host:port[/ALIAS]: the engine, and the alias of the monthly "
        "indices ALIAS-YYYY.MM (default chat-messages) (required)\n"
        "  --topic T             CHAT_KAFKA_TOPIC      topic to index (default chat.events)\n"
        "  --group G             CHAT_INDEXER_GROUP    consumer group; instances of one "
        "group share the partitions (default chat-indexer)\n"
        "  --dlq-topic T         CHAT_INDEXER_DLQ      where poison records go (default "
        "TOPIC.dlq)\n"
        "  --replicas N          CHAT_INDEXER_REPLICAS replicas per index in the template "
        "(default 1; 0 on a single node)\n"
        "  --batch N             CHAT_INDEXER_BATCH    records per _bulk, at most "
        "(default 1000, up to 10000)\n"
        "  --linger-ms N         CHAT_INDEXER_LINGER_MS wait this long for a batch to fill "
        "(default 100)\n"
        "  --metrics-port N      CHAT_INDEXER_METRICS_PORT /metrics port; 0 picks a free "
        "one, logged (default 9108)\n"
        "  --metrics-host ADDR   CHAT_INDEXER_METRICS_HOST /metrics address (default 0.0.0.0)\n"
        "  --log-level L         CHAT_LOG_LEVEL        debug, info, warn, error (default info)\n");
}

static const char *env_or(const char *k, const char *dflt) {
    const char *v = getenv(k);
    return v && *v ? v : dflt;
}

static int parse_int(const char *name, const char *v, long lo, long hi, int *out) {
    char *end;
    long n = strtol(v, &end, 10);
    if (!*v || *end || n < lo || n > hi) {
        fprintf(stderr, "chat-indexer: %s must be %ld..%ld, got '%s'\n", name, lo, hi, v);
        return -1;
    }
    *out = (int)n;
    return 0;
}

int main(int argc, char **argv) {
    indexer_opts_t o = {0};
    o.brokers = env_or("CHAT_KAFKA", NULL);
    o.search_url = env_or("CHAT_SEARCH", NULL);
    o.topic = env_or("CHAT_KAFKA_TOPIC", STREAM_DEFAULT_TOPIC);
    o.group = env_or("CHAT_INDEXER_GROUP", INDEXER_DEFAULT_GROUP);
    o.dlq_topic = env_or("CHAT_INDEXER_DLQ", NULL);
    o.metrics_host = env_or("CHAT_INDEXER_METRICS_HOST", "0.0.0.0");
    const char *replicas = env_or("CHAT_INDEXER_REPLICAS", "1");
    const char *batch = env_or("CHAT_INDEXER_BATCH", "1000");
    const char *linger = env_or("CHAT_INDEXER_LINGER_MS", "100");
    const char *mport = env_or("CHAT_INDEXER_METRICS_PORT", "9108");
    const char *level = env_or("CHAT_LOG_LEVEL", "info");
    enum {
        O_KAFKA = 1,
        O_SEARCH,
        O_TOPIC,
        O_GROUP,
        O_DLQ,
        O_REPL,
        O_BATCH,
        O_LINGER,
        O_MPORT,
        O_MHOST,
        O_LEVEL,
        O_HELP
    };
    static const struct option opts[] = {
        {"kafka", required_argument, 0, O_KAFKA},
        {"search", required_argument, 0, O_SEARCH},
        {"topic", required_argument, 0, O_TOPIC},
        {"group", required_argument, 0, O_GROUP},
        {"dlq-topic", required_argument, 0, O_DLQ},
        {"replicas", required_argument, 0, O_REPL},
        {"batch", required_argument, 0, O_BATCH},
        {"linger-ms", required_argument, 0, O_LINGER},
        {"metrics-port", required_argument, 0, O_MPORT},
        {"metrics-host", required_argument, 0, O_MHOST},
        {"log-level", required_argument, 0, O_LEVEL},
        {"help", no_argument, 0, O_HELP},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case O_KAFKA: o.brokers = optarg; break;
        case O_SEARCH: o.search_url = optarg; break;
        case O_TOPIC: o.topic = optarg; break;
        case O_GROUP: o.group = optarg; break;
        case O_DLQ: o.dlq_topic = optarg; break;
        case O_REPL: replicas = optarg; break;
        case O_BATCH: batch = optarg; break;
        case O_LINGER: linger = optarg; break;
        case O_MPORT: mport = optarg; break;
        case O_MHOST: o.metrics_host = optarg; break;
        case O_LEVEL: level = optarg; break;
        case 'h':
        case O_HELP: usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "chat-indexer: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }
    if (!o.brokers || !o.search_url) {
        fprintf(stderr, "chat-indexer: --kafka and --search are required\n");
        usage(stderr);
        return 2;
    }
    char base[300], alias[SEARCH_OS_ALIAS_MAX + 1];
    const char *why;
    if (search_os_url(o.search_url, base, sizeof base, alias, sizeof alias, &why) < 0) {
        fprintf(stderr, "chat-indexer: --search %s: %s\n", o.search_url, why);
        return 2;
    }
    if (parse_int("--replicas", replicas, 0, 100, &o.replicas) ||
        parse_int("--batch", batch, 1, 10000, &o.batch) ||
        parse_int("--linger-ms", linger, 1, 60000, &o.linger_ms) ||
        parse_int("--metrics-port", mport, 0, 65535, &o.metrics_port))
        return 2;
    int lv = strcmp(level, "debug") == 0   ? CHAT_LOG_DEBUG
             : strcmp(level, "warn") == 0  ? CHAT_LOG_WARN
             : strcmp(level, "error") == 0 ? CHAT_LOG_ERROR
             : strcmp(level, "info") == 0  ? CHAT_LOG_INFO
                                           : -1;
    if (lv < 0) {
        fprintf(stderr, "chat-indexer: --log-level must be debug, info, warn or error\n");
        return 2;
    }
    log_set_level(lv);
    curl_global_init(CURL_GLOBAL_DEFAULT);
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    int rc = indexer_run(&o, &stop_flag);
    curl_global_cleanup();
    return rc;
}
