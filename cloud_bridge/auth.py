"""Who is calling: the site named by the client certificate, checked on every RPC.

TLS (``require_client_auth``) already refuses a missing certificate, one from another CA and an
expired one on the link port. This interceptor then, for every method except the public ones
(Enrol, health, reflection):

- refuses a call without a client certificate (the enrol port does not ask for one);
- checks the certificate again against the CA: issuer, signature, validity period, site name;
- refuses a revoked serial (the revocation list is in the cloud store);
- makes the site identity available to the handler through ``current_site()``.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from cloud_bridge.ca import CertificateAuthority, CertificateError, SiteCertificate

log = logging.getLogger("edgecc.cloud.auth")

_CURRENT_SITE: contextvars.ContextVar[SiteCertificate] = contextvars.ContextVar("site")

IsRevoked = Callable[[int], Awaitable[bool]]


def current_site() -> SiteCertificate:
    """The authenticated site of the RPC being served (set by ``SiteAuthInterceptor``)."""
    try:
        return _CURRENT_SITE.get()
    except LookupError:
        raise RuntimeError("no authenticated site: method not behind SiteAuthInterceptor") from None


class SiteAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every non-public RPC whose caller is not a valid, unrevoked site."""

    def __init__(
        self, ca: CertificateAuthority, is_revoked: IsRevoked, public_methods: frozenset[str]
    ) -> None:
        self._ca = ca
        self._is_revoked = is_revoked
        self._public = public_methods

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method in self._public or _is_public_service(method):
            return handler
        return _guarded(handler, lambda context: self.authorize(context, method))

    async def authorize(self, context: grpc.aio.ServicerContext, method: str) -> SiteCertificate:
        """The calling site, or abort the RPC with UNAUTHENTICATED."""
        auth = context.auth_context()
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            log.info("event=refused reason=no_client_certificate method=%s", method)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "a client certificate is required: enrol, then use the link port",
            )
        try:
            site = self._ca.check_site_certificate(pems[0])
        except CertificateError as exc:
            log.info("event=refused reason=bad_certificate method=%s detail=%r", method, str(exc))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if await self._is_revoked(site.serial):
            log.info(
                "event=refused reason=revoked site=%s serial=%x method=%s",
                site.site_id, site.serial, method,
            )
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "client certificate revoked")
        return site


def _is_public_service(method: str) -> bool:
    # Health checks and reflection answer anyone who completed the TLS handshake.
    return method.startswith(
        ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
         "/grpc.reflection.v1.ServerReflection/")
    )


Authorize = Callable[[grpc.aio.ServicerContext], Awaitable[SiteCertificate]]


def _guarded(handler: grpc.RpcMethodHandler, authorize: Authorize) -> grpc.RpcMethodHandler:
    """The same handler with ``authorize`` run first and its result in ``current_site()``."""
    if handler.unary_unary:
        inner: Any = handler.unary_unary
        factory: Any = grpc.unary_unary_rpc_method_handler
    elif handler.unary_stream:
        inner, factory = handler.unary_stream, grpc.unary_stream_rpc_method_handler
    elif handler.stream_unary:
        inner, factory = handler.stream_unary, grpc.stream_unary_rpc_method_handler
    else:
        inner, factory = handler.stream_stream, grpc.stream_stream_rpc_method_handler

    if inspect.isasyncgenfunction(inner):

        async def behaviour_gen(request: Any, context: grpc.aio.ServicerContext) -> Any:
            # Each RPC runs in a task of its own, so its context holds this one site; no reset,
            # as a generator may be finalised from another context.
            _CURRENT_SITE.set(await authorize(context))
            async for response in inner(request, context):
                yield response

        behaviour: Any = behaviour_gen
    else:

        async def behaviour_call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = _CURRENT_SITE.set(await authorize(context))
            try:
                return await inner(request, context)
            finally:
                _CURRENT_SITE.reset(token)

        behaviour = behaviour_call
    return factory(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
