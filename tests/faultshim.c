/* An LD_PRELOAD shim for tests/test_gateway_faults.py: makes the k-th call of
 * fdatasync or pwrite64 (pwrite is the same syscall) fail with an errno.
 *
 * Built by the test with `cc -shared -fPIC -O2 -o faultshim.so faultshim.c -ldl`
 * and loaded into the fork server with LD_PRELOAD. It is disarmed until a
 * process calls faultshim_arm() (through ctypes), so the server and its other
 * children run untouched. Once armed it counts the calls of both syscalls from
 * zero; when the armed one reaches call number `when` (1-based) it fails it,
 * and with `sticky` every later call too ("the fault never clears"). Each
 * failure is reported with one write() to `report_fd` as
 *
 *     FAULT <syscall> <call number> <errno>
 *
 * before the call returns -1, so a test counts only faults that really fired.
 * `when` = 0 never fires: a counting run.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

enum { FS_FDATASYNC = 0, FS_PWRITE64 = 1, FS_N = 2 };
static const char *const fs_names[FS_N] = {"fdatasync", "pwrite64"};

static long fs_calls[FS_N];
static long fs_fired[FS_N];
static int fs_armed;
static int fs_which = -1;
static long fs_when;
static int fs_errno;
static int fs_sticky;
static int fs_report_fd = -1;

static int (*real_fdatasync)(int);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off_t);

void faultshim_arm(int which, long when, int err, int sticky, int report_fd) {
    fs_calls[0] = fs_calls[1] = 0;
    fs_fired[0] = fs_fired[1] = 0;
    fs_which = which;
    fs_when = when;
    fs_errno = err;
    fs_sticky = sticky;
    fs_report_fd = report_fd;
    fs_armed = 1;
}

void faultshim_disarm(void) { fs_armed = 0; }

long faultshim_calls(int which) { return which >= 0 && which < FS_N ? fs_calls[which] : -1; }

long faultshim_fired(int which) { return which >= 0 && which < FS_N ? fs_fired[which] : -1; }

/* 1: fail this call (and report it), 0: pass it through. */
static int fs_hit(int which) {
    if (!fs_armed)
        return 0;
    long n = __atomic_add_fetch(&fs_calls[which], 1, __ATOMIC_SEQ_CST);
    if (which != fs_which || fs_when <= 0)
        return 0;
    if (!(n == fs_when || (fs_sticky && n > fs_when)))
        return 0;
    __atomic_add_fetch(&fs_fired[which], 1, __ATOMIC_SEQ_CST);
    if (fs_report_fd >= 0) {
        char line[96];
        int len = snprintf(line, sizeof line, "FAULT %s %ld %d\n", fs_names[which], n, fs_errno);
        if (len > 0) {
            ssize_t ignored = write(fs_report_fd, line, (size_t)len);
            (void)ignored;
        }
    }
    return 1;
}

int fdatasync(int fd) {
    if (fs_hit(FS_FDATASYNC)) {
        errno = fs_errno;
        return -1;
    }
    if (!real_fdatasync)
        real_fdatasync = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real_fdatasync(fd);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    if (fs_hit(FS_PWRITE64)) {
        errno = fs_errno;
        return -1;
    }
    if (!real_pwrite64)
        real_pwrite64 = (ssize_t (*)(int, const void *, size_t, off_t))dlsym(RTLD_NEXT,
                                                                           "pwrite64");
    return real_pwrite64(fd, buf, count, offset);
}

/* On 64-bit glibc pwrite is pwrite64; whichever name a caller linked, it is one
 * counter. */
ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    return pwrite64(fd, buf, count, offset);
}
