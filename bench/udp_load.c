/* RTP load for bench/media_relay.py: N bidirectional G.711 calls, one 172-byte RTP packet
 * (12-byte header + 160 bytes of 20 ms G.711, RFC 3551 section 4.5.14) each way every 20 ms,
 * calls spread evenly over the 20 ms period. The caller side of every call sends from one
 * socket, the agent side from another; the relay under test learns them by symmetric RTP.
 * A second thread receives (recvmmsg) and takes the kernel receive time (SO_TIMESTAMPNS), so
 * the latency it reports is the one the relay added plus the loopback path, not our own delay.
 * It polls instead of sleeping: on loopback the sender of a datagram pays for waking its
 * receiver, and a relay under test must not be charged for waking the load generator (a far
 * end on another machine costs it nothing of the kind). It runs at normal priority and yields
 * when idle; the sender thread keeps real-time priority and its own schedule.
 *
 * usage: udp_load TARGETS WARMUP_S MEASURE_S NCALLS CALLER_PORT AGENT_PORT
 *   TARGETS: file of lines "caller_port agent_port" (127.0.0.1), one per call, >= NCALLS lines.
 *   CALLER_PORT, AGENT_PORT: our two local ports (fixed, so a relay's latching survives runs).
 * Prints "START" when the measured window begins and "END {json}" when it is over. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PERIOD_NS 20000000LL
#define SLICES 100 /* the calls' phases spread over the period in 200 us steps */
#define PKT 172
#define HIST_US 100000
#define RX_BATCH 256

static int sock_caller, sock_agent, rtcp_caller, rtcp_agent;
static uint64_t rtcp_packets;
static volatile int receiving = 1;
static uint32_t *sent_measured, *recv_measured;
static uint64_t hist[HIST_US + 1];
static uint64_t corrupt, foreign;

static int64_t now_real(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int open_sock(int port)
{
    int fd = socket(AF_INET, SOCK_DGRAM, 0), on = 1, size = 64 << 20;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        perror("socket");
        exit(2);
    }
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof size) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on);
    return fd;
}

static void *receiver(void *arg)
{
    struct sched_param normal = {.sched_priority = 0};
    pthread_setschedparam(pthread_self(), SCHED_OTHER, &normal);
    int fds[2] = {sock_caller, sock_agent}, rtcp[2] = {rtcp_caller, rtcp_agent};
    static uint8_t bufs[RX_BATCH][2048];
    static char ctrl[RX_BATCH][64];
    struct mmsghdr msgs[RX_BATCH];
    struct iovec iov[RX_BATCH];
    (void)arg;
    while (receiving) {
        int idle = 1;
        for (int i = 0; i < 2; i++) {
            for (;;) {
                for (int k = 0; k < RX_BATCH; k++) {
                    iov[k].iov_base = bufs[k];
                    iov[k].iov_len = sizeof bufs[k];
                    memset(&msgs[k].msg_hdr, 0, sizeof msgs[k].msg_hdr);
                    msgs[k].msg_hdr.msg_iov = &iov[k];
                    msgs[k].msg_hdr.msg_iovlen = 1;
                    msgs[k].msg_hdr.msg_control = ctrl[k];
                    msgs[k].msg_hdr.msg_controllen = sizeof ctrl[k];
                }
                int got = recvmmsg(fds[i], msgs, RX_BATCH, MSG_DONTWAIT, NULL);
                if (got <= 0)
                    break;
                idle = 0;
                for (int k = 0; k < got; k++) {
                    uint8_t *p = bufs[k];
                    int64_t rx = 0, tx;
                    uint32_t call;
                    if (msgs[k].msg_len != PKT || memcmp(p + 12, "EDGE", 4) != 0) {
                        foreign++;
                        continue;
                    }
                    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[k].msg_hdr); c;
                         c = CMSG_NXTHDR(&msgs[k].msg_hdr, c))
                        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
                            struct timespec ts;
                            memcpy(&ts, CMSG_DATA(c), sizeof ts);
                            rx = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
                        }
                    if (!rx)
                        rx = now_real();
                    for (int b = 40; b < PKT; b++)
                        if (p[b] != (uint8_t)(b * 7)) {
                            corrupt++;
                            break;
                        }
                    if (!p[21])
                        continue; /* warm-up packet */
                    memcpy(&call, p + 16, 4);
                    memcpy(&tx, p + 24, 8);
                    recv_measured[call * 2 + p[20]]++;
                    int64_t us = (rx - tx) / 1000;
                    hist[us < 0 ? 0 : (us > HIST_US ? HIST_US : us)]++;
                }
                if (got < RX_BATCH)
                    break;
            }
        }
        for (int i = 0; i < 2; i++) {
            /* the relay's RTCP reports (RFC 3550 section 6): counted, not analysed */
            int got = recvmmsg(rtcp[i], msgs, RX_BATCH, MSG_DONTWAIT, NULL);
            if (got > 0)
                rtcp_packets += got;
        }
        if (idle)
            sched_yield();
    }
    return NULL;
}

