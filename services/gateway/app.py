"""The HTTP/JSON gateway: aiohttp in front of the gRPC servers of this process.

It holds no business logic. Each request is matched against the routes derived from the
protos' `google.api.http` annotations, turned into the request message and sent over a
loopback gRPC channel to the real servicer, so authentication (the `Authorization` header is
forwarded as metadata), quotas, error mapping, metrics and access logs apply unchanged.
Unary RPCs answer JSON; server streams answer Server-Sent Events, except the export stream
(header + bytes chunks), which answers the file itself; client streams take
multipart/form-data (services/gateway/uploads.py). Errors are google.rpc.Status JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc import aio

from services.gateway import uploads
from services.gateway.routes import Route, find_route
from services.gateway.transcode import BadHttpRequest, build_request, rpc_error_body, status_body, to_json
from services.gateway.upload_call import UploadCall

log = logging.getLogger(__name__)

FORWARDED_HEADERS = ("authorization", "x-request-id")
RPC_HEADER = "X-Atelier-Rpc"
REQUEST_ID_KEY = "x-request-id"
CHUNK = "chunk"  # the bytes member of a download stream (ExportAdapterResponse)
TIMEOUT_HEADER = "grpc-timeout"
_TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def is_download(route: Route) -> bool:
    """A server stream of `header` then `chunk` bytes (ExportAdapter) is served as the file."""
    fields = route.method.output_type.fields_by_name
    return route.server_streaming and "header" in fields and "chunk" in fields


def error_response(http: int, body: dict[str, Any], retry_after: float | None = None) -> web.Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return web.json_response(body, status=http, headers=headers)


def bad_request(exc: BadHttpRequest) -> web.Response:
    violation = error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)
    body = status_body(grpc.StatusCode.INVALID_ARGUMENT, exc.description,
                       [error_details_pb2.BadRequest(field_violations=[violation])])
    return error_response(400, body)


def sse_event(data: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Gateway:
    """Routes HTTP requests to gRPC methods; one instance per process."""

    def __init__(self, routes: list[Route], channels: Mapping[str, aio.Channel],
                 upload_channels: Mapping[str, grpc.Channel], openapi: dict[str, Any], console_dir: Path | None,
                 keepalive_seconds: float = 15.0) -> None:
        self._routes = routes
        self._upload_channels = upload_channels
        self._keepalive = keepalive_seconds
        self._channels = channels
        self._openapi = openapi
        self._console = console_dir.resolve() if console_dir is not None else None

    # -- entry points ----------------------------------------------------------------------
    async def openapi(self, _: web.Request) -> web.Response:
        return web.json_response(self._openapi)

    async def console(self, request: web.Request) -> web.StreamResponse:
        """The console's static files (index.html at /); nothing outside its folder."""
        if self._console is not None:
            name = request.match_info.get("path", "") or "index.html"
            target = (self._console / name).resolve()
            if target.is_relative_to(self._console) and target.is_file():
                return web.FileResponse(target)
        return error_response(404, status_body(grpc.StatusCode.NOT_FOUND, f"no such file: {request.path}"))

    async def api(self, request: web.Request) -> web.StreamResponse:
        route, variables, path_known = find_route(self._routes, request.method, request.rel_url.raw_path)
        if route is None:
            if path_known:
                return error_response(405, status_body(grpc.StatusCode.UNIMPLEMENTED,
                                                       f"{request.method} is not allowed on {request.path}"))
            return error_response(404, status_body(grpc.StatusCode.NOT_FOUND, f"no route for {request.path}"))
        channel = self._channels.get(route.service)
        if channel is None:
            return error_response(501, status_body(grpc.StatusCode.UNIMPLEMENTED,
                                                   f"{route.service} is not served by this process"))
        response: web.StreamResponse
        try:
            response = await self._dispatch(route, variables, request, channel)
        except BadHttpRequest as exc:
            response = bad_request(exc)
        except grpc.RpcError as exc:  # aio calls and the sync upload calls alike
            response = error_response(*rpc_error_body(exc))
        if not response.prepared:  # streams sent their headers already (and set it there)
            response.headers[RPC_HEADER] = route.grpc_path
        return response

    # -- dispatch by streaming kind ---------------------------------------------------------
    async def _dispatch(self, route: Route, variables: dict[str, str], request: web.Request,
                        channel: aio.Channel) -> web.StreamResponse:
        metadata, timeout = _metadata(request), deadline_seconds(request.headers.get(TIMEOUT_HEADER))
        if route.client_streaming:
            return await self._upload(route, request, metadata, timeout)
        message = build_request(route.request_class(), await _json_body(route, request),
                                request.query.items(), variables)
        if not route.server_streaming:
            call = channel.unary_unary(route.grpc_path, request_serializer=_serialize,
                                       response_deserializer=route.response_class().FromString)
            unary = call(message, metadata=metadata, timeout=timeout)
            reply = await unary
            headers = _request_id_headers(await unary.trailing_metadata())
            return web.json_response(to_json(reply), headers=headers)
        stream = channel.unary_stream(route.grpc_path, request_serializer=_serialize,
                                      response_deserializer=route.response_class().FromString)
        server_call = stream(message, metadata=metadata, timeout=timeout)
        if is_download(route):
            return await _download(server_call, request, route.grpc_path)
        return await _server_sent_events(server_call, request, route.grpc_path, self._keepalive)

    async def _upload(self, route: Route, request: web.Request, metadata: tuple[tuple[str, str], ...],
                      timeout: float | None) -> web.StreamResponse:
        if not request.content_type.startswith("multipart/form-data"):
            raise BadHttpRequest("content-type", f"{route.template} takes multipart/form-data")
        channel = self._upload_channels[route.service]
        cls = route.request_class()
        reader = await request.multipart()
        state = uploads.UploadState()
        header, first = await uploads.read_header(reader, cls, state)
        call = UploadCall(channel, route.grpc_path, route.response_class().FromString)
        try:
            reply = await call.run(uploads.stream_files(reader, cls, header, first, state), metadata, timeout)
        except ValueError as exc:  # a malformed multipart body (never a short upload: the call was cancelled)
            raise BadHttpRequest("form", str(exc)) from exc
        return web.json_response(to_json(reply))


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def deadline_seconds(value: str | None) -> float | None:
    """A `grpc-timeout` header (gRPC's own spelling, `30S`, `500m`; what Envoy's transcoder
    honours too) as the call's deadline in seconds; none without the header."""
    if value is None:
        return None
    found = _TIMEOUT.fullmatch(value.strip())
    if found is None:
        raise BadHttpRequest(TIMEOUT_HEADER, f"{value!r} is not a gRPC timeout such as 30S or 500m")
    return int(found.group(1)) * _TIMEOUT_UNITS[found.group(2)]


