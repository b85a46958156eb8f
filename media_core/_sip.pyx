# cython: language_level=3
"""SIP message codec: parse and serialize requests and responses (RFC 3261 §7, §20, §25).

Sans-IO: bytes in, :class:`SipMessage` out, and back. The start line and the header fields are
read eagerly by a C loop over the raw bytes into ``(name, value)`` string pairs, names in their
canonical long form; URIs, Vias and name-addrs are parsed on first access and cached.
"""

import dataclasses
import secrets

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport PyObject
from cpython.unicode cimport Py_UNICODE_ISSPACE
from libc.string cimport memchr, memcmp

cdef extern from "Python.h":
    object PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    object PyUnicode_DecodeASCII(const char* s, Py_ssize_t size, const char* errors)


# ---------------------------------------------------------------------------------------------
# Errors (model: h11 `_util.py`)

class RemoteProtocolError(Exception):
    """The peer sent something that is not acceptable SIP.

    ``status`` is the SIP status to answer with, ``headers`` extra response header fields
    (e.g. ``Unsupported``), ``droppable`` says that no response can or should be built (the
    message could not be framed, it is a response, or it names no Via to answer to), and
    ``message`` holds the message as far as it could be read (start line and header fields) so
    that a response can be built from it; ``None`` when nothing usable was read.
    """

    def __init__(self, status, reason, headers=(), droppable=False, message=None):
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.headers = tuple(headers)
        self.droppable = droppable
        self.message = message


class LocalProtocolError(Exception):
    """Our own code misused the codec (e.g. a header value with a line break)."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Hard limits on what the parser accepts from a peer."""

    max_message_bytes: int = 65535
    """Start line, header fields and body together (RFC 3261 §18.1.1 datagrams fit 65,535)."""
    max_headers: int = 100
    """Header fields, counting each physical field line once."""
    max_vias: int = 70
    """Via entries; a request may cross Max-Forwards (70, RFC 3261 §8.1.1.6) proxies."""
    max_line_bytes: int = 8192
    """One header field with its continuation lines, or the start line."""


cdef struct _Lim:
    Py_ssize_t max_message
    Py_ssize_t max_headers
    Py_ssize_t max_vias
    Py_ssize_t max_line


cdef _Lim _DEFAULT_LIM
_DEFAULT_LIM.max_message = 65535
_DEFAULT_LIM.max_headers = 100
_DEFAULT_LIM.max_vias = 70
_DEFAULT_LIM.max_line = 8192


cdef _Lim _lim_from(object limits) except *:
    cdef _Lim lim
    if limits is None:
        return _DEFAULT_LIM
    lim.max_message = limits.max_message_bytes
    lim.max_headers = limits.max_headers
    lim.max_vias = limits.max_vias
    lim.max_line = limits.max_line_bytes
    return lim


# ---------------------------------------------------------------------------------------------
# Byte classes and the canonical header name table

cdef unsigned char _TOKEN[256]   # RFC 3261 §25.1 token characters
cdef unsigned char _LOWER[256]

cdef int _i
for _i in range(256):
    _TOKEN[_i] = 0
    _LOWER[_i] = _i
for _i in range(ord("A"), ord("Z") + 1):
    _LOWER[_i] = _i + 32
