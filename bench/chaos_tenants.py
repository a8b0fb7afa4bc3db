"""Cross-tenant probes over every RPC: tenant B addressing tenant A's resources.

Tenant A owns a dataset, a training job, an adapter with a version and an alias, and has used
that adapter for a Generate (so it sits in the inference caches). For every RPC in the proto
descriptors, B either addresses A's resource and a truly missing one of the same shape (same
status code, same message and details once the identifier is blanked, latency medians within
noise), or is checked for what its answer must not contain (listings, cache status, usage),
or is declared not addressable with the reason. A new RPC fails `coverage()` until it is
sorted into one of those. Afterwards A's resources are checked to be untouched.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.message_factory import GetMessageClass
from grpc_status import rpc_status

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
from bench.chaos_fuzz import all_methods, caller

ROUNDS = 5
# Medians of B->A and B->missing may differ by this much before it counts as a timing leak:
# generous, since both run beside other work on a shared machine.
TIMING_RATIO, TIMING_SLACK_S = 2.0, 0.05
NOT_ADDRESSABLE = {
    "UploadDataset": "creates a dataset in the caller's tenant only; ids are server-chosen",
    "ListBaseModels": "base models are shared by every tenant (admin-managed)",
    "GetBaseModel": "base models are shared by every tenant (admin-managed)",
    "ImportBaseModel": "admin only: PERMISSION_DENIED for any tenant key (fuzz row)",
    "DeleteBaseModel": "admin only: PERMISSION_DENIED for any tenant key (fuzz row)",
}
Metadata = tuple[tuple[str, str], ...]


@dataclass
class Owned:
    """Tenant A's resources, by the identifiers B will try."""

    dataset_id: str
    job_id: str
    job_request_id: str
    adapter: str
    alias: str


@dataclass
class Probe:
    method: str
    label: str
    ok: bool
    detail: str = ""
    seconds: tuple[float, float] = (0.0, 0.0)  # medians: B->A, B->missing


@dataclass
class Stubs:
    training: training_pb2_grpc.TrainingServiceStub
    registry: registry_pb2_grpc.RegistryServiceStub
    inference: inference_pb2_grpc.InferenceServiceStub
    usage: usage_pb2_grpc.UsageServiceStub

    @classmethod
    def of(cls, training: grpc.Channel, inference: grpc.Channel) -> Stubs:
        return cls(training_pb2_grpc.TrainingServiceStub(training), registry_pb2_grpc.RegistryServiceStub(training),
                   inference_pb2_grpc.InferenceServiceStub(inference), usage_pb2_grpc.UsageServiceStub(inference))


def missing_like(identifier: str) -> str:
    """An identifier of the same length and alphabet that no tenant owns."""
    tail = "0a1b2c"[: max(1, min(6, len(identifier) - 1))]
    return identifier[: len(identifier) - len(tail)] + tail


def _answer(call: Callable[[], object], blank: str) -> tuple[str, str, float]:
    """(code, message + details with `blank` replaced, seconds)."""
    start = time.perf_counter()
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            for _ in result:  # type: ignore[attr-defined]
                pass  # a stream's error may follow its first messages: read to the end
        code, text = "OK", ""
    except grpc.RpcError as error:
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        extra = "|".join(d.SerializeToString(deterministic=True).hex() for d in (status.details if status else []))
        code, text = error.code().name, f"{error.details()}|{extra}"
    seconds = time.perf_counter() - start
    return code, _blank(text, blank), seconds


def _blank(text: str, identifier: str) -> str:
    text = text.replace(identifier, "<id>")
    return text.replace(identifier.encode().hex(), "<id>")  # identifiers inside serialized details


