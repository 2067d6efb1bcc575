/* chatctl: the admin CLI (mint a development token, apply the store's schema).
 *
 * The one idea: parsing and wiring only. Tokens come from jwt_sign and schemas from
 * store_migrate, so chatctl and chatd can never disagree about either; anything smarter
 * than reading options belongs in the library. Exit codes: 0 done, 1 the operation
 * failed, 2 bad usage.
 */
#include <errno.h>
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bus/bus.h"
#include "chat/chat.h"
#include "core/core.h"
#include "store/store.h"
#include "stream/stream.h"

#define DEFAULT_STORE "sqlite:./data/chat.db"
#define DEFAULT_TTL 86400
#define DEFAULT_BUS "redis://127.0.0.1:6379"

static void usage(FILE *f) {
    fputs("usage: chatctl COMMAND [OPTIONS]\n"
          "\n"
          "commands:\n"
          "  token      mint a JWT for a user and print it (HS256 with a secret, RS256 or\n"
          "             ES256 with --key)\n"
          "    --user U          user id, the token's \"sub\" (required; 1..128 bytes,\n"
          "                      no control characters)\n"
          "    --secret S        signing secret (default: $CHAT_JWT_SECRET)\n"
          "    --ttl SECONDS     lifetime in seconds, 0 = never expires (default: 86400)\n"
          "    --chats A,B,...   allow only these chat ids (default: every chat)\n"
          "    --key FILE        sign with this PEM private key instead of a secret: RSA\n"
          "                      (RS256) or EC P-256 (ES256)\n"
          "    --kid ID          put this key id in the header\n"
          "    --iss ISSUER      put this \"iss\" claim in the token\n"
          "    --aud AUDIENCE    put this \"aud\" claim in the token\n"
          "  migrate    create or upgrade the store's schema (safe to repeat)\n"
          "    --store URL       store to migrate (default: $CHAT_STORE, else\n"
          "                      " DEFAULT_STORE ")\n"
          "    --kafka BROKERS   also create the Kafka topic chatd produces to, if missing\n"
          "                      (default: $CHAT_KAFKA; none: no topic)\n"
          "    --kafka-topic T   its name (default: $CHAT_KAFKA_TOPIC, else chat.events)\n"
          "    --kafka-partitions N   partitions of a new topic (default 12)\n"
          "    --kafka-replication N  replicas of a new topic (default 1)\n"
          "  nodes      list the live chatd nodes registered on the bus\n"
          "    --bus URL         redis://[:password@]host:port[/db] (default: $CHAT_BUS,\n"
          "                      else " DEFAULT_BUS ")\n"
          "  help       show this help (also --help, -h; every command takes --help too)\n"
          "\n"
          "exit status: 0 success, 1 the operation failed, 2 bad usage\n",
          f);
}

/* A usage mistake: one line saying what is wrong, then where to look. Returns 2. */
static int usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("chatctl: ", stderr);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\nrun 'chatctl --help' for usage\n", stderr);
    return 2;
}

/* getopt_long's '?' and ':' as a message. opterr is off so every message has one form. */
static int option_error(const char *cmd, int c, char **argv) {
    const char *arg = argv[optind - 1];
    if (c == ':') return usage_error("%s: option '%s' needs a value", cmd, arg);
    if (optopt) return usage_error("%s: unknown option '-%c'", cmd, optopt);
    return usage_error("%s: unknown option '%s'", cmd, arg);
}

/* Mirrors jwt.c's rule for "sub" so the message can name the problem; jwt_sign enforces
 * the same rule regardless. */
static bool user_ok(const char *u) {
    size_t n = strlen(u);
    if (n == 0 || n > 128) return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)u[i] < 0x20 || u[i] == 0x7f) return false;
    return true;
}

static int parse_ttl(const char *s, int64_t *out) {
    if (*s < '0' || *s > '9') return CHAT_EINVAL; /* strtoll would take " +5" and "-5" */
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end) return CHAT_EINVAL;
    *out = v;
    return 0;
}

/* Split "a,b" in place into a NULL-terminated list. An empty item is kept (and then
 * fails validation) rather than silently skipped. Returns NULL on OOM. */
static char **split_chats(char *s) {
    size_t n = 1;
    for (const char *p = s; *p; p++) n += *p == ',';
    char **list = calloc(n + 1, sizeof(*list));
    if (!list) return NULL;
    for (size_t i = 0; i < n; i++) {
        list[i] = s;
        char *comma = strchr(s, ',');
        if (comma) {
            *comma = '\0';
            s = comma + 1;
        }
    }
    return list;
}