for _ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.!%*_+`'~":
    _TOKEN[ord(_ch)] = 1

cdef enum:
    H_OTHER = 0
    H_VIA = 1
    H_CONTENT_LENGTH = 2
    H_CSEQ = 3
    _SLOTS = 512
    _MAXNAME = 32

cdef struct _Canon:
    int length
    unsigned char lname[32]
    PyObject* name
    int hid

cdef _Canon _canon[256]
cdef int _ncanon = 0
cdef short _slot[512]

# Canonical long forms (RFC 3261 §20 and the IANA SIP parameters registry), with compact forms.
_KNOWN_HEADERS = (
    ("Accept", None), ("Accept-Contact", "a"), ("Accept-Encoding", None),
    ("Accept-Language", None), ("Accept-Resource-Priority", None), ("Alert-Info", None),
    ("Allow", None), ("Allow-Events", "u"), ("Answer-Mode", None),
    ("Authentication-Info", None), ("Authorization", None), ("Call-ID", "i"),
    ("Call-Info", None), ("Contact", "m"), ("Content-Disposition", None),
    ("Content-Encoding", "e"), ("Content-Language", None), ("Content-Length", "l"),
    ("Content-Type", "c"), ("CSeq", None), ("Date", None), ("Error-Info", None),
    ("Event", "o"), ("Expires", None), ("Flow-Timer", None), ("From", "f"),
    ("History-Info", None), ("Identity", "y"), ("Identity-Info", "n"), ("In-Reply-To", None),
    ("Join", None), ("Max-Breadth", None), ("Max-Forwards", None), ("MIME-Version", None),
    ("Min-Expires", None), ("Min-SE", None), ("Organization", None),
    ("P-Asserted-Identity", None), ("P-Preferred-Identity", None), ("Path", None),
    ("Priority", None), ("Privacy", None), ("Proxy-Authenticate", None),
    ("Proxy-Authorization", None), ("Proxy-Require", None), ("RAck", None), ("Reason", None),
    ("Record-Route", None), ("Refer-Sub", None), ("Refer-To", "r"), ("Referred-By", "b"),
    ("Reject-Contact", "j"), ("Replaces", None), ("Reply-To", None),
    ("Request-Disposition", "d"), ("Require", None), ("Resource-Priority", None),
    ("Retry-After", None), ("Route", None), ("RSeq", None), ("Security-Client", None),
    ("Security-Server", None), ("Security-Verify", None), ("Server", None),
    ("Service-Route", None), ("Session-Expires", "x"), ("SIP-ETag", None),
    ("SIP-If-Match", None), ("Subject", "s"), ("Subscription-State", None),
    ("Supported", "k"), ("Target-Dialog", None), ("Timestamp", None), ("To", "t"),
    ("Unsupported", None), ("User-Agent", None), ("Via", "v"), ("Warning", None),
    ("WWW-Authenticate", None),
)

# Header fields whose value is a comma-separated list (RFC 3261 §7.3.1); get_all splits these.
_LIST_HEADERS = frozenset((
    "Accept", "Accept-Contact", "Accept-Encoding", "Accept-Language", "Alert-Info", "Allow",
    "Allow-Events", "Call-Info", "Contact", "Content-Encoding", "Content-Language",
    "Error-Info", "History-Info", "In-Reply-To", "P-Asserted-Identity",
    "P-Preferred-Identity", "Path", "Proxy-Require", "Reason", "Record-Route",
    "Reject-Contact", "Request-Disposition", "Require", "Route", "Security-Client",
    "Security-Server", "Security-Verify", "Service-Route", "Supported", "Unsupported", "Via",
    "Warning",
))

_CANON_KEEP = []          # keeps the canonical name objects the C table points at alive
_NAME_KEY = {}            # every spelling we know (any case of long and compact) -> canonical


cdef inline unsigned int _hash_name(const unsigned char* p, Py_ssize_t n) noexcept:
    cdef unsigned int h = 2166136261u
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ _LOWER[p[i]]) * 16777619u
    return h


cdef void _canon_add(bytes spelling, str canonical, int hid) except *:
    global _ncanon
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(spelling)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(spelling)
    cdef unsigned int h = _hash_name(p, n) & (_SLOTS - 1)
    cdef Py_ssize_t i
    while _slot[h] != 0:
        h = (h + 1) & (_SLOTS - 1)
    _canon[_ncanon].length = <int>n
    for i in range(n):
        _canon[_ncanon].lname[i] = _LOWER[p[i]]
    _canon[_ncanon].name = <PyObject*>canonical
    _canon[_ncanon].hid = hid
    _ncanon += 1
    _slot[h] = <short>_ncanon


cdef int _canon_lookup(const unsigned char* p, Py_ssize_t n) noexcept:
    cdef unsigned int h
    cdef int s
    cdef Py_ssize_t i
    cdef _Canon* c
    if n <= 0 or n >= _MAXNAME:
        return -1
    h = _hash_name(p, n) & (_SLOTS - 1)
    while True:
        s = _slot[h]
        if s == 0:
            return -1
        c = &_canon[s - 1]
        if c.length == n:
            i = 0
            while i < n and c.lname[i] == _LOWER[p[i]]:
                i += 1
            if i == n:
                return s - 1
        h = (h + 1) & (_SLOTS - 1)


def _build_canon_table():
    for _i in range(_SLOTS):
        _slot[_i] = 0
    for long_name, compact in _KNOWN_HEADERS:
        canonical = long_name
        _CANON_KEEP.append(canonical)
        hid = {"Via": H_VIA, "Content-Length": H_CONTENT_LENGTH, "CSeq": H_CSEQ}.get(
            long_name, H_OTHER)
        _canon_add(long_name.lower().encode(), canonical, hid)
        for spelling in (long_name, long_name.lower(), long_name.upper()):
            _NAME_KEY[spelling] = canonical
        if compact is not None:
            _canon_add(compact.encode(), canonical, hid)
            _NAME_KEY[compact] = canonical
            _NAME_KEY[compact.upper()] = canonical


_build_canon_table()
_KNOWN_CANONICAL = frozenset(_CANON_KEEP)


cdef inline tuple _name_key(str name):
    """(key, known): the canonical name for a known header, else its lower-case form."""
    cdef bint known
    key = _key_of(name, &known)
    return key, known


cdef dict _NAME_KEY_D = _NAME_KEY  # typed: a dict lookup in C, no bound method per call


cdef inline str _key_of(str name, bint* known):
    """The canonical name of a known header (``known`` set), else its lower-case form."""
    cdef object canon = _NAME_KEY_D.get(name)
    if canon is not None:
        known[0] = True
        return <str>canon
    lowered = name.lower()
    canon = _NAME_KEY_D.get(lowered)
    known[0] = canon is not None
    return <str>canon if canon is not None else lowered


def canonical_name(str name) -> str:
    """The canonical long form of a header field name (compact forms expanded)."""
    canon = _NAME_KEY.get(name) or _NAME_KEY.get(name.lower())
    return canon if canon is not None else name


# Interned method names, so the common ones cost no allocation per message.
_METHODS = ("INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "PRACK", "SUBSCRIBE",
            "NOTIFY", "PUBLISH", "INFO", "REFER", "MESSAGE", "UPDATE")
KNOWN_METHODS = frozenset(_METHODS)
cdef list _METHOD_BYTES = [m.encode() for m in _METHODS]

cdef str _SIP20 = "SIP/2.0"


cdef object _method_str(const char* p, Py_ssize_t n):
    cdef bytes b
    cdef Py_ssize_t i
    for i in range(len(_METHOD_BYTES)):
        b = <bytes>_METHOD_BYTES[i]
        if PyBytes_GET_SIZE(b) == n and memcmp(PyBytes_AS_STRING(b), p, n) == 0:
            return _METHODS[i]
    return PyUnicode_DecodeUTF8(p, n, "surrogateescape")


cdef inline object _text(const char* p, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(p, n, "surrogateescape")


cdef inline bint _is_wsp(unsigned char c) noexcept:
    return c == 32 or c == 9


# ---------------------------------------------------------------------------------------------
# The message

cdef class SipMessage:
    """One SIP request or response.

    Header fields are kept in order as ``(name, value)`` pairs, names in canonical long form,
    values unfolded. Structured views (``vias``, ``from_``, ``to``, ``contacts``,
    ``request_uri``) are parsed on first access and cached; edit header fields through
    :meth:`set`, :meth:`add` and :meth:`remove` so those caches stay right.
    """

    cdef public bint is_request
    cdef public object method
    cdef public object uri
    cdef public object status
    cdef public object reason
    cdef public object version
    cdef public list headers
    cdef public bytes body
    cdef object _c_vias
    cdef object _c_top_via
    cdef object _c_from
    cdef object _c_to
    cdef object _c_contacts
    cdef object _c_ruri
    cdef object _c_cseq
    cdef Py_ssize_t _max_vias
    cdef int _err_status
    cdef object _err_reason
    cdef Py_ssize_t _head_len
    cdef long long _clen          # -1 absent, -2 malformed, -3 conflicting
    cdef int _nvia_lines

    def __init__(self, *, is_request=True, method=None, uri=None, status=None, reason=None,
                 headers=(), body=b"", version="SIP/2.0"):
        self.is_request = is_request
        self.method = method
        self.uri = uri
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = []
        for name, value in headers:
            self.add(name, value)
        self.body = bytes(body)

    def __cinit__(self):
        self._max_vias = _DEFAULT_LIM.max_vias
        self._clen = -1
        self.body = b""
        self.version = _SIP20

    def __repr__(self):
        if self.is_request:
            return f"<SipMessage {self.method} {self.uri} headers={len(self.headers)}>"
        return f"<SipMessage {self.status} {self.reason!r} headers={len(self.headers)}>"

    cdef void _invalidate(self):
        self._c_vias = None
        self._c_top_via = None
        self._c_from = None
        self._c_to = None
        self._c_contacts = None
        self._c_ruri = None
        self._c_cseq = None

    # -- header access -------------------------------------------------------------------------

    def get(self, str name):
        """The first value of a header field (any case, compact forms accepted), or None."""
        cdef tuple pair
        cdef bint known
        cdef str key = _key_of(name, &known)
        cdef str n
        for pair in self.headers:
            n = pair[0]
            if n is key or (n == key if known else n.lower() == key):
                return pair[1]
        return None

    def get_all(self, str name) -> list:
        """Every value of a header field; comma-separated list fields are split into items."""
        cdef tuple pair
        cdef bint known
        cdef str key = _key_of(name, &known)
        out = []
        split = known and key in _LIST_HEADERS
        cdef str n
        for pair in self.headers:
            n = pair[0]
            if n is key or (n == key if known else n.lower() == key):
                if split:
                    out.extend(_split_commas(pair[1]))
                else:
                    out.append(pair[1])
        return out

    def count(self, str name) -> int:
        """How many field lines carry this header field."""
        cdef tuple pair
        key, known = _name_key(name)
        cdef int c = 0
        for pair in self.headers:
            n = pair[0]
            if n is key or (n == key if known else (<str>n).lower() == key):
                c += 1
        return c

    def set(self, str name, str value) -> None:
        """Replace every occurrence of a header field by one field with this value."""
        canon = _checked_name(name)
        _check_value(value)
        key, known = _name_key(canon)
        out = []
        placed = False
        for pair in self.headers:
            n = pair[0]
            if n is key or (n == key if known else (<str>n).lower() == key):
                if not placed:
                    out.append((canon, value))
                    placed = True
            else:
                out.append(pair)
        if not placed:
            out.append((canon, value))
        self.headers = out
        self._invalidate()

    def add(self, str name, str value) -> None:
        """Append one header field."""
        canon = _checked_name(name)
        _check_value(value)
        self.headers.append((canon, value))
        self._invalidate()

    def remove(self, str name) -> None:
        """Remove every occurrence of a header field."""
        key, known = _name_key(name)
        self.headers = [
            p for p in self.headers
            if not (p[0] is key or (p[0] == key if known else p[0].lower() == key))
        ]
        self._invalidate()

    # -- structured views (lazy, cached) -------------------------------------------------------

    @property
    def vias(self) -> list:
        """Every Via entry, top first (RFC 3261 §20.42)."""
        return self._vias_v()

    cdef object _vias_v(self):
        if self._c_vias is None:
            values = self.get_all("Via")
            if len(values) > self._max_vias:
                raise RemoteProtocolError(513, "Too many Via entries", message=self)
            if self._c_top_via is not None and values:
                # The cached top Via was parsed from values[0] (edits clear the cache).
                self._c_vias = [self._c_top_via] + [parse_via(v) for v in values[1:]]
            else:
                self._c_vias = [parse_via(v) for v in values]
        return self._c_vias

    @property
    def top_via(self):
        """The first Via entry; RemoteProtocolError 400 when there is none."""
        if self._c_top_via is None:
            if self._c_vias is not None and self._c_vias:
                self._c_top_via = self._c_vias[0]
            else:
                first = self.get("Via")
                if first is None:
                    raise RemoteProtocolError(400, "Missing Via", droppable=True, message=self)
                items = _split_commas(first)
                if not items:
                    raise RemoteProtocolError(400, "Empty Via", droppable=True, message=self)
                self._c_top_via = parse_via(items[0])
        return self._c_top_via

    @property
    def branch(self):
        """The branch parameter of the top Via, or None."""
        return self.top_via.branch

    @property
    def call_id(self) -> str:
        """The Call-ID value."""
        v = self.get("Call-ID")
        if v is None or not v:
            raise RemoteProtocolError(400, "Missing Call-ID", message=self)
        return v

    @property
    def cseq(self) -> tuple:
        """(sequence number, method) from CSeq (RFC 3261 §20.16)."""
        return self._cseq_v()

    cdef object _cseq_v(self):
        if self._c_cseq is None:
            v = self.get("CSeq")
            if v is None:
                raise RemoteProtocolError(400, "Missing CSeq", message=self)
            self._c_cseq = _parse_cseq(v, self)
        return self._c_cseq

    @property
    def from_(self):
        """The From header field as a NameAddr."""
        return self._from__v()

    cdef object _from__v(self):
        if self._c_from is None:
            v = self.get("From")
            if v is None:
                raise RemoteProtocolError(400, "Missing From", message=self)
            self._c_from = parse_name_addr(v)
        return self._c_from

    @property
    def to(self):
        """The To header field as a NameAddr."""
        return self._to_v()

    cdef object _to_v(self):
        if self._c_to is None:
            v = self.get("To")
            if v is None:
                raise RemoteProtocolError(400, "Missing To", message=self)
            self._c_to = parse_name_addr(v)
        return self._c_to

    @property
    def contacts(self) -> list:
        """Every Contact entry; ``Contact: *`` gives one NameAddr whose ``is_wildcard`` is True."""
        return self._contacts_v()

    cdef object _contacts_v(self):
        if self._c_contacts is None:
            self._c_contacts = [parse_name_addr(v) for v in self.get_all("Contact")]
        return self._c_contacts

    @property
    def max_forwards(self):
        """Max-Forwards as an int (0..255), or None when absent."""
        return self._max_forwards_v()

    cdef object _max_forwards_v(self):
        v = self.get("Max-Forwards")
        if v is None:
            return None
        v = v.strip()
        if not v.isascii() or not v.isdigit() or len(v) > 10 or int(v) > 255:
            raise RemoteProtocolError(400, "Bad Max-Forwards", message=self)
        return int(v)

    @property
    def expires(self):
        """Expires in seconds, or None; values beyond 2**32-1 are taken as 2**32-1."""
        return self._expires_v()

    cdef object _expires_v(self):
        v = self.get("Expires")
        if v is None:
            return None
        v = v.strip()
        if not v.isascii() or not v.isdigit():
            raise RemoteProtocolError(400, "Bad Expires", message=self)
        return min(int(v), 4294967295)

    @property
    def request_uri(self):
        """The Request-URI parsed; 416 for a scheme other than sip, sips or tel, 400 if bad."""
        return self._request_uri_v()

    cdef object _request_uri_v(self):
        if self._c_ruri is None:
            if not self.is_request:
                raise LocalProtocolError("a response has no Request-URI")
            try:
                u = _parse_uri(self.uri)
            except RemoteProtocolError as exc:
                raise RemoteProtocolError(400, exc.reason, message=self) from None
            if u.scheme not in ("sip", "sips", "tel"):
                raise RemoteProtocolError(416, "Unsupported URI Scheme", message=self)
            self._c_ruri = u
        return self._c_ruri

    # -- serialization -------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """The message on the wire: canonical names, CRLF line ends, Content-Length correct."""
        if self.is_request:
            if not self.method or not self.uri:
                raise LocalProtocolError("a request needs a method and a Request-URI")
            parts = [f"{self.method} {self.uri} {self.version}\r\n"]
        else:
            status = self.status
            if not isinstance(status, int) or not 100 <= status <= 699:
                raise LocalProtocolError(f"bad status code {status!r}")
            parts = [f"{self.version} {status} {self.reason or ''}\r\n"]
        body = self.body
        cl_done = False
        for name, value in self.headers:
            if name == "Content-Length":
                if cl_done:
                    continue
                cl_done = True
                value = str(len(body))
            parts.append(f"{name}: {value}\r\n")
        if not cl_done:
            parts.append(f"Content-Length: {len(body)}\r\n")
        parts.append("\r\n")
        return "".join(parts).encode("utf-8", "surrogateescape") + body


# ---------------------------------------------------------------------------------------------
# The C parser

cdef inline void _defer(SipMessage msg, int status, str reason):
    if msg._err_status == 0:
        msg._err_status = status
        msg._err_reason = reason


cdef void _parse_start_line(SipMessage msg, const unsigned char* p, Py_ssize_t n) except *:
    cdef Py_ssize_t i, sp1, sp2, j
    cdef const unsigned char* v
    cdef Py_ssize_t vn
    cdef int code
    if n >= 4 and _LOWER[p[0]] == b"s" and _LOWER[p[1]] == b"i" and _LOWER[p[2]] == b"p" \
            and p[3] == b"/":
        # Status-Line = SIP-Version SP Status-Code SP Reason-Phrase (RFC 3261 §7.2)
        msg.is_request = False
        msg.status = 0
        msg.reason = ""
        sp1 = 0
        while sp1 < n and p[sp1] != b" ":
            sp1 += 1
        if not _version_ok(p, sp1):
            _defer(msg, 505, "Version Not Supported")
            return
        i = sp1 + 1
        code = 0
        j = 0
        while i < n and j < 4 and 48 <= p[i] <= 57:
            code = code * 10 + (p[i] - 48)
            i += 1
            j += 1
        if j != 3 or code < 100 or code > 699 or (i < n and p[i] != b" "):
            _defer(msg, 400, "Bad status code")
            return
        msg.status = code
        if i < n:
            msg.reason = _text(<const char*>p + i + 1, n - i - 1)
        return
    # Request-Line = Method SP Request-URI SP SIP-Version (RFC 3261 §7.1): single spaces only.
    msg.is_request = True
    sp1 = 0
    while sp1 < n and _TOKEN[p[sp1]]:
        sp1 += 1
    msg.method = _method_str(<const char*>p, sp1)
    if sp1 == 0 or sp1 >= n or p[sp1] != b" ":
        _defer(msg, 400, "Bad Request-Line")
        msg.uri = ""
        return
    sp2 = n - 1
    while sp2 > sp1 and p[sp2] != b" ":
        sp2 -= 1
    if sp2 == sp1:
        msg.uri = _text(<const char*>p + sp1 + 1, n - sp1 - 1)
        _defer(msg, 400, "Bad Request-Line")
        return
    msg.uri = _text(<const char*>p + sp1 + 1, sp2 - sp1 - 1)
    for i in range(sp1 + 1, sp2):
        if p[i] == b" " or p[i] == b"\t":
            _defer(msg, 400, "Bad Request-Line")
            return
    if sp2 == sp1 + 1:
        _defer(msg, 400, "Bad Request-Line")
        return
    v = p + sp2 + 1
    vn = n - sp2 - 1
    if not _version_ok(v, vn):
        if _version_like(v, vn):
            _defer(msg, 505, "Version Not Supported")
        else:
            _defer(msg, 400, "Bad Request-Line")


cdef inline bint _version_ok(const unsigned char* p, Py_ssize_t n) noexcept:
    # "SIP" is case-insensitive in the ABNF (RFC 2234 literal strings).
    return (n == 7 and _LOWER[p[0]] == b"s" and _LOWER[p[1]] == b"i" and _LOWER[p[2]] == b"p"
            and p[3] == b"/" and p[4] == b"2" and p[5] == b"." and p[6] == b"0")


cdef bint _version_like(const unsigned char* p, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i = 4, d1 = 0, d2 = 0
    if n < 7 or _LOWER[p[0]] != b"s" or _LOWER[p[1]] != b"i" or _LOWER[p[2]] != b"p" \
            or p[3] != b"/":
        return False
    while i < n and 48 <= p[i] <= 57:
        i += 1
        d1 += 1
    if d1 == 0 or i >= n or p[i] != b".":
        return False
    i += 1
    while i < n and 48 <= p[i] <= 57:
        i += 1
        d2 += 1
    return d2 > 0 and i == n


cdef long long _parse_content_length(const unsigned char* p, Py_ssize_t n) noexcept:
    """Content-Length = 1*DIGIT (RFC 3261 §20.14); -2 when malformed."""
    cdef long long v = 0
    cdef Py_ssize_t i
    if n == 0:
        return -2
    for i in range(n):
        if p[i] < 48 or p[i] > 57:
            return -2
        if v < 100000000000000:
            v = v * 10 + (p[i] - 48)
    return v


cdef bint _cseq_ok(const unsigned char* p, Py_ssize_t n) noexcept:
    """CSeq = 1*DIGIT LWS Method, the number a 32-bit unsigned integer (RFC 3261 §8.1.1.5)."""
    cdef Py_ssize_t i = 0, digits = 0, m = 0
    cdef unsigned long long v = 0
    while i < n and 48 <= p[i] <= 57:
        v = v * 10 + (p[i] - 48)
        i += 1
        digits += 1
        if digits > 10:
            return False
    if digits == 0 or v > 4294967295ULL or i >= n or not _is_wsp(p[i]):
        return False
    while i < n and _is_wsp(p[i]):
        i += 1
    while i < n and _TOKEN[p[i]]:
        i += 1
        m += 1
    return m > 0 and i == n


cdef inline const unsigned char* _line_end(const unsigned char* p, const unsigned char* end,
                                           const unsigned char** nxt) noexcept:
    """End of the line at p (before CR LF or a bare LF); *nxt is where the next line starts."""
    cdef const unsigned char* lf = <const unsigned char*>memchr(p, 10, end - p)
    cdef const unsigned char* le
    if lf == NULL:
        nxt[0] = end
        le = end
    else:
        nxt[0] = lf + 1
        le = lf
    if le > p and (le - 1)[0] == 13:
        le -= 1
    return le


cdef SipMessage _parse_head(const unsigned char* buf, Py_ssize_t n, _Lim* lim):
    """Start line and header fields; raises on what cannot be read at all, defers the rest."""
    cdef const unsigned char* end = buf + n
    cdef const unsigned char* p = buf
    cdef const unsigned char* le
    cdef const unsigned char* nxt
    cdef const unsigned char* q
    cdef const unsigned char* le2
    cdef const unsigned char* nxt2
    cdef const unsigned char* s
    cdef const unsigned char* name_end
    cdef const unsigned char* v
    cdef const unsigned char* ve
    cdef const unsigned char* body_start = end
    cdef unsigned char* scratch = NULL
    cdef Py_ssize_t vlen, nheaders = 0, k
    cdef bint folded, bad
    cdef int idx, hid
    cdef long long cl
    cdef SipMessage msg
    cdef list headers = []
    cdef object name, value

    # RFC 3261 §7.5: CRLFs before the start line are ignored.
    while p < end and (p[0] == 13 or p[0] == 10):
        p += 1
    if p >= end:
        raise RemoteProtocolError(400, "Empty message", droppable=True)
    le = _line_end(p, end, &nxt)
    if le - p > lim.max_line:
        raise RemoteProtocolError(513, "Start line too long", droppable=True)
    msg = SipMessage.__new__(SipMessage)
    msg._max_vias = lim.max_vias
    if memchr(p, 13, le - p) != NULL:
        _defer(msg, 400, "Bad start line")
    _parse_start_line(msg, p, le - p)
    p = nxt

    while True:
        if p >= end:
            body_start = end     # a datagram may end without the empty line
            break
        le = _line_end(p, end, &nxt)
        if le == p:
            body_start = nxt
            break
        # A field continues over lines that start with white space (RFC 3261 §7.3.1).
        q = nxt
        folded = False
        while q < end and _is_wsp(q[0]):
            _line_end(q, end, &nxt2)
            q = nxt2
            folded = True
        if q - p > lim.max_line:
            raise RemoteProtocolError(513, "Header field too long", droppable=True)
        nheaders += 1
        if nheaders > lim.max_headers:
            raise RemoteProtocolError(513, "Too many header fields", droppable=True)
        s = p
        while s < le and _TOKEN[s[0]]:
            s += 1
        name_end = s
        while s < le and _is_wsp(s[0]):
            s += 1
        if name_end == p or s >= le or s[0] != b":":
            _defer(msg, 400, "Malformed header field")
            p = q
            continue
        s += 1
        bad = False
        if not folded:
            v = s
            ve = le
            while v < ve and _is_wsp(v[0]):
                v += 1
            while ve > v and _is_wsp((ve - 1)[0]):
                ve -= 1
            vlen = ve - v
            if memchr(v, 13, vlen) != NULL:
                bad = True
        else:
            # Unfold: each line break with its leading white space becomes one SP.
            scratch = <unsigned char*>PyMem_Malloc(q - p + 1)
            if scratch == NULL:
                raise MemoryError()
            vlen = 0
            v = s
            ve = le
            while True:
                while v < ve and _is_wsp(v[0]):
                    v += 1
                while ve > v and _is_wsp((ve - 1)[0]):
                    ve -= 1
                if memchr(v, 13, ve - v) != NULL:
                    bad = True
                if ve > v:
                    if vlen > 0:
                        scratch[vlen] = 32
                        vlen += 1
                    for k in range(ve - v):
                        scratch[vlen + k] = v[k]
                    vlen += ve - v
                if nxt >= q:
                    break
                v = nxt
                ve = _line_end(v, end, &nxt)
            v = scratch
        if bad:
            if scratch != NULL:
                PyMem_Free(scratch)
                scratch = NULL
            _defer(msg, 400, "Bad character in header field")
            p = q
            continue
        idx = _canon_lookup(p, name_end - p)
        if idx >= 0:
            name = <object>_canon[idx].name
            hid = _canon[idx].hid
            if hid == H_VIA:
                msg._nvia_lines += 1
                if msg._nvia_lines > lim.max_vias:
                    _defer(msg, 513, "Too many Via entries")
            elif hid == H_CONTENT_LENGTH:
                cl = _parse_content_length(v, vlen)
                if cl == -2 or msg._clen == -2:
                    msg._clen = -2
                elif msg._clen >= 0 and msg._clen != cl:
                    msg._clen = -3
                elif msg._clen != -3:
                    msg._clen = cl
            elif hid == H_CSEQ:
                if not _cseq_ok(v, vlen):
                    _defer(msg, 400, "Bad CSeq")
        else:
            name = PyUnicode_DecodeASCII(<const char*>p, name_end - p, "strict")
        value = _text(<const char*>v, vlen)
        if scratch != NULL:
            PyMem_Free(scratch)
            scratch = NULL
        headers.append((name, value))
        p = q

    msg.headers = headers
    msg._head_len = body_start - buf
    if msg._head_len > lim.max_message:
        raise RemoteProtocolError(513, "Header section too large", droppable=True)
    return msg


cdef inline bint _droppable(SipMessage msg):
    return not msg.is_request or msg._nvia_lines == 0


cdef SipMessage _parse_datagram(const unsigned char* buf, Py_ssize_t n, _Lim* lim):
    cdef SipMessage msg = _parse_head(buf, n, lim)
    cdef Py_ssize_t bs = msg._head_len
    cdef Py_ssize_t avail = n - bs
    cdef long long cl = msg._clen
    if cl == -2:
        _defer(msg, 400, "Bad Content-Length")
    elif cl == -3:
        _defer(msg, 400, "Conflicting Content-Length")
    elif cl >= 0:
        if bs + cl > lim.max_message:
            _defer(msg, 413, "Request Entity Too Large")
        elif cl > avail:
            # RFC 3261 §18.3: a datagram that ends before the body does is an error.
            _defer(msg, 400, "Body shorter than Content-Length")
        elif cl > 0:
            # RFC 3261 §18.3: octets beyond Content-Length in a datagram are discarded.
            msg.body = PyBytes_FromStringAndSize(<const char*>buf + bs, <Py_ssize_t>cl)
    else:
        # No Content-Length: on UDP the body runs to the end of the datagram (RFC 3261 §18.3).
        if n > lim.max_message:
            _defer(msg, 413, "Request Entity Too Large")
        elif avail > 0:
            msg.body = PyBytes_FromStringAndSize(<const char*>buf + bs, avail)
    if msg._err_status != 0:
        raise RemoteProtocolError(msg._err_status, msg._err_reason,
                                  droppable=_droppable(msg), message=msg)
    return msg


def parse_message(data, limits=None) -> SipMessage:
    """Parse one datagram (UDP) into a SipMessage; raise RemoteProtocolError when it is bad."""
    cdef _Lim lim = _lim_from(limits)
    cdef bytes b
    if type(data) is bytes:
        b = <bytes>data
    else:
        b = bytes(data)
    return _parse_datagram(<const unsigned char*>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b), &lim)


cdef class StreamFramer:
    """Cuts a byte stream (TCP, TLS) into messages by Content-Length (RFC 3261 §18.3).

    ``feed`` the bytes as they arrive, then call ``next_message`` until it returns None.
    CRLF keep-alives between messages are skipped (RFC 5626 §3.5.1); each CRLFCRLF ping is
    counted in ``keepalive_pings`` so the transport can answer with CRLF. A message whose own
    content is bad raises RemoteProtocolError and the stream goes on; an unframeable stream
    raises RemoteProtocolError once, and the framer then refuses further use.
    """

    cdef bytearray _buf
    cdef Py_ssize_t _scan
    cdef SipMessage _pending
    cdef Py_ssize_t _need
    cdef _Lim _lim
    cdef Py_ssize_t _max_buffer
    cdef public int keepalive_pings
    cdef object _broken

    def __init__(self, limits=None, *, max_buffer_bytes=262144):
        self._lim = _lim_from(limits)
        self._buf = bytearray()
        self._max_buffer = max(max_buffer_bytes, self._lim.max_message + 4)
        self.keepalive_pings = 0

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as a message."""
        return PyByteArray_GET_SIZE(self._buf)

    cdef _fail(self, int status, str reason, object message=None):
        self._broken = RemoteProtocolError(status, reason, droppable=True, message=message)
        raise self._broken

    def feed(self, data) -> None:
        """Append received bytes; RemoteProtocolError 513 when the buffer limit is exceeded."""
        if self._broken is not None:
            raise LocalProtocolError("stream framer used after an unframeable stream")
        if PyByteArray_GET_SIZE(self._buf) + len(data) > self._max_buffer:
            self._fail(513, "Stream buffer limit exceeded")
        self._buf += data

    def next_message(self):
        """The next complete message, or None until more bytes arrive."""
        cdef const unsigned char* b
        cdef Py_ssize_t n, i, head_len
        cdef const unsigned char* lf
        cdef SipMessage msg
        cdef long long cl
        if self._broken is not None:
            raise LocalProtocolError("stream framer used after an unframeable stream")
        if self._pending is None:
            # Keep-alives at a message boundary: CRLFCRLF is a ping, a lone CRLF a pong or
            # stray line end (RFC 3261 §7.5, RFC 5626 §3.5.1).
            while True:
                n = PyByteArray_GET_SIZE(self._buf)
                b = <const unsigned char*>PyByteArray_AS_STRING(self._buf)
                if n == 0:
                    return None
                if b[0] == 10:
                    del self._buf[:1]
                    self._scan = 0
                    continue
                if b[0] != 13:
                    break
                if n < 4:
                    if n >= 2 and b[1] != 10:
                        break
                    if n == 3 and b[2] != 13:
                        del self._buf[:2]
                        self._scan = 0
                        continue
                    return None
                if b[1] == 10 and b[2] == 13 and b[3] == 10:
                    del self._buf[:4]
                    self._scan = 0
                    self.keepalive_pings += 1
                    continue
                if b[1] == 10:
                    del self._buf[:2]
                    self._scan = 0
                    continue
                break
            # Find the empty line that ends the header section.
            i = self._scan
            head_len = -1
            while i < n:
                lf = <const unsigned char*>memchr(b + i, 10, n - i)
                if lf == NULL:
                    i = n
                    break
                i = lf - b
                if i + 1 < n and b[i + 1] == 10:
                    head_len = i + 2
                    break
                if i + 2 < n and b[i + 1] == 13 and b[i + 2] == 10:
                    head_len = i + 3
                    break
                if i + 2 >= n:
                    break
                i += 1
            if head_len < 0:
                self._scan = i if i < n else max(n - 2, 0)
                if n > self._lim.max_message:
                    self._fail(513, "Header section too large")
                return None
            if head_len > self._lim.max_message:
                self._fail(513, "Header section too large")
            try:
                msg = _parse_head(b, head_len, &self._lim)
            except RemoteProtocolError as exc:
                self._broken = exc
                raise
            cl = msg._clen
            if cl == -1:
                cl = 0          # RFC 3261 §18.3 requires it on streams; absent means no body
            elif cl < 0:
                self._fail(400, "Bad Content-Length", msg)
            if msg._head_len + cl > self._lim.max_message:
                self._broken = RemoteProtocolError(413, "Request Entity Too Large",
                                                   droppable=_droppable(msg), message=msg)
                raise self._broken
            self._pending = msg
            self._need = msg._head_len + cl
        n = PyByteArray_GET_SIZE(self._buf)
        if n < self._need:
            return None
        msg = self._pending
        self._pending = None
        b = <const unsigned char*>PyByteArray_AS_STRING(self._buf)
        if self._need > msg._head_len:
            msg.body = PyBytes_FromStringAndSize(<const char*>b + msg._head_len,
                                                 self._need - msg._head_len)
        del self._buf[:self._need]
        self._scan = 0
        if msg._err_status != 0:
            raise RemoteProtocolError(msg._err_status, msg._err_reason,
                                      droppable=_droppable(msg), message=msg)
        return msg


# ---------------------------------------------------------------------------------------------
# Structured values: URIs, name-addrs, Vias (parsed on demand; not on the per-message path)

cdef str _ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
cdef str _MARK = "-_.!~*'()"
# RFC 3261 §25.1 character sets of the URI parts, for escaping on output.
cdef frozenset _USER_SAFE = frozenset(_ALNUM + _MARK + "&=+$,;?/")
cdef frozenset _PASSWORD_SAFE = frozenset(_ALNUM + _MARK + "&=+$,")
cdef frozenset _PARAM_SAFE = frozenset(_ALNUM + _MARK + "[]/:&+$")
cdef frozenset _HEADER_SAFE = frozenset(_ALNUM + _MARK + "[]/?:+$")
cdef frozenset _TOKEN_CHARS = frozenset(_ALNUM + "-.!%*_+`'~")
cdef frozenset _HOST_CHARS = frozenset(_ALNUM + "-._")
cdef frozenset _IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")
cdef frozenset _SCHEME_CHARS = frozenset(_ALNUM + "+-.")
cdef frozenset _URI_FORBIDDEN = frozenset(' \t\r\n<>"\\\x7f')
cdef frozenset _HEX = frozenset("0123456789abcdefABCDEF")


