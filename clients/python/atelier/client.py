"""The synchronous SDK: `atelier.Client(target, api_key=...)`.

Every call carries a default deadline; UNAVAILABLE and RESOURCE_EXHAUSTED are retried with
backoff (see retry.py); every failure surfaces as a typed `atelier.errors` exception.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc

from atelier import ids
from atelier.errors import AtelierRpcError, RetryableError, from_grpc_error
from atelier.refs import ROUTING_HEADER, AdapterLike, WeightedAdapterLike, routing_value
from atelier.requests import (
    GenerationResult,
    ImageInput,
    TrainArgs,
    generation_spec,
    training_request,
    upload_messages,
)
from atelier.retry import RetryPolicy, call_with_retry
from atelier.transport import call_metadata, channel_credentials, channel_options
from atelier.usage import TimeLike, usage_request
from atelier_api.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)

T = TypeVar("T")
TERMINAL_STATES = frozenset(
    {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED}
)


class Client:
    """One connection to the training/registry API and (optionally separate) inference API."""

    def __init__(
        self,
        target: str,
        *,
        inference_target: str | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._timeout = timeout
        self._retry = retry or RetryPolicy()
        self._api_key = api_key
        self._channel = _open_channel(target, tls, root_certificates)
        self._inference_channel = (
            _open_channel(inference_target, tls, root_certificates) if inference_target else self._channel
        )
        self.training = training_pb2_grpc.TrainingServiceStub(self._channel)
        self.registry = registry_pb2_grpc.RegistryServiceStub(self._channel)
        self.inference = inference_pb2_grpc.InferenceServiceStub(self._inference_channel)
        self.adapters = Adapters(self)
        self.base_models = BaseModels(self)
        self.jobs = Jobs(self)
        self._usage = {"training": usage_pb2_grpc.UsageServiceStub(self._channel),
                       "inference": usage_pb2_grpc.UsageServiceStub(self._inference_channel)}

    # --- plumbing ---------------------------------------------------------------------
    def call(
        self,
        method: Callable[..., T],
        request: Any,
        *,
        timeout: float | None = None,
        extra_metadata: Sequence[tuple[str, str]] = (),
        retry: bool = True,
    ) -> T:
        """Invoke one RPC with deadline, metadata, typed errors and (by default) retries."""
        metadata = call_metadata(self._api_key, extra_metadata)

        def attempt(remaining: float) -> T:
            try:
                return method(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as error:
                raise from_grpc_error(error) from None

        policy = self._retry if retry else RetryPolicy(max_attempts=1)
        return call_with_retry(attempt, policy, timeout or self._timeout)

    def stream(self, method: Callable[..., Any], request: Any, *, timeout: float | None = None,
               extra_metadata: Sequence[tuple[str, str]] = ()) -> Iterator[Any]:
        """Iterate a server stream, translating errors; the deadline covers the whole stream.

        A caller that stops iterating early (break, exception) cancels the RPC at once instead of
        leaving the server streaming into a call nobody reads until garbage collection.
        """
        metadata = call_metadata(self._api_key, extra_metadata)
        call = method(request, timeout=timeout or self._timeout, metadata=metadata)
        try:
            yield from call
        except grpc.RpcError as error:
            raise from_grpc_error(error) from None
        finally:
            call.cancel()

    def close(self) -> None:
        self._channel.close()
        if self._inference_channel is not self._channel:
            self._inference_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- datasets and training --------------------------------------------------------
    def upload_dataset(
        self,
        images: Sequence[ImageInput],
        *,
        captions: Sequence[str] | Mapping[int, str] | None = None,
        name: str = "",
        timeout: float | None = None,
    ) -> common_pb2.Dataset:
        """Upload 1..N images (paths, bytes or PIL images); returns the stored dataset."""
        def attempt(remaining: float) -> common_pb2.Dataset:
            try:
                response = self.training.UploadDataset(
                    upload_messages(images, captions, name), timeout=remaining,
                    metadata=call_metadata(self._api_key, ()),
                )
            except grpc.RpcError as error:
                raise from_grpc_error(error) from None
            return response.dataset

        return call_with_retry(attempt, self._retry, timeout or self._timeout)

    def train(self, method: str, *, base_model: str, dataset: str | common_pb2.Dataset, name: str,
              request_id: str | None = None, **options: Any) -> JobHandle:
        """Start a training job; keyword options are TrainArgs fields or hyper-parameters.

        `dataset` is a dataset id or the Dataset `upload_dataset` returned."""
        known = {k: options.pop(k) for k in list(options) if k in TrainArgs.__dataclass_fields__}
        args = TrainArgs(method=method, base_model=base_model, dataset=dataset, name=name, extra=options, **known)
        response = self.call(self.training.CreateTrainingJob, training_request(args, request_id))
        return JobHandle(self, response.job)

    # --- generation -------------------------------------------------------------------
    def generate(self, prompt: str, *, base_model: str, adapters: list[WeightedAdapterLike] | None = None,
                 timeout: float | None = None, **options: Any) -> GenerationResult:
        """Generate images; adapters like `["dog@2=0.8", ("style", 0.5)]`."""
        spec = generation_spec(prompt, base_model=base_model, adapters=adapters, **options)
        response = self.call(
            self.inference.Generate, inference_pb2.GenerateRequest(spec=spec), timeout=timeout,
            extra_metadata=_routing(spec),
        )
        return GenerationResult.from_proto(response)

    def generate_stream(self, prompt: str, *, base_model: str, adapters: list[WeightedAdapterLike] | None = None,
                        timeout: float | None = None,
                        **options: Any) -> Iterator[inference_pb2.GenerationProgress | GenerationResult]:
        """Progress events per denoising step, then one GenerationResult."""
        spec = generation_spec(prompt, base_model=base_model, adapters=adapters, **options)
        request = inference_pb2.GenerateStreamRequest(spec=spec)
        for event in self.stream(self.inference.GenerateStream, request, timeout=timeout,
                                 extra_metadata=_routing(spec)):
            if event.HasField("result"):
                yield GenerationResult.from_proto(event.result)
            else:
                yield event.progress


    # --- accounting -------------------------------------------------------------------
    def usage(self, start: TimeLike = None, end: TimeLike = None, *, all_tenants: bool = False,
              via: str = "inference") -> usage_pb2.GetUsageResponse:
        """Device seconds per tenant, kind and device for [start, end), from the UsageService of the
        inference (default) or training server; each answers for its own process (the embedded
        `atelier serve` covers both kinds). `all_tenants` needs an admin key."""
        if via not in self._usage:
            raise ValueError(f"via must be one of {sorted(self._usage)}, got {via!r}")
        return self.call(self._usage[via].GetUsage, usage_request(start, end, all_tenants))


def _routing(spec: inference_pb2.GenerationSpec) -> list[tuple[str, str]]:
    value = routing_value(list(spec.adapters))
    return [(ROUTING_HEADER, value)] if value else []


def _open_channel(target: str, tls: bool, root_certificates: bytes | None) -> grpc.Channel:
    if tls:
        return grpc.secure_channel(target, channel_credentials(root_certificates), options=channel_options())
    return grpc.insecure_channel(target, options=channel_options())


class JobHandle:
    """A training job: refresh, watch progress, wait for the end, cancel."""

    def __init__(self, client: Client, job: training_pb2.TrainingJob) -> None:
        self._client = client
        self.job = job

    @property
    def id(self) -> str:
        return self.job.id

    def refresh(self) -> training_pb2.TrainingJob:
        self.job = self._client.call(self._client.training.GetTrainingJob,
                                     training_pb2.GetTrainingJobRequest(id=self.id)).job
        return self.job

    def watch(self, timeout: float = 24 * 3600.0) -> Iterator[training_pb2.WatchTrainingJobResponse]:
        """Events until the job ends; reconnects after UNAVAILABLE (the server resends state)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                for event in self._client.stream(self._client.training.WatchTrainingJob,
                                                 training_pb2.WatchTrainingJobRequest(id=self.id),
                                                 timeout=max(0.001, deadline - time.monotonic())):
                    self.job = event.job
                    yield event
                return
            except RetryableError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def wait(self, timeout: float = 24 * 3600.0) -> training_pb2.TrainingJob:
        """Block until the job ends; returns it (check .state: FAILED and CANCELLED do not raise)."""
        for _ in self.watch(timeout=timeout):
            pass
        if self.job.state not in TERMINAL_STATES:
            self.refresh()
        return self.job

    def cancel(self) -> training_pb2.TrainingJob:
        self.job = self._client.call(self._client.training.CancelTrainingJob,
                                     training_pb2.CancelTrainingJobRequest(id=self.id)).job
        return self.job


