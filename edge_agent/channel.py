"""The gRPC side of the edge agent: channels and messages (the only user of generated code).

Channel options follow gRPC's connection backoff (exponential, jitter, capped) and keepalive
guidance: the agent holds one long-lived stream, so a dead path must be noticed by pings.
"""

from __future__ import annotations

import json
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

__all__ = ["MAX_MESSAGE_BYTES", "WITHHELD_KIND", "channel_options", "event_message", "pb",
           "pb_grpc", "secure_channel"]


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


def event_message(event: PendingEvent, *, withheld: bool, site_id: str) -> Any:
    """The SiteMessage carrying one event, or its placeholder when ``withheld``."""
    message = pb.Event(site_id=site_id, seq=event.seq)
    if withheld:
        message.kind = WITHHELD_KIND
        # The cloud learns what it is missing, never the content.
        message.payload = json.dumps(
            {"kind": event.kind[:64], "withheld": True}, separators=(",", ":")
        ).encode()
    else:
        message.kind = event.kind
        message.payload = event.payload
    message.occurred_at.FromNanoseconds(int(event.occurred_at * 1e9))
    return pb.SiteMessage(event=message)
