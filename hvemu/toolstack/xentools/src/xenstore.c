/* xenstore.c -- hvemu's drop-in libxenstore.so.4, speaking xenstored's wire protocol (public/io/xs_wire.h)
 * to the hypervisor's own xenstore on $HVEMU_RUN_DIR/xenstored.sock.
 *
 * As Xen's library, a reader thread takes every message off the socket:
 * replies go to the one request in flight, watch events to a queue, and a
 * byte to the pipe xs_fileno returns, so that poll() says when
 * xs_read_watch has something.  Transactions are not modelled (XBT_NULL only).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "hvemu_glue.h"

typedef uint32_t xs_transaction_t;
#define XBT_NULL 0u

enum { XS_DIRECTORY = 1, XS_READ = 2, XS_WATCH = 4, XS_UNWATCH = 5, XS_GET_DOMAIN_PATH = 10, XS_WRITE = 11,
       XS_RM = 13, XS_WATCH_EVENT = 15, XS_ERROR = 16, XS_IS_DOMAIN_INTRODUCED = 17 };
#define PAYLOAD_MAX 4096u

struct hdr { uint32_t type, req_id, tx_id, len; };
struct event { struct event *next; uint32_t len; char body[]; };

struct xs_handle {
    int fd;
    int pipe[2];
    pthread_t reader;
    pthread_mutex_t lock;   /* everything below */
    pthread_cond_t cond;
    pthread_mutex_t request; /* one request in flight */
    struct event *head, *tail;
    char *reply;            /* the reply of the request in flight, once it came */
    uint32_t reply_type, reply_len;
    int dead;
    uint32_t req_id;
};

