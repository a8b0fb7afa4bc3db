"""Rows R5 (corrupted blobs), R6 (fuzzed requests, hostile images) and the cross-tenant probes
of bench/chaos.py, over the servers the driver started (see bench/_chaos_ctx.py).

Each row function returns one table row and keeps its detailed findings in `Findings`, so the
tests (tests/integration/test_chaos_inputs*.py) assert on the same code the bench prints with
small, derandomized example counts, while the bench runs more examples.
"""

from __future__ import annotations

import io
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from google.protobuf.message import Message  # noqa: E402

from atelier_api.v1 import (  # noqa: E402
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    training_pb2,
    training_pb2_grpc,
)
from bench._chaos_ctx import ChaosContext, row  # noqa: E402
from bench.chaos_corrupt import CorruptionRun, corruption_run, describe  # noqa: E402
from bench.chaos_fuzz import (  # noqa: E402
    FuzzTarget,
    Outcome,
    all_methods,
    fuzz_method,
    iter_bad,
    run_fuzz,
    serving,
)
from bench.chaos_images import hostile_images, probe_images, train_on_accepted  # noqa: E402
from bench.chaos_tenants import (  # noqa: E402
    NOT_ADDRESSABLE,
    ROUNDS,
    Owned,
    Stubs,
    TenantProbes,
    coverage,
    unauthenticated,
)

FUZZ_TENANT = "fuzz"
TENANT_A, TENANT_B = "tenant-a", "tenant-b"
ADMIN = "ops"  # an admin tenant of the context (ATELIER_ADMIN_TENANTS)
SECRET = "secret"
QUICK_EXAMPLES = 25
FULL_EXAMPLES = 120


@dataclass
class Findings:
    """Every failure a row saw, one line each (empty when the row passed)."""

    problems: list[str] = field(default_factory=list)


def channel_for(target: str) -> grpc.Channel:
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    channel = grpc.insecure_channel(target, options=options)
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel


def served_services(channel: grpc.Channel) -> list[str]:
    """Service names the server lists through reflection."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return [s.name for reply in replies for s in reply.list_services_response.service]


def fuzz_target(ctx: ChaosContext) -> FuzzTarget:
    """Map each atelier service to the server that lists it (the first one, if both do)."""
    channels: dict[str, grpc.Channel] = {}
    for target in (ctx.training_target, ctx.inference_target):
        channel = channel_for(target)
        for name in served_services(channel):
            channels.setdefault(name, channel)
    return FuzzTarget(channels)


def listings(ctx: ChaosContext, tenant: str) -> Callable[[], object]:
    """A snapshot of what `tenant` can list: datasets, jobs, adapters (with versions), base models."""
    channel = channel_for(ctx.training_target)
    training = training_pb2_grpc.TrainingServiceStub(channel)
    registry = registry_pb2_grpc.RegistryServiceStub(channel)
    metadata = ctx.metadata(tenant)

    def snapshot() -> object:
        datasets = training.ListDatasets(training_pb2.ListDatasetsRequest(page_size=1000), metadata=metadata,
                                         timeout=30).datasets
        jobs = training.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(page_size=1000), metadata=metadata,
                                         timeout=30).jobs
        adapters = registry.ListAdapters(registry_pb2.ListAdaptersRequest(page_size=1000), metadata=metadata,
                                         timeout=30).adapters
        bases = registry.ListBaseModels(registry_pb2.ListBaseModelsRequest(page_size=1000), metadata=metadata,
                                        timeout=30).base_models
        return (sorted(d.id for d in datasets), sorted(j.id for j in jobs),
                sorted(a.SerializeToString(deterministic=True) for a in adapters),
                sorted(b.SerializeToString(deterministic=True) for b in bases))

    return snapshot


def png_bytes(size: int = 64, mode: str = "RGB", fmt: str = "PNG", **save: object) -> bytes:
    """A small valid image (a gradient, so it is not trivially compressible)."""
    from PIL import Image

    img = Image.linear_gradient("L").resize((size, size)).convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt, **save)
    return out.getvalue()


def fuzz_templates(ctx: ChaosContext) -> dict[str, list[Message]]:
    """Valid requests of the fuzz tenant, per RPC, that the fuzzer mutates (see chaos_fuzz)."""
    ctx.make_lora(FUZZ_TENANT, "fz")
    channel = channel_for(ctx.training_target)
    training = training_pb2_grpc.TrainingServiceStub(channel)
    image = training_pb2.DatasetImageChunk(index=0, filename="a.png", caption="a photo", data=png_bytes())
    upload = [training_pb2.UploadDatasetRequest(header=training_pb2.DatasetHeader(name="fz")),
              training_pb2.UploadDatasetRequest(image=image)]
    dataset = training.UploadDataset(iter(upload), metadata=ctx.metadata(FUZZ_TENANT), timeout=60).dataset
    ref = common_pb2.AdapterRef(name="fz", version=1)
    spec = inference_pb2.GenerationSpec(
        base_model=ctx.base_model, prompt="a photo", adapters=[inference_pb2.AdapterWeight(ref=ref, weight=0.5)],
        num_images=1, steps=2, width=32, height=32, seed=1)
    lora = ctx.tmp_dir / "fuzz-import.safetensors"
    lora_bytes = lora.read_bytes() if lora.exists() else _lora_file(ctx, lora)
    job = training_pb2.TrainingJobSpec(
        method=common_pb2.ADAPTER_KIND_LORA, base_model=ctx.base_model, dataset_id=dataset.id, output_name="fz-job",
        instance_prompt="a photo of sks", hyperparameters=training_pb2.Hyperparameters(max_train_steps=2,
                                                                                       resolution=32))
    return {
        "UploadDataset": upload, "GetDataset": [training_pb2.GetDatasetRequest(id=dataset.id)],
        "CreateTrainingJob": [training_pb2.CreateTrainingJobRequest(spec=job)],
        "GetAdapter": [registry_pb2.GetAdapterRequest(ref=ref)],
        "ListAdapterVersions": [registry_pb2.ListAdapterVersionsRequest(name="fz")],
        "SetAlias": [registry_pb2.SetAliasRequest(name="fz", alias="prod", version=1)],
        "ExportAdapter": [registry_pb2.ExportAdapterRequest(ref=ref)],
        "ImportAdapter": [registry_pb2.ImportAdapterRequest(header=registry_pb2.ImportAdapterHeader(
            name="fz-imp", base_model=ctx.base_model, kind=common_pb2.ADAPTER_KIND_LORA, filename="w.safetensors",
            size=len(lora_bytes))), registry_pb2.ImportAdapterRequest(chunk=lora_bytes)],
        "GetBaseModel": [registry_pb2.GetBaseModelRequest(name=ctx.base_model)],
        "Generate": [inference_pb2.GenerateRequest(spec=spec)],
        "GenerateStream": [inference_pb2.GenerateStreamRequest(spec=spec)],
        "PreloadAdapters": [inference_pb2.PreloadAdaptersRequest(base_model=ctx.base_model, adapters=[ref])],
    }


def _lora_file(ctx: ChaosContext, dest: Path) -> bytes:
    from tests.fixtures.synthetic import LoraFactory

    dest.parent.mkdir(parents=True, exist_ok=True)
    written = LoraFactory(ctx.pipeline_dir).write(ctx.tmp_dir / "fuzz-lora", seed=3)
    dest.write_bytes(written.read_bytes())
    return dest.read_bytes()


def cancel_created_jobs(ctx: ChaosContext) -> Callable[[str, Message], None]:
    """The fuzzer's cleanup: a job a mutated request really created is cancelled at once, so
    the single worker is not kept busy by a fuzzed million-step job."""
    stub = training_pb2_grpc.TrainingServiceStub(channel_for(ctx.training_target))

    def cleanup(method: str, response: Message) -> None:
        if method == "CreateTrainingJob":
            job_id = response.job.id  # type: ignore[attr-defined]
            stub.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(id=job_id),
                                   metadata=ctx.metadata(FUZZ_TENANT), timeout=30)

    return cleanup


def admin_import_fuzz(ctx: ChaosContext, target: FuzzTarget, examples: int) -> Outcome:
    """ImportBaseModel fuzzed with an admin key too (a tenant key stops at PERMISSION_DENIED).
    DeleteBaseModel is left out: a fuzzed admin delete could legitimately remove the base model
    every other row uses."""
    method = next(m for m in all_methods() if m.name == "ImportBaseModel")
    channel = target.channels[method.containing_service.full_name]
    outcome = fuzz_method(method, channel, ctx.metadata(ADMIN), listings(ctx, ADMIN), examples)
    outcome.method += " (admin)"
    return outcome


def fuzz_row(ctx: ChaosContext, findings: Findings, examples: int | None = None) -> dict[str, str]:
    """R6a: every RPC's fields fuzzed as the `fuzz` tenant, from scratch and from valid templates."""
    examples = examples or (QUICK_EXAMPLES if ctx.quick else FULL_EXAMPLES)
    target = fuzz_target(ctx)
    outcomes, seconds = run_fuzz(target, ctx.metadata(FUZZ_TENANT), listings(ctx, FUZZ_TENANT), examples,
                                 fuzz_templates(ctx), cancel_created_jobs(ctx))
    if ADMIN in ctx.api_keys:
        outcomes.append(admin_import_fuzz(ctx, target, examples))
    findings.problems.extend(iter_bad(outcomes))
    calls = sum(sum(o.codes.values()) for o in outcomes)
    codes: dict[str, int] = {}
    for outcome in outcomes:
        for code, count in outcome.codes.items():
            codes[code] = codes.get(code, 0) + count
    spread = ", ".join(f"{code} {count}" for code, count in sorted(codes.items(), key=lambda kv: -kv[1]))
    figures = (f"{len(all_methods())} RPCs (+ admin ImportBaseModel) x {examples} examples = {calls} calls in "
               f"{seconds:.0f} s; {spread}; "
               f"{len(findings.problems)} bad")
    return row("R6", "fuzzed requests over every RPC's fields", figures, not findings.problems)