static int cmd_token(int argc, char **argv) {
    static const struct option opts[] = {
        {"user", required_argument, NULL, 'u'}, {"secret", required_argument, NULL, 's'},
        {"ttl", required_argument, NULL, 't'},  {"chats", required_argument, NULL, 'c'},
        {"key", required_argument, NULL, 'k'},  {"kid", required_argument, NULL, 'K'},
        {"iss", required_argument, NULL, 'i'},  {"aud", required_argument, NULL, 'a'},
        {"help", no_argument, NULL, 'h'},       {NULL, 0, NULL, 0},
    };
    const char *user = NULL, *secret = NULL, *ttl_arg = NULL, *chats_arg = NULL;
    const char *key_file = NULL, *kid = NULL, *iss = NULL, *aud = NULL;
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'u': user = optarg; break;
        case 's': secret = optarg; break;
        case 't': ttl_arg = optarg; break;
        case 'c': chats_arg = optarg; break;
        case 'k': key_file = optarg; break;
        case 'K': kid = optarg; break;
        case 'i': iss = optarg; break;
        case 'a': aud = optarg; break;
        case 'h': usage(stdout); return 0;
        default: return option_error("token", c, argv);
        }
    }
    if (optind < argc) return usage_error("token: unexpected argument '%s'", argv[optind]);
    if (!user) return usage_error("token: --user is required");
    if (!user_ok(user))
        return usage_error("token: invalid --user: need 1..128 bytes, no control characters");
    int64_t ttl = DEFAULT_TTL;
    if (ttl_arg && parse_ttl(ttl_arg, &ttl) < 0)
        return usage_error("token: invalid --ttl '%s': need a whole number of seconds >= 0",
                           ttl_arg);
    if (key_file && secret) return usage_error("token: give --key or --secret, not both");
    if (!key_file && !secret) secret = getenv("CHAT_JWT_SECRET");
    if (!key_file && (!secret || !*secret))
        return usage_error("no secret: pass --secret or set CHAT_JWT_SECRET (or --key FILE)");

    int rc = 2;
    char *chats_buf = NULL, **chats = NULL, *token = NULL, *pem = NULL;
    size_t pem_len = 0;
    if (key_file) {
        FILE *f = fopen(key_file, "rb");
        pem = malloc(1 << 20);
        if (f && pem) pem_len = fread(pem, 1, 1 << 20, f);
        if (f) fclose(f);
        if (!f || !pem || pem_len == 0 || pem_len == 1 << 20) {
            fprintf(stderr, "chatctl: token: cannot read --key '%s'\n", key_file);
            rc = 1;
            goto out;
        }
    }
    if (chats_arg) {
        chats_buf = strdup(chats_arg);
        chats = chats_buf ? split_chats(chats_buf) : NULL;
        if (!chats) {
            fprintf(stderr, "chatctl: token: %s\n", chat_strerror(CHAT_ENOMEM));
            rc = 1;
            goto out;
        }
        for (size_t i = 0; chats[i]; i++) {
            if (!chat_id_valid(chats[i], strlen(chats[i]))) {
                rc = usage_error("token: invalid chat id '%s' in --chats: need 1..128 of "
                                 "A-Z a-z 0-9 _ . -",
                                 chats[i]);
                goto out;
            }
        }
    }
    if (key_file || kid || iss || aud) {
        char err[160] = "";
        jwt_mint_t m = {.sub = user,
                        .now = (int64_t)time(NULL),
                        .ttl = ttl,
                        .chats = (const char *const *)chats,
                        .secret = secret,
                        .key_pem = pem,
                        .key_pem_len = pem_len,
                        .kid = kid,
                        .iss = iss,
                        .aud = aud};
        token = jwt_sign_ex(&m, err, sizeof err);
        if (!token) {
            fprintf(stderr, "chatctl: token: cannot mint: %s\n", err);
            rc = 1;
            goto out;
        }
    } else {
        token = jwt_sign(user, (int64_t)time(NULL), ttl, (const char *const *)chats, secret);
    }
    if (!token) {
        /* jwt_sign reports every failure as NULL; these are the ones left after the checks
         * above */
        fprintf(stderr, "chatctl: token: cannot mint: --user is not UTF-8, --ttl is too "
                        "large, the token would exceed 8 KiB, or out of memory\n");
        rc = 1;
        goto out;
    }
    printf("%s\n", token);
    rc = fflush(stdout) == 0 ? 0 : 1;