# The same sets as bit classes of a 128-entry table: every member is ASCII, so a membership
# test is one array load instead of a set lookup per character.
cdef enum:
    C_USER = 1
    C_PASSWORD = 2
    C_PARAM = 4
    C_HEADER = 8
    C_TOKEN = 16
    C_HOST = 32
    C_IPV6 = 64
    C_SCHEME = 128
    C_FORBIDDEN = 256

cdef unsigned short _CLASS[128]


def _build_class_table():
    cdef int code
    sets = ((_USER_SAFE, C_USER), (_PASSWORD_SAFE, C_PASSWORD), (_PARAM_SAFE, C_PARAM),
            (_HEADER_SAFE, C_HEADER), (_TOKEN_CHARS, C_TOKEN), (_HOST_CHARS, C_HOST),
            (_IPV6_CHARS, C_IPV6), (_SCHEME_CHARS, C_SCHEME), (_URI_FORBIDDEN, C_FORBIDDEN))
    for code in range(128):
        _CLASS[code] = 0
    for chars, bit in sets:
        for ch in chars:
            _CLASS[ord(ch)] |= bit


_build_class_table()


cdef inline bint _all_in_class(str s, unsigned short bit) noexcept:
    cdef Py_UCS4 c
    for c in s:
        if c >= 128 or not (_CLASS[c] & bit):
            return False
    return True