def images_row(ctx: ChaosContext, findings: Findings) -> dict[str, str]:
    """R6b: hostile images to UploadDataset and Generate's init/mask image."""
    verdicts = probe_images(channel_for(ctx.training_target), channel_for(ctx.inference_target),
                            ctx.metadata(FUZZ_TENANT), ctx.base_model, listings(ctx, FUZZ_TENANT))
    for v in verdicts:
        if not v.ok:
            findings.problems.append(f"{v.image} -> {v.target}: {v.code} {v.fields} (expected {v.expected})")
    trained, error = train_on_accepted(channel_for(ctx.training_target), ctx.metadata(FUZZ_TENANT), ctx.base_model)
    if trained != "JOB_STATE_SUCCEEDED":
        findings.problems.append(f"training on the accepted images ended {trained}: {error}")
    up = all(serving(channel_for(t)) for t in (ctx.training_target, ctx.inference_target))
    if not up:
        findings.problems.append("a server is not SERVING after the hostile images")
    refused = sum(v.code == "INVALID_ARGUMENT" for v in verdicts)
    accepted = sum(v.code == "OK" for v in verdicts)
    figures = (f"{len(hostile_images())} images, {len(verdicts)} calls (upload, init_image, mask_image): "
               f"{refused} INVALID_ARGUMENT naming the field, {accepted} accepted (CMYK/16-bit/APNG/WebP/EXIF/"
               f"polyglot) and a 2-step job on them {trained.removeprefix('JOB_STATE_')}; "
               f"{len(findings.problems)} wrong; servers {'up' if up else 'DOWN'}")
    return row("R6", "hostile images (bomb, truncated, CMYK, 16-bit, animated, EXIF, polyglot)", figures,
               not findings.problems)