def _metadata(request: web.Request) -> tuple[tuple[str, str], ...]:
    return tuple((name, request.headers[name]) for name in FORWARDED_HEADERS if name in request.headers)


def _request_id_headers(trailers: Any) -> dict[str, str]:
    for key, value in trailers or ():
        if key == REQUEST_ID_KEY and isinstance(value, str):
            return {"X-Request-Id": value}
    return {}


async def _json_body(route: Route, request: web.Request) -> dict[str, Any] | None:
    if not route.body or not request.can_read_body:
        return None
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadHttpRequest("body", f"not JSON: {exc}") from exc
    if route.body != "*":
        data = {route.body: data}
    if not isinstance(data, dict):
        raise BadHttpRequest("body", "the body must be a JSON object")
    return data


async def _first(call: Any) -> tuple[AsyncIterator[Message], Message | None]:
    """The stream's first message, awaited before any header goes out so an early error
    (unknown job, bad spec) is a plain HTTP error rather than a 200 event stream."""
    iterator = call.__aiter__()
    try:
        return iterator, await iterator.__anext__()
    except StopAsyncIteration:
        return iterator, None


async def _next_or_keepalive(iterator: AsyncIterator[Message], response: web.StreamResponse,
                             keepalive: float) -> AsyncIterator[Message]:
    """The stream's messages; while it is quiet, a `: keepalive` comment every `keepalive` seconds
    so idle-timeout proxies keep a long watch open. The pending read is never cancelled by the
    timer (cancelling it would cancel the RPC)."""
    pending: asyncio.Future[Message] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=keepalive)
            if not done:
                await response.write(b": keepalive\n\n")
                continue
            ready, pending = pending, None
            try:
                message = ready.result()
            except StopAsyncIteration:
                return
            yield message
    finally:
        if pending is not None:
            pending.cancel()


async def _server_sent_events(call: Any, request: web.Request, rpc: str, keepalive: float) -> web.StreamResponse:
    """`data: <message JSON>` per message, then `event: end` (or `event: error` with a Status)."""
    iterator, first = await _first(call)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", RPC_HEADER: rpc})
    await response.prepare(request)
    try:
        if first is not None:
            await response.write(sse_event(to_json(first)))
            async for message in _next_or_keepalive(iterator, response, keepalive):
                await response.write(sse_event(to_json(message)))
        await response.write(sse_event({}, "end"))
    except aio.AioRpcError as exc:
        await response.write(sse_event(rpc_error_body(exc)[1], "error"))
    finally:
        call.cancel()  # no-op once finished; stops the RPC when the client went away
    return response


async def _download(call: Any, request: web.Request, rpc: str) -> web.StreamResponse:
    """The exported file's bytes with its name, size and digest in the headers."""
    iterator, first = await _first(call)
    header = getattr(first, "header", None)
    if header is None:
        raise BadHttpRequest("stream", "the export stream did not start with a header")
    response = web.StreamResponse(headers={
        "Content-Type": "application/octet-stream",
        RPC_HEADER: rpc,
        "Content-Disposition": f'attachment; filename="{header.filename}"',
        "X-Atelier-Sha256": header.sha256,
        "X-Atelier-Adapter-Version": f"{header.version.name}@{header.version.version}",
    })
    response.content_length = header.size
    await response.prepare(request)
    try:
        async for message in iterator:
            await response.write(getattr(message, CHUNK))
        await response.write_eof()
    finally:
        call.cancel()
    return response
