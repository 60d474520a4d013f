/*
 * memhog - the workload of the balloon test guest.
 *
 * Holds a host-chosen amount of anonymous memory so that the balloon
 * controller has real memory pressure to react to.
 *
 * Control channel: one command per line on CTL (default /dev/ttyS1, which QEMU
 * exposes as `-serial unix:ctl.sock,server=on,wait=off`).  A line holding an
 * integer N means "hold exactly N MiB, allocated and touched": memhog grows by
 * mmap()ing 1 MiB chunks and shrinks by munmap()ing them, so freed memory
 * really goes back to the guest kernel (malloc/free would keep it in the heap).
 *
 * Output, written to stdout (the console, ttyS0) and, when CTL is a tty,
 * echoed to CTL so the host can follow one clean channel without kernel
 * messages in between:
 *   memhog start pid=P ctl=PATH
 *   memhog ack N                       a command was received
 *   memhog reached N                   held_mib == N after a change
 *   memhog alloc-failed held_mib=H target_mib=N errno=E
 *   memhog bad-command "..."
 *   memhog held_mib=H MemTotal_kb=.. MemFree_kb=.. MemAvailable_kb=..
 *          oom_kill=.. target_mib=N uptime_ms=.. allocstall=..
 *          pgscan_kswapd=.. pgscan_direct=.. pgsteal_kswapd=.. pgsteal_direct=..
 *                                      (one line per second; the last five are
 *                                      the /proc/vmstat events behind virtio
 *                                      balloon stat tags 11-15, allocstall
 *                                      summed over zones; -1 if absent)
 *
 * Growth is done in slices between status ticks, so a large request under
 * slow emulation (TCG) still yields one status line per second.
 *
 * Usage: memhog [CTL_PATH]   (a FIFO works too, which allows host testing)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024UL * 1024UL)
#define PAGE 4096UL
#define MAX_MIB (1L << 20)        /* 1 TiB: anything above is a typo */
#define STATUS_PERIOD_MS 1000
#define RETOUCH_PERIOD_MS 5000
#define CTL_RETRY_MS 2000

static char **chunks;             /* chunks[i] is one mmap()ed MiB */
static long held_mib;             /* number of valid entries in chunks */
static long chunks_cap;
static long target_mib;
static int reached_pending;       /* print "reached" when held == target */
static int alloc_failed_reported; /* one alloc-failed line per target */
static unsigned char touch_val = 1;

static const char *ctl_path = "/dev/ttyS1";
static int ctl_fd = -1;
static int ctl_echo;              /* echo output to CTL (only if a tty) */
static char line_buf[256];
static size_t line_len;

static long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000L + ts.tv_nsec / 1000000L;
}

/* Write one line to the console and, best effort, to the control channel.
 * The channel is non-blocking: if nobody drains the host socket we drop the
 * copy rather than stall the workload. */
static void say(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    /* A single write() per line keeps lines whole on the console. */
    if (write(STDOUT_FILENO, buf, n) < 0) {
        /* nothing sensible to do without a console */
    }
    if (ctl_fd >= 0 && ctl_echo && write(ctl_fd, buf, n) < 0) {
        /* EAGAIN: host side not reading; drop */
    }
}

static void open_ctl(void)
{
    /* O_RDWR also keeps a FIFO from reporting EOF when its writer leaves. */
    ctl_fd = open(ctl_path, O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
    if (ctl_fd < 0)
        return;
    /* Echo only to a real serial line: a FIFO would feed our own output
     * back to us as commands. */
    ctl_echo = isatty(ctl_fd);
    if (ctl_echo) {
        /* Raw mode: no echo back to the host, no CR/LF rewriting, no line
         * editing; we split lines ourselves. */
        struct termios t;
        if (tcgetattr(ctl_fd, &t) == 0) {
            cfmakeraw(&t);
            cfsetispeed(&t, B115200);
            cfsetospeed(&t, B115200);
            t.c_cflag |= CLOCAL | CREAD;
            tcsetattr(ctl_fd, TCSANOW, &t);
        }
        tcflush(ctl_fd, TCIFLUSH);
    }
}

/* Parse "key:   value kB" out of a /proc file; -1 if absent. */
static long proc_value(const char *path, const char *key)
{
    char buf[8192];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = '\0';
    size_t klen = strlen(key);
    for (char *p = buf; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, key, klen) == 0 && (p[klen] == ':' || p[klen] == ' '))
            return strtol(p + klen + 1, NULL, 10);
    }
    return -1;
}

/* Sum of every "PREFIX... value" line (allocstall_dma, allocstall_normal...);
 * -1 if there is none. */
static long proc_sum(const char *path, const char *prefix)
{
    char buf[16384];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = 0;
    ssize_t n;
    while (len < sizeof buf - 1 && (n = read(fd, buf + len, sizeof buf - 1 - len)) > 0)
        len += (size_t)n;
    close(fd);
    buf[len] = '\0';
    size_t plen = strlen(prefix);
    long sum = -1;
    for (char *p = buf; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (strncmp(p, prefix, plen) == 0) {
            char *space = strchr(p, ' ');
            if (space)
                sum = (sum < 0 ? 0 : sum) + strtol(space + 1, NULL, 10);
        }
    }
    return sum;
}

