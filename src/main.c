/* chatd: wiring only. Reads flags and CHAT_* environment variables (flags win), starts
 * the chat server on a libuv loop, turns SIGTERM/SIGINT into a graceful shutdown and, with
 * TLS, SIGHUP into a reload of the certificate and key. */
#include <errno.h>
#include <getopt.h>
#include <libgen.h>
#include <limits.h>
#include <openssl/rand.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "chat/chat.h"
#include "core/core.h"

static void usage(FILE *f) {
    fprintf(
        f, "usage: chatd [options]\n"
           "\n"
           "Every option can also be set in the environment (the flag wins).\n"
           "  --port N                 CHAT_PORT                listen port; 0 picks a free one "
           "(default 8000)\n"
           "  --host ADDR              CHAT_HOST                listen address (default 0.0.0.0)\n"
           "  --store URL              CHAT_STORE               message store (default "
           "sqlite:./data/chat.db)\n"
           "  --bus URL                CHAT_BUS                 event bus between nodes (default "
           "local)\n"
           "  --search NAME            CHAT_SEARCH              full-text search: sqlite (FTS5 "
           "in the SQLite store), scan (bounded scan of the history), or "
           "opensearch://host:port[/ALIAS] / elasticsearch://host:port[/ALIAS] (the index "
           "chat-indexer fills) (default: sqlite with a SQLite store, else scan)\n"
           "  --public-url URL         CHAT_PUBLIC_URL          this node's WebSocket base URL "
           "for /api/connect (default ws://HOST:PORT, wss:// with TLS)\n"
           "  --tls-cert FILE          CHAT_TLS_CERT            PEM certificate (chain): HTTPS and "
           "WSS on the port, TLS 1.2 and 1.3; reloaded on SIGHUP (default: plain HTTP)\n"
           "  --tls-key FILE           CHAT_TLS_KEY             PEM private key of --tls-cert "
           "(both or neither)\n"
           "  --jwt-secret S           CHAT_JWT_SECRET          HS256 secret for tokens "
           "(required unless --dev or a public key or JWKS is given)\n"
           "  --jwt-public-key FILE    CHAT_JWT_PUBLIC_KEY      PEM public key (RSA: RS256, EC "
           "P-256: ES256); repeat the flag for several (env: files separated by ':')\n"
           "  --jwks-url URL           CHAT_JWKS_URL            JWKS of an identity provider, "
           "fetched at start, every --jwks-refresh and on an unknown kid\n"
           "  --jwks-refresh SECONDS   CHAT_JWKS_REFRESH        refetch the JWKS this often "
           "(default 300)\n"
           "  --jwks-min-interval SECONDS CHAT_JWKS_MIN_INTERVAL  least time between two JWKS "
           "fetches (default 30)\n"
           "  --jwt-issuer ISS         CHAT_JWT_ISSUER          tokens must carry this iss "
           "(default: not checked)\n"
           "  --jwt-audience AUD       CHAT_JWT_AUDIENCE        tokens' aud must be or contain "
           "this (default: not checked)\n"
           "  --dev                    CHAT_DEV=1               development mode: generate a "
           "secret and print how to mint a token\n"
           "  --max-message-bytes N    CHAT_MAX_MESSAGE_BYTES   largest message, WebSocket frame "
           "or REST body (default 65536)\n"
           "  --max-outbound-bytes N   CHAT_MAX_OUTBOUND_BYTES  output queued per connection "
           "before a slow client is cut off (default 4194304)\n"
           "  --max-body-bytes N       CHAT_MAX_BODY_BYTES      largest HTTP request body "
           "(default 1048576)\n"
           "  --idle-timeout SECONDS   CHAT_IDLE_TIMEOUT        ping after this much silence, "
           "close if unanswered (default 60)\n"
           "  --header-timeout SECONDS CHAT_HEADER_TIMEOUT      a request head must arrive within "
           "this; 408 beyond (default 10)\n"
           "  --max-connections N      CHAT_MAX_CONNECTIONS     open connections; beyond, 503 "
           "(default 0: the open-files limit less 128)\n"
           "  --max-connections-per-ip N CHAT_MAX_CONNECTIONS_PER_IP  open connections from one "
           "address; beyond, 503 (default 0: no limit)\n"
           "  --replay-limit N         CHAT_REPLAY_LIMIT        most missed messages replayed for "
           "?since= (default 1000)\n"
           "  --node-id N              CHAT_NODE_ID             0..1023, unique per node: part "
           "of every message id (default: with a Redis bus a free one, leased; else 0)\n"
           "  --web-root DIR           CHAT_WEB_ROOT            static files served at / "
           "(default: web/ beside the binary's directory, else ./web)\n"
           "  --kafka BROKERS          CHAT_KAFKA               host:port[,host:port]: every "
           "stored change to Kafka, none lost (default: none)\n"
           "  --kafka-topic T          CHAT_KAFKA_TOPIC         the topic (default chat.events)\n"
           "  --outbox-max-rows N      CHAT_OUTBOX_MAX_ROWS     events waiting for Kafka beyond "
           "which sends are refused (default 1000000; 0: no limit)\n"
           "  --rate-limit MSGS_PER_S  CHAT_RATE_LIMIT          sends (messages, edits, deletes, "
           "typing) "
           "a second per user on this node, WebSocket and REST together; beyond, rate_limited "
           "or 429 (default 0: no limit)\n"
           "  --rate-burst N           CHAT_RATE_BURST          sends a user may make at once "
           "before --rate-limit applies (default 0: twice the rate, at least 1)\n"
           "  --compression on|off     CHAT_COMPRESSION         permessage-deflate with clients "
           "that offer it (browsers do): events compressed once per chat (default on)\n"
           "  --presence-grace-ms MS   CHAT_PRESENCE_GRACE_MS   a user whose last connection to "
           "a chat closed is still online this long: a reconnect within it is no leave and join "
           "(default 5000; 0: leave at once)\n"
           "  --presence-max-members N CHAT_PRESENCE_MAX_MEMBERS  presence:join/leave are not "
           "sent in a chat with more users online (default 1000; 0: never sent)\n"
           "  --log-level LEVEL        CHAT_LOG_LEVEL           debug, info, warn or error "
           "(default info)\n"
           "  --help                                            this text\n");
}

