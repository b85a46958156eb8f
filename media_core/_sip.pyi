"""Type stubs for the compiled SIP codec (media_core/_sip.pyx)."""

from collections.abc import Iterable
from dataclasses import dataclass

KNOWN_METHODS: frozenset[str]
REASON_PHRASES: dict[int, str]

class RemoteProtocolError(Exception):
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    droppable: bool
    message: SipMessage | None
    def __init__(
        self,
        status: int,
        reason: str,
        headers: Iterable[tuple[str, str]] = ...,
        droppable: bool = ...,
        message: SipMessage | None = ...,
    ) -> None: ...

class LocalProtocolError(Exception): ...

@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 65535
    max_headers: int = 100
    max_vias: int = 70
    max_line_bytes: int = 8192

class SipUri:
    scheme: str
    user: str | None
    password: str | None
    host: str
    port: int | None
    params: dict[str, str | None]
    headers: dict[str, str]
    opaque: str | None
    def __init__(
        self,
        scheme: str = ...,
        user: str | None = ...,
        password: str | None = ...,
        host: str = ...,
        port: int | None = ...,
        params: dict[str, str | None] | None = ...,
        headers: dict[str, str] | None = ...,
        opaque: str | None = ...,
    ) -> None: ...

class NameAddr:
    display: str | None
    uri: SipUri
    params: dict[str, str | None]
    def __init__(
        self, uri: SipUri | str, display: str | None = ..., params: dict[str, str | None] | None = ...
    ) -> None: ...
    @property
    def tag(self) -> str | None: ...
    @property
    def is_wildcard(self) -> bool: ...

class Via:
    protocol: str
    transport: str
    host: str
    port: int | None
    params: dict[str, str | None]
    def __init__(
        self,
        transport: str = ...,
        host: str = ...,
        port: int | None = ...,
        params: dict[str, str | None] | None = ...,
        protocol: str = ...,
    ) -> None: ...
    @property
    def branch(self) -> str | None: ...
    @property
    def received(self) -> str | None: ...
    @property
    def rport(self) -> str | None: ...
    @property
    def sent_by(self) -> str: ...

class SipMessage:
    is_request: bool
    method: str | None
    uri: str | None
    status: int | None
    reason: str | None
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    def __init__(
        self,
        *,
        is_request: bool = ...,
        method: str | None = ...,
        uri: str | None = ...,
        status: int | None = ...,
        reason: str | None = ...,
        headers: Iterable[tuple[str, str]] = ...,
        body: bytes = ...,
        version: str = ...,
    ) -> None: ...
    def get(self, name: str) -> str | None: ...
    def get_all(self, name: str) -> list[str]: ...
    def count(self, name: str) -> int: ...
    def set(self, name: str, value: str) -> None: ...
    def add(self, name: str, value: str) -> None: ...
    def remove(self, name: str) -> None: ...
    @property
    def vias(self) -> list[Via]: ...
    @property
    def top_via(self) -> Via: ...
    @property
    def branch(self) -> str | None: ...
    @property
    def call_id(self) -> str: ...
    @property
    def cseq(self) -> tuple[int, str]: ...
    @property
    def from_(self) -> NameAddr: ...
    @property
    def to(self) -> NameAddr: ...
    @property
    def contacts(self) -> list[NameAddr]: ...
    @property
    def max_forwards(self) -> int | None: ...
    @property
    def expires(self) -> int | None: ...
    @property
    def request_uri(self) -> SipUri: ...
    def to_bytes(self) -> bytes: ...

class StreamFramer:
    keepalive_pings: int
    def __init__(self, limits: Limits | None = ..., *, max_buffer_bytes: int = ...) -> None: ...
    @property
    def buffered(self) -> int: ...
    def feed(self, data: bytes) -> None: ...
    def next_message(self) -> SipMessage | None: ...

def parse_message(data: bytes, limits: Limits | None = ...) -> SipMessage: ...
def parse_uri(text: str) -> SipUri: ...
def parse_name_addr(text: str) -> NameAddr: ...
def parse_via(text: str) -> Via: ...
def split_auth_params(text: str) -> list[tuple[str, str]] | None: ...
def canonical_name(name: str) -> str: ...
def check_request(
    msg: SipMessage,
    *,
    supported: frozenset[str] = ...,
    accept: tuple[str, ...] = ...,
    allow: frozenset[str] | None = ...,
) -> None: ...
def reason_phrase(status: int) -> str: ...
def build_response(
    request: SipMessage,
    status: int,
    reason: str | None = ...,
    *,
    headers: Iterable[tuple[str, str]] = ...,
    body: bytes = ...,
    to_tag: str | None = ...,
) -> SipMessage: ...
def build_request(
    method: str, uri: SipUri | str, *, headers: Iterable[tuple[str, str]], body: bytes = ...
) -> SipMessage: ...
def new_branch() -> str: ...
def new_tag() -> str: ...
