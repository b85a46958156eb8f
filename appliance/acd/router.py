"""The ACD router the appliance uses: the compiled core when it is built, else the reference.

Both follow the same rules (``appliance.acd.reference``) and have the same API; ``COMPILED``
tells which one ``Router`` is.
"""

from __future__ import annotations

from appliance.acd.reference import ReferenceRouter

try:
    from appliance.acd._router import Router
except ImportError:  # extension not built (e.g. a source checkout before `make build`)
    Router = ReferenceRouter  # type: ignore[misc,assignment]
    COMPILED = False
else:
    COMPILED = True

__all__ = ["COMPILED", "ReferenceRouter", "Router"]