cdef bint _is_token(str s):
    return len(s) > 0 and _all_in_class(s, C_TOKEN)


cdef str _escape(str s, frozenset safe, unsigned short bit):
    """s with every character outside ``safe`` (class ``bit`` of the table) %HH-escaped."""
    if _all_in_class(s, bit):
        return s
    out = []
    for ch in s:
        if ch in safe:
            out.append(ch)
        else:
            out.extend("%%%02X" % b for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


cdef str _unescape(str s):
    """Undo %HH escapes (RFC 3261 §19.1.2); 400 for a broken escape."""
    cdef Py_ssize_t i, n
    if "%" not in s:
        return s
    n = len(s)
    out = bytearray()
    i = 0
    while i < n:
        ch = s[i]
        if ch == "%":
            h = s[i + 1:i + 3]
            if len(h) != 2 or h[0] not in _HEX or h[1] not in _HEX:
                raise RemoteProtocolError(400, "Bad escape in URI")
            out.append(int(h, 16))
            i += 3
        else:
            out.extend(ch.encode("utf-8", "surrogateescape"))
            i += 1
    return out.decode("utf-8", "surrogateescape")


cdef void _check_uri_text(str s) except *:
    cdef Py_UCS4 c
    for c in s:
        if c < 128 and (c < 32 or _CLASS[c] & C_FORBIDDEN):
            raise RemoteProtocolError(400, "Bad character in URI")


cdef class SipUri:
    """A URI (RFC 3261 §19.1): sip/sips in full, tel with its number in ``user``, others opaque.

    ``user``, ``password``, parameter names and values and header values hold the unescaped
    text; ``host`` keeps the brackets of an IPv6 reference. ``__str__`` escapes again.
    """

    cdef public str scheme
    cdef public object user
    cdef public object password
    cdef public str host
    cdef public object port
    cdef public dict params
    cdef public dict headers
    cdef public object opaque

    def __init__(self, scheme="sip", user=None, password=None, host="", port=None, params=None,
                 headers=None, opaque=None):
        self.scheme = scheme
        self.user = user
        self.password = password
        self.host = host
        self.port = port
        self.params = dict(params) if params else {}
        self.headers = dict(headers) if headers else {}
        self.opaque = opaque

    def __str__(self):
        if self.opaque is not None:
            return f"{self.scheme}:{self.opaque}"
        if self.scheme == "*":
            return "*"
        out = [self.scheme, ":"]
        if self.scheme == "tel":
            out.append(self.user or "")
        else:
            if self.user is not None:
                out.append(_escape(self.user, _USER_SAFE, C_USER))
                if self.password is not None:
                    out.append(":")
                    out.append(_escape(self.password, _PASSWORD_SAFE, C_PASSWORD))
                out.append("@")
            out.append(self.host)
            if self.port is not None:
                out.append(f":{self.port}")
        for k, v in self.params.items():
            out.append(";" + _escape(k, _PARAM_SAFE, C_PARAM))
            if v is not None:
                out.append("=" + _escape(v, _PARAM_SAFE, C_PARAM))
        if self.headers:
            out.append("?" + "&".join(
                _escape(k, _HEADER_SAFE, C_HEADER) + "=" + _escape(v, _HEADER_SAFE, C_HEADER)
                for k, v in self.headers.items()))
        return "".join(out)

    def __repr__(self):
        return f"SipUri({str(self)!r})"

    def _key(self):
        return (self.scheme, self.user, self.password, self.host, self.port, self.params,
                self.headers, self.opaque)

    def __eq__(self, other):
        if not isinstance(other, SipUri):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None


cdef inline SipUri _new_uri(str scheme, object user, object password, str host, object port,
                           dict params, dict headers, object opaque):
    # Straight into the fields: no keyword parsing, no dict copies (parse results are fresh).
    cdef SipUri u = SipUri.__new__(SipUri)
    u.scheme = scheme
    u.user = user
    u.password = password
    u.host = host
    u.port = port
    u.params = params
    u.headers = headers
    u.opaque = opaque
    return u


cdef inline Py_ssize_t _find(str s, Py_UCS4 ch, Py_ssize_t a, Py_ssize_t b) noexcept:
    """Index of the first ``ch`` in s[a:b], or -1."""
    cdef Py_ssize_t i
    for i in range(a, b):
        if s[i] == ch:
            return i
    return -1


cdef inline bint _span_in_class(str s, Py_ssize_t a, Py_ssize_t b, unsigned short bit) noexcept:
    cdef Py_ssize_t i
    cdef Py_UCS4 c
    for i in range(a, b):
        c = s[i]
        if c >= 128 or not (_CLASS[c] & bit):
            return False
    return True


cdef object _port_at(str s, Py_ssize_t a, Py_ssize_t b):
    """The port s[a:b]: 1 to 5 ASCII digits, at most 65535; 400 otherwise."""
    cdef Py_ssize_t i
    cdef Py_UCS4 c
    cdef long v = 0
    if b <= a or b - a > 5:
        raise RemoteProtocolError(400, "Bad port")
    for i in range(a, b):
        c = s[i]
        if c < 48 or c > 57:
            raise RemoteProtocolError(400, "Bad port")
        v = v * 10 + (<long>c - 48)
    if v > 65535:
        raise RemoteProtocolError(400, "Bad port")
    return v


cdef tuple _host_port_at(str s, Py_ssize_t a, Py_ssize_t b):
    """host [":" port] in s[a:b] of a URI, no white space allowed; host is a hostname, an IPv4
    address or an IPv6 reference (RFC 3261 §19.1.1, RFC 5118)."""
    cdef Py_ssize_t close, colon
    cdef str host
    if a < b and s[a] == "[":
        close = _find(s, "]", a, b)
        if close < 0:
            raise RemoteProtocolError(400, "Bad IPv6 reference")
        # RFC 5118 §4.10: accept the three-colon form the RFC 3261 ABNF allowed.
        if close == a + 1 or _find(s, ":", a + 1, close) < 0 \
                or not _span_in_class(s, a + 1, close, C_IPV6):
            raise RemoteProtocolError(400, "Bad IPv6 reference")
        host = s[a:close + 1]
        if close + 1 == b:
            return host, None
        if s[close + 1] != ":":
            raise RemoteProtocolError(400, "Bad host")
        return host, _port_at(s, close + 2, b)
    colon = _find(s, ":", a, b)
    if colon < 0:
        colon = b
    if colon == a or not _span_in_class(s, a, colon, C_HOST):
        raise RemoteProtocolError(400, "Bad host")
    host = s[a:colon]
    if colon == b:
        return host, None
    return host, _port_at(s, colon + 1, b)


def parse_uri(str text) -> SipUri:
    """Parse a URI; RemoteProtocolError 400 when it is malformed."""
    return _parse_uri(text)


cdef SipUri _parse_uri(str text):
    # One pass checks the characters and finds the scheme's colon; the parts are then cut
    # out by index (RFC 3261 §19.1.1: userinfo up to the first "@", host up to ";" or "?").
    cdef Py_ssize_t n, i, colon = -1, start, at, ucolon, hstart, hend, semi, q
    cdef Py_UCS4 c
    cdef str scheme, params_text
    cdef object user = None, password = None, headers_text = None
    if text is None or not text:
        raise RemoteProtocolError(400, "Empty URI")
    n = len(text)
    if n == 1 and text[0] == "*":
        return _new_uri("*", None, None, "", None, {}, {}, None)
    for i in range(n):
        c = text[i]
        if c < 128:
            if c < 32 or _CLASS[c] & C_FORBIDDEN:
                raise RemoteProtocolError(400, "Bad character in URI")
            if c == 58 and colon < 0:  # ":"
                colon = i
    if colon <= 0:
        raise RemoteProtocolError(400, "URI without scheme")
    c = text[0]
    if c >= 128 or not ((65 <= c <= 90) or (97 <= c <= 122)) \
            or not _span_in_class(text, 0, colon, C_SCHEME):
        raise RemoteProtocolError(400, "Bad URI scheme")
    scheme = text[:colon].lower()
    start = colon + 1
    if start == n:
        raise RemoteProtocolError(400, "Empty URI")
    if scheme == "tel":
        # RFC 3966: telephone-subscriber *( ";" par )
        number, _, params_text = text[start:].partition(";")
        if not number:
            raise RemoteProtocolError(400, "Empty tel number")
        return _new_uri("tel", number, None, "", None, _uri_params(params_text), {}, None)
    if scheme != "sip" and scheme != "sips":
        return _new_uri(scheme, None, None, "", None, {}, {}, text[start:])
    # userinfo ends at the first "@": the user part cannot hold an unescaped one.
    at = _find(text, "@", start, n)
    hstart = start
    if at >= 0:
        ucolon = _find(text, ":", start, at)
        if ucolon == start or at == start:
            raise RemoteProtocolError(400, "Empty user in URI")
        if ucolon < 0:
            user = _unescape(text[start:at])
        else:
            user = _unescape(text[start:ucolon])
            password = _unescape(text[ucolon + 1:at])
        hstart = at + 1
    semi = _find(text, ";", hstart, n)
    hend = semi if semi >= 0 else n
    params_text = text[semi + 1:] if semi >= 0 else ""
    q = _find(text, "?", hstart, hend)
    if q >= 0:
        headers_text = text[q + 1:hend]
        hend = q
        if params_text:
            raise RemoteProtocolError(400, "URI parameters after headers")
    elif semi >= 0:
        q = _find(text, "?", semi + 1, n)
        if q >= 0:
            headers_text = text[q + 1:]
            params_text = text[semi + 1:q]
    host, port = _host_port_at(text, hstart, hend)
    uri = _new_uri(scheme, user, password, host, port, _uri_params(params_text), {}, None)
    if headers_text is not None:
        uri.headers = _uri_headers(headers_text)
    return uri


cdef dict _uri_params(str text):
    cdef dict out = {}
    cdef Py_ssize_t n = len(text), i = 0, end, eq
    cdef str name
    if n == 0:
        return out
    while True:
        end = _find(text, ";", i, n)
        if end < 0:
            end = n
        eq = _find(text, "=", i, end)
        if eq == i or end == i:
            raise RemoteProtocolError(400, "Empty URI parameter")
        if eq < 0:
            out[_unescape(text[i:end]).lower()] = None
        else:
            name = _unescape(text[i:eq]).lower()
            out[name] = _unescape(text[eq + 1:end])
        if end == n:
            return out
        i = end + 1


cdef dict _uri_headers(str text):
    cdef dict out = {}
    if not text:
        raise RemoteProtocolError(400, "Empty URI headers")
    for item in text.split("&"):
        name, sep, value = item.partition("=")
        if not name or not sep:
            raise RemoteProtocolError(400, "Bad URI header")
        out[_unescape(name)] = _unescape(value)
    return out


cdef list _split_commas(str value):
    """Split a list field at commas outside quoted strings and <...> (RFC 3261 §7.3.1)."""
    cdef Py_ssize_t i, start = 0, n = len(value)
    cdef bint inq = False, esc = False, angle = False
    cdef Py_UCS4 c
    cdef list out = []
    if "," not in value:
        value = value.strip()
        if value:
            out.append(value)
        return out
    for i in range(n):
        c = value[i]
        if inq:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                inq = False
        elif c == '"':
            inq = True
        elif c == "<":
            angle = True
        elif c == ">":
            angle = False
        elif c == "," and not angle:
            part = value[start:i].strip()
            if part:
                out.append(part)
            start = i + 1
    part = value[start:].strip()
    if part:
        out.append(part)
    return out


cdef list _split_semis(str value):
    """Split at semicolons outside quoted strings."""
    cdef Py_ssize_t i, start = 0, n = len(value)
    cdef bint inq = False, esc = False
    cdef Py_UCS4 c
    cdef list out = []
    if '"' not in value:
        return value.split(";")
    for i in range(n):
        c = value[i]
        if inq:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                inq = False
        elif c == '"':
            inq = True
        elif c == ";":
            out.append(value[start:i])
            start = i + 1
    if inq:
        raise RemoteProtocolError(400, "Unbalanced quotes")
    out.append(value[start:])
    return out


cdef tuple _read_quoted(str s, Py_ssize_t start):
    """quoted-string at s[start] == '"': (unescaped text, index after the closing quote)."""
    cdef Py_ssize_t i = start + 1, n = len(s)
    cdef Py_UCS4 c
    out = []
    while i < n:
        c = s[i]
        if c == "\\":
            if i + 1 >= n or s[i + 1] == "\r" or s[i + 1] == "\n":
                break
            out.append(s[i + 1])
            i += 2
            continue
        if c == '"':
            return "".join(out), i + 1
        if c == "\r" or c == "\n":
            break
        out.append(c)
        i += 1
    raise RemoteProtocolError(400, "Unbalanced quotes")


cdef str _quote(str s):
    """A quoted-string for s (RFC 3261 §25.1 quoted-pair for '"', '\\' and controls)."""
    out = ['"']
    for ch in s:
        if ch == "\r" or ch == "\n":
            raise LocalProtocolError("line break in a quoted string")
        if ch == '"' or ch == "\\" or (ch < " " and ch != "\t") or ch == "\x7f":
            out.append("\\")
        out.append(ch)
    out.append('"')
    return "".join(out)


cdef dict _header_params(list items):
    """generic-param list after a SEMI (RFC 3261 §25.1): names lower-cased, quoted values raw."""
    cdef dict out = {}
    cdef str item, value
    cdef Py_ssize_t n, eq, a, b, va, vb
    for item in items:
        # Cut by index: name [= value], white space around each trimmed (str.strip's set).
        n = len(item)
        eq = _find(item, "=", 0, n)
        b = eq if eq >= 0 else n
        a = 0
        while a < b and Py_UNICODE_ISSPACE(item[a]):
            a += 1
        while b > a and Py_UNICODE_ISSPACE(item[b - 1]):
            b -= 1
        if b == a or not _span_in_class(item, a, b, C_TOKEN):
            raise RemoteProtocolError(400, "Bad parameter")
        if eq < 0:
            out[item[a:b].lower()] = None
            continue
        va = eq + 1
        vb = n
        while va < vb and Py_UNICODE_ISSPACE(item[va]):
            va += 1
        while vb > va and Py_UNICODE_ISSPACE(item[vb - 1]):
            vb -= 1
        if vb == va:
            raise RemoteProtocolError(400, "Empty parameter value")
        value = item[va:vb]
        if item[va] == '"':
            _, end = _read_quoted(value, 0)
            if end != vb - va:
                raise RemoteProtocolError(400, "Bad parameter value")
        elif item[va] == "[":
            if item[vb - 1] != "]" or not _span_in_class(item, va + 1, vb - 1, C_IPV6):
                raise RemoteProtocolError(400, "Bad parameter value")
        elif not _span_in_class(item, va, vb, C_TOKEN) \
                and not _span_in_class(item, va, vb, C_IPV6):
            raise RemoteProtocolError(400, "Bad parameter value")
        out[item[a:b].lower()] = value
    return out


cdef str _params_text(dict params):
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


cdef class NameAddr:
    """A name-addr or addr-spec with its header parameters (From, To, Contact, Route...)."""

    cdef public object display
    cdef public SipUri uri
    cdef public dict params

    def __init__(self, uri, display=None, params=None):
        self.uri = uri if isinstance(uri, SipUri) else parse_uri(uri)
        self.display = display
        self.params = dict(params) if params else {}

    @property
    def tag(self):
        """The tag parameter (RFC 3261 §19.3), or None."""
        return self.params.get("tag")

    @property
    def is_wildcard(self) -> bool:
        """True for ``Contact: *`` (RFC 3261 §10.2.2)."""
        return self.uri.scheme == "*"

    def __str__(self):
        if self.uri.scheme == "*":
            return "*"
        head = f"{_quote(self.display)} " if self.display else ""
        return f"{head}<{self.uri}>{_params_text(self.params)}"

    def __repr__(self):
        return f"NameAddr({str(self)!r})"

    def __eq__(self, other):
        if not isinstance(other, NameAddr):
            return NotImplemented
        return (self.display, self.uri, self.params) == (other.display, other.uri, other.params)

    __hash__ = None


def parse_name_addr(str text) -> NameAddr:
    """Parse ``[display] <uri>;params`` or ``uri;params``; RemoteProtocolError 400 if bad."""
    cdef str s = text.strip()
    cdef str uri_text, rest, display_text
    cdef Py_ssize_t lt, semi, gt
    display = None
    if s == "*":
        return _new_name_addr(_new_uri("*", None, None, "", None, {}, {}, None), None, {})
    if not s:
        raise RemoteProtocolError(400, "Empty address")
    if s[0] == '"':
        display, end = _read_quoted(s, 0)
        rest = s[end:].lstrip()
        if not rest.startswith("<"):
            raise RemoteProtocolError(400, "Display name without <URI>")
    else:
        lt = _find(s, "<", 0, len(s))
        semi = _find(s, ";", 0, len(s))
        if lt >= 0 and (semi < 0 or lt < semi):
            display_text = s[:lt].strip() if lt > 0 else ""
            # display-name = *(token LWS): an unquoted comma or colon is not allowed.
            if display_text:
                for word in display_text.split():
                    if not _is_token(word):
                        raise RemoteProtocolError(400, "Bad display name")
                display = display_text
            rest = s[lt:]
        else:
            rest = None
    if rest is not None:
        gt = _find(rest, ">", 0, len(rest))
        if gt < 0:
            raise RemoteProtocolError(400, "Unclosed <URI>")
        # RFC 3261 §25.1 LAQUOT/RAQUOT: no white space inside the brackets.
        if gt < 2 or Py_UNICODE_ISSPACE(rest[1]) or Py_UNICODE_ISSPACE(rest[gt - 1]):
            raise RemoteProtocolError(400, "White space inside <URI>")
        uri_text = rest[1:gt]
        rest = rest[gt + 1:].strip() if gt + 1 < len(rest) else ""
    else:
        cut = len(s)
        for i, ch in enumerate(s):
            if ch == ";" or ch == " " or ch == "\t":
                cut = i
                break
        uri_text = s[:cut]
        rest = s[cut:].strip()
        # RFC 3261 §20.10: a URI with a comma, question mark or semicolon needs <...>.
        if "," in uri_text or "?" in uri_text:
            raise RemoteProtocolError(400, "URI with ',' or '?' outside <...>")
    uri = _parse_uri(uri_text)
    if rest:
        if rest[0] != ";":
            raise RemoteProtocolError(400, "Junk after address")
        params = _header_params(_split_semis(rest[1:]))
    else:
        params = {}
    return _new_name_addr(uri, display, params)


cdef inline NameAddr _new_name_addr(SipUri uri, object display, dict params):
    cdef NameAddr na = NameAddr.__new__(NameAddr)
    na.uri = uri
    na.display = display
    na.params = params
    return na


cdef class Via:
    """One Via entry (RFC 3261 §20.42): sent-protocol, sent-by and parameters."""

    cdef public str protocol
    cdef public str transport
    cdef public str host
    cdef public object port
    cdef public dict params

    def __init__(self, transport="UDP", host="", port=None, params=None, protocol="SIP/2.0"):
        self.protocol = protocol
        self.transport = transport
        self.host = host
        self.port = port
        self.params = dict(params) if params else {}

    @property
    def branch(self):
        """The branch parameter, or None."""
        return self.params.get("branch")

    @property
    def received(self):
        """The received parameter (RFC 3261 §18.2.1), or None."""
        return self.params.get("received")

    @property
    def rport(self):
        """RFC 3581 rport: None when absent, "" without a value, else the port as text."""
        if "rport" not in self.params:
            return None
        v = self.params["rport"]
        return "" if v is None else v

    @property
    def sent_by(self) -> str:
        """host[:port] as sent."""
        return self.host if self.port is None else f"{self.host}:{self.port}"

    def __str__(self):
        return f"{self.protocol}/{self.transport} {self.sent_by}{_params_text(self.params)}"

    def __repr__(self):
        return f"Via({str(self)!r})"

    def __eq__(self, other):
        if not isinstance(other, Via):
            return NotImplemented
        return ((self.protocol, self.transport, self.host, self.port, self.params)
                == (other.protocol, other.transport, other.host, other.port, other.params))

    __hash__ = None


def parse_via(str text) -> Via:
    """Parse one Via entry (not a comma list); RemoteProtocolError 400 when it is bad."""
    cdef list parts = _split_semis(text)
    cdef str head = parts[0].strip()
    cdef str name, version, rest, transport, sent_by
    cdef Py_ssize_t i1, i2, cut, n = len(head)
    cdef Py_UCS4 c
    # sent-protocol = name SLASH version SLASH transport, SLASH = SWS "/" SWS
    i1 = _find(head, "/", 0, n)
    i2 = _find(head, "/", i1 + 1, n) if i1 >= 0 else -1
    if i1 < 0 or i2 < 0:
        raise RemoteProtocolError(400, "Bad Via")
    name = head[:i1].strip()
    version = head[i1 + 1:i2].strip()
    rest = head[i2 + 1:].lstrip()
    n = len(rest)
    cut = 0
    while cut < n:
        c = rest[cut]
        if c == " " or c == "\t":
            break
        cut += 1
    transport = rest[:cut]
    sent_by = rest[cut:].strip()
    if not _is_token(name) or not _is_token(version) or not _is_token(transport) \
            or not sent_by:
        raise RemoteProtocolError(400, "Bad Via")
    host, port = _sent_by_host_port(sent_by)
    params = _header_params(parts[1:]) if len(parts) > 1 else {}
    cdef Via via = Via.__new__(Via)
    via.protocol = f"{name.upper()}/{version}"
    via.transport = transport.upper()
    via.host = host
    via.port = port
    via.params = params
    return via


def split_auth_params(str text):
    """The ``name=value`` pairs of an auth-param list (RFC 7235 §2.1, RFC 3261 §25.1), or None.

    Each pair is ``token BWS "=" BWS (token / quoted-string)``, pairs separated by commas, a
    trailing comma allowed; names come back lower-cased, quoted values unquoted (a backslash
    escapes the next character, never a line feed). Returns None when the list is malformed
    and ``[]`` for an empty text. White space is what Unicode calls space, as in ``str.split``.
    """
    cdef Py_ssize_t n = len(text), i = 0, start, j
    cdef Py_UCS4 c
    cdef list out = []
    cdef str name, value
    while i < n:
        while i < n and Py_UNICODE_ISSPACE(text[i]):
            i += 1
        start = i
        while i < n:
            c = text[i]
            if c >= 128 or not (_CLASS[c] & C_TOKEN):
                break
            i += 1
        if i == start:
            return None
        name = text[start:i].lower()
        while i < n and Py_UNICODE_ISSPACE(text[i]):
            i += 1
        if i >= n or text[i] != "=":
            return None
        i += 1
        while i < n and Py_UNICODE_ISSPACE(text[i]):
            i += 1
        if i < n and text[i] == '"':
            j = i + 1
            while j < n:
                c = text[j]
                if c == '"':
                    break
                if c == "\\":
                    if j + 1 >= n or text[j + 1] == "\n":
                        return None
                    j += 2
                else:
                    j += 1
            if j >= n:
                return None
            value = text[i + 1:j]
            if "\\" in value:
                value = _unquote_pairs(value)
            i = j + 1
        else:
            start = i
            while i < n:
                c = text[i]
                if c == "," or c == '"' or Py_UNICODE_ISSPACE(c):
                    break
                i += 1
            value = text[start:i]
        while i < n and Py_UNICODE_ISSPACE(text[i]):
            i += 1
        if i < n:
            if text[i] != ",":
                return None
            i += 1
        out.append((name, value))
    return out


cdef str _unquote_pairs(str s):
    """Undo quoted-pairs: each backslash stands for the character after it."""
    cdef Py_ssize_t i = 0, n = len(s)
    out = []
    while i < n:
        if s[i] == "\\" and i + 1 < n:
            out.append(s[i + 1])
            i += 2
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


cdef inline Py_ssize_t _trim_end(str s, Py_ssize_t a, Py_ssize_t b) noexcept:
    while b > a and Py_UNICODE_ISSPACE(s[b - 1]):
        b -= 1
    return b


cdef inline Py_ssize_t _trim_start(str s, Py_ssize_t a, Py_ssize_t b) noexcept:
    while a < b and Py_UNICODE_ISSPACE(s[a]):
        a += 1
    return a


cdef tuple _sent_by_host_port(str s):
    """host [":" port] of a Via sent-by, already stripped; linear white space may surround
    the ":" (RFC 3261 §20.42 sent-by, §25.1 LWS)."""
    cdef Py_ssize_t n = len(s), close, colon, a, b
    if n and s[0] == "[":
        close = _find(s, "]", 0, n)
        if close < 0:
            raise RemoteProtocolError(400, "Bad IPv6 reference")
        # RFC 5118 §4.10: accept the three-colon form the RFC 3261 ABNF allowed.
        if close == 1 or _find(s, ":", 1, close) < 0 or not _span_in_class(s, 1, close, C_IPV6):
            raise RemoteProtocolError(400, "Bad IPv6 reference")
        a = _trim_start(s, close + 1, n)
        if a == n:
            return s[:close + 1], None
        if s[a] != ":":
            raise RemoteProtocolError(400, "Bad host")
        a = _trim_start(s, a + 1, n)
        return s[:close + 1], _port_at(s, a, n)
    colon = _find(s, ":", 0, n)
    b = _trim_end(s, 0, colon if colon >= 0 else n)
    if b == 0 or not _span_in_class(s, 0, b, C_HOST):
        raise RemoteProtocolError(400, "Bad host")
    if colon < 0:
        return s[:b], None
    a = _trim_start(s, colon + 1, n)
    return s[:b], _port_at(s, a, n)


cdef tuple _parse_cseq(str value, object msg):
    parts = value.split()
    if len(parts) != 2 or not parts[0].isascii() or not parts[0].isdigit() \
            or len(parts[0]) > 10 or int(parts[0]) > 4294967295 or not _is_token(parts[1]):
        raise RemoteProtocolError(400, "Bad CSeq", message=msg)
    return int(parts[0]), parts[1]


cdef str _checked_name(str name):
    if name in _KNOWN_CANONICAL:  # already a canonical long name (the usual case)
        return name
    if not _is_token(name):
        raise LocalProtocolError(f"bad header name {name!r}")
    return canonical_name(name)


cdef void _check_value(str value) except *:
    if "\r" in value or "\n" in value:
        raise LocalProtocolError("line break in a header value")


# ---------------------------------------------------------------------------------------------
# UAS checks (RFC 3261 §8.2)

_SINGLE_VALUED = ("To", "From", "Call-ID", "CSeq", "Max-Forwards", "Content-Length",
                  "Content-Type", "Expires")
# check_request's slots: Via, then the single-valued fields in the order above (the first four
# are also mandatory), then the other fields it reads.
cdef enum:
    _K_VIA = 0
    _K_TO = 1
    _K_CSEQ = 4
    _K_MAX_FORWARDS = 5
    _K_CONTENT_TYPE = 7
    _K_EXPIRES = 8
    _K_DATE = 9
    _K_REQUIRE = 10
    _K_ACCEPT = 11
    _NCHECK = 12
cdef tuple _CHECK_NAMES = ("Via",) + _SINGLE_VALUED + ("Date", "Require", "Accept")
cdef dict _CHECK_SLOT = {name: i for i, name in enumerate(_CHECK_NAMES)}
_WKDAYS = frozenset(("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"))
_MONTHS = frozenset(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                     "Nov", "Dec"))


