/* hvemu_glue.c -- the agent channel and the registries the drop-in Xen libraries share. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "hvemu_glue.h"

#define MAX_MSG (HVEMU_PAGE * 65u + 4096u)

static pthread_mutex_t agent_lock = PTHREAD_MUTEX_INITIALIZER;
static int agent_fd = -1;
static pid_t agent_pid = -1;
static char run_dir[512];

static const struct { const char *name; int value; } errnos[] = {
    {"ENOSYS", ENOSYS}, {"EBUSY", EBUSY}, {"EAGAIN", EAGAIN}, {"ENOMEM", ENOMEM}, {"EINVAL", EINVAL},
    {"ENOENT", ENOENT}, {"EPERM", EPERM}, {"ESRCH", ESRCH}, {"EEXIST", EEXIST}, {"ENODEV", ENODEV},
    {"EOPNOTSUPP", EOPNOTSUPP}, {"EACCES", EACCES}, {"EIO", EIO}, {"E2BIG", E2BIG}, {"ENOSPC", ENOSPC},
    {"ENOTEMPTY", ENOTEMPTY}, {"EROFS", EROFS}, {"EISDIR", EISDIR},
};

int hvemu_errno_of(const char *name)
{
    size_t n = strcspn(name, " \n");
    for (size_t i = 0; i < sizeof(errnos) / sizeof(errnos[0]); i++)
        if (strlen(errnos[i].name) == n && !strncmp(errnos[i].name, name, n))
            return errnos[i].value;
    return EIO;
}

const char *hvemu_run_dir(void)
{
    if (!run_dir[0]) {
        const char *d = getenv("HVEMU_RUN_DIR");
        const char *base = getenv("XDG_RUNTIME_DIR");
        if (d && *d)
            snprintf(run_dir, sizeof(run_dir), "%s", d);
        else
            snprintf(run_dir, sizeof(run_dir), "%s/hvemu-%u", base && *base ? base : "/tmp", (unsigned)getuid());
    }
    return run_dir;
}

void hvemu_unsupported(const char *function, const char *why)
{
    fprintf(stderr, "hvemu: %s: %s: not modelled by hvemu (EOPNOTSUPP)\n", function, why);
    errno = EOPNOTSUPP;
}

/* Start the agent: python -m hvemu.toolstack.xentools.agent with our socket end as fd 3. */
static int agent_start(void)
{
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0)
        return -1;
    const char *python = getenv("HVEMU_PYTHON");
    if (!python || !*python)
        python = "python3";
    pid_t pid = fork();
    if (pid < 0) {
        close(sv[0]);
        close(sv[1]);
        return -1;
    }
    if (pid == 0) {
        /* The agent outlives no one: it exits when our end closes (EOF), whatever killed us.  A tool's
         * SIGINT/SIGTERM (a Ctrl-C to its group included) is for the tool, which still needs the agent
         * while it cleans up: the agent has a group of its own and ignores them from its first instruction. */
        setpgid(0, 0);
        signal(SIGINT, SIG_IGN);
        signal(SIGTERM, SIG_IGN);
        signal(SIGHUP, SIG_IGN);
        if (sv[1] == 3) {
            if (fcntl(3, F_SETFD, 0) < 0) /* already fd 3: dup2 would keep its close-on-exec */
                _exit(127);
        } else if (dup2(sv[1], 3) < 0)
            _exit(127);
        for (int fd = 4; fd < 1024; fd++)
            close(fd);
        setenv("HVEMU_RUN_DIR", hvemu_run_dir(), 1);
        execlp(python, python, "-m", "hvemu.toolstack.xentools.agent", (char *)NULL);
        fprintf(stderr, "hvemu: cannot run %s -m hvemu.toolstack.xentools.agent: %s (set HVEMU_PYTHON)\n", python,
                strerror(errno));
        _exit(127);
    }
    close(sv[1]);
    agent_fd = sv[0];
    agent_pid = pid;
    return 0;
}

