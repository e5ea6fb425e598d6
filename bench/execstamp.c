/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Exec stamp: write "PID CLOCK_MONOTONIC-ns ARGV1" to $EXECSTAMP_FILE, then become $EXECSTAMP_REAL.
 * Put first in $PATH under QEMU's name, it marks the moment a tool execs QEMU (no ptrace). */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    const char *file = getenv("EXECSTAMP_FILE"), *real = getenv("EXECSTAMP_REAL");
    if (!real)
        return 127;
    if (file) {
        char line[256];
        int n = snprintf(line, sizeof line, "%d %lld %s\n", (int)getpid(),
                         (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec, argc > 1 ? argv[1] : "-");
        int fd = open(file, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
        if (fd >= 0) {
            if (write(fd, line, (size_t)n) < 0) { /* a lost stamp shows as a missing sample */ }
            close(fd);
        }
    }
    argv[0] = (char *)real;
    execv(real, argv);
    return 127;
}
