/* An LD_PRELOAD shim that makes every fsync, fdatasync and syncfs return
 * SLOW_FSYNC_US microseconds (default 2000) later, like a disk without a
 * power-safe write cache. Used by make bench and tests/test_server.py to show
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
/* Each wrapper calls the real function, then sleeps. */
#define SLOWED(name)                                                    \
    int name(int fd) {                                                  \
        static int (*real)(int);                                        \
        if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, #name);        \
        int rc = real(fd);                                              \
        delay();                                                        \
        return rc;                                                      \
    }

SLOWED(fsync)
SLOWED(fdatasync)
SLOWED(syncfs)