out:
    free(pem);
    free(token);
    free(chats);
    free(chats_buf);
    return rc;
}

/* The options of a command that takes one URL: --NAME URL (else $ENV, else def) and
 * --help. Returns -1 with *url set, or the exit code to return (0 after --help, 2). */
static int parse_url_command(const char *cmd, const char *name, const char *env, const char *def,
                             int argc, char **argv, const char **url) {
    const struct option opts[] = {
        {name, required_argument, NULL, 'U'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    *url = NULL;
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'U': *url = optarg; break;
        case 'h': usage(stdout); return 0;
        default: return option_error(cmd, c, argv);
        }
    }
    if (optind < argc) return usage_error("%s: unexpected argument '%s'", cmd, argv[optind]);
    if (!*url) *url = getenv(env);
    if (!*url || !**url) *url = def;
    return -1;
}

/* A whole number in [lo, hi] for option name, or -1. */
static int parse_int_opt(const char *name, const char *v, int lo, int hi) {
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno || end == v || *end || n < lo || n > hi) {
        usage_error("migrate: invalid --%s '%s': need a whole number %d..%d", name, v, lo, hi);
        return -1;
    }
    return (int)n;
}

static int cmd_migrate(int argc, char **argv) {
    const char *url = NULL, *kafka = getenv("CHAT_KAFKA"), *topic = getenv("CHAT_KAFKA_TOPIC");
    int partitions = STREAM_DEFAULT_PARTITIONS, replication = 1;
    enum { O_STORE = 1, O_KAFKA, O_TOPIC, O_PARTS, O_REPL };
    const struct option opts[] = {
        {"store", required_argument, NULL, O_STORE},
        {"kafka", required_argument, NULL, O_KAFKA},
        {"kafka-topic", required_argument, NULL, O_TOPIC},
        {"kafka-partitions", required_argument, NULL, O_PARTS},
        {"kafka-replication", required_argument, NULL, O_REPL},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case O_STORE: url = optarg; break;
        case O_KAFKA: kafka = optarg; break;
        case O_TOPIC: topic = optarg; break;
        case O_PARTS:
            if ((partitions = parse_int_opt("kafka-partitions", optarg, 1, 10000)) < 0) return 2;
            break;
        case O_REPL:
            if ((replication = parse_int_opt("kafka-replication", optarg, 1, 100)) < 0) return 2;
            break;
        case 'h': usage(stdout); return 0;
        default: return option_error("migrate", c, argv);
        }
    }
    if (optind < argc) return usage_error("migrate: unexpected argument '%s'", argv[optind]);
    if (!url) url = getenv("CHAT_STORE");
    if (!url || !*url) url = DEFAULT_STORE;
    if (!topic || !*topic) topic = STREAM_DEFAULT_TOPIC;

    store_t *s = NULL;
    char err[512] = "", shown[512];
    url_redact(url, shown, sizeof shown);
    int rc = store_open(&s, NULL, url, err, sizeof err);
    if (rc < 0) {
        fprintf(stderr, "chatctl: migrate: %s: %s\n", shown, err[0] ? err : chat_strerror(rc));
        return 1;
    }
    rc = store_migrate(s);
    store_close(s, NULL, NULL);
    if (rc < 0) {
        fprintf(stderr, "chatctl: migrate: %s: %s\n", shown, chat_strerror(rc));
        return 1;
    }
    printf("schema up to date: %s\n", shown);
    if (kafka && *kafka) {
        /* the relay never creates it: the broker may refuse, and a typo must fail loudly */
        bool created;
        rc = stream_create_topic(kafka, topic, partitions, replication, 30000, &created, err,
                                 sizeof err);
        if (rc < 0) {
            fprintf(stderr, "chatctl: migrate: %s\n", err);
            return 1;
        }
        if (created)
            printf("kafka topic created: %s (%d partitions, replication %d)\n", topic, partitions,
                   replication);
        else printf("kafka topic exists: %s\n", topic);
    }
    return fflush(stdout) == 0 ? 0 : 1;
}

/* ---- nodes: ask the bus, print a table ---------------------------------------------- */

typedef struct nodes_run {
    bus_t *bus;
    uv_timer_t timeout, retry;
    int rc, tries;
    bool asked;
} nodes_run_t;

static void nodes_print(void *ud, int status, const bus_node_t *nodes, size_t n);