static const char *env_or(const char *name, const char *def) {
    const char *v = getenv(name);
    return v && *v ? v : def;
}

static int parse_size(const char *what, const char *v, size_t *out) {
    char *end;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    if (errno || end == v || *end || n == 0) {
        fprintf(stderr, "chatd: %s must be a positive integer, got '%s'\n", what, v);
        return -1;
    }
    *out = (size_t)n;
    return 0;
}

/* A count where 0 is allowed (it means "no limit" or "automatic"). */
static int parse_count(const char *what, const char *v, size_t *out) {
    char *end;
    errno = 0;
    unsigned long long n = strtoull(v, &end, 10);
    if (errno || end == v || *end || v[0] == '-') {
        fprintf(stderr, "chatd: %s must be an integer >= 0, got '%s'\n", what, v);
        return -1;
    }
    *out = (size_t)n;
    return 0;
}

static uv_signal_t sig_term, sig_int, sig_hup;
static tls_ctx_t *tls; /* --tls-cert and --tls-key, if given */
static chat_server_t *server;
static jwks_t *jwks; /* public keys and JWKS, if configured */
/* the --jwt-public-key files until jwks_open has read them (static: an early exit on a
 * usage error is not a leak) */
static const char **pem_files;
static char *pem_env;
static bool clustered; /* a bus other than local: SIGTERM is a restart, not an end */
static int exit_status;
static bool starting = true; /* chat_server_start has not returned */

static void on_stopped(void *arg) {
    (void)arg;
    uv_close((uv_handle_t *)&sig_term, NULL);
    uv_close((uv_handle_t *)&sig_int, NULL);
    if (tls) uv_close((uv_handle_t *)&sig_hup, NULL);
    server = NULL;
    tls_ctx_free(tls); /* connections are gone: this frees the last context */
    tls = NULL;
    jwks_close(jwks); /* after the server: nothing verifies tokens any more */
    jwks = NULL;
    log_info("stopped");
}

