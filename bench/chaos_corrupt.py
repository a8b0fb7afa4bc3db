"""R5 corrupted blobs: overwrite stored bytes, then take every read path that would load them.

Victims, all tenant A's and each with bytes of its own (blobs are content addressed, so a
victim sharing a blob with anything else would corrupt that too): a LoRA adapter, a dataset
image, a base model's UNet weights and a training checkpoint. Read paths: Generate,
GenerateStream and PreloadAdapters with the adapter; ExportAdapter in two formats; Generate on
the base model; a training job on the dataset and one on the base model (the job FAILS with
the data-loss message); a job resumed from the checkpoint (run by a private worker so it is
the first to claim it). Each must answer DATA_LOSS (jobs: FAILED naming the corruption), never
stream a byte of the bad blob, never cache it; A's other adapter and tenant B keep working.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from atelier_api.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from bench._chaos_ctx import ChaosContext
from services.registry.refs import AdapterRef
from services.registry.registry import Registry

JOB_TIMEOUT_S = 120.0
CORRUPT_BASE = "tiny-corrupt"


@dataclass
class ReadPath:
    what: str
    store: str
    answer: str  # the status code name, or the job's final state and error
    ok: bool


@dataclass
class CorruptionRun:
    """Everything R5 saw."""

    paths: list[ReadPath] = field(default_factory=list)
    blobs: int = 0
    bystanders_ok: bool = True
    problems: list[str] = field(default_factory=list)


def corrupt(registry: Registry, sha256: str) -> None:
    """Flip the stored bytes of one blob (same length, different content)."""
    key = registry.keys.blob(sha256)
    data, _ = registry.store.get_bytes(key)
    flipped = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
    registry.store.put_bytes(key, flipped)
    assert hashlib.sha256(flipped).hexdigest() != sha256


def _code(call: Callable[[], object]) -> tuple[str, int]:
    """(status code name, messages received before it) for a unary or streaming call."""
    received = 0
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            for _ in result:  # type: ignore[attr-defined]
                received += 1
        return "OK", received
    except grpc.RpcError as error:
        return error.code().name, received


class Corruptor:
    """Runs R5 against one context (its registry is the store under test)."""

    def __init__(self, ctx: ChaosContext, tenant: str = "tenant-a", other: str = "tenant-b") -> None:
        self.ctx = ctx
        self.tenant, self.other = tenant, other
        self.registry = Registry.from_settings(ctx.registry_settings)
        self.store = ctx.registry_settings.registry_url.split(":", 1)[0]
        training = grpc.insecure_channel(ctx.training_target)
        inference = grpc.insecure_channel(ctx.inference_target)
        self.training = training_pb2_grpc.TrainingServiceStub(training)
        self.registry_api = registry_pb2_grpc.RegistryServiceStub(training)
        self.inference = inference_pb2_grpc.InferenceServiceStub(inference)
        self.run = CorruptionRun()
        self._tag = f"{int(time.time() * 1000) % 10**8}"

    def _record(self, what: str, answer: str, ok: bool) -> None:
        self.run.paths.append(ReadPath(what, self.store, answer, ok))
        if not ok:
            self.run.problems.append(f"{self.store}: {what} -> {answer}")

    def spec(self, adapter: str | None, base_model: str | None = None) -> inference_pb2.GenerationSpec:
        adapters = [inference_pb2.AdapterWeight(ref=common_pb2.AdapterRef(name=adapter, version=1), weight=0.5)]
        return inference_pb2.GenerationSpec(base_model=base_model or self.ctx.base_model, prompt="a photo", steps=2,
                                            width=32, height=32, seed=3, adapters=adapters if adapter else [])

    def generate(self, tenant: str, adapter: str | None, base_model: str | None = None) -> str:
        return _code(lambda: self.inference.Generate(inference_pb2.GenerateRequest(spec=self.spec(
            adapter, base_model)), metadata=self.ctx.metadata(tenant), timeout=120))[0]

    # --- the victims ---------------------------------------------------------------------
    def adapter_paths(self) -> None:
        victim, bystander = f"victim-{self._tag}", f"bystander-{self._tag}"
        self.ctx.make_lora(self.tenant, victim)
        self.ctx.make_lora(self.tenant, bystander)
        self.ctx.make_lora(self.other, victim)  # B's adapter of the same name: its own bytes
        record = self.registry.adapters.resolve(AdapterRef(self.tenant, victim, version=1)).files[0]
        corrupt(self.registry, record.sha256)
        self.run.blobs += 1
        a = self.ctx.metadata(self.tenant)
        for attempt in (1, 2):  # a failure is not cached either: the second call checks again
            code = self.generate(self.tenant, victim)
            self._record(f"Generate with the adapter (call {attempt})", code, code == "DATA_LOSS")
        code, got = _code(lambda: self.inference.GenerateStream(inference_pb2.GenerateStreamRequest(
            spec=self.spec(victim)), metadata=a, timeout=120))
        self._record("GenerateStream with the adapter", code, code == "DATA_LOSS" and got <= 1)
        code, _ = _code(lambda: self.inference.PreloadAdapters(inference_pb2.PreloadAdaptersRequest(
            base_model=self.ctx.base_model, adapters=[common_pb2.AdapterRef(name=victim, version=1)]),
            metadata=a, timeout=120))
        self._record("PreloadAdapters", code, code == "DATA_LOSS")
        for fmt in (registry_pb2.ADAPTER_FORMAT_DIFFUSERS, registry_pb2.ADAPTER_FORMAT_KOHYA):
            code, got = _code(lambda f=fmt: self.registry_api.ExportAdapter(registry_pb2.ExportAdapterRequest(  # type: ignore[misc]
                ref=common_pb2.AdapterRef(name=victim, version=1), format=f), metadata=a, timeout=60))
            name = registry_pb2.AdapterFormat.Name(fmt)
            self._record(f"ExportAdapter {name}", f"{code} after {got} messages", code == "DATA_LOSS" and got == 0)
        status = self.inference.GetCacheStatus(inference_pb2.GetCacheStatusRequest(), metadata=a, timeout=30)
        cached = [e.key for t in status.tiers for e in t.entries if victim in e.key or record.sha256 in e.key]
        self._record("cache tiers hold nothing of it", f"{cached}", not cached)
        for who, adapter in ((self.tenant, bystander), (self.other, victim), (self.other, None)):
            code = self.generate(who, adapter)
            if code != "OK":
                self.run.bystanders_ok = False
                self.run.problems.append(f"{self.store}: bystander Generate by {who} with {adapter} -> {code}")

    def dataset_path(self) -> None:
        from bench.chaos_inputs import png_bytes

        a = self.ctx.metadata(self.tenant)
        data = png_bytes(64 + int(self._tag) % 50)  # a size of its own: no blob shared with other datasets
        upload = [training_pb2.UploadDatasetRequest(header=training_pb2.DatasetHeader(name="rotten")),
                  training_pb2.UploadDatasetRequest(image=training_pb2.DatasetImageChunk(
                      index=0, filename="a.png", caption="a photo of sks", data=data))]
        dataset = self.training.UploadDataset(iter(upload), metadata=a, timeout=60).dataset
        manifest = self.registry.datasets.get(self.tenant, dataset.id)
        corrupt(self.registry, manifest.images[0].sha256)
        self.run.blobs += 1
        self._job("training on the dataset", dataset.id, self.ctx.base_model)

    def base_model_path(self) -> None:
        from services.tinymodel.pipeline import build_random_pipeline

        folder = build_random_pipeline(self.ctx.tmp_dir / f"corrupt-base-{self._tag}", seed=int(self._tag) % 997 + 1)
        manifest = self.registry.base_models.import_folder(CORRUPT_BASE, folder)
        unet = next(f for f in manifest.files if f.path.startswith("unet/") and f.path.endswith(".safetensors"))
        corrupt(self.registry, unet.sha256)
        self.run.blobs += 1
        for attempt in (1, 2):
            code = self.generate(self.tenant, None, CORRUPT_BASE)
            self._record(f"Generate on the base model (call {attempt})", code, code == "DATA_LOSS")
        a = self.ctx.metadata(self.tenant)
        upload = [training_pb2.UploadDatasetRequest(header=training_pb2.DatasetHeader(name="fine")),
                  training_pb2.UploadDatasetRequest(image=training_pb2.DatasetImageChunk(
                      index=0, filename="a.png", caption="a photo of sks", data=_fine_png()))]
        dataset = self.training.UploadDataset(iter(upload), metadata=a, timeout=60).dataset
        self._job("training on the base model", dataset.id, CORRUPT_BASE)
        self.registry.base_models.delete(CORRUPT_BASE)

    def _job(self, what: str, dataset_id: str, base_model: str) -> None:
        spec = training_pb2.TrainingJobSpec(
            method=common_pb2.ADAPTER_KIND_LORA, base_model=base_model, dataset_id=dataset_id,
            output_name=f"never-{self._tag}", instance_prompt="a photo of sks",
            hyperparameters=training_pb2.Hyperparameters(max_train_steps=2, resolution=32))
        a = self.ctx.metadata(self.tenant)
        job = self.training.CreateTrainingJob(training_pb2.CreateTrainingJobRequest(spec=spec), metadata=a,
                                              timeout=30).job
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline and job.state not in (training_pb2.JOB_STATE_SUCCEEDED,
                                                                training_pb2.JOB_STATE_FAILED,
                                                                training_pb2.JOB_STATE_CANCELLED):
            time.sleep(0.3)
            job = self.training.GetTrainingJob(training_pb2.GetTrainingJobRequest(id=job.id), metadata=a,
                                               timeout=30).job
        state = training_pb2.JobState.Name(job.state)
        published = _exists(self.registry, self.tenant, f"never-{self._tag}")
        ok = state == "JOB_STATE_FAILED" and "corrupted" in job.error and not published
        self._record(what, f"{state}: {job.error[:90]}", ok)


def _exists(registry: Registry, tenant: str, name: str) -> bool:
    from services.common.errors import NotFound

    try:
        registry.adapters.resolve(AdapterRef(tenant, name))
    except NotFound:
        return False
    return True


def _fine_png() -> bytes:
    from bench.chaos_inputs import png_bytes

    return png_bytes(72)


def resume_path(ctx: ChaosContext, run: CorruptionRun, tenant: str = "tenant-a") -> None:
    """A job whose latest checkpoint is corrupted, claimed by a private worker (own job store,
    the shared registry): the resume fetch answers DataLoss, the job FAILS, nothing loads."""
    from services.training import convert
    from services.training.jobstore import JobStore
    from services.training.worker import Worker

    store_name = ctx.registry_settings.registry_url.split(":", 1)[0]
    tmp = ctx.tmp_dir / f"resume-{int(time.time() * 1000)}"
    tmp.mkdir(parents=True)
    settings = ctx.registry_settings.model_copy(update={"database_url": f"sqlite:///{tmp / 'jobs.db'}",
                                                        "data_dir": tmp / "var"})
    registry = Registry.from_settings(settings)
    dataset = registry.datasets.put(tenant, "resume", [("a.png", "a photo of sks", _fine_png(), 72, 72)])
    spec = training_pb2.TrainingJobSpec(
        method=common_pb2.ADAPTER_KIND_LORA, base_model=ctx.base_model, dataset_id=dataset.id,
        output_name="resumed", instance_prompt="a photo of sks",
        hyperparameters=training_pb2.Hyperparameters(max_train_steps=4, resolution=32, checkpointing_steps=2))
    config = convert.config_from_proto(spec)
    store = JobStore.open(settings)
    try:
        job, _ = store.create_job(tenant, "", method=config.method, spec=convert.spec_to_dict(spec),
                                  output_name="resumed", total_steps=4, config=config.model_dump(mode="json"))
        state = tmp / "optimizer.json"
        state.write_bytes(b"optimizer state " + tmp.name.encode() * 64)
        checkpoint = registry.checkpoints.put(tenant, job.id, 2, {"optimizer.json": state})
        corrupt(registry, checkpoint.files[0].sha256)
        run.blobs += 1
        Worker(settings, store, registry, worker_id="resume-probe").run_once()
        done = store.get_job(job.id)
        ok = done.state == "FAILED" and "corrupted" in (done.error or "")
        run.paths.append(ReadPath("resume from the checkpoint", store_name, f"{done.state}: {done.error[:90]}", ok))
        if not ok:
            run.problems.append(f"{store_name}: resume -> {done.state}: {done.error}")
    finally:
        store.close()


def corruption_run(ctx: ChaosContext) -> CorruptionRun:
    """All of R5 on ctx's registry."""
    corruptor = Corruptor(ctx)
    corruptor.adapter_paths()
    corruptor.dataset_path()
    corruptor.base_model_path()
    resume_path(ctx, corruptor.run)
    if not corruptor.run.bystanders_ok:
        corruptor.run.problems.append("another adapter or tenant stopped working")
    return corruptor.run


def describe(runs: list[CorruptionRun]) -> tuple[str, bool]:
    paths = [p for r in runs for p in r.paths]
    stores = sorted({p.store for p in paths})
    loss = sum(p.ok for p in paths)
    problems = [x for r in runs for x in r.problems]
    blobs = sum(r.blobs for r in runs)
    figures = (f"{blobs} blobs corrupted on {'+'.join(stores)}; {loss}/{len(paths)} read paths DATA_LOSS "
               f"(jobs FAILED) with 0 bytes served; bystanders {'ok' if all(r.bystanders_ok for r in runs) else 'HIT'}")
    return figures, not problems

