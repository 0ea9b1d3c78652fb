/*
 * records: durable numbered records on a block device, behind a tiny TCP protocol.
 *
 * usage: records [-d DEVICE] [-p PORT]     (defaults /dev/vda, 7000)
 *
 * Record n occupies bytes [n*4096, (n+1)*4096) of DEVICE:
 *   0   16 bytes  "KEMARI-RECORD!!!"
 *   16  uint64    n
 *   24  uint64    FNV-1a 64 of bytes [0, 24) and [32, 4096)
 *   32  ...       payload: the byte (n & 0xff) repeated
 * The device is opened O_DSYNC, so a pwrite returns only once the record is on stable
 * storage (virtio-blk FLUSH/FUA).
 *
 * Protocol (one command per line, any number of clients, one line answer each):
 *   "W n\n"  write record n durably          -> "OK n\n"
 *   "R\n"    count the records on disk       -> "R n\n": n is the highest record such
 *            that records 0..n are all valid (records are appended), -1 if none
 *   anything else                            -> "ERR <reason>\n"
 * Prints "KEMARI-RECORDS-READY port=P device=D capacity=N" once listening.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define REC_SIZE 4096
#define MAX_CLIENTS 32
#define LINE_MAX_LEN 128

static const char rec_magic[16] = "KEMARI-RECORD!!!";

static int dev_fd;
static uint64_t capacity;

struct client {
    int fd;
    size_t len;
    char buf[LINE_MAX_LEN];
};

static uint64_t fnv1a(uint64_t h, const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ULL;
    }
    return h;
}

static uint64_t rec_checksum(const unsigned char *rec)
{
    uint64_t h = fnv1a(0xcbf29ce484222325ULL, rec, 24);
    return fnv1a(h, rec + 32, REC_SIZE - 32);
}

static int write_record(uint64_t n)
{
    static unsigned char rec[REC_SIZE] __attribute__((aligned(4096)));
    memcpy(rec, rec_magic, 16);
    memcpy(rec + 16, &n, 8);
    memset(rec + 32, (int)(n & 0xff), REC_SIZE - 32);
    uint64_t sum = rec_checksum(rec);
    memcpy(rec + 24, &sum, 8);
    ssize_t w = pwrite(dev_fd, rec, REC_SIZE, (off_t)(n * REC_SIZE));
    return w == REC_SIZE ? 0 : -1;
}

static int record_valid(uint64_t n)
{
    static unsigned char rec[REC_SIZE] __attribute__((aligned(4096)));
    if (pread(dev_fd, rec, REC_SIZE, (off_t)(n * REC_SIZE)) != REC_SIZE)
        return 0;
    uint64_t got_n, sum;
    memcpy(&got_n, rec + 16, 8);
    memcpy(&sum, rec + 24, 8);
    return memcmp(rec, rec_magic, 16) == 0 && got_n == n && sum == rec_checksum(rec);
}

static void reply(int fd, const char *line)
{
    ssize_t w = send(fd, line, strlen(line), MSG_NOSIGNAL);
    (void)w;
}

static void handle_line(int fd, char *line)
{
    char out[64];
    unsigned long long n;
    char extra;
    if (sscanf(line, "W %llu %c", &n, &extra) == 1) {
        if (n >= capacity)
            snprintf(out, sizeof(out), "ERR record %llu beyond device\n", n);
        else if (write_record(n) != 0)
            snprintf(out, sizeof(out), "ERR write %llu: %s\n", n, strerror(errno));
        else
            snprintf(out, sizeof(out), "OK %llu\n", n);
    } else if (strcmp(line, "R") == 0) {
        uint64_t i = 0;
        while (i < capacity && record_valid(i))
            i++;
        snprintf(out, sizeof(out), "R %lld\n", (long long)i - 1);
    } else {
        snprintf(out, sizeof(out), "ERR bad command\n");
    }
    reply(fd, out);
}

/* Returns 0 to keep the client, -1 to drop it. */
static int feed(struct client *c)
{
    ssize_t r = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
    if (r <= 0)
        return -1;
    c->len += (size_t)r;
    for (;;) {
        char *nl = memchr(c->buf, '\n', c->len);
        if (!nl)
            break;
        *nl = '\0';
        if (nl > c->buf && nl[-1] == '\r')
            nl[-1] = '\0';
        handle_line(c->fd, c->buf);
        size_t used = (size_t)(nl - c->buf) + 1;
        memmove(c->buf, nl + 1, c->len - used);
        c->len -= used;
    }
    if (c->len == sizeof(c->buf)) {
        reply(c->fd, "ERR line too long\n");
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *dev = "/dev/vda";
    int port = 7000, opt;
    while ((opt = getopt(argc, argv, "d:p:")) != -1) {
        switch (opt) {
        case 'd':
            dev = optarg;
            break;
        case 'p':
            port = atoi(optarg);
            break;
        default:
            fprintf(stderr, "usage: records [-d DEVICE] [-p PORT]\n");
            return 2;
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);

    dev_fd = open(dev, O_RDWR | O_DSYNC | O_CLOEXEC);
    if (dev_fd < 0) {
        fprintf(stderr, "records: open %s: %s\n", dev, strerror(errno));
        return 1;
    }
    off_t size = lseek(dev_fd, 0, SEEK_END);
    if (size < REC_SIZE) {
        fprintf(stderr, "records: %s is too small\n", dev);
        return 1;
    }
    capacity = (uint64_t)size / REC_SIZE;

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(lfd, 16) < 0) {
        perror("records: listen");
        return 1;
    }
    printf("KEMARI-RECORDS-READY port=%d device=%s capacity=%llu\n", port, dev,
           (unsigned long long)capacity);

    struct client clients[MAX_CLIENTS];
    int nclients = 0;
    for (;;) {
        struct pollfd pfds[MAX_CLIENTS + 1];
        pfds[0] = (struct pollfd){.fd = lfd, .events = nclients < MAX_CLIENTS ? POLLIN : 0};
        for (int i = 0; i < nclients; i++)
            pfds[i + 1] = (struct pollfd){.fd = clients[i].fd, .events = POLLIN};
        if (poll(pfds, (nfds_t)nclients + 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            perror("records: poll");
            return 1;
        }
        for (int i = nclients - 1; i >= 0; i--) {
            if (pfds[i + 1].revents && feed(&clients[i]) != 0) {
                close(clients[i].fd);
                clients[i] = clients[--nclients];
            }
        }
        if (pfds[0].revents & POLLIN) {
            int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
            if (c >= 0)
                clients[nclients++] = (struct client){.fd = c, .len = 0};
        }
    }
}
