"""Who is calling: bearer tokens (RFC 6750) checked against the user store, and role gates."""

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from appliance.api.errors import ApiError
from appliance.api.middleware import note
from appliance.api.users import Principal, Role, UserStore

# auto_error off: a missing token must answer in the API's error shape, with the RFC 6750 §3
# challenge, not FastAPI's own 403.
bearer = HTTPBearer(auto_error=False, description="The token returned by POST /api/login")

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="edgecc"'}


def require(users: UserStore, role: Role) -> Callable[..., Principal]:
    """A dependency admitting holders of a valid token whose role reaches ``role``:
    401 without one (or with an expired/revoked one), 403 when the role is too low."""

    def dependency(request: Request,
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
                   ) -> Principal:
        if credentials is None:
            raise ApiError(401, "a bearer token is required (POST /api/login)",
                           headers=_CHALLENGE)
        principal = users.resolve(credentials.credentials)
        if principal is None:
            raise ApiError(401, "the token is invalid, expired or revoked; log in again",
                           headers={"WWW-Authenticate":
                                    'Bearer realm="edgecc", error="invalid_token"'})
        note(request, actor=principal.name)
        if not principal.role.allows(role):
            raise ApiError(403, f"this needs the {role.value} role; the token's role is "
                           f"{principal.role.value}")
        check_query(request)
        return principal

    return dependency


def check_query(request: Request) -> None:
    """Refuse (422) query parameters the route does not take: a typo such as ``shrinkge``
    must not fall back to a default silently."""
    known = _query_names(getattr(request.scope.get("route"), "dependant", None))
    for name in request.query_params:
        if name not in known:
            expected = f"one of {', '.join(sorted(known))}" if known else "none"
            raise ApiError(422, f"{name or '(empty)'}: unknown query parameter (expected "
                           f"{expected})", name)


def _query_names(dependant: Any) -> set[str]:
    if dependant is None:
        return set()
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names
