# cython: language_level=3, boundscheck=False, wraparound=False
"""Batched UDP reads and writes for the SIP transport (Linux ``recvmmsg``/``sendmmsg``).

One system call reads up to ``batch`` datagrams, and one writes a whole queue of responses:
under a registration storm the per-message cost of a Python ``recvfrom``/``sendto`` (argument
parsing, a 64 KiB buffer per read, an address tuple per datagram) is a large part of the work.
The socket stays owned by the caller (``socket.socket``); this only uses its descriptor.

Peer addresses come back as the caller's own objects (built once per address by a factory and
kept in a bounded cache), and destinations go in as packed socket addresses made by
``pack_address`` (cached by the caller), so no address is parsed or formatted per message.
"""

import os

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    int recvmmsg(int fd, mmsghdr *msgs, unsigned int vlen, int flags, void *timeout)
    int sendmmsg(int fd, mmsghdr *msgs, unsigned int vlen, int flags)
    int AF_INET
    int AF_INET6
    int MSG_DONTWAIT

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        unsigned int s_addr
    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    unsigned short ntohs(unsigned short)
    unsigned short htons(unsigned short)
    unsigned int ntohl(unsigned int)
    unsigned int htonl(unsigned int)

cdef extern from "<netdb.h>" nogil:
    int getnameinfo(const sockaddr *sa, socklen_t salen, char *host, socklen_t hostlen,
                    char *serv, socklen_t servlen, int flags)
    int NI_NUMERICHOST
    int NI_NUMERICSERV
    int NI_MAXHOST

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)

cdef int _MAX_BATCH = 1024


def pack_address(int family, tuple address) -> bytes:
    """The packed ``sockaddr`` of a numeric (host, port[, flowinfo, scope_id]) address.

    Raises ValueError when the host is not a numeric address of ``family``.
    """
    cdef sockaddr_in sin
    cdef sockaddr_in6 sin6
    host = str(address[0]).encode("ascii")
    cdef int port = int(address[1])
    if not 0 <= port <= 65535:
        raise ValueError("port out of range")
    if family == AF_INET:
        memset(&sin, 0, sizeof(sin))
        sin.sin_family = AF_INET
        sin.sin_port = htons(port)
        if inet_pton(AF_INET, host, &sin.sin_addr) != 1:
            raise ValueError(f"not an IPv4 address: {address[0]!r}")
        return PyBytes_FromStringAndSize(<char *>&sin, sizeof(sin))
    if family == AF_INET6:
        memset(&sin6, 0, sizeof(sin6))
        sin6.sin6_family = AF_INET6
        sin6.sin6_port = htons(port)
        if len(address) > 2:
            sin6.sin6_flowinfo = htonl(int(address[2]))
        if len(address) > 3:
            sin6.sin6_scope_id = int(address[3])
        if inet_pton(AF_INET6, host.split(b"%", 1)[0], &sin6.sin6_addr) != 1:
            raise ValueError(f"not an IPv6 address: {address[0]!r}")
        return PyBytes_FromStringAndSize(<char *>&sin6, sizeof(sin6))
    raise ValueError(f"unsupported address family {family}")