static void status_line(void)
{
    say("memhog held_mib=%ld MemTotal_kb=%ld MemFree_kb=%ld MemAvailable_kb=%ld"
        " oom_kill=%ld target_mib=%ld uptime_ms=%ld allocstall=%ld"
        " pgscan_kswapd=%ld pgscan_direct=%ld pgsteal_kswapd=%ld pgsteal_direct=%ld",
        held_mib,
        proc_value("/proc/meminfo", "MemTotal"),
        proc_value("/proc/meminfo", "MemFree"),
        proc_value("/proc/meminfo", "MemAvailable"),
        proc_value("/proc/vmstat", "oom_kill"),
        target_mib, now_ms(),
        proc_sum("/proc/vmstat", "allocstall"),
        proc_value("/proc/vmstat", "pgscan_kswapd"),
        proc_value("/proc/vmstat", "pgscan_direct"),
        proc_value("/proc/vmstat", "pgsteal_kswapd"),
        proc_value("/proc/vmstat", "pgsteal_direct"));
}

/* Write to every page so it is backed by real guest RAM (not the shared zero
 * page); a changing value keeps host-side dedup (KSM) from merging them. */
static void touch_chunk(char *c)
{
    for (unsigned long off = 0; off < MIB; off += PAGE)
        c[off] = (char)touch_val;
}

static int grow_one(void)
{
    if (held_mib == chunks_cap) {
        long cap = chunks_cap ? chunks_cap * 2 : 256;
        char **n = realloc(chunks, cap * sizeof *chunks);
        if (!n)
            return -1;
        chunks = n;
        chunks_cap = cap;
    }
    char *c = mmap(NULL, MIB, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (c == MAP_FAILED)
        return -1;
    touch_chunk(c);
    chunks[held_mib++] = c;
    return 0;
}

static void shrink_to(long mib)
{
    while (held_mib > mib)
        munmap(chunks[--held_mib], MIB);
}

static void handle_line(char *s)
{
    while (*s == ' ' || *s == '\t' || *s == '\r')
        s++;
    size_t len = strlen(s);
    while (len && (s[len - 1] == ' ' || s[len - 1] == '\t' || s[len - 1] == '\r'))
        s[--len] = '\0';
    if (len == 0)
        return;
    char *end;
    errno = 0;
    long n = strtol(s, &end, 10);
    if (errno || *end != '\0' || n < 0 || n > MAX_MIB) {
        say("memhog bad-command \"%s\"", s);
        return;
    }
    say("memhog ack %ld", n);
    target_mib = n;
    reached_pending = 1;
    alloc_failed_reported = 0;
    shrink_to(target_mib);
}

static void read_ctl(void)
{
    char buf[256];
    for (;;) {
        ssize_t n = read(ctl_fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) {
            /* Hangup/error: reopen on a later tick. */
            close(ctl_fd);
            ctl_fd = -1;
            return;
        }
        for (ssize_t i = 0; i < n; i++) {
            char ch = buf[i];
            if (ch == '\n' || ch == '\r') {
                line_buf[line_len] = '\0';
                handle_line(line_buf);
                line_len = 0;
            } else if (line_len < sizeof line_buf - 1) {
                line_buf[line_len++] = ch;
            }
            /* Overlong lines are truncated and then rejected as bad. */
        }
    }
}

int main(int argc, char **argv)
{
    if (argc > 1)
        ctl_path = argv[1];
    signal(SIGPIPE, SIG_IGN);
    /* Unbuffered: every status line must reach the console immediately. */
    setvbuf(stdout, NULL, _IONBF, 0);

    open_ctl();
    say("memhog start pid=%d ctl=%s%s", (int)getpid(), ctl_path,
        ctl_fd < 0 ? " (unavailable, retrying)" : "");

    long next_status = now_ms();
    long next_retouch = next_status + RETOUCH_PERIOD_MS;
    long next_ctl_retry = next_status + CTL_RETRY_MS;

    for (;;) {
        long now = now_ms();
        if (now >= next_status) {
            status_line();
            /* Skip missed ticks instead of bursting after a stall. */
            while (next_status <= now)
                next_status += STATUS_PERIOD_MS;
        }
        if (ctl_fd < 0 && now >= next_ctl_retry) {
            open_ctl();
            next_ctl_retry = now + CTL_RETRY_MS;
        }
        if (now >= next_retouch) {
            /* Periodic re-touch keeps the pages hot and resident. */
            touch_val = (unsigned char)(touch_val % 255 + 1);
            for (long i = 0; i < held_mib; i++)
                touch_chunk(chunks[i]);
            next_retouch = now_ms() + RETOUCH_PERIOD_MS;
        }

        /* Grow in slices until the next status tick. */
        int grow_failed = 0;
        while (held_mib < target_mib && now_ms() < next_status) {
            if (grow_one() != 0) {
                grow_failed = 1;
                if (!alloc_failed_reported) {
                    say("memhog alloc-failed held_mib=%ld target_mib=%ld errno=%d",
                        held_mib, target_mib, errno);
                    alloc_failed_reported = 1;
                }
                break;
            }
        }
        if (reached_pending && held_mib == target_mib) {
            say("memhog reached %ld", target_mib);
            reached_pending = 0;
        }

        /* Wait for a command; do not sleep while growth is still pending. */
        int timeout = (int)(next_status - now_ms());
        if (timeout < 0)
            timeout = 0;
        if (held_mib < target_mib && !grow_failed)
            timeout = 0;
        struct pollfd pfd = {.fd = ctl_fd, .events = POLLIN};
        int r = poll(&pfd, 1, timeout); /* fd -1 is ignored: plain sleep */
        if (r > 0 && ctl_fd >= 0) {
            if (pfd.revents & POLLIN)
                read_ctl();
            else if (pfd.revents & (POLLHUP | POLLERR | POLLNVAL)) {
                close(ctl_fd);
                ctl_fd = -1;
            }
        }
    }
}
