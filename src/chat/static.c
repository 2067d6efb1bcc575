/* static: the web client's files, read once at start so that serving them never touches
 * the disk from the loop. */
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "chat_internal.h"

/* ---- static files --------------------------------------------------------------------- */

static const char *chat__mime(const char *name) {
    const char *dot = strrchr(name, '.');
    if (!dot) return "application/octet-stream";
    static const struct {
        const char *ext, *type;
    } types[] = {
        {".html", "text/html; charset=utf-8"},
        {".js", "text/javascript; charset=utf-8"},
        {".mjs", "text/javascript; charset=utf-8"},
        {".css", "text/css; charset=utf-8"},
        {".json", "application/json"},
        {".svg", "image/svg+xml"},
        {".png", "image/png"},
        {".ico", "image/x-icon"},
        {".txt", "text/plain; charset=utf-8"},
        {".webmanifest", "application/manifest+json"},
    };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++)
        if (strcmp(dot, types[i].ext) == 0) return types[i].type;
    return "application/octet-stream";
}

/* The web client is small and fixed: read it once at start so serving it never touches
 * the disk from the loop. Two levels deep is all the page uses. */
void chat_static_load(chat_server_t *s, const char *dir, const char *prefix, int depth) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[4096], url[1024];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        snprintf(url, sizeof url, "%s/%s", prefix, e->d_name);
        struct stat st;
        if (stat(path, &st) < 0) continue;
        if (S_ISDIR(st.st_mode)) {
            if (depth < 2) chat_static_load(s, path, url, depth + 1);
            continue;
        }
        if (!S_ISREG(st.st_mode) || st.st_size > (8 << 20)) continue;
        FILE *f = fopen(path, "rb");
        if (!f) continue;
        buf_t *b = buf_new((size_t)st.st_size);
        char *upath = NULL;
        if (b && fread(b->data, 1, (size_t)st.st_size, f) == (size_t)st.st_size &&
            (upath = strdup(url))) {
            /* a file without its path would make every lookup's strlen read NULL */
            b->len = (size_t)st.st_size;
            static_file_t *nf = realloc(s->files, sizeof(*nf) * (s->n_files + 1));
            if (nf) {
                s->files = nf;
                s->files[s->n_files++] =
                    (static_file_t){.path = upath, .type = chat__mime(e->d_name), .body = b};
                b = NULL;
                upath = NULL;
            }
        }
        if (b) log_warn("static_file_skipped path=%s", path);
        free(upath);
        buf_unref(b);
        fclose(f);
    }
    closedir(d);
}

void chat_static_free(chat_server_t *s) {
    for (size_t i = 0; i < s->n_files; i++) {
        free(s->files[i].path);
        buf_unref(s->files[i].body);
    }
    free(s->files);
    s->files = NULL;
    s->n_files = 0;
}

const static_file_t *chat_static_find(chat_server_t *s, const char *path, size_t n) {
    if (n == 1 && path[0] == '/') {
        path = "/index.html";
        n = strlen(path);
    }
    for (size_t i = 0; i < s->n_files; i++)
        if (strlen(s->files[i].path) == n && memcmp(s->files[i].path, path, n) == 0)
            return &s->files[i];
    return NULL;
}
