/* vsock-io: the test guest's AF_VSOCK client and server (busybox has none); built by vmspawnd.testing.guest.
 *   vsock-io send CID PORT           stdin to the peer, then close (one sd_notify message or journal stream)
 *   vsock-io connect CID PORT        stdin to the peer (then shut down writing), the peer's replies to stdout
 *   vsock-io listen PORT PROG ARG... for each connection, run PROG with the connection as stdin and stdout */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int fail(const char *what) { fprintf(stderr, "vsock-io: %s: %s\n", what, strerror(errno)); return 1; }

static int copy(int from, int to) {
    char buf[65536];
    for (;;) {
        ssize_t n = read(from, buf, sizeof buf);
        if (n == 0) return 0;
        if (n < 0) { if (errno == EINTR) continue; return -1; }
        for (ssize_t off = 0; off < n;) {
            ssize_t w = write(to, buf + off, n - off);
            if (w < 0) { if (errno == EINTR) continue; return -1; }
            off += w;
        }
    }
}

static int do_connect(unsigned cid, unsigned port, int reply) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) return fail("socket");
    struct sockaddr_vm sa = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) return fail("connect");
    if (copy(0, fd) < 0) return fail("send");
    if (!reply) return close(fd) < 0 ? fail("close") : 0;
    shutdown(fd, SHUT_WR);
    if (copy(fd, 1) < 0) return fail("receive");
    return 0;
}

static int do_listen(unsigned port, char **argv) {
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (fd < 0) return fail("socket");
    struct sockaddr_vm sa = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) return fail("bind");
    if (listen(fd, 16) < 0) return fail("listen");
    signal(SIGCHLD, SIG_IGN);
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) { if (errno == EINTR) continue; return fail("accept"); }
        if (fork() == 0) {
            dup2(c, 0); dup2(c, 1); close(c); close(fd);
            execv(argv[0], argv);
            _exit(fail(argv[0]));
        }
        close(c);
    }
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "send")) return do_connect(strtoul(argv[2], 0, 0), strtoul(argv[3], 0, 0), 0);
    if (argc == 4 && !strcmp(argv[1], "connect")) return do_connect(strtoul(argv[2], 0, 0), strtoul(argv[3], 0, 0), 1);
    if (argc >= 4 && !strcmp(argv[1], "listen")) return do_listen(strtoul(argv[2], 0, 0), argv + 3);
    fprintf(stderr, "usage: vsock-io connect CID PORT | vsock-io listen PORT PROG [ARG...]\n");
    return 2;
}
