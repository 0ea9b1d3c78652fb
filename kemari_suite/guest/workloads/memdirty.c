/*
 * memdirty: dirty guest pages at a steady rate, for sync-point benchmarks.
 *
 * usage: memdirty [-m MIB] [-r PAGES_PER_SEC] [-P compressible|incompressible]
 *   -m MIB   working set (default 32), allocated with mmap and touched once up front
 *   -r RATE  pages dirtied per second of guest time (default 1000; 0 = as fast as possible)
 *   -P       what a dirtied page holds afterwards:
 *              compressible    the whole page filled with one repeated 64-bit word
 *                              (changes on every pass: a full-page change that
 *                              compresses to almost nothing)
 *              incompressible  the whole page filled with xorshift64 output
 *
 * Pages are dirtied round robin through the working set, paced in 1 ms slices with
 * clock_nanosleep; a backlog larger than one second's worth (a slow or busy guest) is
 * dropped rather than caught up in a burst.
 *
 * Progress for the host: a struct kemari_probe with magic "KEMARI-MEMDIRTY!"; value is
 * the number of pages dirtied so far, ticks_per_second the target rate, aux the working
 * set in pages. The only output is "KEMARI-MEMDIRTY-START mib=M rate=R pattern=P" once
 * the working set is populated.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "kemari_probe.h"

static struct kemari_probe probe;

/* "KEMARI-MEMDIRTY!" XOR KEMARI_MAGIC_MASK */
static const unsigned char masked_magic[16] = {0x11, 0x1f, 0x17, 0x1b, 0x08, 0x13, 0x77, 0x17,
                                               0x1f, 0x17, 0x1e, 0x13, 0x08, 0x0e, 0x03, 0x7b};

static void on_signal(int sig)
{
    kemari_probe_disarm(&probe);
    signal(sig, SIG_DFL);
    raise(sig);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

static inline uint64_t xorshift64(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return rng_state = x;
}

static void dirty_page(uint64_t *page, int incompressible, uint64_t seq)
{
    const size_t words = KEMARI_PAGE / sizeof(uint64_t);
    if (incompressible) {
        for (size_t i = 0; i < words; i++)
            page[i] = xorshift64();
    } else {
        uint64_t w = seq * 0x0101010101010101ULL + 1;
        for (size_t i = 0; i < words; i++)
            ((volatile uint64_t *)page)[i] = w;
    }
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    long mib = 32, rate = 1000;
    int incompressible = 0, opt;
    const char *pattern = "compressible";
    while ((opt = getopt(argc, argv, "m:r:P:")) != -1) {
        switch (opt) {
        case 'm':
            mib = atol(optarg);
            break;
        case 'r':
            rate = atol(optarg);
            break;
        case 'P':
            if (strcmp(optarg, "compressible") == 0) {
                incompressible = 0;
            } else if (strcmp(optarg, "incompressible") == 0) {
                incompressible = 1;
            } else {
                fprintf(stderr, "memdirty: -P compressible|incompressible\n");
                return 2;
            }
            pattern = optarg;
            break;
        default:
            fprintf(stderr,
                    "usage: memdirty [-m MIB] [-r PAGES_PER_SEC] [-P compressible|incompressible]\n");
            return 2;
        }
    }
    if (mib < 1 || rate < 0) {
        fprintf(stderr, "memdirty: bad -m or -r\n");
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);

    size_t npages = (size_t)mib * (1024 * 1024 / KEMARI_PAGE);
    unsigned char *ws = mmap(NULL, npages * KEMARI_PAGE, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (ws == MAP_FAILED) {
        perror("memdirty: mmap");
        return 1;
    }
    for (size_t i = 0; i < npages; i++)
        dirty_page((uint64_t *)(ws + i * KEMARI_PAGE), incompressible, 0);

    kemari_probe_arm(&probe, masked_magic, (uint64_t)rate, (uint64_t)npages);
    printf("KEMARI-MEMDIRTY-START mib=%ld rate=%ld pattern=%s\n", mib, rate, pattern);

    uint64_t done = 0; /* pages dirtied (also the round-robin cursor and the pass seq) */
    double start = now_s();
    const struct timespec slice = {0, 1000000L};
    for (;;) {
        uint64_t due;
        if (rate == 0) {
            due = done + 64;
        } else {
            double elapsed = now_s() - start;
            due = (uint64_t)(elapsed * (double)rate);
            if (due > done + (uint64_t)rate) {
                /* More than a second behind: drop the backlog, keep the pace. */
                start += (double)(due - done - (uint64_t)rate) / (double)rate;
                due = done + (uint64_t)rate;
            }
        }
        while (done < due) {
            size_t idx = (size_t)(done % npages);
            dirty_page((uint64_t *)(ws + idx * KEMARI_PAGE), incompressible, done / npages + 1);
            done++;
            probe.value = done;
        }
        if (rate != 0)
            clock_nanosleep(CLOCK_MONOTONIC, 0, &slice, NULL);
    }
}