cdef bint _date_ok(str v):
    """rfc1123-date in GMT (RFC 3261 §20.17), e.g. "Sat, 13 Nov 2010 23:29:00 GMT"."""
    parts = v.split(" ")
    if len(parts) != 6 or parts[5] != "GMT" or not parts[0].endswith(","):
        return False
    if parts[0][:len(parts[0]) - 1] not in _WKDAYS or parts[2] not in _MONTHS:
        return False
    day, year, hms = parts[1], parts[3], parts[4].split(":")
    if len(day) != 2 or not day.isdigit() or len(year) != 4 or not year.isdigit():
        return False
    return len(hms) == 3 and all(len(x) == 2 and x.isdigit() for x in hms)


cdef bint _media_match(str offered, str wanted):
    """Does an Accept range (``type/sub``, ``type/*``, ``*/*``) cover a media type?"""
    o = offered.split(";", 1)[0].strip().lower()
    if o == "*/*" or o == wanted:
        return True
    return o.endswith("/*") and wanted.split("/", 1)[0] == o[:len(o) - 2]


def check_request(SipMessage msg, *, supported=frozenset(), accept=("application/sdp",),
                  allow=None) -> None:
    """The checks a UAS makes before it acts on a request (RFC 3261 §8.2).

    Raises RemoteProtocolError with the status to answer: 400 (missing or repeated mandatory
    fields, bad syntax, CSeq method mismatch), 416 (Request-URI scheme), 405/501 (method not in
    ``allow``, when given), 483 (Max-Forwards 0, not for OPTIONS), 420 (+ Unsupported), 415
    (+ Accept or Accept-Encoding), 406 (an INVITE whose Accept excludes all of ``accept``).
    """
    if not msg.is_request:
        raise LocalProtocolError("check_request needs a request")
    # One pass over the header fields: counts of the mandatory and single-valued ones and the
    # first value of those checked below (names are canonical, as ``get`` compares them).
    cdef int counts[_NCHECK]
    cdef list firsts = [None] * _NCHECK
    cdef int k
    cdef tuple pair
    for k in range(_NCHECK):
        counts[k] = 0
    for pair in msg.headers:
        slot = _CHECK_SLOT.get(pair[0])
        if slot is not None:
            k = <int>slot
            if counts[k] == 0:
                firsts[k] = pair[1]
            counts[k] += 1
    if counts[_K_VIA] == 0:
        raise RemoteProtocolError(400, "Missing Via", droppable=True, message=msg)
    for k in range(_K_TO, _K_CSEQ + 1):
        if counts[k] == 0:
            raise RemoteProtocolError(400, f"Missing {_CHECK_NAMES[k]}", message=msg)
    for k in range(_K_TO, _K_EXPIRES + 1):
        if counts[k] > 1:
            raise RemoteProtocolError(400, f"Repeated {_CHECK_NAMES[k]}", message=msg)
    try:
        msg._vias_v()
        msg._from__v()
        msg._to_v()
        msg._contacts_v()
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(exc.status, exc.reason, message=msg) from None
    method = msg.method
    if msg._cseq_v()[1] != method:
        raise RemoteProtocolError(400, "CSeq method does not match", message=msg)
    max_forwards = msg._max_forwards_v() if counts[_K_MAX_FORWARDS] else None
    date = firsts[_K_DATE]
    if date is not None and not _date_ok(date):
        raise RemoteProtocolError(400, "Bad Date", message=msg)
    if counts[_K_EXPIRES]:
        msg._expires_v()
    ruri = msg._request_uri_v()     # §8.2.2.1: 416 for a scheme we do not understand
    if ruri.headers:
        raise RemoteProtocolError(400, "Headers in Request-URI", message=msg)
    if allow is not None and method not in allow:
        if method in KNOWN_METHODS:
            raise RemoteProtocolError(405, "Method Not Allowed",
                                      (("Allow", ", ".join(sorted(allow))),), message=msg)
        raise RemoteProtocolError(501, "Not Implemented", message=msg)
    if max_forwards == 0 and method != "OPTIONS":
        raise RemoteProtocolError(483, "Too Many Hops", message=msg)
    if method != "ACK" and method != "CANCEL":
        # §8.2.2.3: every option tag in Require must be supported.
        unsupported = [t for t in msg.get_all("Require") if t not in supported] \
            if counts[_K_REQUIRE] else None
        if unsupported:
            raise RemoteProtocolError(420, "Bad Extension",
                                      (("Unsupported", ", ".join(unsupported)),), message=msg)
    # §8.2.3: content we cannot process.
    ctype = firsts[_K_CONTENT_TYPE]
    if msg.body or ctype is not None:
        wanted = (ctype or "").split(";", 1)[0].strip().lower()
        if not wanted:
            raise RemoteProtocolError(400, "Body without Content-Type", message=msg)
        if wanted not in [a.lower() for a in accept]:
            raise RemoteProtocolError(415, "Unsupported Media Type",
                                      (("Accept", ", ".join(accept)),), message=msg)
        encodings = [e.lower() for e in msg.get_all("Content-Encoding")]
        if any(e != "identity" for e in encodings):
            raise RemoteProtocolError(415, "Unsupported Media Type",
                                      (("Accept-Encoding", "identity"),), message=msg)
    if method == "INVITE" and counts[_K_ACCEPT]:
        ranges = msg.get_all("Accept")
        if not any(_media_match(r, a.lower()) for r in ranges for a in accept):
            raise RemoteProtocolError(406, "Not Acceptable", message=msg)