def pair(method: str, label: str, call: Callable[[str], object], owned: str, rounds: int = ROUNDS) -> Probe:
    """B calls `call(owned)` and `call(missing_like(owned))`, interleaved `rounds` times."""
    missing = missing_like(owned)
    answers: dict[str, list[tuple[str, str, float]]] = {"owned": [], "missing": []}
    for _ in range(rounds):
        answers["owned"].append(_answer(lambda: call(owned), owned))
        answers["missing"].append(_answer(lambda: call(missing), missing))
    shapes = {kind: {(c, t) for c, t, _ in got} for kind, got in answers.items()}
    medians = tuple(statistics.median(s for _, _, s in answers[k]) for k in ("owned", "missing"))
    codes = {c for c, _ in shapes["owned"]}
    ok = shapes["owned"] == shapes["missing"] and codes == {"NOT_FOUND"}
    slow = medians[0] > medians[1] * TIMING_RATIO + TIMING_SLACK_S or medians[1] > medians[0] * TIMING_RATIO + \
        TIMING_SLACK_S
    detail = "" if ok else f"owned {sorted(shapes['owned'])} vs missing {sorted(shapes['missing'])}"
    if slow:
        detail += f" timing {medians[0] * 1e3:.1f} ms vs {medians[1] * 1e3:.1f} ms"
    return Probe(method, label, ok and not slow, detail.strip(), (medians[0], medians[1]))


def check(method: str, label: str, ok: bool, detail: str = "") -> Probe:
    return Probe(method, label, ok, "" if ok else detail)


