/*
 * livemig's vfio-user test device: a libvfio-user server whose migration
 * callbacks implement pre-copy with dirty tracking (the library's sample does not).
 *
 * State: `size` bytes of pages (BAR1, read-only through REGION_READ). Every page
 * describes itself: its first 16 bytes are (page index, version) and the rest is
 * a xorshift stream seeded by (seed, index, version), so any page can be checked
 * on its own and a corrupt load is caught. A writer thread rewrites random pages
 * (version + 1) at `rate` pages/s while the device runs (RUNNING, PRE_COPY).
 *
 * Stream: records {u32 type, u32 len, u64 arg} + len bytes, little-endian:
 * HEADER (arg = size, payload = u64 page size, u64 seed), PAGE (arg = index, payload = the
 * page), END (arg = pages). A session starts with every page dirty. PRE_COPY sends
 * dirty pages and reads 0 bytes when none is dirty now ("nothing now", more may
 * come); STOP_COPY sends the rest, then END, then 0 bytes forever. A read never
 * splits a record unless the request is smaller than one record.
 *
 * The destination takes PRE_COPY + STOP_COPY streams (pages are simply
 * overwritten), checks each page as it arrives (so the check costs no downtime
 * but for the pages of the stop-copy stream), and validates on RESUMING -> STOP: a
 * header for this geometry, whole records, every page received and sound, END seen.
 * Otherwise the transition fails with EINVAL and the device stays RESUMING;
 * DEVICE_RESET drops the partial load (the state is regenerated from the seed).
 * PRE_COPY -> RUNNING (abort) is always allowed.
 *
 * BAR0 (4 KiB, u64 registers): 0x00 rate (RW, pages/s), 0x08 pages written by the
 * writer (R), 0x10 state size (R), 0x18 pages failing their self-check (R, scans
 * the state), 0x20 touch (W: rewrite page N now, as the writer would).
 *
 * Usage: testdev [-s SIZE] [-r RATE] [-S SEED] [-v] SOCKET. The server serves one
 * client at a time and waits for the next when one leaves; SIGTERM ends it.
 */

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <err.h>

#include "libvfio-user.h"

#define PAGE 4096u
#define REC_HEADER 1u
#define REC_PAGE 2u
#define REC_END 3u

struct rec {
    uint32_t type;
    uint32_t len;
    uint64_t arg;
} __attribute__((packed));

struct dev {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    uint8_t *mem;
    uint64_t size, npages, seed, rate, writes, rng;
    uint8_t *dirty;
    uint64_t ndirty;
    vfu_migr_state_t state;
    bool runs;
    /* saving session */
    bool saving;
    int phase; /* 0 header, 1 pages, 2 end, 3 done */
    uint64_t cursor;
    uint8_t stage[sizeof(struct rec) + PAGE];
    size_t stage_len, stage_off;
    /* resuming session */
    uint8_t in[sizeof(struct rec) + PAGE];
    size_t in_len;
    uint8_t *received;
    uint64_t nreceived;
    bool got_header, got_end, bad;
    char why[160];
};

static struct dev D;
static volatile sig_atomic_t quit;

