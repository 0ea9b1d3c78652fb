/*
 * counter: a monotonic counter the host can read from guest RAM.
 *
 * usage: counter [-q] [-p PORT] [RATE]
 *   RATE     increments per second (default 100), paced with clock_nanosleep on
 *            CLOCK_MONOTONIC absolute deadlines; 0 spins as fast as the vCPU goes
 *            (a CPU-bound throughput probe for benchmarks, timed on the host)
 *   -p PORT  also serve the value over TCP: each accepted connection gets
 *            "<value>\n" and is closed, so a client polls by reconnecting
 *   -q       do not print "COUNTER <value>" once per RATE increments
 *
 * The value lives in a struct kemari_probe with magic "KEMARI-COUNTER!!" (see
 * kemari_probe.h); aux is the TCP port (0 if none). Prints
 * "KEMARI-COUNTER-START rate=R port=P" when running.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "kemari_probe.h"

static struct kemari_probe probe;

/* "KEMARI-COUNTER!!" XOR KEMARI_MAGIC_MASK */
static const unsigned char masked_magic[16] = {0x11, 0x1f, 0x17, 0x1b, 0x08, 0x13, 0x77, 0x19,
                                               0x15, 0x0f, 0x14, 0x0e, 0x1f, 0x08, 0x7b, 0x7b};

static void on_signal(int sig)
{
    kemari_probe_disarm(&probe);
    signal(sig, SIG_DFL);
    raise(sig);
}

static int listen_on(int port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("counter: socket");
        exit(1);
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(fd, 16) < 0) {
        perror("counter: bind/listen");
        exit(1);
    }
    return fd;
}

static void serve_pending(int lfd)
{
    for (;;) {
        int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0)
            return; /* EAGAIN: nothing pending (or a transient error: try next tick) */
        char line[32];
        int n = snprintf(line, sizeof(line), "%llu\n", (unsigned long long)probe.value);
        ssize_t w = send(c, line, (size_t)n, MSG_NOSIGNAL | MSG_DONTWAIT);
        (void)w;
        close(c);
    }
}

static void add_ns(struct timespec *t, long ns)
{
    t->tv_nsec += ns;
    while (t->tv_nsec >= 1000000000L) {
        t->tv_nsec -= 1000000000L;
        t->tv_sec++;
    }
}

static int before(const struct timespec *a, const struct timespec *b)
{
    return a->tv_sec < b->tv_sec || (a->tv_sec == b->tv_sec && a->tv_nsec < b->tv_nsec);
}

int main(int argc, char **argv)
{
    int port = 0, quiet = 0, opt;
    long rate = 100;
    while ((opt = getopt(argc, argv, "qp:")) != -1) {
        switch (opt) {
        case 'q':
            quiet = 1;
            break;
        case 'p':
            port = atoi(optarg);
            break;
        default:
            fprintf(stderr, "usage: counter [-q] [-p PORT] [RATE]\n");
            return 2;
        }
    }
    if (optind < argc)
        rate = atol(argv[optind]);
    if (rate < 0 || rate > 1000000 || port < 0 || port > 65535) {
        fprintf(stderr, "counter: bad rate or port\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);

    int lfd = port ? listen_on(port) : -1;
    kemari_probe_arm(&probe, masked_magic, (uint64_t)rate, (uint64_t)port);
    printf("KEMARI-COUNTER-START rate=%ld port=%d\n", rate, port);

    if (rate == 0) {
        /* Spin: the host measures progress per second of its own clock. */
        for (;;) {
            volatile uint64_t *value = &probe.value;
            for (int i = 0; i < 65536; i++)
                *value = *value + 1;
            if (lfd >= 0)
                serve_pending(lfd);
        }
    }
    const long period = 1000000000L / rate;
    struct timespec next, now;
    clock_gettime(CLOCK_MONOTONIC, &next);
    for (;;) {
        add_ns(&next, period);
        int rc;
        do {
            rc = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        } while (rc == EINTR);
        /* Fell more than one period behind (a busy guest): pace from now, no burst. */
        clock_gettime(CLOCK_MONOTONIC, &now);
        struct timespec late = next;
        add_ns(&late, period);
        if (before(&late, &now))
            next = now;

        uint64_t v = probe.value + 1;
        probe.value = v;
        if (lfd >= 0)
            serve_pending(lfd);
        if (!quiet && v % (uint64_t)rate == 0)
            printf("COUNTER %llu\n", (unsigned long long)v);
    }
}