class Jobs:
    def __init__(self, client: Client) -> None:
        self._client = client

    def get(self, job_id: str | training_pb2.TrainingJob | JobHandle) -> JobHandle:
        request = training_pb2.GetTrainingJobRequest(id=ids.job_id(job_id))
        job = self._client.call(self._client.training.GetTrainingJob, request)
        return JobHandle(self._client, job.job)

    def list(self, *, state: int = 0, method: int = 0, page_size: int = 50) -> Iterator[training_pb2.TrainingJob]:
        """Every job, following page tokens."""
        request = training_pb2.ListTrainingJobsRequest(page_size=page_size, state=state,  # type: ignore[arg-type]
                                                       method=method)  # type: ignore[arg-type]
        yield from _paginate(self._client, self._client.training.ListTrainingJobs, request, "jobs")


class Adapters:
    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self, *, kind: int = 0, base_model: str = "", page_size: int = 50) -> Iterator[common_pb2.Adapter]:
        request = registry_pb2.ListAdaptersRequest(page_size=page_size, kind=kind,  # type: ignore[arg-type]
                                                   base_model=base_model)
        yield from _paginate(self._client, self._client.registry.ListAdapters, request, "adapters")

    def get(self, ref: AdapterLike) -> registry_pb2.GetAdapterResponse:
        """`ref`: 'name', 'name@3', 'name:alias', an AdapterVersion (that version) or an Adapter."""
        from atelier.refs import parse_ref

        request = registry_pb2.GetAdapterRequest(ref=parse_ref(ids.adapter_ref(ref)))
        return self._client.call(self._client.registry.GetAdapter, request)

    def versions(self, name: AdapterLike, page_size: int = 50) -> Iterator[common_pb2.AdapterVersion]:
        request = registry_pb2.ListAdapterVersionsRequest(name=ids.adapter_name(name), page_size=page_size)
        yield from _paginate(self._client, self._client.registry.ListAdapterVersions, request, "versions")

    def set_alias(self, name: AdapterLike, alias: str, version: int | None = None,
                  expected_version: int | None = None) -> registry_pb2.SetAliasResponse:
        """Point `alias` at `version` (or at the AdapterVersion passed as `name`)."""
        request = registry_pb2.SetAliasRequest(name=ids.adapter_name(name), alias=ids.text(alias, "alias"),
                                               version=ids.adapter_version(name, version))
        if expected_version is not None:
            request.expected_version = expected_version
        return self._client.call(self._client.registry.SetAlias, request, retry=False)

    def delete_alias(self, name: AdapterLike, alias: str) -> None:
        request = registry_pb2.DeleteAliasRequest(name=ids.adapter_name(name), alias=ids.text(alias, "alias"))
        self._client.call(self._client.registry.DeleteAlias, request)

    def delete(self, name: AdapterLike, version: int | None = None) -> None:
        """Delete one version: (name, version), or an AdapterVersion alone."""
        request = registry_pb2.DeleteAdapterVersionRequest(name=ids.adapter_name(name),
                                                           version=ids.adapter_version(name, version))
        self._client.call(self._client.registry.DeleteAdapterVersion, request)