static uint64_t
mix(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static void
fill_page(uint8_t *page, uint64_t index, uint64_t version)
{
    uint64_t *words = (uint64_t *)page;
    uint64_t x = mix(D.seed ^ mix(index + 1) ^ mix(version + 0x9e3779b97f4a7c15ULL)) | 1;

    words[0] = index;
    words[1] = version;
    for (size_t i = 2; i < PAGE / 8; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        words[i] = x;
    }
}

static bool
page_ok(uint64_t index)
{
    uint8_t expect[PAGE];
    const uint64_t *words = (const uint64_t *)(D.mem + index * PAGE);

    if (words[0] != index) {
        return false;
    }
    fill_page(expect, index, words[1]);
    return memcmp(expect, D.mem + index * PAGE, PAGE) == 0;
}

/* Rewrite one page as the workload would; the caller holds the lock. */
static void
write_page(uint64_t index)
{
    uint64_t *words = (uint64_t *)(D.mem + index * PAGE);
    uint64_t version = words[1] + 1;

    fill_page(D.mem + index * PAGE, index, version);
    if (!D.dirty[index]) {
        D.dirty[index] = 1;
        D.ndirty++;
    }
    D.writes++;
}

static void
regenerate(void)
{
    for (uint64_t i = 0; i < D.npages; i++) {
        fill_page(D.mem + i * PAGE, i, 0);
    }
}

static void *
writer(void *unused)
{
    struct timespec last, now;
    double due = 0;

    (void)unused;
    clock_gettime(CLOCK_MONOTONIC, &last);
    pthread_mutex_lock(&D.lock);
    while (!quit) {
        if (!D.runs || D.rate == 0) {
            pthread_cond_wait(&D.wake, &D.lock);
            clock_gettime(CLOCK_MONOTONIC, &last);
            due = 0;
            continue;
        }
        clock_gettime(CLOCK_MONOTONIC, &now);
        due += (double)D.rate * ((now.tv_sec - last.tv_sec) + (now.tv_nsec - last.tv_nsec) / 1e9);
        last = now;
        for (; due >= 1 && D.runs; due -= 1) {
            D.rng = mix(D.rng + 1);
            write_page(D.rng % D.npages);
        }
        pthread_mutex_unlock(&D.lock);
        usleep(1000);
        pthread_mutex_lock(&D.lock);
    }
    pthread_mutex_unlock(&D.lock);
    return NULL;
}

static void
set_runs(bool runs)
{
    D.runs = runs;
    pthread_cond_broadcast(&D.wake);
}

static void
start_save(void)
{
    memset(D.dirty, 1, D.npages);
    D.ndirty = D.npages;
    D.saving = true;
    D.phase = 0;
    D.cursor = 0;
    D.stage_len = D.stage_off = 0;
}

static void
start_resume(void)
{
    memset(D.received, 0, D.npages);
    D.nreceived = 0;
    D.in_len = 0;
    D.got_header = D.got_end = D.bad = false;
    D.why[0] = '\0';
}

/* Put the next record in the stage; false when there is none now. */
static bool
next_record(void)
{
    struct rec *r = (struct rec *)D.stage;

    if (D.phase == 0) {
        uint64_t geometry[2] = { PAGE, D.seed };
        *r = (struct rec){ REC_HEADER, sizeof(geometry), D.size };
        memcpy(D.stage + sizeof(*r), geometry, sizeof(geometry));
        D.stage_len = sizeof(*r) + sizeof(geometry);
        D.phase = 1;
        return true;
    }
    if (D.phase == 1 && D.ndirty > 0) {
        while (!D.dirty[D.cursor]) {
            D.cursor = (D.cursor + 1) % D.npages;
        }
        *r = (struct rec){ REC_PAGE, PAGE, D.cursor };
        memcpy(D.stage + sizeof(*r), D.mem + D.cursor * PAGE, PAGE);
        D.stage_len = sizeof(*r) + PAGE;
        D.dirty[D.cursor] = 0;
        D.ndirty--;
        D.cursor = (D.cursor + 1) % D.npages;
        return true;
    }
    if (D.phase == 1 && D.state == VFU_MIGR_STATE_STOP_AND_COPY) {
        D.phase = 2;
    }
    if (D.phase == 2) {
        *r = (struct rec){ REC_END, 0, D.npages };
        D.stage_len = sizeof(*r);
        D.phase = 3;
        return true;
    }
    return false;
}

static ssize_t
read_data(vfu_ctx_t *ctx, void *buf, uint64_t count)
{
    size_t out = 0;

    (void)ctx;
    pthread_mutex_lock(&D.lock);
    while (out < count) {
        if (D.stage_off == D.stage_len) {
            D.stage_off = D.stage_len = 0;
            if (!next_record()) {
                break;
            }
            if (out > 0 && D.stage_len > count - out) {
                break; /* the record waits for the next read, whole */
            }
        }
        size_t n = D.stage_len - D.stage_off;
        if (n > count - out) {
            n = count - out;
        }
        memcpy((uint8_t *)buf + out, D.stage + D.stage_off, n);
        D.stage_off += n;
        out += n;
    }
    pthread_mutex_unlock(&D.lock);
    return (ssize_t)out;
}

static void
refuse(const char *why)
{
    if (!D.bad) {
        D.bad = true;
        snprintf(D.why, sizeof(D.why), "%s", why);
    }
}

static void
load_record(const struct rec *r, const uint8_t *payload)
{
    uint64_t geometry[2];

    switch (r->type) {
    case REC_HEADER:
        memcpy(geometry, payload, sizeof(geometry));
        if (r->len != sizeof(geometry) || r->arg != D.size || geometry[0] != PAGE) {
            refuse("header for another geometry");
            break;
        }
        D.seed = geometry[1]; /* the pages derive from the source's seed */
        D.got_header = true;
        break;
    case REC_PAGE:
        if (!D.got_header || r->len != PAGE || r->arg >= D.npages) {
            refuse("page record out of place");
            break;
        }
        memcpy(D.mem + r->arg * PAGE, payload, PAGE);
        if (!page_ok(r->arg)) {
            refuse("a page fails its self-check");
        }
        if (!D.received[r->arg]) {
            D.received[r->arg] = 1;
            D.nreceived++;
        }
        break;
    case REC_END:
        if (r->len != 0 || r->arg != D.npages) {
            refuse("bad end record");
        }
        D.got_end = true;
        break;
    default:
        refuse("unknown record type");
    }
}

static ssize_t
write_data(vfu_ctx_t *ctx, void *data, uint64_t count)
{
    const uint8_t *p = data;
    uint64_t left = count;

    (void)ctx;
    pthread_mutex_lock(&D.lock);
    while (left > 0 && !D.bad) {
        size_t want = sizeof(struct rec);
        if (D.in_len >= sizeof(struct rec)) {
            const struct rec *r = (const struct rec *)D.in;
            if (r->len > PAGE) {
                refuse("record longer than a page");
                break;
            }
            want += r->len;
        }
        size_t n = want - D.in_len;
        if (n > left) {
            n = left;
        }
        memcpy(D.in + D.in_len, p, n);
        D.in_len += n;
        p += n;
        left -= n;
        if (D.in_len >= sizeof(struct rec)) {
            const struct rec *r = (const struct rec *)D.in;
            if (r->len <= PAGE && D.in_len == sizeof(struct rec) + r->len) {
                load_record(r, D.in + sizeof(struct rec));
                D.in_len = 0;
            }
        }
    }
    pthread_mutex_unlock(&D.lock);
    return (ssize_t)count; /* bad data is refused at RESUMING -> STOP */
}

static int
validate(void)
{
    if (!D.bad && D.in_len != 0) {
        refuse("stream ends inside a record");
    }
    if (!D.bad && !D.got_end) {
        refuse("stream has no end record");
    }
    if (!D.bad && D.nreceived != D.npages) {
        refuse("stream misses pages");
    }
    if (D.bad) {
        fprintf(stderr, "testdev[%d]: refusing the loaded state: %s\n", getpid(), D.why);
        errno = EINVAL;
        return -1;
    }
    return 0;
}

static int
transition(vfu_ctx_t *ctx, vfu_migr_state_t state)
{
    int ret = 0;

    (void)ctx;
    pthread_mutex_lock(&D.lock);
    switch (state) {
    case VFU_MIGR_STATE_PRE_COPY:
        start_save();
        break;
    case VFU_MIGR_STATE_STOP_AND_COPY:
        set_runs(false);
        if (!D.saving) {
            start_save();
        }
        break;
    case VFU_MIGR_STATE_STOP:
        set_runs(false);
        if (D.state == VFU_MIGR_STATE_RESUME) {
            ret = validate();
        }
        D.saving = false;
        break;
    case VFU_MIGR_STATE_RESUME:
        start_resume();
        break;
    case VFU_MIGR_STATE_RUNNING:
        D.saving = false;
        set_runs(true);
        break;
    }
    if (ret == 0) {
        D.state = state;
    }
    pthread_mutex_unlock(&D.lock);
    return ret;
}

static int
reset(vfu_ctx_t *ctx, vfu_reset_type_t type)
{
    (void)ctx;
    if (type != VFU_RESET_DEVICE) {
        return 0; /* a client leaving changes nothing: the next one finds the state */
    }
    pthread_mutex_lock(&D.lock);
    D.saving = false;
    if (D.state == VFU_MIGR_STATE_RESUME) {
        regenerate();
        start_resume();
        D.got_header = D.got_end = true;
        memset(D.received, 1, D.npages);
        D.nreceived = D.npages; /* nothing loaded: the regenerated state validates */
    }
    pthread_mutex_unlock(&D.lock);
    return 0;
}

static ssize_t
bar0(vfu_ctx_t *ctx, char *const buf, size_t count, loff_t offset, const bool is_write)
{
    uint64_t value = 0;

    (void)ctx;
    if (count != 8 || offset % 8 != 0) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&D.lock);
    if (is_write) {
        memcpy(&value, buf, 8);
        if (offset == 0x00) {
            D.rate = value;
            pthread_cond_broadcast(&D.wake);
        } else if (offset == 0x20 && value < D.npages) {
            write_page(value);
        } else {
            pthread_mutex_unlock(&D.lock);
            errno = EINVAL;
            return -1;
        }
    } else {
        switch (offset) {
        case 0x00: value = D.rate; break;
        case 0x08: value = D.writes; break;
        case 0x10: value = D.size; break;
        case 0x18:
            for (uint64_t i = 0; i < D.npages; i++) {
                value += !page_ok(i);
            }
            break;
        default: value = 0;
        }
        memcpy(buf, &value, 8);
    }
    pthread_mutex_unlock(&D.lock);
    return 8;
}