static int call_locked(const char *line, const void *data, size_t data_len, char *reply, size_t reply_len,
                       int *fds, int *nfds, void *out, size_t out_len)
{
    static char buf[MAX_MSG];
    size_t n = strlen(line);
    if (n + 1 + data_len > sizeof(buf)) {
        errno = E2BIG;
        return -1;
    }
    if (agent_fd < 0 && agent_start() < 0)
        return -1;
    memcpy(buf, line, n);
    buf[n++] = '\n';
    if (data_len)
        memcpy(buf + n, data, data_len);
    if (send(agent_fd, buf, n + data_len, MSG_NOSIGNAL) < 0)
        return -1;
    char cbuf[CMSG_SPACE(sizeof(int) * HVEMU_MAX_FDS)];
    struct iovec iov = {buf, sizeof(buf) - 1};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof(cbuf)};
    ssize_t got;
    do
        got = recvmsg(agent_fd, &mh, MSG_CMSG_CLOEXEC);
    while (got < 0 && errno == EINTR);
    if (got <= 0) {
        if (got == 0)
            fprintf(stderr, "hvemu: the agent exited (is the hypervisor running on %s?)\n", hvemu_run_dir());
        errno = got == 0 ? ECONNRESET : errno;
        return -1;
    }
    int received = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
            int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int *p = (int *)CMSG_DATA(c);
            for (int i = 0; i < k; i++) {
                if (fds && nfds && received < *nfds)
                    fds[received++] = p[i];
                else
                    close(p[i]);
            }
        }
    if (nfds)
        *nfds = received;
    buf[got] = '\0';
    char *nl = memchr(buf, '\n', (size_t)got);
    size_t line_len = nl ? (size_t)(nl - buf) : (size_t)got;
    if (line_len >= 2 && !strncmp(buf, "ok", 2) && (line_len == 2 || buf[2] == ' ')) {
        if (reply && reply_len) {
            size_t start = line_len > 2 ? 3 : 2, len = line_len - start;
            if (len >= reply_len)
                len = reply_len - 1;
            memcpy(reply, buf + start, len);
            reply[len] = '\0';
        }
        if (out && nl) {
            size_t len = (size_t)got - line_len - 1;
            memcpy(out, nl + 1, len < out_len ? len : out_len);
        }
        return 0;
    }
    for (int i = 0; i < received; i++)
        close(fds[i]);
    if (nfds)
        *nfds = 0;
    if (getenv("HVEMU_DEBUG"))
        fprintf(stderr, "hvemu: %s -> %.*s\n", line, (int)line_len, buf);
    errno = hvemu_errno_of(buf);
    return -1;
}

int hvemu_call(const char *line, const void *data, size_t data_len, char *reply, size_t reply_len, int *fds,
               int *nfds)
{
    pthread_mutex_lock(&agent_lock);
    int rc = call_locked(line, data, data_len, reply, reply_len, fds, nfds, NULL, 0);
    int saved = errno;
    pthread_mutex_unlock(&agent_lock);
    errno = saved;
    return rc;
}

int hvemu_call_data(const char *line, char *reply, size_t reply_len, void *out, size_t out_len)
{
    pthread_mutex_lock(&agent_lock);
    int rc = call_locked(line, NULL, 0, reply, reply_len, NULL, NULL, out, out_len);
    int saved = errno;
    pthread_mutex_unlock(&agent_lock);
    errno = saved;
    return rc;
}

/* ------------------------------------------------------------------ registries */

#define SLOTS 64
static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static struct { uint32_t domid, port; int fd; } evtchns[SLOTS];
static struct { uint32_t domid; int fd; uint64_t gfns; } memories[SLOTS];
static struct { uint32_t domid; int ring; void *addr; } placeholders[SLOTS];
static int n_evtchns, n_memories, n_placeholders;

void hvemu_evtchn_offer(uint32_t domid, uint32_t port, int fd)
{
    pthread_mutex_lock(&reg_lock);
    for (int i = 0; i < n_evtchns; i++)
        if (evtchns[i].domid == domid && evtchns[i].port == port) {
            close(evtchns[i].fd);
            evtchns[i].fd = fd;
            pthread_mutex_unlock(&reg_lock);
            return;
        }
    if (n_evtchns < SLOTS)
        evtchns[n_evtchns++] = (typeof(evtchns[0])){domid, port, fd};
    else
        close(fd);
    pthread_mutex_unlock(&reg_lock);
}

