"""TrainingService: datasets and training jobs over gRPC, scoped to the calling tenant.

Thin: messages become plain values in `services.training.convert` (which also resolves and
validates the training config, reporting every bad field at once), then it calls the registry
(datasets, existence checks) and the job store, running their synchronous code in worker
threads. Errors are typed domain errors; the server's interceptor maps them.

WatchTrainingJob sends the job as it stands first, then replays the job's event log from
that point, polling the database (`watch_poll_seconds`). Polling keeps the API stateless:
the worker that produces events is usually another process, often another pod.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from atelier_api.v1 import training_pb2, training_pb2_grpc
from services.common.auth import current_tenant
from services.common.config import Settings
from services.common.errors import InvalidInput
from services.common.server import ServiceBinding
from services.registry import convert as pc
from services.registry.names import validate_name
from services.registry.registry import Registry
from services.training import convert
from services.training.datasets import validate_dataset
from services.training.jobstore import JobStore
from services.training.quotas import check_room_for_job, check_upload_bytes
from services.training.schema import TERMINAL_STATES
from services.training.tokenizers import BaseModelTokenizers
from services.training.trainers import TrainConfig, validate_against_family, validate_against_tokenizer
from services.training.upload import UploadAssembler

SERVICE_NAME = "atelier.v1.TrainingService"
MAX_PAGE_SIZE = 1000


def _page_size(value: int) -> int:
    if value < 0 or value > MAX_PAGE_SIZE:
        raise InvalidInput("page_size", f"must be between 0 and {MAX_PAGE_SIZE}")
    return value


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """All TrainingService RPCs over one job store and one registry."""

    def __init__(
        self, settings: Settings, store: JobStore, registry: Registry, *, watch_poll_seconds: float = 0.2
    ) -> None:
        self._settings = settings
        self._store = store
        self._registry = registry
        self._poll = watch_poll_seconds
        self._tokenizers = BaseModelTokenizers(registry)

    # --- datasets -----------------------------------------------------------------------
    async def UploadDataset(
        self, request_iterator: AsyncIterator[training_pb2.UploadDatasetRequest], context: grpc.aio.ServicerContext
    ) -> training_pb2.UploadDatasetResponse:
        tenant = current_tenant()
        assembler = UploadAssembler(self._settings)
        async for message in request_iterator:
            assembler.add(convert.upload_part(message))
        name = assembler.name or "dataset"
        validate_name(name, "header.name")
        valid = await asyncio.to_thread(validate_dataset, assembler.images(), self._settings)
        await asyncio.to_thread(check_upload_bytes, self._registry, self._settings, tenant,
                                sum(len(v.data) for v in valid))
        manifest = await asyncio.to_thread(
            self._registry.datasets.put,
            tenant,
            name,
            [(v.filename, v.caption, v.data, v.width, v.height) for v in valid],
        )
        return training_pb2.UploadDatasetResponse(dataset=pc.dataset_to_proto(manifest))

    async def GetDataset(self, request: training_pb2.GetDatasetRequest,
                         context: grpc.aio.ServicerContext) -> training_pb2.GetDatasetResponse:
        validate_name(request.id, "id")
        manifest = await asyncio.to_thread(self._registry.datasets.get, current_tenant(), request.id)
        return training_pb2.GetDatasetResponse(dataset=pc.dataset_to_proto(manifest))

    async def ListDatasets(self, request: training_pb2.ListDatasetsRequest,
                           context: grpc.aio.ServicerContext) -> training_pb2.ListDatasetsResponse:
        manifests, token = await asyncio.to_thread(
            self._registry.datasets.list_page, current_tenant(), _page_size(request.page_size), request.page_token
        )
        return training_pb2.ListDatasetsResponse(
            datasets=[pc.dataset_to_proto(m) for m in manifests], next_page_token=token
        )

    # --- jobs ---------------------------------------------------------------------------
    async def CreateTrainingJob(self, request: training_pb2.CreateTrainingJobRequest,
                                context: grpc.aio.ServicerContext) -> training_pb2.CreateTrainingJobResponse:
        tenant = current_tenant()
        new = convert.new_job_from_proto(request, self._settings)  # every bad field at once
        pinned = await asyncio.to_thread(self._check_references, tenant, new.config)
        config = new.config.model_copy(update={"base_model": pinned})
        await asyncio.to_thread(check_room_for_job, self._registry, self._settings, tenant)
        job, created = await asyncio.to_thread(
            self._store.create_job,
            tenant,
            new.request_id,
            method=config.method,
            spec=new.spec,
            output_name=config.output_name,
            total_steps=config.max_train_steps,
            config=config.model_dump(mode="json"),
            webhook=new.webhook,
        )
        return training_pb2.CreateTrainingJobResponse(job=convert.job_to_proto(job), created=created)

    def _check_references(self, tenant: str, config: TrainConfig) -> str:
        """NOT_FOUND now for an unknown base model or dataset, rather than a FAILED job later
        (the names' syntax was checked with the rest of the request).

        Returns the base model pinned as `name@N`: the job stores it, so every attempt trains
        on the version validated here even if an admin imports a newer one meanwhile.
        """
        base = self._registry.base_models.get(config.base_model)
        self._registry.datasets.get(tenant, config.dataset_id)
        validate_against_family(config, base.family)
        if config.method == "TEXTUAL_INVERSION":
            validate_against_tokenizer(config, self._tokenizers.get(base))
        if config.with_prior_preservation and config.class_dataset_id:
            self._registry.datasets.get(tenant, config.class_dataset_id)
        return base.ref

    async def GetTrainingJob(self, request: training_pb2.GetTrainingJobRequest,
                             context: grpc.aio.ServicerContext) -> training_pb2.GetTrainingJobResponse:
        job = await asyncio.to_thread(self._store.get_job, self._job_id(request.id), current_tenant())
        return training_pb2.GetTrainingJobResponse(job=convert.job_to_proto(job))

    async def ListTrainingJobs(self, request: training_pb2.ListTrainingJobsRequest,
                               context: grpc.aio.ServicerContext) -> training_pb2.ListTrainingJobsResponse:
        jobs, token = await asyncio.to_thread(
            self._store.list_jobs,
            current_tenant(),
            _page_size(request.page_size),
            request.page_token,
            convert.state_filter(request.state),
            convert.method_filter(request.method),
        )
        return training_pb2.ListTrainingJobsResponse(
            jobs=[convert.job_to_proto(j) for j in jobs], next_page_token=token
        )

    async def CancelTrainingJob(self, request: training_pb2.CancelTrainingJobRequest,
                                context: grpc.aio.ServicerContext) -> training_pb2.CancelTrainingJobResponse:
        job = await asyncio.to_thread(self._store.cancel_job, self._job_id(request.id), current_tenant())
        return training_pb2.CancelTrainingJobResponse(job=convert.job_to_proto(job))

    async def WatchTrainingJob(
        self, request: training_pb2.WatchTrainingJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[training_pb2.WatchTrainingJobResponse]:
        tenant = current_tenant()
        job_id = self._job_id(request.id)
        await asyncio.to_thread(self._store.get_job, job_id, tenant)  # NOT_FOUND before anything else
        cursor = await asyncio.to_thread(self._store.last_event_id, job_id)
        job = await asyncio.to_thread(self._store.get_job, job_id, tenant)
        yield convert.snapshot_response(job)
        if job.terminal:
            return
        while True:
            events = await asyncio.to_thread(self._store.events_after, job_id, cursor)
            if not events:
                await asyncio.sleep(self._poll)
                continue
            job = await asyncio.to_thread(self._store.get_job, job_id, tenant)
            for event in events:
                cursor = event.id
                yield convert.event_response(event, job)
                if event.state in TERMINAL_STATES:
                    return

    @staticmethod
    def _job_id(value: str) -> str:
        if not value:
            raise InvalidInput("id", "must not be empty")
        if len(value) > 64:
            raise InvalidInput("id", "at most 64 characters")
        return value


def training_bindings(
    settings: Settings, store: JobStore, registry: Registry, *, watch_poll_seconds: float = 0.2
) -> list[ServiceBinding]:
    """The ServiceBinding list for start_server."""
    servicer = TrainingServicer(settings, store, registry, watch_poll_seconds=watch_poll_seconds)

    def register(server: grpc.aio.Server) -> None:
        training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, server)

    return [ServiceBinding(SERVICE_NAME, register)]