# ---------------------------------------------------------------------------------------------
# Building messages

REASON_PHRASES = {
    100: "Trying", 180: "Ringing", 181: "Call Is Being Forwarded", 182: "Queued",
    183: "Session Progress", 199: "Early Dialog Terminated", 200: "OK", 202: "Accepted",
    204: "No Notification", 300: "Multiple Choices", 301: "Moved Permanently",
    302: "Moved Temporarily", 305: "Use Proxy", 380: "Alternative Service", 400: "Bad Request",
    401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 406: "Not Acceptable", 407: "Proxy Authentication Required",
    408: "Request Timeout", 410: "Gone", 412: "Conditional Request Failed",
    413: "Request Entity Too Large", 414: "Request-URI Too Long", 415: "Unsupported Media Type",
    416: "Unsupported URI Scheme", 417: "Unknown Resource-Priority", 420: "Bad Extension",
    421: "Extension Required", 422: "Session Interval Too Small", 423: "Interval Too Brief",
    428: "Use Identity Header", 429: "Provide Referrer Identity", 433: "Anonymity Disallowed",
    436: "Bad Identity-Info", 437: "Unsupported Certificate", 438: "Invalid Identity Header",
    439: "First Hop Lacks Outbound Support", 440: "Max-Breadth Exceeded",
    469: "Bad Info Package", 470: "Consent Needed", 480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist", 482: "Loop Detected", 483: "Too Many Hops",
    484: "Address Incomplete", 485: "Ambiguous", 486: "Busy Here", 487: "Request Terminated",
    488: "Not Acceptable Here", 489: "Bad Event", 491: "Request Pending",
    493: "Undecipherable", 494: "Security Agreement Required", 500: "Server Internal Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    504: "Server Time-out", 505: "Version Not Supported", 513: "Message Too Large",
    580: "Precondition Failure", 600: "Busy Everywhere", 603: "Decline",
    604: "Does Not Exist Anywhere", 606: "Not Acceptable", 607: "Unwanted", 608: "Rejected",
}
_CLASS_PHRASES = {1: "Progress", 2: "OK", 3: "Redirection", 4: "Client Error",
                  5: "Server Error", 6: "Global Failure"}


