"""The SIP guard: drops traffic from brute-forcing, flooding and scanning sources.

Three rules, checked in this order for every request before it reaches a transaction:

1. a source host that failed digest authentication ``max_auth_failures`` times within
   ``failure_window`` seconds is banned for ``ban_time`` seconds;
2. each source host has a token bucket of ``rate_burst`` requests refilled at ``rate_limit``
   per second;
3. a request whose User-Agent contains a known scanner default (``friendly-scanner``,
   ``sipvicious``...) is dropped.

Dropped requests get no response at all, so a scanner learns nothing and spends its own time
on retransmissions (RFC 3261 §17 gives it nothing to match). Sources inside ``exempt_sources``
(an SBC, a load tester) are never banned or limited. Every table here is bounded.

This module is sans-IO: time is passed in as ``now`` (seconds, any monotonic origin).
"""

from __future__ import annotations

import enum
import ipaddress
import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from appliance.sip.source import Source

__all__ = ["Guard", "GuardDecision", "GuardVerdict"]

log = logging.getLogger("edgecc.sip.guard")

_MAX_SOURCES = 65_536
_MAX_BANS = 65_536
_DROP_LOG_INTERVAL = 10.0


class GuardVerdict(enum.Enum):
    """What the transport does with a request."""

    ALLOW = "allow"
    DROP = "drop"


@dataclass(frozen=True)
class GuardDecision:
    """A verdict with the rule that decided it."""

    verdict: GuardVerdict
    """ALLOW or DROP."""
    reason: str
    """"ok", "exempt", "disabled", "banned", "rate limited" or "scanner"."""


_ALLOW = GuardDecision(GuardVerdict.ALLOW, "ok")
_EXEMPT = GuardDecision(GuardVerdict.ALLOW, "exempt")
_DISABLED = GuardDecision(GuardVerdict.ALLOW, "disabled")
_BANNED = GuardDecision(GuardVerdict.DROP, "banned")
_RATE = GuardDecision(GuardVerdict.DROP, "rate limited")
_SCANNER = GuardDecision(GuardVerdict.DROP, "scanner")


