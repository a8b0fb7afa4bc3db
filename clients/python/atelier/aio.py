"""`atelier.AsyncClient`: the asyncio twin of `atelier.Client`, for async backends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from grpc import aio

from atelier import ids
from atelier.errors import from_grpc_error
from atelier.refs import ROUTING_HEADER, WeightedAdapterLike, routing_value
from atelier.requests import (
    GenerationResult,
    ImageInput,
    TrainArgs,
    generation_spec,
    training_request,
    upload_messages,
)
from atelier.retry import RetryPolicy, call_with_retry_async
from atelier.transport import call_metadata, channel_credentials, channel_options
from atelier_api.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)

T = TypeVar("T")


class AsyncClient:
    """Same surface as Client for the calls a web backend makes: upload, train, watch, generate."""

    def __init__(self, target: str, *, inference_target: str | None = None, api_key: str | None = None,
                 tls: bool = False, root_certificates: bytes | None = None, timeout: float = 60.0,
                 retry: RetryPolicy | None = None) -> None:
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._api_key = api_key
        self._channel = _open(target, tls, root_certificates)
        self._inference_channel = _open(inference_target, tls, root_certificates) if inference_target else self._channel
        self.training = training_pb2_grpc.TrainingServiceStub(self._channel)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channel)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._inference_channel)

    async def call(self, method: Callable[..., Any], request: Any, *, timeout: float | None = None,
                   extra_metadata: Sequence[tuple[str, str]] = ()) -> Any:
        metadata = call_metadata(self._api_key, extra_metadata)

        async def attempt(remaining: float) -> Any:
            try:
                return await method(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as error:
                raise from_grpc_error(error) from None

        return await call_with_retry_async(attempt, self._retry, timeout or self._timeout)

    async def upload_dataset(self, images: Sequence[ImageInput], *,
                             captions: Sequence[str] | Mapping[int, str] | None = None,
                             name: str = "") -> common_pb2.Dataset:
        async def attempt(remaining: float) -> common_pb2.Dataset:
            try:
                response = await self.training.UploadDataset(
                    upload_messages(images, captions, name), timeout=remaining,
                    metadata=call_metadata(self._api_key, ()),
                )
            except grpc.RpcError as error:
                raise from_grpc_error(error) from None
            return response.dataset

        return await call_with_retry_async(attempt, self._retry, self._timeout)

    async def train(self, method: str, *, base_model: str, dataset: str | common_pb2.Dataset, name: str,
                    request_id: str | None = None, **options: Any) -> training_pb2.TrainingJob:
        known = {k: options.pop(k) for k in list(options) if k in TrainArgs.__dataclass_fields__}
        args = TrainArgs(method=method, base_model=base_model, dataset=dataset, name=name, extra=options, **known)
        response = await self.call(self.training.CreateTrainingJob, training_request(args, request_id))
        return response.job  # type: ignore[no-any-return]

    async def watch(self, job_id: str | training_pb2.TrainingJob, timeout: float = 24 * 3600.0
                    ) -> AsyncIterator[training_pb2.WatchTrainingJobResponse]:
        request = training_pb2.WatchTrainingJobRequest(id=ids.job_id(job_id))
        try:
            async for event in self.training.WatchTrainingJob(
                request, timeout=timeout,
                metadata=call_metadata(self._api_key, ()),
            ):
                yield event
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None

    async def wait(self, job_id: str | training_pb2.TrainingJob,
                   timeout: float = 24 * 3600.0) -> training_pb2.TrainingJob:
        job_id = ids.job_id(job_id)
        job = None
        async for event in self.watch(job_id, timeout):
            job = event.job
        if job is None:
            job = (await self.call(self.training.GetTrainingJob, training_pb2.GetTrainingJobRequest(id=job_id))).job
        return job

    async def cancel(self, job_id: str | training_pb2.TrainingJob) -> training_pb2.TrainingJob:
        request = training_pb2.CancelTrainingJobRequest(id=ids.job_id(job_id))
        response = await self.call(self.training.CancelTrainingJob, request)
        return response.job  # type: ignore[no-any-return]

    async def generate(self, prompt: str, *, base_model: str, adapters: list[WeightedAdapterLike] | None = None,
                       timeout: float | None = None, **options: Any) -> GenerationResult:
        spec = generation_spec(prompt, base_model=base_model, adapters=adapters, **options)
        routing = routing_value(list(spec.adapters))
        response = await self.call(self.inference.Generate, inference_pb2.GenerateRequest(spec=spec),
                                   timeout=timeout, extra_metadata=[(ROUTING_HEADER, routing)] if routing else [])
        return GenerationResult.from_proto(response)

    async def close(self) -> None:
        await self._channel.close(None)
        if self._inference_channel is not self._channel:
            await self._inference_channel.close(None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _open(target: str, tls: bool, root_certificates: bytes | None) -> aio.Channel:
    if tls:
        return aio.secure_channel(target, channel_credentials(root_certificates), options=channel_options())
    return aio.insecure_channel(target, options=channel_options())
