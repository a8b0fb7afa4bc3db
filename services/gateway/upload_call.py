"""Client-streaming upload calls on the sync gRPC API, run from the gateway's event loop.

grpc.aio (1.85) turns a server that answers before the client has finished sending (a 403
on the header of an 8 MB base-model upload, a quota refusal on a dataset) into INTERNAL
"Internal error from Core" about one time in three: the pending send fails and its error
replaces the server's status. The sync API's request-consumer thread stops quietly instead
and the call reports the server's own status (the SDK relies on the same behaviour). The
requests still come from the async multipart reader: the consumer thread pulls each message
from the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import Message

from services.gateway.transcode import BadHttpRequest


class UploadCall:
    """One client-streaming call: `await UploadCall(...).run(messages, metadata, timeout)`."""

    def __init__(self, channel: grpc.Channel, path: str, deserialize: Callable[[bytes], Message]) -> None:
        self._multi = channel.stream_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                           response_deserializer=deserialize)
        self._pending: concurrent.futures.Future[Message] | None = None
        self.source_error: BaseException | None = None

    def _requests(self, source: AsyncIterator[Message], loop: asyncio.AbstractEventLoop) -> Iterator[Message]:
        """Runs on grpc's consumer thread; each message is read on the event loop."""
        while True:
            self._pending = asyncio.run_coroutine_threadsafe(source.__anext__(), loop)  # type: ignore[arg-type]
            try:
                message = self._pending.result()
            except StopAsyncIteration:
                return
            except (BadHttpRequest, ValueError) as exc:  # a malformed form: answered 400, never a short upload
                self.source_error = self.source_error or exc
                raise
            yield message

    async def run(self, source: AsyncIterator[Message], metadata: tuple[tuple[str, str], ...],
                  timeout: float | None) -> Message:
        """The reply; raises the call's grpc.RpcError, or the source's own error (a bad form).
        Anything else the reader raises once the call is over (our cancelled read) is ignored."""
        loop = asyncio.get_running_loop()
        future: Any = self._multi.future(self._requests(source, loop), metadata=metadata, timeout=timeout)
        finished = loop.create_future()
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(_settle, finished))
        try:
            await finished
        except asyncio.CancelledError:  # the HTTP client went away: stop the RPC
            future.cancel()
            raise
        finally:
            if self._pending is not None:
                self._pending.cancel()  # no read of the request body may outlive the call
        if self.source_error is not None:
            raise self.source_error
        reply: Message = future.result()
        return reply


def _settle(finished: asyncio.Future[None]) -> None:
    if not finished.done():
        finished.set_result(None)
