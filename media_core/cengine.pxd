# C declarations used by the media engine (media_core/_engine.pyx): Linux epoll, eventfd,
# UDP sockets with recvmmsg/sendmmsg, pthreads and the monotonic clock. Declarations only; the
# logic lives in _engine.pyx and the few macros Cython cannot express in engine_core.h.

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void* ptr
        int fd
        uint32_t u32
        uint64_t u64

    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLLET
        EPOLLERR
        EPOLLHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event* event)
    int epoll_wait(int epfd, epoll_event* events, int maxevents, int timeout)


cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)


cdef extern from "<sys/uio.h>" nogil:
    cdef struct iovec:
        void* iov_base
        size_t iov_len


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    cdef struct sockaddr:
        sa_family_t sa_family

    cdef struct sockaddr_storage:
        sa_family_t ss_family

    cdef struct msghdr:
        void* msg_name
        socklen_t msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags

    cdef struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    enum:
        AF_INET
        AF_INET6
        AF_UNSPEC
        SOCK_DGRAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_RCVBUF
        SO_SNDBUF
        MSG_DONTWAIT
        MSG_TRUNC

    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr* addr, socklen_t len)
    int bind(int fd, const sockaddr* addr, socklen_t len)
    int setsockopt(int fd, int level, int optname, const void* optval, socklen_t optlen)
    int getsockname(int fd, sockaddr* addr, socklen_t* len)
    int recvmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags, void* timeout)
    int sendmmsg(int fd, mmsghdr* vec, unsigned int vlen, int flags)
    ssize_t sendto(int fd, const void* buf, size_t n, int flags, const sockaddr* addr,
                   socklen_t addr_len)


cdef extern from "<netinet/in.h>" nogil:
    cdef struct in_addr:
        uint32_t s_addr

    cdef struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr

    cdef struct in6_addr:
        uint8_t s6_addr[16]

    cdef struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    enum:
        IPPROTO_IP
        IPPROTO_IPV6
        IP_TOS
        IPV6_TCLASS
        IPV6_V6ONLY

    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)


cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char* src, void* dst)


cdef extern from "<time.h>" nogil:
    cdef struct timespec:
        long tv_sec
        long tv_nsec
    enum:
        CLOCK_REALTIME
    int clock_gettime(int clk, timespec* ts)


cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    int pthread_create(pthread_t* thread, void* attr, void* (*start)(void*) noexcept nogil,
                       void* arg)
    int pthread_join(pthread_t thread, void** retval)
    int pthread_mutex_init(pthread_mutex_t* m, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* m)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)


cdef extern from "engine_core.h" nogil:
    # Hint that memory at p will be read soon (__builtin_prefetch).
    void engine_prefetch(const void* p)
    # Thread id of the caller (gettid), for pinning and /proc/self/task/TID/stat.
    int engine_gettid()
    # CLOCK_MONOTONIC in nanoseconds.
    int64_t engine_now_ns()
    # Sleep until a CLOCK_MONOTONIC time in ns.
    void engine_sleep_until_ns(int64_t t)
    # Relaxed atomic flag helpers for the stop flag shared by the two threads.
    void engine_store_flag(int* p, int v)
    int engine_load_flag(int* p)
    # Random 32-bit value (getrandom), for SSRC and initial sequence/timestamp (RFC 3550 §5.1).
    uint32_t engine_random32()