def reason_phrase(int status) -> str:
    """The RFC 3261 §21 reason phrase for a status code (its class's name if unknown)."""
    return REASON_PHRASES.get(status) or _CLASS_PHRASES.get(status // 100, "Unknown")


# RFC 3261 §8.2.6.2: the fields a response copies from its request.
cdef frozenset _RESPONSE_COPIES = frozenset(("Via", "From", "To", "Call-ID", "CSeq"))


def build_response(SipMessage request, int status, reason=None, *, headers=(), body=b"",
                   to_tag=None) -> SipMessage:
    """A response to ``request`` (RFC 3261 §8.2.6): Vias, From, To, Call-ID and CSeq copied."""
    if not request.is_request:
        raise LocalProtocolError("build_response needs a request")
    if not 100 <= status <= 699:
        raise LocalProtocolError(f"bad status code {status}")
    resp = SipMessage.__new__(SipMessage)
    resp.is_request = False
    resp.status = status
    resp.reason = reason if reason is not None else reason_phrase(status)
    out = []
    cdef bint first_to = True
    cdef tuple pair
    for pair in request.headers:
        name = pair[0]
        if name not in _RESPONSE_COPIES:
            continue
        if name != "To":
            out.append(pair)
        else:
            value = pair[1]
            if to_tag is not None:
                # The first To's parsed view is cached by the request when it was read.
                if first_to and request._c_to is not None:
                    tagged = (<NameAddr>request._c_to).params.get("tag") is not None
                else:
                    tagged = _has_tag(value)
                if not tagged:
                    value = f"{value};tag={to_tag}"
            first_to = False
            out.append((name, value))
    resp.headers = out
    for name, value in headers:
        resp.add(name, value)
    resp.body = bytes(body)
    return resp


cdef bint _has_tag(str to_value):
    try:
        return parse_name_addr(to_value).tag is not None
    except RemoteProtocolError:
        return ";tag=" in to_value.replace(" ", "").lower()


def build_request(str method, uri, *, headers, body=b"") -> SipMessage:
    """A request from its parts; Content-Length is filled in by ``to_bytes``."""
    if not _is_token(method):
        raise LocalProtocolError(f"bad method {method!r}")
    uri_text = str(uri)
    if not uri_text or " " in uri_text or "\r" in uri_text or "\n" in uri_text:
        raise LocalProtocolError(f"bad Request-URI {uri_text!r}")
    msg = SipMessage.__new__(SipMessage)
    msg.is_request = True
    msg.method = method
    msg.uri = uri_text
    msg.headers = []
    for name, value in headers:
        msg.add(name, value)
    msg.body = bytes(body)
    return msg


def new_branch() -> str:
    """A fresh Via branch with the RFC 3261 §8.1.1.7 magic cookie."""
    return "z9hG4bK" + secrets.token_hex(10)


def new_tag() -> str:
    """A fresh From/To tag (RFC 3261 §19.3: at least 32 bits of randomness)."""
    return secrets.token_hex(6)
