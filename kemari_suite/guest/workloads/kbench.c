/*
 * kbench: lmbench- and IOzone-style micro-benchmarks, timed by the HOST from console
 * markers (QEMU stops the guest's clock while the VM is stopped, so a guest timer is
 * blind to sync-point pauses; the guest-internal figures are printed only beside them).
 *
 * usage: kbench [-t SECONDS] [-i BENCH=N,...] [-r ROUNDS] [-W FRACTION] [-b LIST]
 *               [-d DEVICE] [-F FILE_KIB] [-S SYNC_KIB] [-R RECORD_KIB] [-P PF_KIB]
 *               [-w WARMUP_S]
 *   -t  guest seconds one timed loop should last; each benchmark's iteration count is
 *       calibrated once, after the warm-up (default 1.0)
 *   -i  iteration counts to use instead of calibrating (so that every scenario of a
 *       suite does the same work): e.g. fork=800,exec=200
 *   -W  round 1 is a warm-up (TCG translates code the first time it runs): its loops
 *       run this fraction of the iterations (default 0.25)
 *   -r  rounds; 0 (the default) runs rounds until the VM is stopped: the host keeps
 *       only the rounds that started once the VM was protected
 *   -b  comma-separated benchmarks, run in this order in every round (default
 *       fork,exec,sh,pagefault,ctxsw,iozone_wbuf,iozone_osync)
 *   -d  block device of the IOzone-style writers (default /dev/vda; skipped if absent)
 *   -F  bytes written per buffered IOzone-style pass, in KiB (default 4096)
 *   -S  bytes written per O_SYNC pass, in KiB (default: as -F)
 *   -R  record size in KiB (default 4)
 *   -P  size of the page-fault file on the guest's tmpfs /dev/shm, in KiB (default 8192)
 *   -w  warm-up seconds once the clocksource left tsc-early (default 2)
 *
 * Benchmarks (lmbench lat_proc, lat_pagefault, lat_ctx; IOzone write):
 *   fork          fork(), the child _exit()s, the parent waits
 *   exec          fork() + execve("/bin/khello")
 *   sh            fork() + execl("/bin/sh", "sh", "-c", "/bin/khello") (lmbench's
 *                 "shell" case: sh runs hello)
 *   pagefault     mmap a tmpfs file MAP_SHARED, read one byte of every page, munmap;
 *                 one operation is one page
 *   ctxsw         two processes pass a one-byte token through two pipes; one
 *                 operation is one context switch (two per round trip)
 *   iozone_wbuf   buffered pwrite() of every record, then fsync(): one operation is one
 *                 record
 *   iozone_osync  pwrite() of every record on an O_SYNC descriptor
 * The writers fill every record with fresh pseudo-random bytes each round, so the
 * pages they dirty really differ from the last checkpoint; the fill is followed by an
 * untimed 0.3 s pause, so that its own dirtied pages are synchronized before the loop.
 *
 * Console protocol, one line each, written with write(2) by this process only:
 *   KB-READY clocksource=CS settle_ms=N cpu_mhz=F   warm-up done (F: the TSC
 *                                         frequency the guest kernel calibrated)
 *   KB-CAL BENCH ITERS                    iterations chosen for BENCH
 *   KB-ROUND K                            round K starts
 *   KB-START BENCH K ITERS                the timed loop starts as soon as this line
 *                                         has left the UART (tcdrain)
 *   KB-END BENCH K                        the timed loop has just ended
 *   KB-GUEST BENCH K OPS NS BYTES         guest-internal: OPS operations in NS
 *                                         nanoseconds of CLOCK_MONOTONIC
 *   KB-SKIP BENCH REASON / KB-FAIL BENCH REASON
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MAX_BENCH 16
#define HELLO "/bin/khello"
#define PF_PATH "/dev/shm/kbench.pf"
#define PAGE 4096

static double target_s = 1.0;
static long rounds;
static const char *device = "/dev/vda";
static long file_kib = 4096;
static long sync_kib = 0;
static double warm_fraction = 0.25;
static long record_kib = 4;
static long pf_kib = 8192;
static double warmup_s = 2.0;

static void say(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof(line) - 2)
        n = (int)sizeof(line) - 2;
    line[n++] = '\n';
    const char *p = line;
    while (n > 0) {
        ssize_t w = write(1, p, (size_t)n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return;
        }
        p += w;
        n -= (int)w;
    }
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- process creation ------------------------------------------------------------ */

