"""img2img and inpainting through gRPC equal plain diffusers' pipelines with the same adapters.

Real gRPC on loopback, registry on moto S3, the tiny random base model at 32 px (a 4-channel
UNet: diffusers' inpaint pipeline blends the kept region back into the latents). References are
plain `StableDiffusionImg2ImgPipeline` / `StableDiffusionInpaintPipeline` loaded from the same
folder, with `load_lora_weights` (+ fuse, as the equivalence tests), `load_textual_inversion`
and the DreamBooth UNet/text encoder swapped in: pixel for pixel, max difference 0.
"""

from __future__ import annotations

import concurrent.futures
import io
import math
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image
from typer.testing import CliRunner

from atelier.cli.main import app
from atelier.client import Client
from atelier_api.v1 import inference_pb2
from services.registry.manifests import LORA_WEIGHTS_FILE, TI_EMBEDS_FILE
from tests.fixtures.s3 import MotoServer
from tests.fixtures.synthetic import LoraFactory, write_dreambooth, write_textual_inversion
from tests.integration.test_inference_support import (
    BASE,
    SIZE,
    InferenceEnv,
    details,
    engine_settings,
    pixels,
    reference_pipeline,
    rpc_error,
    spec,
    start_env,
)

TOKEN = "<concept>"
PROMPT = f"a photo of {TOKEN} on a table"
SEED = 4
STEPS = 5


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def init_png(seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> bytes:
    """A structured RGB image (gradients plus noise), so the init image visibly matters."""
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = np.stack([xx * 255 / max(1, w - 1), yy * 255 / max(1, h - 1), (xx + yy) * 127 / max(1, w + h - 2)], -1)
    return png(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def mask_png(size: int = SIZE) -> bytes:
    """Right half white (repaint), left half black (keep)."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2:] = 255
    return png(mask)


INIT, MASK = init_png(), mask_png()


@pytest.fixture(scope="module")
def env(moto_server: MotoServer, tiny_random_pipeline_dir: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEnv]:
    moto_server.ensure_running()
    tmp = tmp_path_factory.mktemp("inference-img2img")
    settings = engine_settings(moto_server.endpoint, moto_server.create_bucket(), tmp, tiny_random_pipeline_dir,
                               batch_wait_ms=300.0, max_image_side=256)
    env = start_env(settings, tiny_random_pipeline_dir)
    factory = LoraFactory(tiny_random_pipeline_dir, text_encoder=True)
    env.publish("lora-a", "LORA", {LORA_WEIGHTS_FILE: factory.write(tmp / "lora-a", seed=0)})
    ti = write_textual_inversion(tmp / "ti-a", TOKEN, dim=64, seed=10, num_vectors=2)
    env.publish("ti-a", "TEXTUAL_INVERSION", {TI_EMBEDS_FILE: ti}, trigger_tokens=[TOKEN])
    env.publish("db", "DREAMBOOTH", write_dreambooth(tiny_random_pipeline_dir, tmp / "db", seed=3, text_encoder=True))
    yield env
    env.close()


ADAPTERS: dict[str, list[tuple[str, float]]] = {
    "lora+ti": [("lora-a", 0.8), ("ti-a", 1.0)],
    "dreambooth+lora+ti": [("db", 1.0), ("lora-a", 0.8), ("ti-a", 1.0)],
}


def reference(env: InferenceEnv, mode: str, adapters: list[tuple[str, float]], strength: float,
              num_images: int = 1, init: bytes = INIT, seed: int = SEED, prompt: str = PROMPT) -> list[np.ndarray]:
    """The same generation with nothing but diffusers."""
    names = dict(adapters)
    loaded: dict[str, Any] = {}
    if "lora-a" in names:
        loaded["lora"] = (env.files["lora-a"][LORA_WEIGHTS_FILE], names["lora-a"])
    if "ti-a" in names:
        loaded["ti"] = (env.files["ti-a"][TI_EMBEDS_FILE], TOKEN)
    if "db" in names:
        loaded["dreambooth"] = env.files["db"]["unet/config.json"].parent.parent
    cls = StableDiffusionImg2ImgPipeline if mode == "img2img" else StableDiffusionInpaintPipeline
    pipe = reference_pipeline(env.pipeline_dir, cls=cls, **loaded)
    kwargs: dict[str, Any] = {"image": Image.open(io.BytesIO(init)), "strength": strength}
    if mode == "inpaint":
        kwargs |= {"mask_image": Image.open(io.BytesIO(MASK)), "height": SIZE, "width": SIZE}
    generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
    with torch.no_grad():
        out = pipe(prompt, num_inference_steps=STEPS, num_images_per_prompt=num_images, generator=generators,
                   **kwargs).images
    return [np.asarray(image).astype(np.int16) for image in out]


def ours(env: InferenceEnv, mode: str, adapters: list[tuple[str, float]], strength: float | None,
         **kw: Any) -> inference_pb2.GenerateResponse:
    extra: dict[str, Any] = {"init_image": kw.pop("init", INIT)}
    if strength is not None:
        extra["strength"] = strength
    if mode == "inpaint":
        extra["mask_image"] = MASK
    return env.generate(prompt=kw.pop("prompt", PROMPT), adapters=adapters, seed=kw.pop("seed", SEED),
                        steps=STEPS, **extra, **kw)


@pytest.mark.parametrize("mix", list(ADAPTERS))
def test_img2img_with_mixed_adapters_equals_diffusers(env: InferenceEnv, mix: str) -> None:
    response = ours(env, "img2img", ADAPTERS[mix], 0.6, num_images=2)
    got = [pixels(image.png) for image in response.images]
    expected = reference(env, "img2img", ADAPTERS[mix], 0.6, num_images=2)
    assert [np.abs(a - b).max() for a, b in zip(got, expected, strict=True)] == [0, 0]
    assert [(i.seed, i.width, i.height) for i in response.images] == [(SEED, SIZE, SIZE), (SEED + 1, SIZE, SIZE)]
    # The adapters and the init image both did something.
    assert not np.array_equal(got[0], reference(env, "img2img", [], 0.6)[0])
    assert not np.array_equal(got[0], pixels(ours(env, "img2img", ADAPTERS[mix], 0.6,
                                                  init=init_png(seed=9)).images[0].png))


@pytest.mark.parametrize("mix", list(ADAPTERS))
def test_inpainting_with_mixed_adapters_equals_diffusers(env: InferenceEnv, mix: str) -> None:
    for strength in (None, 0.75):  # unset: 1.0, diffusers' default for inpainting
        got = pixels(ours(env, "inpaint", ADAPTERS[mix], strength).images[0].png)
        expected = reference(env, "inpaint", ADAPTERS[mix], 1.0 if strength is None else strength)[0]
        assert np.abs(got - expected).max() == 0
    plain_img2img = pixels(ours(env, "img2img", ADAPTERS[mix], 0.75).images[0].png)
    assert not np.array_equal(got, plain_img2img)  # the mask took part


def test_img2img_default_strength_is_diffusers_default(env: InferenceEnv) -> None:
    got = pixels(ours(env, "img2img", [], None).images[0].png)
    assert np.abs(got - reference(env, "img2img", [], 0.8)[0]).max() == 0


def test_batches_only_with_compatible_requests_and_stays_byte_identical(env: InferenceEnv) -> None:
    adapters = [("lora-a", 0.5)]
    jobs: list[dict[str, Any]] = [
        {"mode": "img2img", "strength": 0.6, "init": init_png(1), "seed": 5, "prompt": "a red box"},
        {"mode": "img2img", "strength": 0.6, "init": init_png(2), "seed": 6, "prompt": "a blue cat", "num_images": 2},
        {"mode": "img2img", "strength": 0.6, "init": init_png(3), "seed": 7, "prompt": "a green toy"},
        {"mode": "img2img", "strength": 0.4, "init": init_png(4), "seed": 8, "prompt": "a photo"},
        {"mode": "inpaint", "strength": 0.6, "init": init_png(5), "seed": 9, "prompt": "a photo"},
    ]

    def run(job: dict[str, Any]) -> inference_pb2.GenerateResponse:
        job = dict(job)
        return ours(env, job.pop("mode"), adapters, job.pop("strength"), **job)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(run, jobs))
    assert max(r.batch_size for r in batched[:3]) > 1
    assert [r.batch_size for r in batched[3:]] == [1, 1]  # other strength, other mode: alone
    for job, together in zip(jobs, batched, strict=True):
        alone = run(job)
        assert alone.batch_size == 1
        assert [i.png for i in together.images] == [i.png for i in alone.images]


def test_stream_reports_the_strength_adjusted_steps(env: InferenceEnv) -> None:
    request = inference_pb2.GenerateStreamRequest(spec=spec(prompt=PROMPT, seed=SEED, steps=STEPS,
                                                            init_image=INIT, strength=0.6))
    events = list(env.stub.GenerateStream(request, timeout=60))
    denoising = [e.progress for e in events if e.HasField("progress") and e.progress.stage == "denoising"]
    assert denoising and [p.step for p in denoising] == list(range(1, denoising[0].total_steps + 1))
    assert denoising[0].total_steps < STEPS  # int(5 * 0.6) = 3 steps (+1 for PNDM's warm-up)
    assert events[-1].result.images[0].png == ours(env, "img2img", [], 0.6).images[0].png


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height with almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))
            + chunk(b"IEND", b""))


NOISE = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("garbage", {"init_image": b"not an image at all"}, "spec.init_image", "not a PNG"),
    ("bomb", {"init_image": png_header_only(30_000, 30_000)}, "spec.init_image", "decompression bomb"),
    ("over max_image_side squared", {"init_image": png_header_only(300, 300)}, "spec.init_image", "bomb guard"),
    ("truncated", {"init_image": png(NOISE)[:400], "width": 64, "height": 64}, "spec.init_image", "truncated"),
    ("gif", {"init_image": png(NOISE, "GIF")}, "spec.init_image", "not a PNG"),
    ("side not multiple of 8", {"init_image": init_png(size=(36, 32)), "width": 0}, "spec.init_image", "multiple"),
    ("side above limit", {"init_image": init_png(size=(264, 8)), "width": 0, "height": 0}, "spec.init_image",
     "at most"),
    ("width differs", {"init_image": INIT, "width": 64}, "spec.width", "equal the init image"),
    ("mask without init", {"mask_image": MASK}, "spec.mask_image", "needs spec.init_image"),
    ("mask size differs", {"init_image": INIT, "mask_image": mask_png(64)}, "spec.mask_image", "does not match"),
    ("mask garbage", {"init_image": INIT, "mask_image": b"\x89PNG nope"}, "spec.mask_image", "not a PNG"),
    ("strength zero", {"init_image": INIT, "strength": 0.0}, "spec.strength", "(0, 1]"),
    ("strength above 1", {"init_image": INIT, "strength": 1.5}, "spec.strength", "(0, 1]"),
    ("strength nan", {"init_image": INIT, "strength": math.nan}, "spec.strength", "(0, 1]"),
    ("strength without init", {"strength": 0.5}, "spec.strength", "only meaningful"),
    ("strength leaves no step", {"init_image": INIT, "strength": 0.2, "steps": 3}, "spec.strength", "no denoising"),
]


@pytest.mark.parametrize(("case", "kw", "field", "text"), CASES, ids=[c[0] for c in CASES])
def test_bad_init_image_mask_or_strength_is_invalid_argument(env: InferenceEnv, case: str, kw: dict[str, Any],
                                                             field: str, text: str) -> None:
    err = rpc_error(lambda: env.generate(**kw))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in details(err)["fields"], (case, details(err))
    assert text in (err.details() or ""), err.details()


def test_init_image_errors_are_reported_with_the_others(env: InferenceEnv) -> None:
    err = rpc_error(lambda: env.generate(prompt=" ", init_image=b"junk", strength=2.0))
    assert {"spec.prompt", "spec.init_image", "spec.strength"} <= set(details(err)["fields"])


def test_jpeg_and_rgba_init_images_are_accepted(env: InferenceEnv) -> None:
    rgba = np.dstack([pixels(INIT).astype(np.uint8), np.full((SIZE, SIZE), 128, np.uint8)])
    for data in (png(pixels(INIT).astype(np.uint8), "JPEG"), png(rgba)):
        response = env.generate(prompt="a red box", init_image=data, strength=0.6, steps=STEPS, width=0, height=0)
        assert (response.images[0].width, response.images[0].height) == (SIZE, SIZE)


def test_sdk_and_cli_send_init_image_strength_and_mask(env: InferenceEnv, tmp_path: Path) -> None:
    expected = pixels(ours(env, "inpaint", ADAPTERS["lora+ti"], 0.75).images[0].png)
    (tmp_path / "init.png").write_bytes(INIT)
    (tmp_path / "mask.png").write_bytes(MASK)
    with Client(env.server.target, inference_target=env.server.target) as client:
        result = client.generate(PROMPT, base_model=BASE, adapters=["lora-a=0.8", "ti-a=1"], seed=SEED,
                                 steps=STEPS, init_image=Image.open(io.BytesIO(INIT)), strength=0.75,
                                 mask_image=tmp_path / "mask.png")
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")).astype(np.int16), expected)
    assert result.safety_flagged == [False]
    common = ["--inference-target", env.server.target, "generate", PROMPT, "--base", BASE, "--adapter", "lora-a=0.8",
              "--adapter", "ti-a=1", "--seed", str(SEED), "--steps", str(STEPS)]
    out = tmp_path / "out.png"
    ran = CliRunner().invoke(app, [*common, "--init-image", str(tmp_path / "init.png"), "--strength", "0.75",
                                   "--mask", str(tmp_path / "mask.png"), "-o", str(out)])
    assert ran.exit_code == 0, ran.output
    assert np.array_equal(pixels(out.read_bytes()), expected)
    refused = CliRunner().invoke(app, [*common, "--mask", str(tmp_path / "mask.png"), "-o", str(out)])
    assert refused.exit_code == 2 and "spec.mask_image" in refused.output, refused.output