class Guard:
    """Per-source bans, rate limits and scanner filtering, driven by ``now``.

    ``config`` is an ``appliance.config.GuardConfig`` (or anything with its attributes:
    enabled, max_auth_failures, failure_window, ban_time, rate_limit, rate_burst,
    exempt_sources, scanner_user_agents).
    """

    def __init__(self, config: Any, *, max_sources: int = _MAX_SOURCES) -> None:
        self.enabled: bool = bool(config.enabled)
        self.max_auth_failures = int(config.max_auth_failures)
        self.failure_window = float(config.failure_window)
        self.ban_time = float(config.ban_time)
        self.rate_limit = float(config.rate_limit)
        self.rate_burst = float(config.rate_burst)
        if self.max_auth_failures < 1 or self.failure_window <= 0 or self.ban_time < 0:
            raise ValueError("guard: max_auth_failures >= 1, failure_window > 0, ban_time >= 0")
        if self.rate_limit <= 0 or self.rate_burst < 1:
            raise ValueError("guard: rate_limit > 0 and rate_burst >= 1")
        self.exempt_networks = exempt_networks(config.exempt_sources)
        self.scanner_user_agents = tuple(
            str(ua).lower() for ua in config.scanner_user_agents if str(ua)
        )
        self._max_sources = max_sources
        # host -> ban expiry
        self._bans: dict[str, float] = {}
        # host -> recent failure times (at most max_auth_failures kept)
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        # host -> [tokens, last refill time]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()
        # host -> exempt? (cache of the CIDR check)
        self._exempt_cache: dict[str, bool] = {}
        # host -> last time a drop was logged (log throttle)
        self._drop_logged: dict[str, float] = {}
        self.dropped: dict[str, int] = {"banned": 0, "rate limited": 0, "scanner": 0}
        """Counters of dropped requests per reason."""
        self.on_ban: Callable[[Source, float, int], None] | None = None
        """Told of each new ban: (source, ban end, failures); the alerts' security rule."""

    # -- queries ----------------------------------------------------------------------------

    def is_exempt(self, host: str) -> bool:
        """True when ``host`` is inside one of ``exempt_sources``."""
        cached = self._exempt_cache.get(host)
        if cached is not None:
            return cached
        try:
            addr = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            exempt = False
        else:
            if addr.version == 6 and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            exempt = any(addr in net for net in self.exempt_networks)
        if len(self._exempt_cache) >= self._max_sources:
            self._exempt_cache.clear()
        self._exempt_cache[host] = exempt
        return exempt

    def is_banned(self, host: str, now: float) -> bool:
        """True when ``host`` is banned at ``now``."""
        until = self._bans.get(host)
        if until is None:
            return False
        if now >= until:
            del self._bans[host]
            log.info("event=sip_guard_unban source=%s", host)
            return False
        return True

    def bans(self, now: float) -> dict[str, float]:
        """Currently banned hosts and the seconds left on each ban."""
        return {host: until - now for host, until in self._bans.items() if until > now}

    # -- per request ------------------------------------------------------------------------

    def check(self, request: Any, source: Source, now: float) -> GuardDecision:
        """Decide whether a request from ``source`` goes on, and why."""
        if not self.enabled:
            return _DISABLED
        host = source.host
        if self.exempt_networks and self.is_exempt(host):
            return _EXEMPT
        if host in self._bans and self.is_banned(host, now):
            return self._drop(_BANNED, source, now)
        if not self._take_token(host, now):
            return self._drop(_RATE, source, now)
        if self.scanner_user_agents and request is not None:
            ua = request.get("User-Agent")
            if ua:
                lowered = ua.lower()
                for needle in self.scanner_user_agents:
                    if needle in lowered:
                        return self._drop(_SCANNER, source, now)
        return _ALLOW

    def admit(self, request: Any, source: Source, now: float) -> GuardVerdict:
        """ALLOW or DROP a request from ``source`` (see ``check`` for the reason)."""
        return self.check(request, source, now).verdict

    def auth_failed(self, source: Source, now: float) -> None:
        """Count a failed digest authentication from ``source``; ban it past the threshold."""
        if not self.enabled:
            return
        host = source.host
        if self.exempt_networks and self.is_exempt(host):
            return
        if host in self._bans and self.is_banned(host, now):
            return
        times = self._failures.get(host)
        if times is None:
            if len(self._failures) >= self._max_sources:
                self._failures.popitem(last=False)
            times = self._failures[host] = deque(maxlen=self.max_auth_failures)
        else:
            self._failures.move_to_end(host)
        times.append(now)
        if len(times) >= self.max_auth_failures and now - times[0] <= self.failure_window:
            self._ban(source, now, len(times))

    def auth_succeeded(self, source: Source, now: float) -> None:
        """Note a successful authentication from ``source``.

        Earlier failures are deliberately kept: clearing them here would let anyone holding
        one valid account reset the count between guesses at other accounts.
        """
        failures = self._failures.get(source.host)
        if failures and now - failures[-1] > self.failure_window:
            del self._failures[source.host]

    # -- housekeeping -----------------------------------------------------------------------

    def prune(self, now: float) -> None:
        """Forget expired bans, old failures and idle full buckets."""
        for host in [h for h, until in self._bans.items() if until <= now]:
            del self._bans[host]
            log.info("event=sip_guard_unban source=%s", host)
        for host in [h for h, t in self._failures.items() if now - t[-1] > self.failure_window]:
            del self._failures[host]
        full_after = self.rate_burst / self.rate_limit
        for host in [h for h, b in self._buckets.items() if now - b[1] >= full_after]:
            del self._buckets[host]
        for host in [h for h, t in self._drop_logged.items() if now - t > _DROP_LOG_INTERVAL]:
            del self._drop_logged[host]

    def next_timer(self) -> float | None:
        """When the next ban ends (nothing else needs a timer), or None."""
        return min(self._bans.values(), default=None)

    # -- internals --------------------------------------------------------------------------

    def _take_token(self, host: str, now: float) -> bool:
        bucket = self._buckets.get(host)
        if bucket is None:
            if len(self._buckets) >= self._max_sources:
                self.prune(now)
                while len(self._buckets) >= self._max_sources:
                    self._buckets.popitem(last=False)
            self._buckets[host] = [self.rate_burst - 1.0, now]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate_limit
        if tokens > self.rate_burst:
            tokens = self.rate_burst
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = tokens - 1.0
            return True
        bucket[0] = tokens
        return False

    def _ban(self, source: Source, now: float, failures: int) -> None:
        if len(self._bans) >= _MAX_BANS:
            # Keep the newest bans: the oldest are the closest to ending anyway.
            oldest = min(self._bans, key=self._bans.__getitem__)
            del self._bans[oldest]
        self._bans[source.host] = now + self.ban_time
        self._failures.pop(source.host, None)
        log.warning(
            "event=sip_guard_ban source=%s transport=%s failures=%d window_s=%g ban_s=%g",
            source.host,
            source.transport,
            failures,
            self.failure_window,
            self.ban_time,
        )
        if self.on_ban is not None:
            try:
                self.on_ban(source, now + self.ban_time, failures)
            except Exception:
                log.exception("event=sip_guard_on_ban_failed source=%s", source.host)

    def _drop(self, decision: GuardDecision, source: Source, now: float) -> GuardDecision:
        self.dropped[decision.reason] += 1
        last = self._drop_logged.get(source.host)
        if last is None or now - last >= _DROP_LOG_INTERVAL:
            if len(self._drop_logged) >= self._max_sources:
                self._drop_logged.clear()
            self._drop_logged[source.host] = now
            log.info(
                "event=sip_guard_drop source=%s transport=%s reason=%s",
                source.host,
                source.transport,
                decision.reason.replace(" ", "_"),
            )
        return decision


def exempt_networks(
    cidrs: Iterable[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """Parse CIDRs as the guard does (host bits allowed); raises ValueError on bad input."""
    return tuple(ipaddress.ip_network(str(c), strict=False) for c in cidrs)