static int reap(pid_t pid)
{
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return -1;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

static int loop_fork(long n, long *ops, long *bytes)
{
    for (long i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0)
            return -1;
        if (pid == 0)
            _exit(0);
        if (reap(pid) < 0)
            return -1;
    }
    *ops = n;
    *bytes = 0;
    return 0;
}

static int loop_exec(long n, long *ops, long *bytes)
{
    static char *const argv[] = {"khello", NULL};
    static char *const envp[] = {NULL};
    for (long i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0)
            return -1;
        if (pid == 0) {
            execve(HELLO, argv, envp);
            _exit(127);
        }
        if (reap(pid) < 0)
            return -1;
    }
    *ops = n;
    *bytes = 0;
    return 0;
}

static int loop_sh(long n, long *ops, long *bytes)
{
    for (long i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0)
            return -1;
        if (pid == 0) {
            execl("/bin/sh", "sh", "-c", HELLO, (char *)NULL);
            _exit(127);
        }
        if (reap(pid) < 0)
            return -1;
    }
    *ops = n;
    *bytes = 0;
    return 0;
}

/* ---- page faults ------------------------------------------------------------------ */

static int pf_fd = -1;
static size_t pf_size;

static int setup_pagefault(void)
{
    if (pf_fd >= 0)
        return 0;
    pf_size = (size_t)pf_kib * 1024;
    pf_fd = open(PF_PATH, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (pf_fd < 0)
        return -1;
    /* The open descriptor keeps the file: unlinked now, it never outlives the run. */
    unlink(PF_PATH);
    static char chunk[PAGE];
    for (size_t off = 0; off < pf_size; off += PAGE) {
        memset(chunk, (int)(off / PAGE), sizeof(chunk));
        if (pwrite(pf_fd, chunk, PAGE, (off_t)off) != PAGE)
            return -1;
    }
    return 0;
}

static int loop_pagefault(long n, long *ops, long *bytes)
{
    volatile unsigned sum = 0;
    for (long i = 0; i < n; i++) {
        unsigned char *p = mmap(NULL, pf_size, PROT_READ, MAP_SHARED, pf_fd, 0);
        if (p == MAP_FAILED)
            return -1;
        for (size_t off = 0; off < pf_size; off += PAGE)
            sum += p[off];
        munmap(p, pf_size);
    }
    (void)sum;
    *ops = n * (long)(pf_size / PAGE);
    *bytes = 0;
    return 0;
}

/* ---- context switches ------------------------------------------------------------- */

static int ctx_to[2] = {-1, -1}, ctx_back[2] = {-1, -1};
static pid_t ctx_child = -1;

static int setup_ctxsw(void)
{
    if (pipe(ctx_to) < 0 || pipe(ctx_back) < 0)
        return -1;
    ctx_child = fork();
    if (ctx_child < 0)
        return -1;
    if (ctx_child == 0) {
        char c;
        close(ctx_to[1]);
        close(ctx_back[0]);
        while (read(ctx_to[0], &c, 1) == 1)
            if (write(ctx_back[1], &c, 1) != 1)
                _exit(1);
        _exit(0);
    }
    close(ctx_to[0]);
    close(ctx_back[1]);
    return 0;
}

static int loop_ctxsw(long n, long *ops, long *bytes)
{
    char c = 'k';
    for (long i = 0; i < n; i++) {
        if (write(ctx_to[1], &c, 1) != 1 || read(ctx_back[0], &c, 1) != 1)
            return -1;
    }
    *ops = 2 * n;
    *bytes = 0;
    return 0;
}

static void teardown_ctxsw(void)
{
    close(ctx_to[1]);
    close(ctx_back[0]);
    if (ctx_child > 0)
        reap(ctx_child);
    ctx_child = -1;
}

/* ---- IOzone-style writes ---------------------------------------------------------- */

static unsigned char *io_buf;
static size_t io_len;
static int io_fd = -1;
static uint64_t io_seed = 0x9e3779b97f4a7c15ULL;

static void fill_fresh(long kib)
{
    /* xorshift64: a new stream every round, so every written page really changes. */
    uint64_t x = io_seed += 0x2545f4914f6cdd1dULL;
    uint64_t *w = (uint64_t *)io_buf;
    for (size_t i = 0; i < (size_t)kib * 1024 / 8; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w[i] = x;
    }
}

static int setup_io(int flags, long kib)
{
    /* mmap, not malloc: glibc would keep a freed 8 MiB chunk in the heap. */
    io_len = (size_t)kib * 1024;
    void *p = mmap(NULL, io_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return -1;
    io_buf = p;
    fill_fresh(kib);
    io_fd = open(device, O_WRONLY | O_CLOEXEC | flags);
    if (io_fd < 0) {
        munmap(io_buf, io_len);
        io_buf = NULL;
        return -1;
    }
    /* A quiet gap longer than a sync interval, so that the pages the fill dirtied go
     * with a sync point before the timed loop, not into the loop's first one. */
    usleep(300000);
    return 0;
}

static int setup_wbuf(void)
{
    return setup_io(0, file_kib);
}

static int setup_osync(void)
{
    return setup_io(O_SYNC, sync_kib);
}

static int write_all(long kib, long *ops, long *bytes)
{
    size_t rec = (size_t)record_kib * 1024, total = (size_t)kib * 1024;
    long n = 0;
    for (size_t off = 0; off + rec <= total; off += rec, n++)
        if (pwrite(io_fd, io_buf + off, rec, (off_t)off) != (ssize_t)rec)
            return -1;
    *ops = n;
    *bytes = (long)(n * (long)rec);
    return 0;
}

static int loop_wbuf(long n, long *ops, long *bytes)
{
    (void)n;
    if (write_all(file_kib, ops, bytes) < 0)
        return -1;
    return fsync(io_fd);
}

static int loop_osync(long n, long *ops, long *bytes)
{
    (void)n;
    return write_all(sync_kib, ops, bytes);
}

static void teardown_io(void)
{
    if (io_fd >= 0)
        close(io_fd);
    io_fd = -1;
    /* Keep this process small between the writers: fork() copies the page tables of
     * every mapping, and an 8 MiB buffer made lat_fork-style loops 2.5x slower. */
    if (io_buf != NULL)
        munmap(io_buf, io_len);
    io_buf = NULL;
}

/* ---- the table -------------------------------------------------------------------- */

struct bench {
    const char *name;
    int (*setup)(void);
    int (*loop)(long n, long *ops, long *bytes);
    void (*teardown)(void);
    int calibrate; /* 0: one pass per round (the writers) */
    long iters;
    const char *skip;
};

static struct bench all[] = {
    {"fork", NULL, loop_fork, NULL, 1, 0, NULL},
    {"exec", NULL, loop_exec, NULL, 1, 0, NULL},
    {"sh", NULL, loop_sh, NULL, 1, 0, NULL},
    {"pagefault", setup_pagefault, loop_pagefault, NULL, 1, 0, NULL},
    {"ctxsw", setup_ctxsw, loop_ctxsw, teardown_ctxsw, 1, 0, NULL},
    {"iozone_wbuf", setup_wbuf, loop_wbuf, teardown_io, 0, 1, NULL},
    {"iozone_osync", setup_osync, loop_osync, teardown_io, 0, 1, NULL},
};
#define N_ALL (sizeof(all) / sizeof(all[0]))

static struct bench *chosen[MAX_BENCH];
static int n_chosen;

static void choose(const char *list)
{
    char *copy = strdup(list), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        size_t i;
        for (i = 0; i < N_ALL; i++)
            if (strcmp(all[i].name, tok) == 0)
                break;
        if (i == N_ALL) {
            say("KB-FAIL %s unknown-benchmark", tok);
            continue;
        }
        if (n_chosen < MAX_BENCH)
            chosen[n_chosen++] = &all[i];
    }
    free(copy);
}

/* One untimed-by-the-host run of n iterations; guest seconds, or -1. */
static double run_once(struct bench *b, long n)
{
    long ops, bytes;
    if (b->setup && b->setup() < 0)
        return -1;
    int64_t t0 = now_ns();
    int rc = b->loop(n, &ops, &bytes);
    int64_t t1 = now_ns();
    if (b->teardown)
        b->teardown();
    return rc < 0 ? -1 : (double)(t1 - t0) / 1e9;
}

static void calibrate(struct bench *b)
{
    long n = 2;
    double t = 0;
    for (int step = 0; step < 24; step++) {
        t = run_once(b, n);
        if (t < 0) {
            b->skip = "failed";
            return;
        }
        if (t >= target_s * 0.25 || n > 100000000L)
            break;
        double f = t > 0 ? target_s * 0.35 / t : 16;
        if (f < 2)
            f = 2;
        if (f > 16)
            f = 16;
        n = (long)((double)n * f);
    }
    /* The first runs of fresh code are slow under TCG (translation): check the
     * extrapolation with one run at full length and correct it once. */
    double want = t > 0 ? (double)n * target_s / t : (double)n;
    n = want < 1 ? 1 : (long)want;
    t = run_once(b, n);
    if (t < 0) {
        b->skip = "failed";
        return;
    }
    want = t > 0 ? (double)n * target_s / t : (double)n;
    b->iters = want < 1 ? 1 : (long)want;
}

static void timed(struct bench *b, long round)
{
    long ops = 0, bytes = 0;
    long iters = b->iters;
    if (round == 1 && b->calibrate) {
        iters = (long)((double)iters * warm_fraction);
        if (iters < 1)
            iters = 1;
    }
    if (b->setup && b->setup() < 0) {
        say("KB-FAIL %s setup-errno-%d", b->name, errno);
        return;
    }
    say("KB-START %s %ld %ld", b->name, round, iters);
    tcdrain(1);
    int64_t t0 = now_ns();
    int rc = b->loop(iters, &ops, &bytes);
    int64_t t1 = now_ns();
    say("KB-END %s %ld", b->name, round);
    if (b->teardown)
        b->teardown();
    if (rc < 0)
        say("KB-FAIL %s errno-%d", b->name, errno);
    else
        say("KB-GUEST %s %ld %ld %lld %ld", b->name, round, ops, (long long)(t1 - t0), bytes);
}

static void given_iters(const char *spec)
{
    char *copy = strdup(spec), *save = NULL;
    for (char *tok = strtok_r(copy, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(tok, '=');
        if (eq == NULL)
            continue;
        *eq = 0;
        long n = atol(eq + 1);
        for (size_t i = 0; i < N_ALL; i++)
            if (strcmp(all[i].name, tok) == 0 && all[i].calibrate && n > 0)
                all[i].iters = n;
    }
    free(copy);
}

static void settle(void)
{
    /* A fresh TCG guest runs several times slower until its clocksource leaves
     * tsc-early: wait for that (at most 30 s), then spin for the warm-up. */
    char cs[64] = "?";
    int64_t start = now_ns();
    for (;;) {
        int fd = open("/sys/devices/system/clocksource/clocksource0/current_clocksource",
                      O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            ssize_t n = read(fd, cs, sizeof(cs) - 1);
            close(fd);
            cs[n > 0 ? n : 0] = 0;
            char *nl = strchr(cs, '\n');
            if (nl)
                *nl = 0;
        }
        if (strcmp(cs, "tsc-early") != 0 || now_ns() - start > 30000000000LL)
            break;
        usleep(100000);
    }
    int64_t settled = now_ns();
    volatile uint64_t spin = 0;
    while (now_ns() - settled < (int64_t)(warmup_s * 1e9))
        spin++;
    /* The TSC frequency the kernel calibrated at boot: a guest booted while the VM was
     * being stopped for sync points can get it wrong, and then its clock runs fast or
     * slow (the host's clock, which times the loops, is not affected). */
    char mhz[32] = "?";
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (f != NULL) {
        char line[256];
        while (fgets(line, sizeof(line), f))
            if (sscanf(line, "cpu MHz : %31s", mhz) == 1)
                break;
        fclose(f);
    }
    say("KB-READY clocksource=%s settle_ms=%lld cpu_mhz=%s", cs,
        (long long)((settled - start) / 1000000), mhz);
}

int main(int argc, char **argv)
{
    const char *list = "fork,exec,sh,pagefault,ctxsw,iozone_wbuf,iozone_osync";
    int opt;
    const char *given = "";
    while ((opt = getopt(argc, argv, "t:i:r:W:b:d:F:S:R:P:w:")) != -1) {
        switch (opt) {
        case 't': target_s = atof(optarg); break;
        case 'i': given = optarg; break;
        case 'W': warm_fraction = atof(optarg); break;
        case 'S': sync_kib = atol(optarg); break;
        case 'r': rounds = atol(optarg); break;
        case 'b': list = optarg; break;
        case 'd': device = optarg; break;
        case 'F': file_kib = atol(optarg); break;
        case 'R': record_kib = atol(optarg); break;
        case 'P': pf_kib = atol(optarg); break;
        case 'w': warmup_s = atof(optarg); break;
        default:
            say("KB-FAIL usage kbench [-t S] [-i B=N,...] [-r N] [-W F] [-b LIST] [-d DEV] "
                "[-F KIB] [-S KIB] [-R KIB] [-P KIB] [-w S]");
            return 2;
        }
    }
    if (sync_kib == 0)
        sync_kib = file_kib;
    if (target_s <= 0 || file_kib <= 0 || sync_kib <= 0 || record_kib <= 0 || pf_kib < 4 ||
        warm_fraction <= 0) {
        say("KB-FAIL usage bad-sizes");
        return 2;
    }
    choose(list);
    given_iters(given);
    settle();
    struct stat st;
    for (int i = 0; i < n_chosen; i++) {
        struct bench *b = chosen[i];
        if ((b->loop == loop_exec || b->loop == loop_sh) && stat(HELLO, &st) < 0)
            b->skip = "no-" HELLO;
        if (b->setup == setup_wbuf || b->setup == setup_osync) {
            if (stat(device, &st) < 0)
                b->skip = "no-device";
            continue;
        }
        if (b->skip == NULL && b->calibrate && b->iters == 0)
            calibrate(b);
        if (b->skip)
            say("KB-SKIP %s %s", b->name, b->skip);
        else
            say("KB-CAL %s %ld", b->name, b->iters);
    }
    for (int i = 0; i < n_chosen; i++)
        if (chosen[i]->skip && !chosen[i]->calibrate)
            say("KB-SKIP %s %s", chosen[i]->name, chosen[i]->skip);
    for (long k = 1; rounds == 0 || k <= rounds; k++) {
        say("KB-ROUND %ld", k);
        for (int i = 0; i < n_chosen; i++)
            if (!chosen[i]->skip)
                timed(chosen[i], k);
    }
    say("KB-DONE");
    return 0;
}
