/*
 * stream: a TCP service that sends one numbered line after another.
 *
 * usage: stream [-p PORT] [RATE]      (defaults 7002, 200 lines per second)
 *
 * Each accepted connection gets "0\n", "1\n", "2\n", ... paced at RATE lines per second
 * of guest time, with blocking writes (a slow reader slows the stream down: TCP's own
 * backpressure). One connection at a time; the next is accepted when it closes. A client
 * checks the numbers it receives are contiguous: no gap, no duplicate, no rewind, even
 * across a failover of the VM.
 * Prints "KEMARI-STREAM-READY port=P" once listening.
 *
 * Probe (kemari_probe.h), magic "KEMARI-STREAM!!!": value is one more than the highest
 * line number handed to TCP so far (set before the write), so a host reading a RAM
 * image knows which lines that state of the guest may have sent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "kemari_probe.h"

static struct kemari_probe probe;

/* "KEMARI-STREAM!!!" XOR KEMARI_MAGIC_MASK */
static const unsigned char masked_magic[16] = {0x11, 0x1f, 0x17, 0x1b, 0x08, 0x13, 0x77, 0x09, 0x0e, 0x08, 0x1f, 0x1b, 0x17, 0x7b, 0x7b, 0x7b};

static int write_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

int main(int argc, char **argv)
{
    int port = 7002, opt;
    long rate = 200;
    while ((opt = getopt(argc, argv, "p:")) != -1) {
        if (opt == 'p')
            port = atoi(optarg);
        else {
            fprintf(stderr, "usage: stream [-p PORT] [RATE]\n");
            return 2;
        }
    }
    if (optind < argc)
        rate = atol(argv[optind]);
    if (rate < 1 || rate > 1000000 || port < 1 || port > 65535) {
        fprintf(stderr, "stream: bad rate or port\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(lfd, 4) < 0) {
        perror("stream: bind/listen");
        return 1;
    }
    kemari_probe_arm(&probe, masked_magic, (uint64_t)rate, (uint64_t)port);
    printf("KEMARI-STREAM-READY port=%d\n", port);
    const long period = 1000000000L / rate;
    for (;;) {
        int c = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (c < 0)
            continue;
        struct timespec next;
        clock_gettime(CLOCK_MONOTONIC, &next);
        for (unsigned long long i = 0;; i++) {
            char line[32];
            int len = snprintf(line, sizeof(line), "%llu\n", i);
            if (i + 1 > probe.value)
                probe.value = i + 1;
            __sync_synchronize();
            if (write_all(c, line, (size_t)len) < 0)
                break;
            next.tv_nsec += period;
            while (next.tv_nsec >= 1000000000L) {
                next.tv_nsec -= 1000000000L;
                next.tv_sec++;
            }
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL) == EINTR)
                ;
        }
        close(c);
    }
}