static ssize_t
bar1(vfu_ctx_t *ctx, char *const buf, size_t count, loff_t offset, const bool is_write)
{
    (void)ctx;
    if (is_write || (uint64_t)offset + count > D.size) {
        errno = EINVAL;
        return -1;
    }
    pthread_mutex_lock(&D.lock);
    memcpy(buf, D.mem + offset, count);
    pthread_mutex_unlock(&D.lock);
    return (ssize_t)count;
}

static void
on_term(int sig)
{
    (void)sig;
    quit = 1;
}

static void
logger(vfu_ctx_t *ctx, int level, const char *msg)
{
    (void)ctx;
    (void)level;
    fprintf(stderr, "testdev[%d]: %s\n", getpid(), msg);
}

int
main(int argc, char *argv[])
{
    const vfu_migration_callbacks_t callbacks = {
        .version = VFU_MIGR_CALLBACKS_VERS,
        .transition = transition,
        .read_data = read_data,
        .write_data = write_data,
    };
    struct sigaction act = { .sa_handler = on_term };
    sigset_t blocked;
    bool verbose = false;
    pthread_t thread;
    vfu_ctx_t *ctx;
    int opt;

    D.size = 1u << 20;
    while ((opt = getopt(argc, argv, "s:r:S:v")) != -1) {
        switch (opt) {
        case 's': D.size = strtoull(optarg, NULL, 0); break;
        case 'r': D.rate = strtoull(optarg, NULL, 0); break;
        case 'S': D.seed = strtoull(optarg, NULL, 0); break;
        case 'v': verbose = true; break;
        default: errx(2, "usage: %s [-s SIZE] [-r PAGES_PER_S] [-S SEED] [-v] SOCKET", argv[0]);
        }
    }
    if (optind >= argc) {
        errx(2, "missing the socket path");
    }
    if (D.size < PAGE || (D.size & (D.size - 1)) != 0) {
        errx(2, "size must be a power of two of at least %u bytes", PAGE);
    }
    D.npages = D.size / PAGE;
    D.mem = aligned_alloc(PAGE, D.size);
    D.dirty = calloc(D.npages, 1);
    D.received = calloc(D.npages, 1);
    if (D.mem == NULL || D.dirty == NULL || D.received == NULL) {
        err(1, "allocating %llu bytes of state", (unsigned long long)D.size);
    }
    D.rng = mix(D.seed + 7);
    regenerate();
    D.state = VFU_MIGR_STATE_RUNNING;
    D.runs = true;
    pthread_mutex_init(&D.lock, NULL);
    pthread_cond_init(&D.wake, NULL);

    sigaction(SIGTERM, &act, NULL);
    sigaction(SIGINT, &act, NULL);
    ctx = vfu_create_ctx(VFU_TRANS_SOCK, argv[optind], 0, NULL, VFU_DEV_TYPE_PCI);
    if (ctx == NULL) {
        err(1, "vfu_create_ctx(%s)", argv[optind]);
    }
    if (vfu_setup_log(ctx, logger, verbose ? LOG_DEBUG : LOG_ERR) < 0 ||
        vfu_pci_init(ctx, VFU_PCI_TYPE_CONVENTIONAL, PCI_HEADER_TYPE_NORMAL, 0) < 0 ||
        vfu_setup_region(ctx, VFU_PCI_DEV_BAR0_REGION_IDX, PAGE, bar0, VFU_REGION_FLAG_RW,
                         NULL, 0, -1, 0) < 0 ||
        vfu_setup_region(ctx, VFU_PCI_DEV_BAR1_REGION_IDX, D.size, bar1, VFU_REGION_FLAG_READ,
                         NULL, 0, -1, 0) < 0 ||
        vfu_setup_device_migration_callbacks(ctx, &callbacks) < 0 ||
        vfu_setup_device_reset_cb(ctx, reset) < 0) {
        err(1, "setting up the device");
    }
    vfu_pci_set_id(ctx, 0x1de5, 0x11e, 0, 0);
    if (vfu_realize_ctx(ctx) < 0) {
        err(1, "vfu_realize_ctx");
    }
    /* The writer must not take SIGTERM: the main thread's blocking calls must see EINTR. */
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGINT);
    pthread_sigmask(SIG_BLOCK, &blocked, NULL);
    if (pthread_create(&thread, NULL, writer, NULL) != 0) {
        errx(1, "starting the writer thread");
    }
    pthread_sigmask(SIG_UNBLOCK, &blocked, NULL);
    fprintf(stderr, "testdev[%d]: serving %s, %llu bytes\n", getpid(), argv[optind],
            (unsigned long long)D.size);
    while (!quit) {
        if (vfu_attach_ctx(ctx) < 0) {
            if (errno == EINTR) {
                continue;
            }
            err(1, "vfu_attach_ctx");
        }
        while (!quit) {
            if (vfu_run_ctx(ctx) < 0) {
                if (errno == EINTR) {
                    continue;
                }
                if (errno != ENOTCONN && errno != ESHUTDOWN) {
                    warn("vfu_run_ctx");
                }
                break;
            }
        }
    }
    pthread_mutex_lock(&D.lock);
    set_runs(false);
    pthread_mutex_unlock(&D.lock);
    pthread_join(thread, NULL);
    vfu_destroy_ctx(ctx);
    return 0;
}