static void nodes_ask(uv_timer_t *t) {
    nodes_run_t *r = t->data;
    int rc = bus_list_nodes(r->bus, nodes_print, r);
    if (rc < 0) nodes_print(r, rc, NULL, 0);
}

static void nodes_print(void *ud, int status, const bus_node_t *nodes, size_t n) {
    nodes_run_t *r = ud;
    /* The subscriber link may be up before the command link: ask again shortly. */
    if (status == CHAT_EIO && ++r->tries < 20) {
        uv_timer_start(&r->retry, nodes_ask, 100, 0);
        return;
    }
    uv_timer_stop(&r->timeout);
    if (status < 0) {
        fprintf(stderr, "chatctl: nodes: %s\n", chat_strerror(status));
        r->rc = 1;
    } else {
        printf("%-32s  %-28s  %11s  %7s  %-24s  %-24s  %s\n", "ID", "URL", "CONNECTIONS", "NODE_ID",
               "STARTED", "SEEN", "STATE");
        for (size_t i = 0; i < n; i++) {
            char started[25], seen[25];
            time_format_ms(nodes[i].started_at, started);
            time_format_ms(nodes[i].seen_at, seen);
            char nid[12] = "-";
            if (nodes[i].node_id >= 0) snprintf(nid, sizeof nid, "%d", nodes[i].node_id);
            printf("%-32s  %-28s  %11llu  %7s  %-24s  %-24s  %s\n", nodes[i].id, nodes[i].url,
                   (unsigned long long)nodes[i].connections, nid, started, seen,
                   nodes[i].draining ? "draining" : "live");
        }
        r->rc = 0;
    }
    bus_close(r->bus, NULL, NULL);
    uv_close((uv_handle_t *)&r->timeout, NULL);
    uv_close((uv_handle_t *)&r->retry, NULL);
}

static void nodes_state(void *ud, bool up) {
    nodes_run_t *r = ud;
    if (!up || r->asked) return;
    r->asked = true;
    nodes_ask(&r->retry);
}

static void nodes_timeout(uv_timer_t *t) {
    nodes_run_t *r = t->data;
    fprintf(stderr, "chatctl: nodes: no answer from the bus within 5 s\n");
    r->rc = 1;
    uv_timer_stop(&r->retry);
    bus_close(r->bus, NULL, NULL);
    uv_close((uv_handle_t *)&r->timeout, NULL);
    uv_close((uv_handle_t *)&r->retry, NULL);
}

static int cmd_nodes(int argc, char **argv) {
    const char *url;
    int rc0 = parse_url_command("nodes", "bus", "CHAT_BUS", DEFAULT_BUS, argc, argv, &url);
    if (rc0 >= 0) return rc0;
    if (strncmp(url, "redis://", 8) != 0)
        return usage_error("nodes: needs a redis:// bus; '%s' has no registry", url);

    log_set_level(CHAT_LOG_WARN); /* the table is the output; connection chatter is not */
    uv_loop_t *loop = uv_default_loop();
    nodes_run_t r = {.rc = 1};
    char err[256] = "";
    bus_callbacks_t cb = {.on_state = nodes_state, .ud = &r};
    int rc = bus_open(&r.bus, loop, url, &cb, err, sizeof err);
    if (rc < 0) {
        char shown[512];
        url_redact(url, shown, sizeof shown);
        fprintf(stderr, "chatctl: nodes: %s: %s\n", shown, err[0] ? err : chat_strerror(rc));
        return 1;
    }
    uv_timer_init(loop, &r.timeout);
    r.timeout.data = &r;
    uv_timer_init(loop, &r.retry);
    r.retry.data = &r;
    uv_timer_start(&r.timeout, nodes_timeout, 5000, 0);
    uv_run(loop, UV_RUN_DEFAULT);
    uv_loop_close(loop);
    return r.rc;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fputs("chatctl: missing command\n\n", stderr);
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    opterr = 0;
    /* each command parses its own options, with its name in argv[0] */
    if (strcmp(cmd, "token") == 0) return cmd_token(argc - 1, argv + 1);
    if (strcmp(cmd, "migrate") == 0) return cmd_migrate(argc - 1, argv + 1);
    if (strcmp(cmd, "nodes") == 0) return cmd_nodes(argc - 1, argv + 1);
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        usage(stdout);
        return 0;
    }
    if (cmd[0] == '-') return usage_error("unknown option '%s'", cmd);
    return usage_error("unknown command '%s'", cmd);
}
