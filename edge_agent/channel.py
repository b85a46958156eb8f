"""The gRPC side of the edge agent: channels and messages (the only user of generated code).

Channel options follow gRPC's connection backoff (exponential, jitter, capped) and keepalive
guidance: the agent holds one long-lived stream, so a dead path must be noticed by pings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import grpc

try:
    from proto import bridge_pb2 as pb
    from proto import bridge_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "the bridge's generated code is missing: run `python -m proto.build`"
    ) from exc

from appliance.eventlog import PendingEvent
from edge_agent.config import CloudSection

MAX_MESSAGE_BYTES = 1024 * 1024 + 64 * 1024
"""Largest message either way (docs/cloud.md, limits)."""
WITHHELD_KIND = "edgecc.withheld"
"""Kind of the placeholder sent for a seq whose payload is not shipped."""

BATCH_MESSAGE_BYTES = 512 * 1024
"""An EventBatch is closed once its payloads reach this: with one more event of the largest
size (256 KiB) and the envelopes it stays under MAX_MESSAGE_BYTES."""

__all__ = ["BATCH_MESSAGE_BYTES", "MAX_MESSAGE_BYTES", "WITHHELD_KIND", "EventBatcher",
           "channel_options", "column_messages", "event_message", "pb", "pb_grpc",
           "secure_channel", "withheld_payload"]


def channel_options(cloud: CloudSection) -> list[tuple[str, Any]]:
    """Options of the link channel: reconnect backoff, keepalive, message limits."""
    options: list[tuple[str, Any]] = [
        ("grpc.initial_reconnect_backoff_ms", cloud.reconnect.initial_ms),
        ("grpc.min_reconnect_backoff_ms", cloud.reconnect.initial_ms),
        ("grpc.max_reconnect_backoff_ms", cloud.reconnect.max_ms),
        ("grpc.keepalive_time_ms", cloud.keepalive.time_ms),
        ("grpc.keepalive_timeout_ms", cloud.keepalive.timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # Pings keep going on an idle stream (no data for hours at night).
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # One connection of our own, never shared with another channel of the process.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    if cloud.server_name:
        options.append(("grpc.ssl_target_name_override", cloud.server_name))
    return options


def secure_channel(
    address: str, cloud: CloudSection, ca_pem: bytes, key_pem: bytes | None = None,
    cert_pem: bytes | None = None,
) -> grpc.Channel:
    """A TLS channel to ``address`` trusting only the cloud CA (mutual when key/cert given)."""
    credentials = grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)
    return grpc.secure_channel(address, credentials, options=channel_options(cloud))


def withheld_payload(kind: str) -> bytes:
    """Payload of the placeholder for an event of ``kind`` that is not shipped: the cloud
    learns what it is missing, never the content."""
    return json.dumps({"kind": kind[:64], "withheld": True}, separators=(",", ":")).encode()


def column_messages(
    site_id: str, seqs: Sequence[int], kinds: Sequence[str], payloads: Sequence[bytes],
    occurred_at: Sequence[float], limit_bytes: int = BATCH_MESSAGE_BYTES,
) -> Iterator[tuple[Any, int, int]]:
    """EventColumns messages of consecutive events, each closed once its payloads reach
    ``limit_bytes`` (so under MAX_MESSAGE_BYTES); yields ``(message, last seq, payload bytes)``.

    The columns go into the message whole (one C-level copy each), not event by event.
    """
    sizes = list(map(len, payloads))
    start, count = 0, len(seqs)
    while start < count:
        end, total = start, 0
        if sum(sizes[start:]) < limit_bytes:
            end, total = count, sum(sizes[start:])
        else:
            while end < count and total < limit_bytes:
                total += sizes[end]
                end += 1
        message = pb.SiteMessage()
        columns = message.columns
        columns.site_id = site_id
        columns.seqs.extend(seqs[start:end])
        columns.kinds.extend(kinds[start:end])
        columns.payloads.extend(payloads[start:end])
        columns.occurred_at.extend(occurred_at[start:end])
        yield message, seqs[end - 1], total
        start = end


def _fill(message: Any, event: PendingEvent, withheld: bool) -> int:
    """Set kind, payload and time of an Event message; return the payload's size."""
    if withheld:
        message.kind = WITHHELD_KIND
        payload = withheld_payload(event.kind)
    else:
        message.kind = event.kind
        payload = event.payload
    message.payload = payload
    # google.protobuf.Timestamp: whole seconds and 0..999,999,999 nanos, also before 1970.
    seconds, nanos = divmod(int(event.occurred_at * 1e9), 1_000_000_000)
    stamp = message.occurred_at
    stamp.seconds = seconds
    stamp.nanos = nanos
    return len(payload)


def event_message(event: PendingEvent, *, withheld: bool, site_id: str) -> Any:
    """The SiteMessage carrying one event, or its placeholder when ``withheld``."""
    message = pb.Event(site_id=site_id, seq=event.seq)
    _fill(message, event, withheld)
    return pb.SiteMessage(event=message)


class EventBatcher:
    """Builds EventBatch messages of consecutive events, each under the message limit."""

    def __init__(self, site_id: str, limit_bytes: int = BATCH_MESSAGE_BYTES) -> None:
        self.site_id = site_id
        self.limit_bytes = limit_bytes
        self._message: Any = None
        self.bytes = 0
        """Payload bytes in the open batch."""
        self.last_seq = 0
        """Seq of the newest event added."""

    def add(self, event: PendingEvent, *, withheld: bool) -> Any | None:
        """Add one event; return the finished SiteMessage when the batch is full, else None."""
        if self._message is None:
            self._message = pb.SiteMessage()
            self.bytes = 0
        item = self._message.events.events.add(site_id=self.site_id, seq=event.seq)
        self.bytes += _fill(item, event, withheld)
        self.last_seq = event.seq
        if self.bytes >= self.limit_bytes:
            return self.flush()
        return None

    def flush(self) -> Any | None:
        """The open batch as a SiteMessage (None when empty); a new batch starts."""
        message, self._message = self._message, None
        return message