def own_resources(ctx: ChaosContext, tenant: str = TENANT_A) -> Owned:
    """Tenant A's dataset, job (a short LoRA run), adapter `secret` v1 with alias `prod`, and a
    Generate with it so it sits in A's cache tiers."""
    channel = channel_for(ctx.training_target)
    training = training_pb2_grpc.TrainingServiceStub(channel)
    registry = registry_pb2_grpc.RegistryServiceStub(channel)
    a = ctx.metadata(tenant)
    upload = [training_pb2.UploadDatasetRequest(header=training_pb2.DatasetHeader(name="private")),
              training_pb2.UploadDatasetRequest(image=training_pb2.DatasetImageChunk(
                  index=0, filename="a.png", caption="a photo of sks", data=png_bytes()))]
    dataset = training.UploadDataset(iter(upload), metadata=a, timeout=60).dataset
    spec = training_pb2.TrainingJobSpec(
        method=common_pb2.ADAPTER_KIND_LORA, base_model=ctx.base_model, dataset_id=dataset.id, output_name="a-job",
        instance_prompt="a photo of sks", hyperparameters=training_pb2.Hyperparameters(max_train_steps=2,
                                                                                       resolution=32))
    request_id = f"a-request-{uuid.uuid4().hex[:8]}"
    job = training.CreateTrainingJob(training_pb2.CreateTrainingJobRequest(request_id=request_id, spec=spec),
                                     metadata=a, timeout=30).job
    ctx.make_lora(tenant, SECRET)
    registry.SetAlias(registry_pb2.SetAliasRequest(name=SECRET, alias="prod", version=1), metadata=a, timeout=30)
    generate = inference_pb2_grpc.InferenceServiceStub(channel_for(ctx.inference_target)).Generate
    generate(inference_pb2.GenerateRequest(spec=inference_pb2.GenerationSpec(
        base_model=ctx.base_model, prompt="a photo", steps=2, width=32, height=32, seed=1,
        adapters=[inference_pb2.AdapterWeight(ref=common_pb2.AdapterRef(name=SECRET, version=1), weight=0.5)])),
        metadata=a, timeout=120)
    return Owned(dataset.id, job.id, request_id, SECRET, "prod")


def untouched(ctx: ChaosContext, owned: Owned, tenant: str = TENANT_A) -> list[str]:
    """What B's probes changed among A's resources (must be empty)."""
    channel = channel_for(ctx.training_target)
    training = training_pb2_grpc.TrainingServiceStub(channel)
    registry = registry_pb2_grpc.RegistryServiceStub(channel)
    a = ctx.metadata(tenant)
    changed: list[str] = []
    job = training.GetTrainingJob(training_pb2.GetTrainingJobRequest(id=owned.job_id), metadata=a, timeout=30).job
    if job.state == training_pb2.JOB_STATE_CANCELLED:
        changed.append("A's job was cancelled")
    versions = registry.ListAdapterVersions(registry_pb2.ListAdapterVersionsRequest(name=owned.adapter),
                                            metadata=a, timeout=30).versions
    if [v.version for v in versions] != [1]:
        changed.append(f"A's versions are now {[v.version for v in versions]}")
    adapter = registry.GetAdapter(registry_pb2.GetAdapterRequest(ref=common_pb2.AdapterRef(
        name=owned.adapter, alias=owned.alias)), metadata=a, timeout=30)
    if adapter.version.version != 1:
        changed.append("A's alias moved")
    training.GetDataset(training_pb2.GetDatasetRequest(id=owned.dataset_id), metadata=a, timeout=30)
    return changed