static void on_signal(uv_signal_t *h, int signum) {
    (void)h;
    if (!server) {
        if (starting) { /* waiting for the bus to lease a node id: nothing to drain */
            fprintf(stderr, "chatd: %s while starting: exiting\n",
                    signum == SIGTERM ? "SIGTERM" : "SIGINT");
            fflush(stderr);
            _exit(1);
        }
        return;
    }
    /* In a cluster SIGTERM drains the node: clients get 1012 (service restart) and
     * reconnect to another node through /api/connect. Alone, or on SIGINT, it is 1001. */
    uint16_t code = clustered && signum == SIGTERM ? 1012 : 1001;
    log_info("signal %s: shutting down", signum == SIGTERM ? "SIGTERM" : "SIGINT");
    chat_server_shutdown(server, code, on_stopped, NULL);
}

/* SIGHUP: a renewed certificate (certbot, cert-manager) is picked up without a restart. The
 * files are small and local: read on the loop, once per signal. */
static void on_hup(uv_signal_t *h, int signum) {
    (void)h;
    (void)signum;
    char err[512];
    if (tls_ctx_reload(tls, err, sizeof err) < 0)
        log_error("tls_reload_failed error=%s kept=previous", LOG_STR(err));
    else log_info("tls_reloaded");
}

/* The node cannot go on (it lost its node id): drain as on SIGTERM, then exit 1. */
static void on_fatal(void *arg, const char *why) {
    (void)arg;
    fprintf(stderr, "chatd: fatal: %s: draining and exiting\n", why);
    exit_status = 1;
    if (server) chat_server_shutdown(server, 1012, on_stopped, NULL);
}

static const char *find_web_root(const char *argv0, char *buf, size_t n) {
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    struct stat st;
    if (len > 0) {
        exe[len] = 0;
        snprintf(buf, n, "%s/../web", dirname(exe));
        if (stat(buf, &st) == 0 && S_ISDIR(st.st_mode)) return buf;
    }
    (void)argv0;
    if (stat("web", &st) == 0 && S_ISDIR(st.st_mode)) return "web";
    return NULL;
}

