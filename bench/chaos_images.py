"""R6 hostile images: crafted files sent as a dataset image (UploadDataset) and as Generate's
init_image / mask_image.

Each image has an expected verdict. "refuse": INVALID_ARGUMENT whose BadRequest names the
image's field (images[0], spec.init_image, spec.mask_image). "accept": the call succeeds
(CMYK and 16-bit greyscale are converted, see services/common/images.convert_pixels; an
animated PNG/WebP uses its first frame; EXIF and trailing bytes after the image are ignored).
Either way the server stays SERVING and a refused upload stores nothing; a dataset of all the
accepted images trains (2 steps) to SUCCEEDED.
"""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from PIL import Image

from atelier_api.v1 import common_pb2, inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc

SIDE = 64


def _gradient(mode: str = "RGB", side: int = SIDE) -> Image.Image:
    return Image.linear_gradient("L").resize((side, side)).convert(mode)


def _save(img: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **options)
    return out.getvalue()


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_bomb(side: int = 60_000) -> bytes:
    """A PNG header claiming side x side greyscale pixels over a few KB of zlib'd zeros: decoding
    it would need side^2 bytes (3.6 GB at 60000)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    rows = zlib.compressobj(9)
    data = rows.compress(b"\0" * (side + 1) * 64) + rows.flush()
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def sixteen_bit_png() -> bytes:
    import numpy as np

    samples = (np.linspace(0, 65535, SIDE * SIDE).reshape(SIDE, SIDE)).astype(np.uint16)
    return _save(Image.fromarray(samples), "PNG")


def animated(fmt: str) -> bytes:
    frames = [_gradient().rotate(angle) for angle in (0, 90, 180)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def huge_exif() -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: 60 KB of metadata on a 64 px picture
    return _save(_gradient(), "JPEG", exif=exif.tobytes())


def polyglot() -> bytes:
    """A valid PNG with a ZIP archive (and an HTML script) appended: both parsers accept it."""
    archive = io.BytesIO()
    import zipfile

    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("payload.html", "<script>alert(1)</script>")
    return _save(_gradient(), "PNG") + archive.getvalue()


def hostile_images() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, "refuse" | "accept")."""
    valid = _save(_gradient(), "PNG")
    return {
        "bomb": (png_bomb(), "refuse"),
        "truncated": (valid[: len(valid) // 2], "refuse"),
        "zero-size": (b"", "refuse"),
        "not-an-image": (b"GIF89a" + b"\0" * 64, "refuse"),
        "animated-gif": (animated("GIF"), "refuse"),  # GIF is not an accepted format at all
        "tiff": (_save(_gradient(), "TIFF"), "refuse"),
        "cmyk-jpeg": (_save(_gradient("CMYK"), "JPEG"), "accept"),
        "16-bit-png": (sixteen_bit_png(), "accept"),
        "apng": (animated("PNG"), "accept"),
        "animated-webp": (animated("WEBP"), "accept"),
        "huge-exif": (huge_exif(), "accept"),
        "polyglot-png-zip": (polyglot(), "accept"),
    }


@dataclass
class ImageVerdict:
    image: str
    target: str
    expected: str
    code: str
    fields: list[str]
    ok: bool


def violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    fields: list[str] = []
    for detail in status.details if status else []:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            fields += [v.field for v in bad.field_violations]
    return fields


def _judge(image: str, target: str, expected: str, field: str, call: Callable[[], object],
           snapshot: Callable[[], object]) -> ImageVerdict:
    before = snapshot()
    try:
        call()
        code, fields = "OK", []
    except grpc.RpcError as error:
        code, fields = error.code().name, violations(error)
    if expected == "accept":
        ok = code == "OK"
    else:
        ok = code == "INVALID_ARGUMENT" and any(f.startswith(field) for f in fields) and snapshot() == before
    return ImageVerdict(image, target, expected, code, fields, ok)


def train_on_accepted(training_channel: grpc.Channel, metadata: tuple[tuple[str, str], ...], base_model: str,
                      timeout_s: float = 180.0) -> tuple[str, str]:
    """Upload every image the API accepts as one dataset and train 2 steps on it: accepted
    must also mean usable. Returns the job's final state name and error."""
    training = training_pb2_grpc.TrainingServiceStub(training_channel)
    accepted = [data for data, verdict in hostile_images().values() if verdict == "accept"]
    upload = [training_pb2.UploadDatasetRequest(header=training_pb2.DatasetHeader(name="benign"))]
    upload += [training_pb2.UploadDatasetRequest(image=training_pb2.DatasetImageChunk(
        index=i, filename=f"{i}.img", caption="a photo of sks", data=data)) for i, data in enumerate(accepted)]
    dataset = training.UploadDataset(iter(upload), metadata=metadata, timeout=60).dataset
    spec = training_pb2.TrainingJobSpec(
        method=common_pb2.ADAPTER_KIND_LORA, base_model=base_model, dataset_id=dataset.id, output_name="benign",
        instance_prompt="a photo of sks", hyperparameters=training_pb2.Hyperparameters(max_train_steps=2,
                                                                                       resolution=32))
    job = training.CreateTrainingJob(training_pb2.CreateTrainingJobRequest(spec=spec), metadata=metadata,
                                     timeout=30).job
    deadline = time.monotonic() + timeout_s
    final = (training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED)
    while job.state not in final and time.monotonic() < deadline:
        time.sleep(0.3)
        job = training.GetTrainingJob(training_pb2.GetTrainingJobRequest(id=job.id), metadata=metadata,
                                      timeout=30).job
    return training_pb2.JobState.Name(job.state), job.error


def probe_images(training_channel: grpc.Channel, inference_channel: grpc.Channel,
                 metadata: tuple[tuple[str, str], ...], base_model: str,
                 snapshot: Callable[[], object]) -> list[ImageVerdict]:
    """Every hostile image to UploadDataset, Generate.init_image and Generate.mask_image."""
    training = training_pb2_grpc.TrainingServiceStub(training_channel)
    inference = inference_pb2_grpc.InferenceServiceStub(inference_channel)
    plain = _save(_gradient(), "PNG")
    verdicts: list[ImageVerdict] = []
    for name, (data, expected) in hostile_images().items():
        upload = [training_pb2.UploadDatasetRequest(header=training_pb2.DatasetHeader(name="hostile")),
                  training_pb2.UploadDatasetRequest(image=training_pb2.DatasetImageChunk(
                      index=0, filename="x.png", caption="a photo", data=data))]
        verdicts.append(_judge(name, "UploadDataset", expected, "images[0]", lambda u=upload: training.UploadDataset(
            iter(u), metadata=metadata, timeout=60), snapshot))
        for field, init, mask in (("spec.init_image", data, b""), ("spec.mask_image", plain, data)):
            spec = inference_pb2.GenerationSpec(base_model=base_model, prompt="a photo", steps=2, width=SIDE,
                                                height=SIDE, seed=1, init_image=init, mask_image=mask, strength=0.5)
            if not data:
                continue  # empty bytes are proto3's "not set": no init image / no mask, not a hostile file
            verdicts.append(_judge(name, f"Generate {field}", expected, field, lambda s=spec: inference.Generate(
                inference_pb2.GenerateRequest(spec=s), metadata=metadata, timeout=120), snapshot))
    return verdicts