class BaseModels:
    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self, page_size: int = 50) -> Iterator[common_pb2.BaseModel]:
        request = registry_pb2.ListBaseModelsRequest(page_size=page_size)
        yield from _paginate(self._client, self._client.registry.ListBaseModels, request, "base_models")

    def get(self, name: str) -> common_pb2.BaseModel:
        return self._client.call(self._client.registry.GetBaseModel,
                                 registry_pb2.GetBaseModelRequest(name=name)).base_model

    def import_(self, name: str, folder: str, description: str = "",
                timeout: float = 3600.0) -> common_pb2.BaseModel:
        """Stream a local diffusers folder into the registry."""
        from atelier.transport import base_model_upload

        def attempt(remaining: float) -> common_pb2.BaseModel:
            try:
                return self._client.registry.ImportBaseModel(
                    base_model_upload(name, folder, description), timeout=remaining,
                    metadata=call_metadata(self._client._api_key, ()),
                ).base_model
            except grpc.RpcError as error:
                raise from_grpc_error(error) from None

        return call_with_retry(attempt, self._client._retry, timeout)


def _paginate(client: Client, method: Callable[..., Any], request: Any, field: str) -> Iterator[Any]:
    while True:
        response = client.call(method, request)
        yield from getattr(response, field)
        if not response.next_page_token:
            return
        request.page_token = response.next_page_token


__all__ = ["AtelierRpcError", "Client", "JobHandle"]