int main(int argc, char **argv) {
    chat_config_t cfg = {0};
    const char *port = env_or("CHAT_PORT", "8000");
    cfg.host = env_or("CHAT_HOST", "0.0.0.0");
    cfg.store_url = env_or("CHAT_STORE", "sqlite:./data/chat.db");
    cfg.bus_url = env_or("CHAT_BUS", "local");
    cfg.search_url = env_or("CHAT_SEARCH", NULL);
    cfg.jwt_secret = env_or("CHAT_JWT_SECRET", NULL);
    const char *dev = env_or("CHAT_DEV", "0");
    cfg.dev = strcmp(dev, "1") == 0 || strcmp(dev, "true") == 0;
    const char *max_msg = env_or("CHAT_MAX_MESSAGE_BYTES", "65536");
    const char *max_out = env_or("CHAT_MAX_OUTBOUND_BYTES", "4194304");
    const char *max_body = env_or("CHAT_MAX_BODY_BYTES", "1048576");
    const char *idle = env_or("CHAT_IDLE_TIMEOUT", "60");
    const char *head_to = env_or("CHAT_HEADER_TIMEOUT", "10");
    const char *max_conns = env_or("CHAT_MAX_CONNECTIONS", "0");
    const char *max_ip = env_or("CHAT_MAX_CONNECTIONS_PER_IP", "0");
    const char *node = env_or("CHAT_NODE_ID", NULL);
    const char *replay = env_or("CHAT_REPLAY_LIMIT", "1000");
    cfg.web_root = env_or("CHAT_WEB_ROOT", NULL);
    cfg.public_url = env_or("CHAT_PUBLIC_URL", NULL);
    const char *tls_cert = env_or("CHAT_TLS_CERT", NULL);
    const char *tls_key = env_or("CHAT_TLS_KEY", NULL);
    const char *level = env_or("CHAT_LOG_LEVEL", "info");
    jwks_config_t jk = {0};
    jk.url = env_or("CHAT_JWKS_URL", NULL);
    jk.issuer = env_or("CHAT_JWT_ISSUER", NULL);
    jk.audience = env_or("CHAT_JWT_AUDIENCE", NULL);
    const char *jwks_refresh = env_or("CHAT_JWKS_REFRESH", "300");
    const char *jwks_min = env_or("CHAT_JWKS_MIN_INTERVAL", "30");
    /* public key files: repeated flags, else CHAT_JWT_PUBLIC_KEY split at ':' (as PATH) */
    pem_files = calloc((size_t)argc + 1, sizeof(*pem_files));
    size_t n_pem = 0, n_pem_flags = 0;
    if (!pem_files) return 1;

    cfg.kafka_brokers = env_or("CHAT_KAFKA", NULL);
    cfg.kafka_topic = env_or("CHAT_KAFKA_TOPIC", "chat.events");
    const char *outbox_max = env_or("CHAT_OUTBOX_MAX_ROWS", "1000000");
    const char *rate_limit = env_or("CHAT_RATE_LIMIT", "0");
    const char *rate_burst = env_or("CHAT_RATE_BURST", "0");
    const char *compression = env_or("CHAT_COMPRESSION", "on");
    const char *pres_grace = env_or("CHAT_PRESENCE_GRACE_MS", "5000");
    const char *pres_max = env_or("CHAT_PRESENCE_MAX_MEMBERS", "1000");

    enum {
        O_PORT = 1,
        O_HOST,
        O_PUBURL,
        O_STORE,
        O_BUS,
        O_SECRET,
        O_DEV,
        O_MAXMSG,
        O_MAXOUT,
        O_MAXBODY,
        O_IDLE,
        O_REPLAY,
        O_NODE,
        O_WEB,
        O_LEVEL,
        O_PUBKEY,
        O_JWKS,
        O_JWKS_REFRESH,
        O_JWKS_MIN,
        O_ISSUER,
        O_AUDIENCE,
        O_HELP,
        O_HEADTO,
        O_MAXCONN,
        O_MAXIP,
        O_KAFKA,
        O_KTOPIC,
        O_OBMAX,
        O_SEARCH,
        O_RATE,
        O_BURST,
        O_TLSCERT,
        O_TLSKEY,
        O_COMPRESS,
        O_PGRACE,
        O_PMAX
    };
    static const struct option opts[] = {
        {"port", required_argument, 0, O_PORT},
        {"host", required_argument, 0, O_HOST},
        {"public-url", required_argument, 0, O_PUBURL},
        {"tls-cert", required_argument, 0, O_TLSCERT},
        {"tls-key", required_argument, 0, O_TLSKEY},
        {"store", required_argument, 0, O_STORE},
        {"bus", required_argument, 0, O_BUS},
        {"search", required_argument, 0, O_SEARCH},
        {"jwt-secret", required_argument, 0, O_SECRET},
        {"dev", no_argument, 0, O_DEV},
        {"max-message-bytes", required_argument, 0, O_MAXMSG},
        {"max-outbound-bytes", required_argument, 0, O_MAXOUT},
        {"max-body-bytes", required_argument, 0, O_MAXBODY},
        {"idle-timeout", required_argument, 0, O_IDLE},
        {"header-timeout", required_argument, 0, O_HEADTO},
        {"max-connections", required_argument, 0, O_MAXCONN},
        {"max-connections-per-ip", required_argument, 0, O_MAXIP},
        {"replay-limit", required_argument, 0, O_REPLAY},
        {"node-id", required_argument, 0, O_NODE},
        {"web-root", required_argument, 0, O_WEB},
        {"log-level", required_argument, 0, O_LEVEL},
        {"jwt-public-key", required_argument, 0, O_PUBKEY},
        {"jwks-url", required_argument, 0, O_JWKS},
        {"jwks-refresh", required_argument, 0, O_JWKS_REFRESH},
        {"jwks-min-interval", required_argument, 0, O_JWKS_MIN},
        {"jwt-issuer", required_argument, 0, O_ISSUER},
        {"jwt-audience", required_argument, 0, O_AUDIENCE},
        {"kafka", required_argument, 0, O_KAFKA},
        {"kafka-topic", required_argument, 0, O_KTOPIC},
        {"outbox-max-rows", required_argument, 0, O_OBMAX},
        {"rate-limit", required_argument, 0, O_RATE},
        {"rate-burst", required_argument, 0, O_BURST},
        {"compression", required_argument, 0, O_COMPRESS},
        {"presence-grace-ms", required_argument, 0, O_PGRACE},
        {"presence-max-members", required_argument, 0, O_PMAX},
        {"help", no_argument, 0, O_HELP},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (c) {
        case O_PORT: port = optarg; break;
        case O_HOST: cfg.host = optarg; break;
        case O_PUBURL: cfg.public_url = optarg; break;
        case O_TLSCERT: tls_cert = optarg; break;
        case O_TLSKEY: tls_key = optarg; break;
        case O_STORE: cfg.store_url = optarg; break;
        case O_BUS: cfg.bus_url = optarg; break;
        case O_SEARCH: cfg.search_url = optarg; break;
        case O_SECRET: cfg.jwt_secret = optarg; break;
        case O_DEV: cfg.dev = true; break;
        case O_MAXMSG: max_msg = optarg; break;
        case O_MAXOUT: max_out = optarg; break;
        case O_MAXBODY: max_body = optarg; break;
        case O_IDLE: idle = optarg; break;
        case O_HEADTO: head_to = optarg; break;
        case O_MAXCONN: max_conns = optarg; break;
        case O_MAXIP: max_ip = optarg; break;
        case O_REPLAY: replay = optarg; break;
        case O_NODE: node = optarg; break;
        case O_WEB: cfg.web_root = optarg; break;
        case O_LEVEL: level = optarg; break;
        case O_PUBKEY: pem_files[n_pem_flags++] = optarg; break;
        case O_JWKS: jk.url = optarg; break;
        case O_JWKS_REFRESH: jwks_refresh = optarg; break;
        case O_JWKS_MIN: jwks_min = optarg; break;
        case O_ISSUER: jk.issuer = optarg; break;
        case O_AUDIENCE: jk.audience = optarg; break;
        case O_KAFKA: cfg.kafka_brokers = optarg; break;
        case O_KTOPIC: cfg.kafka_topic = optarg; break;
        case O_OBMAX: outbox_max = optarg; break;
        case O_RATE: rate_limit = optarg; break;
        case O_BURST: rate_burst = optarg; break;
        case O_COMPRESS: compression = optarg; break;
        case O_PGRACE: pres_grace = optarg; break;
        case O_PMAX: pres_max = optarg; break;
        case 'h':
        case O_HELP: usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "chatd: unexpected argument '%s'\n", argv[optind]);
        return 2;
    }

    char *end;
    long p = strtol(port, &end, 10);
    if (*end || end == port || p < 0 || p > 65535) {
        fprintf(stderr, "chatd: port must be 0..65535, got '%s'\n", port);
        return 2;
    }
    cfg.port = (int)p;
    if (strcmp(compression, "on") == 0) {
        cfg.compression = true;
    } else if (strcmp(compression, "off") != 0) {
        fprintf(stderr, "chatd: compression must be on or off, got '%s'\n", compression);
        return 2;
    }
    if (parse_size("max-message-bytes", max_msg, &cfg.max_message_bytes) < 0 ||
        parse_size("max-outbound-bytes", max_out, &cfg.max_outbound_bytes) < 0 ||
        parse_size("max-body-bytes", max_body, &cfg.max_body_bytes) < 0)
        return 2;
    size_t replay_limit;
    if (parse_size("replay-limit", replay, &replay_limit) < 0) return 2;
    if (replay_limit > 100000) {
        fprintf(stderr, "chatd: replay-limit must be at most 100000\n");
        return 2;
    }
    cfg.replay_limit = (unsigned)replay_limit;
    double idle_s = strtod(idle, &end);
    if (*end || end == idle || !(idle_s > 0) || idle_s > 86400) {
        fprintf(stderr, "chatd: idle-timeout must be seconds > 0, got '%s'\n", idle);
        return 2;
    }
    cfg.idle_timeout_ms = (unsigned)(idle_s * 1000);
    if (cfg.idle_timeout_ms == 0) cfg.idle_timeout_ms = 1;
    double head_s = strtod(head_to, &end);
    if (*end || end == head_to || !(head_s > 0) || head_s > 3600) {
        fprintf(stderr, "chatd: header-timeout must be seconds > 0, got '%s'\n", head_to);
        return 2;
    }
    cfg.header_timeout_ms = (unsigned)(head_s * 1000);
    if (cfg.header_timeout_ms == 0) cfg.header_timeout_ms = 1;
    if (parse_count("max-connections", max_conns, &cfg.max_connections) < 0 ||
        parse_count("max-connections-per-ip", max_ip, &cfg.max_connections_per_ip) < 0)
        return 2;
    size_t obmax;
    if (parse_count("outbox-max-rows", outbox_max, &obmax) < 0) return 2;
    cfg.outbox_max_rows = obmax;
    cfg.rate_limit = strtod(rate_limit, &end);
    if (*end || end == rate_limit || !(cfg.rate_limit >= 0) || cfg.rate_limit > 1e6) {
        fprintf(stderr,
                "chatd: rate-limit must be sends a second, 0..1000000 (0: no limit), "
                "got '%s'\n",
                rate_limit);
        return 2;
    }
    size_t burst;
    if (parse_count("rate-burst", rate_burst, &burst) < 0) return 2;
    if (burst > 1000000) {
        fprintf(stderr, "chatd: rate-burst must be at most 1000000\n");
        return 2;
    }
    cfg.rate_burst = (double)burst;
    size_t grace;
    if (parse_count("presence-grace-ms", pres_grace, &grace) < 0 ||
        parse_count("presence-max-members", pres_max, &cfg.presence_max_members) < 0)
        return 2;
    if (grace > 600000) {
        fprintf(stderr, "chatd: presence-grace-ms must be at most 600000\n");
        return 2;
    }
    cfg.presence_grace_ms = (unsigned)grace;
    if (cfg.kafka_brokers && !*cfg.kafka_brokers) cfg.kafka_brokers = NULL;
    if (!*cfg.kafka_topic) {
        fprintf(stderr, "chatd: kafka-topic must not be empty\n");
        return 2;
    }
    cfg.node_id_auto = !node;
    long nid = node ? strtol(node, &end, 10) : 0;
    if (node && (*end || end == node || nid < 0 || nid > 1023)) {
        fprintf(stderr, "chatd: node-id must be 0..1023, got '%s'\n", node);
        return 2;
    }
    cfg.node_id = (unsigned)nid;
    cfg.on_fatal = on_fatal;
    static const char *levels[] = {"debug", "info", "warn", "error"};
    cfg.log_level = -1;
    for (int i = 0; i < 4; i++)
        if (strcmp(level, levels[i]) == 0) cfg.log_level = i;
    if (cfg.log_level < 0) {
        fprintf(stderr, "chatd: log-level must be debug, info, warn or error\n");
        return 2;
    }
    log_set_level(cfg.log_level);
    if (tls_cert && !*tls_cert) tls_cert = NULL;
    if (tls_key && !*tls_key) tls_key = NULL;
    if (!tls_cert != !tls_key) {
        fprintf(stderr,
                "chatd: --tls-cert and --tls-key go together (CHAT_TLS_CERT and "
                "CHAT_TLS_KEY): %s is missing\n",
                tls_cert ? "the key" : "the certificate");
        return 2;
    }
    if (tls_cert) {
        char terr[512];
        if (!(tls = tls_ctx_new(tls_cert, tls_key, terr, sizeof terr))) {
            fprintf(stderr, "chatd: %s\n", terr);
            return 2;
        }
        cfg.tls = tls;
    }

    n_pem = n_pem_flags;
    const char *pem_list = env_or("CHAT_JWT_PUBLIC_KEY", NULL);
    if (!n_pem && pem_list) {
        if (!(pem_env = strdup(pem_list))) return 1;
        pem_files = realloc(pem_files, (strlen(pem_env) + 2) * sizeof(*pem_files));
        if (!pem_files) return 1;
        for (char *save = NULL, *f = strtok_r(pem_env, ":", &save); f;
             f = strtok_r(NULL, ":", &save))
            pem_files[n_pem++] = f;
    }
    jk.pem_files = pem_files;
    jk.n_pem = n_pem;
    size_t jr, jm;
    if (parse_size("jwks-refresh", jwks_refresh, &jr) < 0 ||
        parse_size("jwks-min-interval", jwks_min, &jm) < 0)
        return 2;
    if (jr > 86400 * 7 || jm > 86400) {
        fprintf(stderr, "chatd: jwks-refresh must be at most 604800 and jwks-min-interval at "
                        "most 86400 seconds\n");
        return 2;
    }
    jk.refresh_s = (unsigned)jr;
    jk.min_interval_s = (unsigned)jm;
    bool public_keys = n_pem || jk.url;

    char secret[65];
    bool generated = false;
    if ((!cfg.jwt_secret || !*cfg.jwt_secret) && !(public_keys && !cfg.dev)) {
        if (!cfg.dev) {
            fprintf(stderr, "chatd: no JWT secret: set CHAT_JWT_SECRET or pass --jwt-secret, "
                            "or --jwt-public-key / --jwks-url (or run with --dev to generate "
                            "one)\n");
            return 2;
        }
        unsigned char raw[32];
        if (RAND_bytes(raw, sizeof raw) != 1) {
            fprintf(stderr, "chatd: cannot generate a secret\n");
            return 1;
        }
        for (int i = 0; i < 32; i++) snprintf(secret + 2 * i, 3, "%02x", raw[i]);
        cfg.jwt_secret = secret;
        generated = true;
    }
    if (cfg.dev) {
        /* dev mode always says how to get in; `make run` keeps its secret in data/ so that
         * tokens (and the web page's sign-in) survive a restart */
        char ctl[PATH_MAX];
        snprintf(ctl, sizeof ctl, "%s", argv[0]);
        fprintf(stderr,
                "\n  dev mode: JWT secret %s%s\n"
                "  mint a token:  %s/chatctl token --user alice --secret %s\n"
                "  or open the web page and sign in with any name\n\n",
                cfg.jwt_secret, generated ? " (generated for this run)" : "", dirname(ctl),
                cfg.jwt_secret);
    }
    char webbuf[PATH_MAX];
    if (!cfg.web_root) cfg.web_root = find_web_root(argv[0], webbuf, sizeof webbuf);

    clustered = strcmp(cfg.bus_url, "local") != 0;
    srand((unsigned)time_now_ms() ^ (unsigned)getpid()); /* ties in /api/connect */
    signal(SIGPIPE, SIG_IGN);
    uv_loop_t *loop = uv_default_loop();
    /* Before anything can announce that we listen: a supervisor may signal right away. */
    uv_signal_init(loop, &sig_term);
    uv_signal_init(loop, &sig_int);
    uv_signal_start(&sig_term, on_signal, SIGTERM);
    uv_signal_start(&sig_int, on_signal, SIGINT);
    if (tls) { /* without TLS there is nothing to reload: SIGHUP keeps its default */
        uv_signal_init(loop, &sig_hup);
        uv_signal_start(&sig_hup, on_hup, SIGHUP);
    }
    char err[256] = "";
    int rc = 0;
    if (public_keys || jk.issuer || jk.audience) {
        jk.secret = cfg.jwt_secret;
        rc = jwks_open(&cfg.jwks, loop, &jk, err, sizeof err);
        if (rc < 0) {
            fprintf(stderr, "chatd: %s\n", err);
            return 2;
        }
        jwks = cfg.jwks;
    }
    free(pem_files); /* jwks_open has read the files */
    free(pem_env);
    pem_files = NULL;
    pem_env = NULL;
    rc = chat_server_start(&server, loop, &cfg, err, sizeof err);
    starting = false;
    if (rc < 0) {
        jwks_close(jwks);
        jwks = NULL;
        uv_close((uv_handle_t *)&sig_term, NULL);
        uv_close((uv_handle_t *)&sig_int, NULL);
        if (tls) uv_close((uv_handle_t *)&sig_hup, NULL);
        uv_run(loop, UV_RUN_DEFAULT);
        tls_ctx_free(tls);
        fprintf(stderr, "chatd: cannot start: %s (%s)\n", err[0] ? err : chat_strerror(rc),
                chat_strerror(rc));
        return 1;
    }
    char store_shown[512], bus_shown[512];
    url_redact(cfg.store_url, store_shown, sizeof store_shown);
    url_redact(cfg.bus_url, bus_shown, sizeof bus_shown);
    log_info("listening host=%s port=%d store=%s bus=%s node=%u tls=%d%s", cfg.host,
             chat_server_port(server), LOG_STR(store_shown), LOG_STR(bus_shown),
             chat_server_node_id(server), tls ? 1 : 0, cfg.dev ? " dev=1" : "");
    uv_run(loop, UV_RUN_DEFAULT);
    rc = uv_loop_close(loop);
    if (rc < 0) log_warn("loop_close error=%s", uv_strerror(rc));
    return exit_status;
}