cdef class DatagramBatch:
    """recvmmsg/sendmmsg on one non-blocking UDP descriptor.

    ``make_peer(host, port)`` builds the object ``receive`` reports a datagram's source as; one
    is kept per address, at most ``max_peers`` (the cache starts over when full).
    """

    cdef int fd
    cdef unsigned int batch
    cdef size_t max_datagram
    cdef char *buffers
    cdef mmsghdr *msgs
    cdef iovec *iovs
    cdef sockaddr_storage *names
    cdef mmsghdr *out_msgs
    cdef iovec *out_iovs
    cdef object make_peer
    cdef dict peers
    cdef Py_ssize_t max_peers

    def __cinit__(self, int fd, int batch, Py_ssize_t max_datagram, make_peer,
                  Py_ssize_t max_peers=4096):
        if not 0 < batch <= _MAX_BATCH:
            raise ValueError(f"batch must be 1..{_MAX_BATCH}")
        if max_datagram <= 0:
            raise ValueError("max_datagram must be positive")
        self.fd = fd
        self.batch = batch
        self.max_datagram = max_datagram
        self.make_peer = make_peer
        self.peers = {}
        self.max_peers = max_peers
        self.buffers = <char *>malloc(batch * max_datagram)
        self.msgs = <mmsghdr *>malloc(batch * sizeof(mmsghdr))
        self.iovs = <iovec *>malloc(batch * sizeof(iovec))
        self.names = <sockaddr_storage *>malloc(batch * sizeof(sockaddr_storage))
        self.out_msgs = <mmsghdr *>malloc(_MAX_BATCH * sizeof(mmsghdr))
        self.out_iovs = <iovec *>malloc(_MAX_BATCH * sizeof(iovec))
        if (self.buffers == NULL or self.msgs == NULL or self.iovs == NULL
                or self.names == NULL or self.out_msgs == NULL or self.out_iovs == NULL):
            raise MemoryError()

    def __dealloc__(self):
        free(self.buffers)
        free(self.msgs)
        free(self.iovs)
        free(self.names)
        free(self.out_msgs)
        free(self.out_iovs)

    def receive(self) -> list:
        """Up to ``batch`` waiting datagrams as ``[(data, peer), ...]`` (empty: none waiting).

        Raises OSError for a socket error met before any datagram (e.g. an ICMP error for an
        earlier send); the socket stays usable.
        """
        cdef unsigned int i
        cdef int n
        cdef mmsghdr *m
        for i in range(self.batch):
            self.iovs[i].iov_base = self.buffers + i * self.max_datagram
            self.iovs[i].iov_len = self.max_datagram
            m = &self.msgs[i]
            memset(m, 0, sizeof(mmsghdr))
            m.msg_hdr.msg_name = &self.names[i]
            m.msg_hdr.msg_namelen = sizeof(sockaddr_storage)
            m.msg_hdr.msg_iov = &self.iovs[i]
            m.msg_hdr.msg_iovlen = 1
        cdef int err = 0
        with nogil:
            n = recvmmsg(self.fd, self.msgs, self.batch, MSG_DONTWAIT, NULL)
            if n < 0:
                err = errno
        if n < 0:
            if err == EAGAIN or err == EINTR:
                return []
            raise OSError(err, os.strerror(err))
        out = []
        for i in range(<unsigned int>n):
            data = PyBytes_FromStringAndSize(<char *>self.iovs[i].iov_base, self.msgs[i].msg_len)
            out.append((data, self._peer(&self.names[i], self.msgs[i].msg_hdr.msg_namelen)))
        return out

    cdef object _peer(self, sockaddr_storage *name, socklen_t length):
        cdef sockaddr_in *sin
        if name.ss_family == AF_INET:
            sin = <sockaddr_in *>name
            key = (<unsigned long long>sin.sin_addr.s_addr << 16) | sin.sin_port
        else:
            key = PyBytes_FromStringAndSize(<char *>name, length)
        peer = self.peers.get(key)
        if peer is None:
            peer = self._new_peer(name, length)
            if len(self.peers) >= self.max_peers:
                self.peers.clear()
            self.peers[key] = peer
        return peer

    cdef object _new_peer(self, sockaddr_storage *name, socklen_t length):
        cdef char host[1025]
        cdef int port = 0
        if getnameinfo(<sockaddr *>name, length, host, sizeof(host), NULL, 0,
                       NI_NUMERICHOST | NI_NUMERICSERV) != 0:
            host[0] = 0
        if name.ss_family == AF_INET:
            port = ntohs((<sockaddr_in *>name).sin_port)
        elif name.ss_family == AF_INET6:
            port = ntohs((<sockaddr_in6 *>name).sin6_port)
        return self.make_peer(host.decode("ascii", "replace"), port)

    def send(self, list queue, Py_ssize_t start=0) -> tuple:
        """Send ``queue[start:]`` (``(data, packed_address)`` pairs) with as few calls as can be.

        Returns ``(next, failed, last_errno)``: ``next`` is the index of the first datagram not
        sent because the socket is full (``len(queue)`` when all went), ``failed`` how many
        were dropped on other errors (e.g. an unreachable destination), ``last_errno`` the
        errno of the last such error (0 if none).
        """
        cdef Py_ssize_t total = len(queue)
        cdef Py_ssize_t pos = start
        cdef Py_ssize_t count, j
        cdef int n, err
        cdef int failed = 0
        cdef int last_errno = 0
        cdef mmsghdr *m
        cdef bytes data, name
        cdef list held
        while pos < total:
            count = min(total - pos, _MAX_BATCH)
            # The headers point into these objects: hold them for the call.
            held = queue[pos:pos + count]
            for j in range(count):
                pair = <tuple?>held[j]
                data = <bytes?>pair[0]
                name = <bytes?>pair[1]
                self.out_iovs[j].iov_base = <char *>data
                self.out_iovs[j].iov_len = len(data)
                m = &self.out_msgs[j]
                memset(m, 0, sizeof(mmsghdr))
                m.msg_hdr.msg_name = <char *>name
                m.msg_hdr.msg_namelen = len(name)
                m.msg_hdr.msg_iov = &self.out_iovs[j]
                m.msg_hdr.msg_iovlen = 1
            with nogil:
                n = sendmmsg(self.fd, self.out_msgs, <unsigned int>count, MSG_DONTWAIT)
                err = errno
            if n > 0:
                pos += n
                continue
            if err == EINTR:
                continue
            if err == EAGAIN:  # EWOULDBLOCK is EAGAIN on Linux
                break
            # The first datagram of the call failed on its own (sendmmsg reports an error
            # only when no datagram went): drop it and go on with the next.
            failed += 1
            last_errno = err
            pos += 1
        return pos, failed, last_errno
