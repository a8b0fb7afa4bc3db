"""One way to wrap every RPC shape, shared by all Atelier server interceptors.

grpc.aio interceptors only see a method *handler*; to run code around the actual call
(catch errors, time it, set context variables) they must replace the handler's behaviour.
Four RPC shapes and three behaviour styles (coroutine, async generator, sync function) make
that easy to get subtly wrong, so every interceptor here supplies an async context manager
("guard") and `wrap_handler` applies it uniformly:

* the guard is entered inside the wrapped behaviour, i.e. in the task that runs the RPC,
  so context variables it sets are visible to the servicer;
* for response streams the guard spans the whole stream, not just the first message;
* the wrapper keeps the behaviour's style (grpc.aio dispatches on it: a coroutine
  streaming handler writes with `context.write`, an async generator yields).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc
from grpc import aio

Guard = Callable[[grpc.HandlerCallDetails, aio.ServicerContext], AbstractAsyncContextManager[None]]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]

HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."


def is_infrastructure_method(method: str) -> bool:
    """Health and reflection stay open and unauthenticated so probes and tools work."""
    return method.startswith(HEALTH_PREFIX) or method.startswith(REFLECTION_PREFIX)


def metadata_value(context: aio.ServicerContext, key: str) -> str | None:
    """First value of an invocation metadata key (keys are lower-case on the wire)."""
    for item in context.invocation_metadata() or ():
        if item[0] == key:
            value = item[1]
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def status_code_of(context: aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the RPC ends with, as seen from an outer interceptor.

    An inner interceptor (error mapping) aborts with a code, which the context records; a
    behaviour may also `set_code` and return. A bare exception reaching this point would be
    reported by grpc as UNKNOWN; a cancelled task as CANCELLED.
    """
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return code
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    if error is not None and not isinstance(error, GeneratorExit):
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


def _wrap_unary_response(behaviour: Callable[..., Any], guard: Guard, details: grpc.HandlerCallDetails,
                         request_streaming: bool) -> Callable[..., Awaitable[Any]]:
    """Wrap unary-unary and stream-unary behaviours."""
    is_async = inspect.iscoroutinefunction(behaviour)

    async def wrapped(request: Any, context: aio.ServicerContext) -> Any:
        async with guard(details, context):
            if is_async:
                return await behaviour(request, context)
            if request_streaming:
                result = behaviour(request, context)
                return await result if inspect.isawaitable(result) else result
            # A sync unary handler must not block the loop; to_thread copies context vars.
            return await asyncio.to_thread(behaviour, request, context)

    return wrapped


def _wrap_stream_response(behaviour: Callable[..., Any], guard: Guard,
                          details: grpc.HandlerCallDetails) -> Callable[..., Any]:
    """Wrap unary-stream and stream-stream behaviours, keeping their style."""
    if inspect.iscoroutinefunction(behaviour):

        async def writer_style(request: Any, context: aio.ServicerContext) -> None:
            async with guard(details, context):
                await behaviour(request, context)

        return writer_style

    async def generator_style(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        async with guard(details, context):
            stream = behaviour(request, context)
            if hasattr(stream, "__aiter__"):
                async for message in stream:
                    yield message
            elif stream is not None:
                for message in stream:
                    yield message

    return generator_style


def wrap_handler(handler: grpc.RpcMethodHandler | None, guard: Guard,
                 details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
    """Return `handler` with its behaviour run inside `guard`; None stays None (unknown method)."""
    if handler is None:
        return None
    deser, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary_response(handler.unary_unary, guard, details, False), deser, ser)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary_response(handler.stream_unary, guard, details, True), deser, ser)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream_response(handler.unary_stream, guard, details), deser, ser)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream_response(handler.stream_stream, guard, details), deser, ser)
    return handler


class GuardInterceptor(aio.ServerInterceptor):
    """Base class: subclasses implement `guard`; the plumbing here wraps every shape."""

    def guard(self, details: grpc.HandlerCallDetails,
              context: aio.ServicerContext) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    def applies_to(self, method: str) -> bool:
        """Override to skip some methods (they are then served unwrapped)."""
        return True

    async def intercept_service(self, continuation: Continuation,
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not self.applies_to(handler_call_details.method):
            return handler
        wrapped = wrap_handler(handler, self.guard, handler_call_details)
        assert wrapped is not None
        return wrapped
