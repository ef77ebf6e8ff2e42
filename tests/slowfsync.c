/* An LD_PRELOAD shim that makes every fsync, fdatasync and syncfs return
 * SLOW_FSYNC_US microseconds (default 2000) later, like a disk without a
 * power-safe write cache. Used by make bench and tests/test_daemon.py to show
 * group commit where the flush, not the CPU, is what a publisher waits for. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
static void delay(void) {
    static long us = -1;
    if (us < 0) { const char *v = getenv("SLOW_FSYNC_US"); us = v ? atol(v) : 2000; }
    struct timespec t = { us / 1000000, (us % 1000000) * 1000 };
    nanosleep(&t, NULL);
}
int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int rc = real(fd);
    delay();
    return rc;
}
int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int rc = real(fd);
    delay();
    return rc;
}
int syncfs(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "syncfs");
    int rc = real(fd);
    delay();
    return rc;
}
