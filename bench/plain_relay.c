/* The plain C relay that bench/media_relay.py compares the engine with: epoll + recvmmsg +
 * sendmmsg, one thread, pairs of UDP sockets, each side's far end learnt from its first packet
 * (symmetric RTP), payload and header forwarded untouched. No RTCP, stats, rewriting or taps:
 * the floor of what a userspace relay costs per packet on this machine.
 *
 * usage: plain_relay NPAIRS PAIRS_FILE
 * Binds 2 x NPAIRS sockets on free ports of 127.0.0.1, writes "port_a port_b" per pair to
 * PAIRS_FILE, prints "READY" and runs until killed. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64

struct side {
    int fd;
    int latched;
    struct sockaddr_in far;
};

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: plain_relay NPAIRS PAIRS_FILE\n");
        return 2;
    }
    int pairs = atoi(argv[1]);
    struct side *s = calloc(2 * pairs, sizeof *s);
    int ep = epoll_create1(0);
    FILE *out = fopen(argv[2], "w");
    if (!s || !out)
        return 2;
    for (int i = 0; i < 2 * pairs; i++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
        socklen_t alen = sizeof a;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        s[i].fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (s[i].fd < 0 || bind(s[i].fd, (struct sockaddr *)&a, sizeof a) != 0 ||
            getsockname(s[i].fd, (struct sockaddr *)&a, &alen) != 0) {
            perror("bind");
            return 1;
        }
        fprintf(out, (i & 1) ? "%d\n" : "%d ", ntohs(a.sin_port));
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, s[i].fd, &ev);
    }
    fclose(out);
    printf("READY\n");
    fflush(stdout);
    static uint8_t bufs[BATCH][1500];
    struct mmsghdr rx[BATCH], tx[BATCH];
    struct iovec iov[BATCH];
    struct sockaddr_in from[BATCH];
    struct epoll_event events[256];
    for (;;) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int e = 0; e < n; e++) {
            struct side *in = &s[events[e].data.u32], *out = &s[events[e].data.u32 ^ 1];
            for (int k = 0; k < BATCH; k++) {
                iov[k].iov_base = bufs[k];
                iov[k].iov_len = sizeof bufs[k];
                memset(&rx[k].msg_hdr, 0, sizeof rx[k].msg_hdr);
                rx[k].msg_hdr.msg_iov = &iov[k];
                rx[k].msg_hdr.msg_iovlen = 1;
                rx[k].msg_hdr.msg_name = &from[k];
                rx[k].msg_hdr.msg_namelen = sizeof from[k];
            }
            int got = recvmmsg(in->fd, rx, BATCH, MSG_DONTWAIT, NULL);
            if (got <= 0)
                continue;
            if (!in->latched) {
                in->far = from[0];
                in->latched = 1;
            }
            if (!out->latched)
                continue;
            for (int k = 0; k < got; k++) {
                iov[k].iov_len = rx[k].msg_len;
                memset(&tx[k].msg_hdr, 0, sizeof tx[k].msg_hdr);
                tx[k].msg_hdr.msg_iov = &iov[k];
                tx[k].msg_hdr.msg_iovlen = 1;
                tx[k].msg_hdr.msg_name = &out->far;
                tx[k].msg_hdr.msg_namelen = sizeof out->far;
            }
            sendmmsg(out->fd, tx, got, MSG_DONTWAIT);
        }
    }
}
