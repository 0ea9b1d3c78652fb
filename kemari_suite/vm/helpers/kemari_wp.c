/*
 * kemari_wp: the write-protect helper of the uffd-wp dirty-page tracker.
 *
 * Loaded into stock QEMU, either as a TCG plugin (-plugin kemari_wp.so,sock=PATH; QEMU
 * calls qemu_plugin_install, also under KVM) or, where QEMU's plugin API refuses it,
 * with LD_PRELOAD and KEMARI_WP_SOCK=PATH. Either way it starts one thread that serves a
 * Unix socket at PATH and does one thing: on request, register QEMU's guest RAM mapping
 * with a userfaultfd in asynchronous write-protect mode and write-protect all of it.
 *
 * From then on the kernel marks every page written through QEMU's mappings (guest
 * vCPUs, QEMU's own device emulation, the kernel on QEMU's behalf) and the agent reads
 * and re-protects those marks with the PAGEMAP_SCAN ioctl on /proc/<qemu>/pagemap. No
 * fault ever reaches this thread (UFFD_FEATURE_WP_ASYNC): the file descriptor is only
 * kept open, because closing it would end the registration.
 *
 * Protocol (one request line, one answer line; one client at a time):
 *   PROTECT <path> <bytes>\n  ->  OK <hex address>\n  |  ERR <reason>\n
 *   PING\n                    ->  OK\n
 * PROTECT finds the mapping of offset 0 of <path> in /proc/self/maps that covers
 * <bytes>. Asked again for the same range, it write-protects the whole range again.
 *
 * Needs Linux 6.7 or newer (UFFD_FEATURE_WP_ASYNC, PAGEMAP_SCAN). Conflicts with QEMU's
 * own userfaultfd users (postcopy, background-snapshot): a range has one userfaultfd.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12)
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13)
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

#define WANTED_FEATURES \
    (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_HUGETLBFS_SHMEM | UFFD_FEATURE_WP_UNPOPULATED)

/* The QEMU plugin ABI this helper speaks: the version QEMU 7.2 and 8.x accept. (Tests
 * build it with another, to see a QEMU refuse the plugin and the preload take over.) */
#ifndef KEMARI_WP_PLUGIN_API
#define KEMARI_WP_PLUGIN_API 1
#endif
__attribute__((visibility("default"))) int qemu_plugin_version = KEMARI_WP_PLUGIN_API;

static int started;
static int uffd = -1;
static uint64_t reg_start, reg_len;

static int find_mapping(const char *path, uint64_t size, uint64_t *base, char *err, size_t n)
{
    FILE *maps = fopen("/proc/self/maps", "re");
    char line[4096], real[4096];
    uint64_t found = 0, covered = 0;
    int have = 0;

    if (!realpath(path, real))
        snprintf(real, sizeof(real), "%s", path);
    if (!maps) {
        snprintf(err, n, "cannot read /proc/self/maps: %s", strerror(errno));
        return -1;
    }
    while (fgets(line, sizeof(line), maps)) {
        unsigned long long start, end, off;
        char *name;
        size_t len;

        if (sscanf(line, "%llx-%llx %*s %llx", &start, &end, &off) != 3)
            continue;
        name = strchr(line, '/');
        if (!name)
            continue;
        len = strcspn(name, "\n");
        name[len] = 0;
        if (len > 10 && strcmp(name + len - 10, " (deleted)") == 0)
            name[len - 10] = 0;
        if (strcmp(name, path) != 0 && strcmp(name, real) != 0)
            continue;
        if (have && found != start - off) {
            fclose(maps);
            snprintf(err, n, "%s is mapped more than once", path);
            return -1;
        }
        have = 1;
        found = start - off;
        if (off <= covered && end - start + off > covered)
            covered = end - start + off;
    }
    fclose(maps);
    if (!have) {
        snprintf(err, n, "%s is not mapped by this QEMU", path);
        return -1;
    }
    if (covered < size) {
        snprintf(err, n, "%s is mapped for %llu bytes, guest RAM is %llu", path,
                 (unsigned long long)covered, (unsigned long long)size);
        return -1;
    }
    *base = found;
    return 0;
}

static int write_protect(uint64_t start, uint64_t len, char *err, size_t n)
{
    struct uffdio_writeprotect wp = {
        .range = {.start = start, .len = len},
        .mode = UFFDIO_WRITEPROTECT_MODE_WP,
    };
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0) {
        snprintf(err, n, "UFFDIO_WRITEPROTECT: %s", strerror(errno));
        return -1;
    }
    return 0;
}