int hvemu_evtchn_claim(uint32_t domid, uint32_t port)
{
    int fd = -1;
    pthread_mutex_lock(&reg_lock);
    for (int i = 0; i < n_evtchns; i++)
        if (evtchns[i].domid == domid && evtchns[i].port == port)
            fd = fcntl(evtchns[i].fd, F_DUPFD_CLOEXEC, 0);
    pthread_mutex_unlock(&reg_lock);
    if (fd < 0)
        errno = ENOENT;
    return fd;
}

void hvemu_memory_offer(uint32_t domid, int fd, uint64_t gfns)
{
    pthread_mutex_lock(&reg_lock);
    for (int i = 0; i < n_memories; i++)
        if (memories[i].domid == domid) {
            close(memories[i].fd);
            memories[i].fd = fd;
            memories[i].gfns = gfns;
            pthread_mutex_unlock(&reg_lock);
            return;
        }
    if (n_memories < SLOTS)
        memories[n_memories++] = (typeof(memories[0])){domid, fd, gfns};
    else
        close(fd);
    pthread_mutex_unlock(&reg_lock);
}

int hvemu_memory_fd(uint32_t domid, uint64_t *gfns)
{
    int fd = -1;
    pthread_mutex_lock(&reg_lock);
    for (int i = 0; i < n_memories; i++)
        if (memories[i].domid == domid) {
            fd = memories[i].fd;
            if (gfns)
                *gfns = memories[i].gfns;
        }
    pthread_mutex_unlock(&reg_lock);
    return fd;
}

void hvemu_ring_placeholder_set(uint32_t domid, int ring, void *addr)
{
    pthread_mutex_lock(&reg_lock);
    for (int i = 0; i < n_placeholders; i++)
        if (placeholders[i].domid == domid && placeholders[i].ring == ring) {
            placeholders[i].addr = addr;
            pthread_mutex_unlock(&reg_lock);
            return;
        }
    if (n_placeholders < SLOTS)
        placeholders[n_placeholders++] = (typeof(placeholders[0])){domid, ring, addr};
    pthread_mutex_unlock(&reg_lock);
}

void *hvemu_ring_placeholder_get(uint32_t domid, int ring)
{
    void *addr = NULL;
    pthread_mutex_lock(&reg_lock);
    for (int i = 0; i < n_placeholders; i++)
        if (placeholders[i].domid == domid && placeholders[i].ring == ring)
            addr = placeholders[i].addr;
    pthread_mutex_unlock(&reg_lock);
    return addr;
}

static struct { uint32_t domid; int used; struct hvemu_paging_ring info; } paging_rings[SLOTS];

void hvemu_paging_ring_set(uint32_t domid, const struct hvemu_paging_ring *info)
{
    pthread_mutex_lock(&reg_lock);
    int free_slot = -1;
    for (int i = 0; i < SLOTS; i++) {
        if (paging_rings[i].used && paging_rings[i].domid == domid) {
            paging_rings[i].info = *info;
            pthread_mutex_unlock(&reg_lock);
            return;
        }
        if (!paging_rings[i].used && free_slot < 0)
            free_slot = i;
    }
    if (free_slot >= 0) {
        paging_rings[free_slot].used = 1;
        paging_rings[free_slot].domid = domid;
        paging_rings[free_slot].info = *info;
    }
    pthread_mutex_unlock(&reg_lock);
}

void hvemu_paging_ring_clear(uint32_t domid)
{
    pthread_mutex_lock(&reg_lock);
    for (int i = 0; i < SLOTS; i++)
        if (paging_rings[i].used && paging_rings[i].domid == domid)
            paging_rings[i].used = 0;
    pthread_mutex_unlock(&reg_lock);
}

int hvemu_paging_ring_get(uint32_t domid, struct hvemu_paging_ring *info)
{
    int found = 0;
    pthread_mutex_lock(&reg_lock);
    for (int i = 0; i < SLOTS && !found; i++)
        if (paging_rings[i].used && paging_rings[i].domid == domid) {
            *info = paging_rings[i].info;
            found = 1;
        }
    pthread_mutex_unlock(&reg_lock);
    return found;
}
