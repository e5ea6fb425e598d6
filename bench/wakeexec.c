/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* Wake and exec: block until one byte arrives on stdin, then exec argv[1] (with argv[1..]).  The last
 * step of the exec-late launcher without an interpreter: a floor for the daemon's Start → QEMU exec. */
#include <unistd.h>

int main(int argc, char **argv) {
    char byte;
    if (argc < 2 || read(0, &byte, 1) != 1)
        return 1;
    execv(argv[1], argv + 1);
    return 127;
}