static int protect(const char *path, uint64_t size, uint64_t *base, char *err, size_t n)
{
    struct uffdio_api api = {.api = UFFD_API, .features = WANTED_FEATURES};
    struct uffdio_register reg = {.mode = UFFDIO_REGISTER_MODE_WP};

    if (find_mapping(path, size, base, err, n) < 0)
        return -1;
    if (uffd >= 0) {
        if (*base != reg_start || size != reg_len) {
            snprintf(err, n, "another range is already registered");
            return -1;
        }
        return write_protect(reg_start, reg_len, err, n);
    }
    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0 && (errno == EPERM || errno == EACCES))
        uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    if (uffd < 0) {
        snprintf(err, n, "userfaultfd: %s", strerror(errno));
        return -1;
    }
    if (ioctl(uffd, UFFDIO_API, &api) < 0) {
        snprintf(err, n, "UFFDIO_API (asynchronous write-protect needs Linux 6.7): %s",
                 strerror(errno));
        goto fail;
    }
    if ((api.features & WANTED_FEATURES) != WANTED_FEATURES) {
        snprintf(err, n, "kernel lacks userfaultfd features 0x%llx",
                 (unsigned long long)(WANTED_FEATURES & ~api.features));
        goto fail;
    }
    reg.range.start = *base;
    reg.range.len = size;
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
        snprintf(err, n, "UFFDIO_REGISTER write-protect%s: %s",
                 errno == EBUSY ? " (QEMU's own userfaultfd holds it: postcopy or "
                                  "background-snapshot?)" : "",
                 strerror(errno));
        goto fail;
    }
    reg_start = *base;
    reg_len = size;
    return write_protect(reg_start, reg_len, err, n);
fail:
    close(uffd);
    uffd = -1;
    return -1;
}

static void serve_one(int conn)
{
    char req[4200], reply[4400], err[4096], path[4096];
    size_t got = 0;
    unsigned long long size;
    uint64_t base;

    for (;;) {
        ssize_t r;
        char *nl;

        r = read(conn, req + got, sizeof(req) - 1 - got);
        if (r <= 0)
            return;
        got += (size_t)r;
        req[got] = 0;
        while ((nl = strchr(req, '\n')) != NULL) {
            *nl = 0;
            if (strcmp(req, "PING") == 0)
                snprintf(reply, sizeof(reply), "OK\n");
            else if (sscanf(req, "PROTECT %4095s %llu", path, &size) == 2)
                if (protect(path, size, &base, err, sizeof(err)) == 0)
                    snprintf(reply, sizeof(reply), "OK %llx\n", (unsigned long long)base);
                else
                    snprintf(reply, sizeof(reply), "ERR %s\n", err);
            else
                snprintf(reply, sizeof(reply), "ERR unknown request\n");
            if (write(conn, reply, strlen(reply)) < 0)
                return;
            got -= (size_t)(nl + 1 - req);
            memmove(req, nl + 1, got + 1);
        }
        if (got >= sizeof(req) - 1)
            return;
    }
}

static void *serve(void *arg)
{
    int lsock = (int)(intptr_t)arg;
    for (;;) {
        int conn = accept4(lsock, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return NULL;
        }
        serve_one(conn);
        close(conn);
    }
}

static int start(const char *sock_path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    pthread_t thread;
    int lsock;

    if (__atomic_exchange_n(&started, 1, __ATOMIC_SEQ_CST))
        return 0;
    if (strlen(sock_path) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "kemari_wp: socket path too long: %s\n", sock_path);
        return -1;
    }
    strcpy(addr.sun_path, sock_path);
    unlink(sock_path);
    lsock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lsock < 0 || bind(lsock, (struct sockaddr *)&addr, sizeof(addr)) < 0 ||
        chmod(sock_path, 0600) < 0 || listen(lsock, 4) < 0) {
        fprintf(stderr, "kemari_wp: cannot serve %s: %s\n", sock_path, strerror(errno));
        return -1;
    }
    if (pthread_create(&thread, NULL, serve, (void *)(intptr_t)lsock) != 0) {
        fprintf(stderr, "kemari_wp: cannot start its thread\n");
        return -1;
    }
    pthread_detach(thread);
    return 0;
}

/* The QEMU plugin entry point: -plugin kemari_wp.so,sock=PATH */
__attribute__((visibility("default"))) int qemu_plugin_install(uint64_t id, const void *info,
                                                               int argc, char **argv)
{
    (void)id;
    (void)info;
    for (int i = 0; i < argc; i++)
        if (strncmp(argv[i], "sock=", 5) == 0)
            return start(argv[i] + 5);
    fprintf(stderr, "kemari_wp: missing sock=PATH\n");
    return -1;
}

/* LD_PRELOAD entry point: KEMARI_WP_SOCK=PATH */
__attribute__((constructor)) static void preload(void)
{
    const char *sock_path = getenv("KEMARI_WP_SOCK");
    if (sock_path && *sock_path) {
        char copy[4096];
        snprintf(copy, sizeof(copy), "%s", sock_path);
        unsetenv("KEMARI_WP_SOCK"); /* not for QEMU's children */
        start(copy);
    }
}
