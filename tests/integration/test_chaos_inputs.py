"""The chaos bench's input rows (R5 corrupted blobs, R6 fuzzed requests and hostile images, the
cross-tenant probes) run as tests: the same code bench/chaos.py prints, through a real
`start_runtime("all")` with auth on, small derandomized Hypothesis budgets, plus a regression
test for each INTERNAL the fuzzer found."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from atelier_api.v1 import (
    common_pb2,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    usage_pb2,
    usage_pb2_grpc,
)
from bench._chaos_ctx import ChaosContext
from bench.chaos_corrupt import corruption_run
from bench.chaos_fuzz import all_methods
from bench.chaos_images import hostile_images, sixteen_bit_png, violations
from bench.chaos_inputs import Findings, fuzz_row, images_row, tenants_row
from bench.chaos_tenants import coverage
from tests.fixtures.s3 import MotoServer, make_s3_settings
from tests.integration.chaos_inputs_support import chaos_context, stack_settings

pytestmark = pytest.mark.slow
FUZZ_EXAMPLES = 25


@pytest.fixture(scope="module")
def ctx(tiny_random_pipeline_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosContext]:
    tmp = tmp_path_factory.mktemp("chaos-inputs")
    with chaos_context(stack_settings(tmp, f"file://{tmp / 'registry'}"), tiny_random_pipeline_dir, tmp) as ctx:
        ctx.tmp_dir.mkdir(parents=True, exist_ok=True)
        yield ctx


@pytest.fixture(scope="module")
def s3_ctx(moto_server: MotoServer, tiny_random_pipeline_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosContext]:
    moto_server.ensure_running()
    tmp = tmp_path_factory.mktemp("chaos-inputs-s3")
    s3 = make_s3_settings(moto_server.endpoint, moto_server.create_bucket())
    s3_fields = {k: getattr(s3, k) for k in ("registry_url", "s3_endpoint_url", "s3_region", "s3_access_key_id",
                                             "s3_secret_access_key", "s3_read_timeout_seconds")}
    with chaos_context(stack_settings(tmp, **s3_fields), tiny_random_pipeline_dir, tmp) as ctx:
        ctx.tmp_dir.mkdir(parents=True, exist_ok=True)
        yield ctx


# --- R5 --------------------------------------------------------------------------------------
@pytest.mark.parametrize("store", ["file", "s3"])
def test_corrupted_blobs_answer_data_loss_on_every_read_path(store: str, request: pytest.FixtureRequest) -> None:
    context: ChaosContext = request.getfixturevalue("ctx" if store == "file" else "s3_ctx")
    run = corruption_run(context)
    assert run.problems == []
    assert run.blobs == 4 and len(run.paths) == 12 and all(p.ok for p in run.paths)
    assert {p.store for p in run.paths} == {"file" if store == "file" else "s3"}
    assert run.bystanders_ok


# --- R6: fuzzing -----------------------------------------------------------------------------
def test_fuzzed_requests_over_every_rpc_never_answer_internal(ctx: ChaosContext) -> None:
    findings = Findings()
    result = fuzz_row(ctx, findings, examples=FUZZ_EXAMPLES)
    assert findings.problems == [] and result["verdict"] == "PASS", findings.problems
    assert f"{len(all_methods())} RPCs" in result["figures"]


def test_usage_timestamps_outside_the_timestamp_range_are_invalid_argument(ctx: ChaosContext) -> None:
    """Fuzzer finding: an out-of-range Timestamp failed while echoing the window (INTERNAL)."""
    stub = usage_pb2_grpc.UsageServiceStub(grpc.insecure_channel(ctx.inference_target))
    for field in ("start_time", "end_time"):
        request = usage_pb2.GetUsageRequest()
        getattr(request, field).seconds = -(2**63)
        with pytest.raises(grpc.RpcError) as bad:
            stub.GetUsage(request, metadata=ctx.metadata("tenant-a"), timeout=10)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(bad.value) == [field]
    edge = usage_pb2.GetUsageRequest()
    edge.end_time.seconds, edge.end_time.nanos = 253402300799, 999_999_999  # 9999-12-31T23:59:59.999999999
    echoed = stub.GetUsage(edge, metadata=ctx.metadata("tenant-a"), timeout=10)
    assert echoed.end_time.seconds == 253402300799


def test_kohya_export_of_a_lora_stored_in_the_older_diffusers_spelling(ctx: ChaosContext) -> None:
    """Fuzzer finding: a LoRA stored with `lora.down/lora.up` keys exported to kohya or A1111
    crashed (IndexError -> INTERNAL); it is renamed like an import would be."""
    ctx.make_lora("tenant-a", "old-spelling")
    stub = registry_pb2_grpc.RegistryServiceStub(grpc.insecure_channel(ctx.training_target))
    for fmt in (registry_pb2.ADAPTER_FORMAT_KOHYA, registry_pb2.ADAPTER_FORMAT_A1111):
        chunks = list(stub.ExportAdapter(registry_pb2.ExportAdapterRequest(
            ref=common_pb2.AdapterRef(name="old-spelling", version=1), format=fmt),
            metadata=ctx.metadata("tenant-a"), timeout=60))
        data = b"".join(c.chunk for c in chunks)
        path = ctx.tmp_dir / f"exported-{fmt}.safetensors"
        path.write_bytes(data)
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        assert keys and all(k.startswith("lora_unet_") for k in keys)
        assert any(k.endswith(".lora_down.weight") for k in keys)


# --- R6: hostile images -------------------------------------------------------------------
def test_hostile_images_are_refused_naming_the_field_or_accepted_when_benign(ctx: ChaosContext) -> None:
    findings = Findings()
    result = images_row(ctx, findings)
    assert findings.problems == [] and result["verdict"] == "PASS", findings.problems
    assert len(hostile_images()) == 12


def test_a_16_bit_init_image_generates_like_its_8_bit_equivalent(ctx: ChaosContext) -> None:
    """16-bit greyscale is scaled to 8 bits, not clipped to white (PIL's own convert clips)."""
    wide = sixteen_bit_png()
    samples = np.asarray(Image.open(io.BytesIO(wide))).astype(np.uint32)
    narrow = io.BytesIO()
    Image.fromarray((samples * 255 // 65535).astype(np.uint8)).save(narrow, format="PNG")
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(ctx.inference_target))

    def generate(init: bytes) -> bytes:
        spec = inference_pb2.GenerationSpec(base_model=ctx.base_model, prompt="a photo", steps=2, width=64,
                                            height=64, seed=5, init_image=init, strength=0.5)
        return stub.Generate(inference_pb2.GenerateRequest(spec=spec), metadata=ctx.metadata("tenant-a"),
                             timeout=120).images[0].png

    assert generate(wide) == generate(narrow.getvalue())


def test_training_images_in_16_bit_are_scaled_not_clipped(tmp_path: Path) -> None:
    from services.training.trainers.data import load_rgb

    path = tmp_path / "wide.png"
    path.write_bytes(sixteen_bit_png())
    samples = np.asarray(Image.open(path)).astype(np.uint32)
    loaded = np.asarray(load_rgb(path))
    assert loaded.shape == (*samples.shape, 3)
    assert np.abs(loaded[..., 0].astype(int) - (samples * 255 // 65535).astype(int)).max() <= 1
    assert 100 < loaded.mean() < 155  # a full-range gradient, not a white sheet


# --- cross-tenant ---------------------------------------------------------------------------
def test_every_rpc_has_a_cross_tenant_probe_or_a_reason() -> None:
    assert coverage() == []


def test_tenant_b_cannot_tell_tenant_a_resources_from_missing_ones(ctx: ChaosContext) -> None:
    findings = Findings()
    result = tenants_row(ctx, findings)
    assert findings.problems == [] and result["verdict"] == "PASS", findings.problems
    calls = 2 * len(all_methods())  # every RPC without a key and with an unknown one
    assert f"{calls}/{calls} keyless/unknown-key calls UNAUTHENTICATED" in result["figures"]