@dataclass
class TenantProbes:
    """Runs every probe as B against A's `owned` resources."""

    stubs: Stubs
    b: Metadata
    owned: Owned
    base_model: str
    lora_bytes: bytes
    png: bytes
    rounds: int = ROUNDS
    results: list[Probe] = field(default_factory=list)

    def ref(self, name: str, **selector: object) -> common_pb2.AdapterRef:
        return common_pb2.AdapterRef(name=name, **selector)  # type: ignore[arg-type]

    def spec(self, adapter: str) -> inference_pb2.GenerationSpec:
        return inference_pb2.GenerationSpec(
            base_model=self.base_model, prompt="a photo", steps=2, width=32, height=32, seed=1,
            adapters=[inference_pb2.AdapterWeight(ref=self.ref(adapter, version=1), weight=0.5)])

    def run(self) -> list[Probe]:
        """Every probe; ImportAdapter last, since B then owns a same-named adapter."""
        methods = sorted(all_methods(), key=lambda m: m.name == "ImportAdapter")
        for method in methods:
            probe = getattr(self, f"probe_{method.name}", None)
            if probe is not None:
                probe(method.name)
        return self.results

    def _pair(self, method: str, label: str, call: Callable[[str], object], owned: str) -> None:
        self.results.append(pair(method, label, call, owned, self.rounds))

    # --- TrainingService -------------------------------------------------------------------
    def probe_GetDataset(self, m: str) -> None:
        t = self.stubs.training
        self._pair(m, "dataset id", lambda i: t.GetDataset(training_pb2.GetDatasetRequest(id=i), metadata=self.b,
                                                           timeout=30), self.owned.dataset_id)

    def probe_ListDatasets(self, m: str) -> None:
        got = self.stubs.training.ListDatasets(training_pb2.ListDatasetsRequest(page_size=1000), metadata=self.b,
                                               timeout=30)
        self.results.append(check(m, "A's dataset not listed", all(d.id != self.owned.dataset_id
                                                                    for d in got.datasets), "listed"))

    def probe_CreateTrainingJob(self, m: str) -> None:
        t = self.stubs.training

        def create(dataset: str, request_id: str = "") -> training_pb2.CreateTrainingJobResponse:
            spec = training_pb2.TrainingJobSpec(
                method=common_pb2.ADAPTER_KIND_LORA, base_model=self.base_model, dataset_id=dataset,
                output_name="probe", instance_prompt="a photo of sks",
                hyperparameters=training_pb2.Hyperparameters(max_train_steps=2, resolution=32))
            return t.CreateTrainingJob(training_pb2.CreateTrainingJobRequest(request_id=request_id, spec=spec),
                                       metadata=self.b, timeout=30)

        self._pair(m, "spec.dataset_id", create, self.owned.dataset_id)
        # The idempotency key is per tenant: B reusing A's request id (on a dataset of its own)
        # gets a new job of its own, never A's job back.
        upload = [training_pb2.UploadDatasetRequest(header=training_pb2.DatasetHeader(name="b-own")),
                  training_pb2.UploadDatasetRequest(image=training_pb2.DatasetImageChunk(
                      index=0, filename="b.png", caption="a photo", data=self.png))]
        own = t.UploadDataset(iter(upload), metadata=self.b, timeout=60).dataset.id
        got = create(own, self.owned.job_request_id)
        self.results.append(check(m, "request_id of A", got.created and got.job.id != self.owned.job_id,
                                  f"returned job {got.job.id} (created={got.created})"))
        t.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(id=got.job.id), metadata=self.b, timeout=30)

    def probe_GetTrainingJob(self, m: str) -> None:
        t = self.stubs.training
        self._pair(m, "job id", lambda i: t.GetTrainingJob(training_pb2.GetTrainingJobRequest(id=i),
                                                           metadata=self.b, timeout=30), self.owned.job_id)

    def probe_ListTrainingJobs(self, m: str) -> None:
        got = self.stubs.training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(page_size=1000),
                                                   metadata=self.b, timeout=30)
        self.results.append(check(m, "A's job not listed", all(j.id != self.owned.job_id for j in got.jobs),
                                  "listed"))

    def probe_CancelTrainingJob(self, m: str) -> None:
        t = self.stubs.training
        self._pair(m, "job id", lambda i: t.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(id=i),
                                                              metadata=self.b, timeout=30), self.owned.job_id)

    def probe_WatchTrainingJob(self, m: str) -> None:
        t = self.stubs.training
        self._pair(m, "job id", lambda i: t.WatchTrainingJob(training_pb2.WatchTrainingJobRequest(id=i),
                                                             metadata=self.b, timeout=30), self.owned.job_id)

    # --- RegistryService -------------------------------------------------------------------
    def probe_ListAdapters(self, m: str) -> None:
        got = self.stubs.registry.ListAdapters(registry_pb2.ListAdaptersRequest(page_size=1000), metadata=self.b,
                                               timeout=30)
        self.results.append(check(m, "A's adapter not listed", all(a.name != self.owned.adapter
                                                                    for a in got.adapters), "listed"))

    def probe_GetAdapter(self, m: str) -> None:
        r = self.stubs.registry
        for label, selector in (("latest", {}), ("version", {"version": 1}), ("alias", {"alias": self.owned.alias})):
            self._pair(m, f"ref ({label})", lambda n, s=selector: r.GetAdapter(  # type: ignore[misc]
                registry_pb2.GetAdapterRequest(ref=self.ref(n, **s)), metadata=self.b, timeout=30),
                self.owned.adapter)

    def probe_ListAdapterVersions(self, m: str) -> None:
        r = self.stubs.registry
        self._pair(m, "name", lambda n: r.ListAdapterVersions(registry_pb2.ListAdapterVersionsRequest(name=n),
                                                              metadata=self.b, timeout=30), self.owned.adapter)

    def probe_SetAlias(self, m: str) -> None:
        r = self.stubs.registry
        self._pair(m, "name", lambda n: r.SetAlias(registry_pb2.SetAliasRequest(name=n, alias="hijack", version=1),
                                                   metadata=self.b, timeout=30), self.owned.adapter)

    def probe_DeleteAlias(self, m: str) -> None:
        r = self.stubs.registry
        self._pair(m, "name", lambda n: r.DeleteAlias(registry_pb2.DeleteAliasRequest(name=n, alias=self.owned.alias),
                                                      metadata=self.b, timeout=30), self.owned.adapter)

    def probe_DeleteAdapterVersion(self, m: str) -> None:
        r = self.stubs.registry
        self._pair(m, "name", lambda n: r.DeleteAdapterVersion(registry_pb2.DeleteAdapterVersionRequest(
            name=n, version=1), metadata=self.b, timeout=30), self.owned.adapter)

    def probe_ExportAdapter(self, m: str) -> None:
        r = self.stubs.registry
        self._pair(m, "ref", lambda n: r.ExportAdapter(registry_pb2.ExportAdapterRequest(ref=self.ref(n, version=1)),
                                                       metadata=self.b, timeout=30), self.owned.adapter)

    def probe_ImportAdapter(self, m: str) -> None:
        """B importing under A's adapter name gets its own version 1: A's version count never shows."""
        header = registry_pb2.ImportAdapterHeader(
            name=self.owned.adapter, base_model=self.base_model, kind=common_pb2.ADAPTER_KIND_LORA,
            filename="w.safetensors", size=len(self.lora_bytes))
        stream = [registry_pb2.ImportAdapterRequest(header=header), registry_pb2.ImportAdapterRequest(
            chunk=self.lora_bytes)]
        got = self.stubs.registry.ImportAdapter(iter(stream), metadata=self.b, timeout=60).version
        self.results.append(check(m, "own namespace", got.version == 1,
                                  f"B's import under A's name became version {got.version}"))
        self.stubs.registry.DeleteAdapterVersion(registry_pb2.DeleteAdapterVersionRequest(
            name=self.owned.adapter, version=got.version), metadata=self.b, timeout=30)

    # --- InferenceService ------------------------------------------------------------------
    def probe_Generate(self, m: str) -> None:
        i = self.stubs.inference
        self._pair(m, "spec.adapters", lambda n: i.Generate(inference_pb2.GenerateRequest(spec=self.spec(n)),
                                                            metadata=self.b, timeout=60), self.owned.adapter)

    def probe_GenerateStream(self, m: str) -> None:
        i = self.stubs.inference
        self._pair(m, "spec.adapters", lambda n: i.GenerateStream(inference_pb2.GenerateStreamRequest(
            spec=self.spec(n)), metadata=self.b, timeout=60), self.owned.adapter)

    def probe_PreloadAdapters(self, m: str) -> None:
        i = self.stubs.inference
        self._pair(m, "adapters", lambda n: i.PreloadAdapters(inference_pb2.PreloadAdaptersRequest(
            base_model=self.base_model, adapters=[self.ref(n, version=1)]), metadata=self.b, timeout=60),
            self.owned.adapter)

    def probe_GetCacheStatus(self, m: str) -> None:
        got = self.stubs.inference.GetCacheStatus(inference_pb2.GetCacheStatusRequest(), metadata=self.b, timeout=30)
        keys = [e.key for t in got.tiers for e in t.entries]
        self.results.append(check(m, "A's cache entries not shown", not any(self.owned.adapter in k for k in keys),
                                  f"B sees {keys}"))

    # --- UsageService ----------------------------------------------------------------------
    def probe_GetUsage(self, m: str) -> None:
        u = self.stubs.usage
        own = u.GetUsage(usage_pb2.GetUsageRequest(), metadata=self.b, timeout=30)
        self.results.append(check(m, "only B's usage", all(t.tenant != "tenant-a" for t in own.totals),
                                  f"{[t.tenant for t in own.totals]}"))
        try:
            u.GetUsage(usage_pb2.GetUsageRequest(all_tenants=True), metadata=self.b, timeout=30)
            self.results.append(check(m, "all_tenants", False, "a tenant key read every tenant's usage"))
        except grpc.RpcError as error:
            self.results.append(check(m, "all_tenants", error.code() == grpc.StatusCode.PERMISSION_DENIED,
                                      error.code().name))


def unauthenticated(channels: dict[str, grpc.Channel]) -> list[Probe]:
    """Every RPC without a key and with an unknown key: UNAUTHENTICATED before any lookup, so
    an anonymous caller learns nothing either (health and reflection are the only open RPCs)."""
    results: list[Probe] = []
    for method in all_methods():
        channel = channels[method.containing_service.full_name]
        request = GetMessageClass(method.input_type)()
        payload = [request] if method.client_streaming else request
        for label, metadata in (("no key", ()), ("unknown key", (("authorization", "Bearer not-a-key"),))):
            code = caller(channel, method, metadata)(payload)
            results.append(check(method.name, label, code == grpc.StatusCode.UNAUTHENTICATED, code.name))
    return results


def coverage() -> list[str]:
    """RPCs with neither a probe nor a reason (must be empty)."""
    return [m.full_name for m in all_methods()
            if not hasattr(TenantProbes, f"probe_{m.name}") and m.name not in NOT_ADDRESSABLE]