def tenants_row(ctx: ChaosContext, findings: Findings) -> dict[str, str]:
    """Cross-tenant probes: B against A's resources over every RPC."""
    owned = own_resources(ctx)
    stubs = Stubs.of(channel_for(ctx.training_target), channel_for(ctx.inference_target))
    lora = ctx.tmp_dir / "tenant-b-import.safetensors"
    lora_bytes = _lora_file(ctx, lora)
    rounds = 3 if ctx.quick else ROUNDS
    probes = TenantProbes(stubs, ctx.metadata(TENANT_B), owned, ctx.base_model, lora_bytes, png_bytes(),
                          rounds).run()
    anonymous = unauthenticated(fuzz_target(ctx).channels)
    findings.problems += [f"{p.method} [{p.label}]: {p.detail}" for p in probes + anonymous if not p.ok]
    findings.problems += [f"{name}: no probe and no reason" for name in coverage()]
    findings.problems += untouched(ctx, owned)
    paired = [p for p in probes if p.seconds != (0.0, 0.0)]
    worst = max((abs(p.seconds[0] - p.seconds[1]) * 1e3 for p in paired), default=0.0)
    rpcs = {p.method for p in probes}
    figures = (f"{len(rpcs)} RPCs probed ({len(NOT_ADDRESSABLE)} not tenant-addressable), {len(paired)} owned-vs-"
               f"missing pairs x {rounds}: same NOT_FOUND code+message; largest median gap {worst:.1f} ms; "
               f"{sum(p.ok for p in anonymous)}/{len(anonymous)} keyless/unknown-key calls UNAUTHENTICATED; "
               f"{len(findings.problems)} leaks")
    return row("X", "cross-tenant probes over every RPC", figures, not findings.problems)


def _on_s3(ctx: ChaosContext, endpoint: str) -> CorruptionRun:
    """R5 again with the registry on the S3 server at `endpoint` (a fresh bucket, its own runtime)."""
    from tests.fixtures.s3 import make_s3_settings, s3_client
    from tests.integration.chaos_inputs_support import chaos_context, stack_settings

    bucket = f"chaos-r5-{uuid.uuid4().hex[:12]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    s3 = make_s3_settings(endpoint, bucket)
    fields = {k: getattr(s3, k) for k in ("registry_url", "s3_endpoint_url", "s3_region", "s3_access_key_id",
                                          "s3_secret_access_key", "s3_read_timeout_seconds")}
    tmp = ctx.tmp_dir / f"r5-s3-{bucket}"
    with chaos_context(stack_settings(tmp, **fields), ctx.pipeline_dir, tmp) as s3_ctx:
        s3_ctx.tmp_dir.mkdir(parents=True, exist_ok=True)
        return corruption_run(s3_ctx)


def corruption_row(ctx: ChaosContext, findings: Findings) -> dict[str, str]:
    """R5: corrupted adapter, dataset, base-model and checkpoint blobs on the context's store."""
    runs = [corruption_run(ctx)]
    endpoint = ctx.extra.get("s3_endpoint")
    if endpoint and not ctx.registry_settings.registry_url.startswith("s3://"):
        runs.append(_on_s3(ctx, str(endpoint)))
    findings.problems += [p for run in runs for p in run.problems]
    figures, ok = describe(runs)
    return row("R5", "corrupted blobs: DATA_LOSS, never loaded", figures, ok)


def input_rows(ctx: ChaosContext) -> list[dict[str, str]]:
    """The rows this module owns, in table order. R5 also runs on S3 when the driver puts a
    moto/S3 endpoint in `ctx.extra["s3_endpoint"]` and the context's own registry is local."""
    ctx.tmp_dir.mkdir(parents=True, exist_ok=True)
    rows = [corruption_row(ctx, Findings()), fuzz_row(ctx, Findings()), images_row(ctx, Findings()),
            tenants_row(ctx, Findings())]
    return rows
