/*
 * A probe: a page-aligned structure the host finds by scanning guest RAM.
 *
 * Layout (little endian, at the start of a 4096-byte page):
 *   0   16 bytes  magic, e.g. "KEMARI-COUNTER!!"
 *   16  uint64    value (monotonic; written only by this process)
 *   24  uint64    ticks per second (the rate the value is meant to advance)
 *   32  uint64    aux (program specific, see each program)
 *   40  uint64    pid of the writer
 *
 * The magic is never stored as initialised data: the program's ELF file sits in the
 * initramfs (page cache), page-aligned like the live copy, and a stored magic would show
 * up there as a stale second hit. It is assembled at run time from a masked copy, so
 * only the live page carries it. It is wiped on SIGTERM/SIGINT for the same reason.
 */
#ifndef KEMARI_PROBE_H
#define KEMARI_PROBE_H

#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define KEMARI_PAGE 4096
#define KEMARI_MAGIC_MASK 0x5a

struct kemari_probe {
    volatile unsigned char magic[16];
    volatile uint64_t value;
    volatile uint64_t ticks_per_second;
    volatile uint64_t aux;
    volatile uint64_t pid;
} __attribute__((aligned(KEMARI_PAGE)));

/* masked: each byte of the magic XOR KEMARI_MAGIC_MASK, 16 bytes. */
static inline void kemari_probe_arm(struct kemari_probe *p, const unsigned char masked[16],
                                    uint64_t ticks_per_second, uint64_t aux)
{
    p->value = 0;
    p->ticks_per_second = ticks_per_second;
    p->aux = aux;
    p->pid = (uint64_t)getpid();
    __sync_synchronize();
    for (int i = 0; i < 16; i++)
        p->magic[i] = masked[i] ^ KEMARI_MAGIC_MASK;
    __sync_synchronize();
}

static inline void kemari_probe_disarm(struct kemari_probe *p)
{
    for (int i = 0; i < 16; i++)
        p->magic[i] = 0;
    __sync_synchronize();
}

#endif