static int read_full(int fd, void *buf, size_t n)
{
    char *p = buf;
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n) {
        ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static void *reader_main(void *arg)
{
    struct xs_handle *h = arg;
    for (;;) {
        struct hdr hd;
        if (read_full(h->fd, &hd, sizeof(hd)) < 0 || hd.len > PAYLOAD_MAX)
            break;
        char *body = malloc(hd.len + 1);
        if (!body || read_full(h->fd, body, hd.len) < 0) {
            free(body);
            break;
        }
        body[hd.len] = '\0';
        pthread_mutex_lock(&h->lock);
        if (hd.type == XS_WATCH_EVENT) {
            struct event *ev = malloc(sizeof(*ev) + hd.len + 1);
            if (ev) {
                ev->next = NULL;
                ev->len = hd.len;
                memcpy(ev->body, body, hd.len + 1);
                if (h->tail)
                    h->tail->next = ev;
                else
                    h->head = ev;
                h->tail = ev;
                char b = 'w';
                if (write(h->pipe[1], &b, 1) < 0) { /* the pipe is full: poll() already says readable */
                }
            }
            free(body);
        } else {
            free(h->reply);
            h->reply = body;
            h->reply_type = hd.type;
            h->reply_len = hd.len;
        }
        pthread_cond_broadcast(&h->cond);
        pthread_mutex_unlock(&h->lock);
    }
    pthread_mutex_lock(&h->lock);
    h->dead = 1;
    pthread_cond_broadcast(&h->cond);
    pthread_mutex_unlock(&h->lock);
    return NULL;
}

HVEMU_EXPORT struct xs_handle *xs_open(unsigned long flags)
{
    (void)flags;
    struct xs_handle *h = calloc(1, sizeof(*h));
    if (!h)
        return NULL;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s/xenstored.sock", hvemu_run_dir());
    h->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (h->fd < 0 || connect(h->fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        int saved = errno;
        if (h->fd >= 0)
            close(h->fd);
        free(h);
        errno = saved;
        return NULL;
    }
    if (pipe2(h->pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        close(h->fd);
        free(h);
        return NULL;
    }
    pthread_mutex_init(&h->lock, NULL);
    pthread_mutex_init(&h->request, NULL);
    pthread_cond_init(&h->cond, NULL);
    if (pthread_create(&h->reader, NULL, reader_main, h)) {
        close(h->fd);
        close(h->pipe[0]);
        close(h->pipe[1]);
        free(h);
        errno = EAGAIN;
        return NULL;
    }
    return h;
}

HVEMU_EXPORT void xs_close(struct xs_handle *h)
{
    if (!h)
        return;
    shutdown(h->fd, SHUT_RDWR);
    pthread_join(h->reader, NULL);
    close(h->fd);
    close(h->pipe[0]);
    close(h->pipe[1]);
    for (struct event *ev = h->head, *next; ev; ev = next) {
        next = ev->next;
        free(ev);
    }
    free(h->reply);
    free(h);
}

HVEMU_EXPORT void xs_daemon_close(struct xs_handle *h)
{
    xs_close(h);
}

HVEMU_EXPORT int xs_fileno(struct xs_handle *h)
{
    return h->pipe[0];
}

/* One request; the reply's payload (malloc'd, NUL-terminated) or NULL with errno. */
static char *request(struct xs_handle *h, xs_transaction_t t, uint32_t type, const void *a, size_t alen,
                     const void *b, size_t blen, unsigned int *len)
{
    if (t != XBT_NULL) {
        hvemu_unsupported("xenstore transactions", "transactions");
        return NULL;
    }
    if (alen + blen > PAYLOAD_MAX) {
        errno = E2BIG;
        return NULL;
    }
    pthread_mutex_lock(&h->request);
    pthread_mutex_lock(&h->lock);
    free(h->reply);
    h->reply = NULL;
    struct hdr hd = {type, ++h->req_id, 0, (uint32_t)(alen + blen)};
    pthread_mutex_unlock(&h->lock);
    char *msg = malloc(sizeof(hd) + alen + blen);
    if (!msg) {
        pthread_mutex_unlock(&h->request);
        return NULL;
    }
    memcpy(msg, &hd, sizeof(hd));
    memcpy(msg + sizeof(hd), a, alen);
    if (blen)
        memcpy(msg + sizeof(hd) + alen, b, blen);
    int rc = write_full(h->fd, msg, sizeof(hd) + alen + blen);
    free(msg);
    char *out = NULL;
    pthread_mutex_lock(&h->lock);
    if (rc < 0) {
        errno = EIO;
    } else {
        while (!h->reply && !h->dead)
            pthread_cond_wait(&h->cond, &h->lock);
        if (!h->reply) {
            errno = EIO;
        } else if (h->reply_type == XS_ERROR) {
            errno = hvemu_errno_of(h->reply);
        } else {
            out = h->reply;
            h->reply = NULL;
            if (len)
                *len = h->reply_len;
        }
    }
    pthread_mutex_unlock(&h->lock);
    pthread_mutex_unlock(&h->request);
    return out;
}

static bool request_ok(struct xs_handle *h, xs_transaction_t t, uint32_t type, const void *a, size_t alen,
                       const void *b, size_t blen)
{
    char *r = request(h, t, type, a, alen, b, blen, NULL);
    free(r);
    return r != NULL;
}

HVEMU_EXPORT void *xs_read(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *len)
{
    return request(h, t, XS_READ, path, strlen(path) + 1, NULL, 0, len);
}

HVEMU_EXPORT bool xs_write(struct xs_handle *h, xs_transaction_t t, const char *path, const void *data,
                           unsigned int len)
{
    return request_ok(h, t, XS_WRITE, path, strlen(path) + 1, data, len);
}

HVEMU_EXPORT bool xs_rm(struct xs_handle *h, xs_transaction_t t, const char *path)
{
    return request_ok(h, t, XS_RM, path, strlen(path) + 1, NULL, 0);
}

HVEMU_EXPORT char **xs_directory(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *num)
{
    unsigned int len = 0;
    char *r = request(h, t, XS_DIRECTORY, path, strlen(path) + 1, NULL, 0, &len);
    if (!r)
        return NULL;
    unsigned int n = 0;
    for (unsigned int i = 0; i < len; i++)
        n += r[i] == '\0';
    char **vec = malloc((n + 1) * sizeof(char *) + len);
    if (!vec) {
        free(r);
        return NULL;
    }
    char *strings = (char *)(vec + n + 1);
    memcpy(strings, r, len);
    free(r);
    for (unsigned int i = 0, k = 0; k < n; k++) {
        vec[k] = strings + i;
        i += (unsigned int)strlen(strings + i) + 1;
    }
    vec[n] = NULL;
    *num = n;
    return vec;
}

static bool watch_op(struct xs_handle *h, uint32_t type, const char *path, const char *token)
{
    size_t p = strlen(path) + 1, t = strlen(token) + 1;
    return request_ok(h, XBT_NULL, type, path, p, token, t);
}

HVEMU_EXPORT bool xs_watch(struct xs_handle *h, const char *path, const char *token)
{
    return watch_op(h, XS_WATCH, path, token);
}

HVEMU_EXPORT bool xs_unwatch(struct xs_handle *h, const char *path, const char *token)
{
    return watch_op(h, XS_UNWATCH, path, token);
}

/* vec[0] the path (XS_WATCH_PATH), vec[1] the token (XS_WATCH_TOKEN), in one allocation the caller frees. */
HVEMU_EXPORT char **xs_read_watch(struct xs_handle *h, unsigned int *num)
{
    pthread_mutex_lock(&h->lock);
    while (!h->head && !h->dead)
        pthread_cond_wait(&h->cond, &h->lock);
    struct event *ev = h->head;
    if (!ev) {
        pthread_mutex_unlock(&h->lock);
        errno = EIO;
        return NULL;
    }
    h->head = ev->next;
    if (!h->head)
        h->tail = NULL;
    char b;
    if (read(h->pipe[0], &b, 1) < 0) { /* it was already drained */
    }
    pthread_mutex_unlock(&h->lock);
    const char *path = ev->body;
    size_t plen = strnlen(path, ev->len);
    const char *token = plen < ev->len ? ev->body + plen + 1 : "";
    size_t tlen = strlen(token);
    char **vec = malloc(2 * sizeof(char *) + plen + 1 + tlen + 1);
    if (!vec) {
        free(ev);
        return NULL;
    }
    char *s = (char *)(vec + 2);
    memcpy(s, path, plen);
    s[plen] = '\0';
    memcpy(s + plen + 1, token, tlen + 1);
    vec[0] = s;
    vec[1] = s + plen + 1;
    free(ev);
    if (num)
        *num = 2;
    return vec;
}

HVEMU_EXPORT char *xs_get_domain_path(struct xs_handle *h, unsigned int domid)
{
    char id[16];
    int n = snprintf(id, sizeof(id), "%u", domid);
    return request(h, XBT_NULL, XS_GET_DOMAIN_PATH, id, (size_t)n + 1, NULL, 0, NULL);
}

HVEMU_EXPORT bool xs_is_domain_introduced(struct xs_handle *h, unsigned int domid)
{
    char id[16];
    int n = snprintf(id, sizeof(id), "%u", domid);
    char *r = request(h, XBT_NULL, XS_IS_DOMAIN_INTRODUCED, id, (size_t)n + 1, NULL, 0, NULL);
    bool yes = r && r[0] == 'T';
    free(r);
    return yes;
}
