"""Where a SIP message came from (or goes to): transport plus address."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Source:
    """A peer address as seen by a SIP transport.

    ``transport`` is the upper-case transport token used in Via headers ("UDP", "TCP", "TLS").
    """

    transport: str
    host: str
    port: int