static int64_t percentile(uint64_t total, double q)
{
    uint64_t want = (uint64_t)(total * q), acc = 0;
    for (int i = 0; i <= HIST_US; i++) {
        acc += hist[i];
        if (acc > want)
            return i;
    }
    return HIST_US;
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: udp_load TARGETS WARMUP_S MEASURE_S NCALLS CALLER_PORT AGENT_PORT\n");
        return 2;
    }
    double warmup = atof(argv[2]), measure = atof(argv[3]);
    int ncalls = atoi(argv[4]);
    FILE *f = fopen(argv[1], "r");
    struct sockaddr_in *dst_caller = calloc(ncalls, sizeof *dst_caller);
    struct sockaddr_in *dst_agent = calloc(ncalls, sizeof *dst_agent);
    sent_measured = calloc(ncalls * 2, sizeof *sent_measured);
    recv_measured = calloc(ncalls * 2, sizeof *recv_measured);
    if (!f || !dst_caller || !dst_agent || !sent_measured || !recv_measured)
        return 2;
    for (int i = 0; i < ncalls; i++) {
        int pa, pb;
        if (fscanf(f, "%d %d", &pa, &pb) != 2) {
            fprintf(stderr, "TARGETS has fewer than %d lines\n", ncalls);
            return 2;
        }
        dst_caller[i] = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons(pa)};
        dst_caller[i].sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        dst_agent[i] = dst_caller[i];
        dst_agent[i].sin_port = htons(pb);
    }
    fclose(f);
    sock_caller = open_sock(atoi(argv[5]));
    sock_agent = open_sock(atoi(argv[6]));
    rtcp_caller = open_sock(atoi(argv[5]) + 1);
    rtcp_agent = open_sock(atoi(argv[6]) + 1);
    pthread_t rx;
    pthread_create(&rx, NULL, receiver, NULL);

    int per_slice = (ncalls + SLICES - 1) / SLICES;
    uint8_t (*pk_c)[PKT] = calloc(per_slice, PKT), (*pk_a)[PKT] = calloc(per_slice, PKT);
    struct mmsghdr *m_c = calloc(per_slice, sizeof *m_c), *m_a = calloc(per_slice, sizeof *m_a);
    struct iovec *io_c = calloc(per_slice, sizeof *io_c), *io_a = calloc(per_slice, sizeof *io_a);
    int64_t start = now_real() + 20000000LL;
    int64_t measure_from = start + (int64_t)(warmup * 1e9);
    int64_t measure_to = measure_from + (int64_t)(measure * 1e9);
    int64_t worst_late = 0;
    int announced = 0;
    uint64_t sent_total = 0;
    for (uint32_t k = 0;; k++) {
        int64_t base = start + (int64_t)k * PERIOD_NS;
        if (base >= measure_to)
            break;
        for (int s = 0; s < SLICES; s++) {
            int64_t due = base + (int64_t)s * (PERIOD_NS / SLICES);
            struct timespec ts = {.tv_sec = due / 1000000000LL, .tv_nsec = due % 1000000000LL};
            clock_nanosleep(CLOCK_REALTIME, TIMER_ABSTIME, &ts, NULL);
            int64_t t = now_real();
            if (t - due > worst_late && k > 0)
                worst_late = t - due;
            int measured = due >= measure_from;
            if (measured && !announced) {
                printf("START\n");
                fflush(stdout);
                announced = 1;
            }
            int n = 0;
            for (int c = s * per_slice; c < ncalls && c < (s + 1) * per_slice; c++, n++) {
                for (int dir = 0; dir < 2; dir++) {
                    uint8_t *p = dir ? pk_a[n] : pk_c[n];
                    uint16_t seq = htons((uint16_t)k);
                    uint32_t rts = htonl(k * 160), ssrc = htonl(c * 2 + dir + 1);
                    p[0] = 0x80;
                    p[1] = 0; /* PCMU */
                    memcpy(p + 2, &seq, 2);
                    memcpy(p + 4, &rts, 4);
                    memcpy(p + 8, &ssrc, 4);
                    memcpy(p + 12, "EDGE", 4);
                    memcpy(p + 16, &c, 4);
                    p[20] = (uint8_t)dir;
                    p[21] = (uint8_t)measured;
                    memcpy(p + 24, &t, 8);
                    for (int b = 40; b < PKT; b++)
                        p[b] = (uint8_t)(b * 7);
                    struct iovec *io = dir ? &io_a[n] : &io_c[n];
                    struct mmsghdr *m = dir ? &m_a[n] : &m_c[n];
                    io->iov_base = p;
                    io->iov_len = PKT;
                    memset(m, 0, sizeof *m);
                    m->msg_hdr.msg_iov = io;
                    m->msg_hdr.msg_iovlen = 1;
                    m->msg_hdr.msg_name = dir ? &dst_agent[c] : &dst_caller[c];
                    m->msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
                    if (measured)
                        sent_measured[c * 2 + dir]++;
                }
            }
            for (int off = 0; off < n;) {
                int r = sendmmsg(sock_caller, m_c + off, n - off, 0);
                if (r <= 0)
                    break;
                off += r;
            }
            for (int off = 0; off < n;) {
                int r = sendmmsg(sock_agent, m_a + off, n - off, 0);
                if (r <= 0)
                    break;
                off += r;
            }
            sent_total += 2 * n;
        }
    }
    printf("STOP\n");
    fflush(stdout);
    /* let the last packets through the relay */
    struct timespec grace = {.tv_sec = 0, .tv_nsec = 300000000L};
    nanosleep(&grace, NULL);
    receiving = 0;
    pthread_join(rx, NULL);
    uint64_t sent = 0, got = 0, dup = 0;
    for (int i = 0; i < ncalls * 2; i++) {
        sent += sent_measured[i];
        got += recv_measured[i] > sent_measured[i] ? sent_measured[i] : recv_measured[i];
        if (recv_measured[i] > sent_measured[i])
            dup += recv_measured[i] - sent_measured[i];
    }
    uint64_t hist_total = 0;
    for (int i = 0; i <= HIST_US; i++)
        hist_total += hist[i];
    printf("END {\"calls\": %d, \"sent\": %lu, \"received\": %lu, \"duplicates\": %lu, "
           "\"corrupt\": %lu, \"foreign\": %lu, \"loss_pct\": %.4f, \"p50_us\": %ld, "
           "\"p99_us\": %ld, \"max_us\": %ld, \"sender_late_us\": %ld, \"rtcp_packets\": %lu}\n",
           ncalls, sent, got, dup, corrupt, foreign,
           sent ? 100.0 * (double)(sent - got) / (double)sent : 100.0,
           percentile(hist_total, 0.5), percentile(hist_total, 0.99),
           percentile(hist_total, 0.999999), worst_late / 1000, rtcp_packets);
    fflush(stdout);
    return 0;
}
