"""Pure builders from Python arguments to request protos, shared by Client and AsyncClient."""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from atelier import ids
from atelier.refs import WeightedAdapterLike, to_adapter_weights
from atelier.train_choices import set_lr_scheduler, set_optimizer
from atelier_api.v1 import common_pb2, inference_pb2, training_pb2

METHODS: dict[str, int] = {
    "lora": common_pb2.ADAPTER_KIND_LORA,
    "dreambooth": common_pb2.ADAPTER_KIND_DREAMBOOTH,
    "textual-inversion": common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION,
    "textual_inversion": common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION,
    "ti": common_pb2.ADAPTER_KIND_TEXTUAL_INVERSION,
}

SCHEDULERS: dict[str, int] = {
    "": inference_pb2.SCHEDULER_KIND_UNSPECIFIED,
    "ddim": inference_pb2.SCHEDULER_KIND_DDIM,
    "euler": inference_pb2.SCHEDULER_KIND_EULER,
    "euler-ancestral": inference_pb2.SCHEDULER_KIND_EULER_ANCESTRAL,
    "dpm-solver": inference_pb2.SCHEDULER_KIND_DPM_SOLVER_MULTISTEP,
    "pndm": inference_pb2.SCHEDULER_KIND_PNDM,
    "lms": inference_pb2.SCHEDULER_KIND_LMS,
}

PRECISIONS: dict[str, int] = {
    "no": training_pb2.MIXED_PRECISION_NO,
    "fp16": training_pb2.MIXED_PRECISION_FP16,
    "bf16": training_pb2.MIXED_PRECISION_BF16,
}

CHUNK_BYTES = 1024 * 1024

ImageInput = str | Path | bytes | Image.Image


def image_bytes(item: ImageInput) -> tuple[str, bytes]:
    """(filename, encoded bytes) for a path, raw bytes or a PIL image (sent as PNG)."""
    if isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return "image.png", buffer.getvalue()
    if isinstance(item, bytes):
        return "image", item
    path = Path(item)
    return path.name, path.read_bytes()


def upload_messages(
    images: Sequence[ImageInput], captions: Sequence[str] | Mapping[int, str] | None, name: str
) -> Iterator[training_pb2.UploadDatasetRequest]:
    """Header, then each image in chunks of at most CHUNK_BYTES (same index = same image)."""
    yield training_pb2.UploadDatasetRequest(header=training_pb2.DatasetHeader(name=name))
    for index, item in enumerate(images):
        filename, data = image_bytes(item)
        caption = _caption_for(captions, index)
        for start in range(0, max(len(data), 1), CHUNK_BYTES):
            chunk = training_pb2.DatasetImageChunk(
                index=index, filename=filename, caption=caption, data=data[start : start + CHUNK_BYTES]
            )
            yield training_pb2.UploadDatasetRequest(image=chunk)


def _caption_for(captions: Sequence[str] | Mapping[int, str] | None, index: int) -> str:
    if captions is None:
        return ""
    if isinstance(captions, Mapping):
        return captions.get(index, "")
    return captions[index] if index < len(captions) else ""


_HYPERPARAMETER_FIELDS = {f.name for f in training_pb2.Hyperparameters.DESCRIPTOR.fields}
_LORA_FIELDS = {"rank", "alpha", "dropout", "target_modules", "text_encoder_target_modules", "use_dora",
                "conv_rank", "conv_alpha"}


@dataclass
class TrainArgs:
    """Everything `Client.train` accepts besides hyper-parameters."""

    method: str
    base_model: str
    dataset: str | common_pb2.Dataset  # the id, or the Dataset upload_dataset returned
    name: str
    instance_prompt: str = ""
    alias: str = ""
    description: str = ""
    placeholder_token: str = ""
    initializer_token: str = ""
    num_vectors: int | None = None
    class_prompt: str = ""
    prior_preservation_weight: float | None = None
    num_class_images: int | None = None
    webhook_url: str = ""  # signed POST on SUCCEEDED/FAILED/CANCELLED (needs webhook_secret)
    webhook_secret: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def training_request(args: TrainArgs, request_id: str | None) -> training_pb2.CreateTrainingJobRequest:
    """Build CreateTrainingJobRequest; unknown keyword arguments are a TypeError, not ignored."""
    if args.method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {args.method!r}")
    spec = training_pb2.TrainingJobSpec(
        method=METHODS[args.method], base_model=ids.text(args.base_model, "base_model"),  # type: ignore[arg-type]
        dataset_id=ids.dataset_id(args.dataset), output_name=ids.text(args.name, "name"),
        instance_prompt=args.instance_prompt, output_alias=args.alias,
        description=args.description,
    )
    if args.placeholder_token or args.initializer_token:
        spec.textual_inversion.placeholder_token = args.placeholder_token
        spec.textual_inversion.initializer_token = args.initializer_token
        if args.num_vectors is not None:
            spec.textual_inversion.num_vectors = args.num_vectors
    if args.class_prompt:
        _set_prior(spec.prior_preservation, args)
    _set_fields(spec, args.extra)
    return training_pb2.CreateTrainingJobRequest(request_id=request_id or uuid.uuid4().hex, spec=spec,
                                                 webhook_url=args.webhook_url, webhook_secret=args.webhook_secret)


def _set_prior(prior: training_pb2.PriorPreservation, args: TrainArgs) -> None:
    prior.enabled = True
    prior.class_prompt = args.class_prompt
    if args.prior_preservation_weight is not None:
        prior.weight = args.prior_preservation_weight
    if args.num_class_images is not None:
        prior.num_class_images = args.num_class_images


def _set_fields(spec: training_pb2.TrainingJobSpec, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if value is None:
            continue
        target: Any
        if key.removeprefix("lora_") in _LORA_FIELDS:
            target, key = spec.lora, key.removeprefix("lora_")
        elif key in _HYPERPARAMETER_FIELDS:
            target = spec.hyperparameters
        else:
            raise TypeError(f"unknown training option {key!r}")
        if key == "mixed_precision" and isinstance(value, str):
            value = PRECISIONS[value]
        if key == "optimizer":
            set_optimizer(spec.hyperparameters, value)
            continue
        if key in ("lr_scheduler", "lr_scheduler_kind"):
            set_lr_scheduler(spec.hyperparameters, key, value)
            continue
        if isinstance(value, list | tuple):
            getattr(target, key).extend(value)
        else:
            setattr(target, key, value)


def generation_spec(
    prompt: str,
    *,
    base_model: str,
    adapters: list[WeightedAdapterLike] | None = None,
    negative_prompt: str = "",
    num_images: int = 1,
    steps: int = 0,
    guidance_scale: float = 0.0,
    width: int = 0,
    height: int = 0,
    seed: int | None = None,
    scheduler: str = "",
    init_image: ImageInput | None = None,
    strength: float | None = None,
    mask_image: ImageInput | None = None,
) -> inference_pb2.GenerationSpec:
    """0 for steps/guidance/size means the server's default for the base model.

    img2img: `init_image` (path, bytes or PIL image; its size is the output size) and `strength`
    in (0, 1] (None: the server's default). Inpainting: also `mask_image`, white = repaint.
    """
    spec = inference_pb2.GenerationSpec(
        base_model=base_model, prompt=prompt, negative_prompt=negative_prompt,
        adapters=to_adapter_weights(adapters), num_images=num_images, steps=steps,
        guidance_scale=guidance_scale, width=width, height=height,
        scheduler=SCHEDULERS[scheduler],  # type: ignore[arg-type]
    )
    if seed is not None:
        spec.seed = seed
    if init_image is not None:
        spec.init_image = image_bytes(init_image)[1]
    if mask_image is not None:
        spec.mask_image = image_bytes(mask_image)[1]
    if strength is not None:
        spec.strength = strength
    return spec


@dataclass
class GenerationResult:
    """Decoded images plus everything needed to reproduce them."""

    images: list[Image.Image]
    seeds: list[int]
    adapters: list[inference_pb2.ResolvedAdapter]
    timings: inference_pb2.Timings
    raw: inference_pb2.GenerateResponse
    # Per image: the server's safety hook replaced it with a black image.
    safety_flagged: list[bool] = field(default_factory=list)

    @classmethod
    def from_proto(cls, response: inference_pb2.GenerateResponse) -> GenerationResult:
        images: list[Image.Image] = [Image.open(io.BytesIO(image.png)) for image in response.images]
        for image in images:
            image.load()
        return cls(
            images=images, seeds=[image.seed for image in response.images],
            adapters=list(response.adapters), timings=response.timings, raw=response,
            safety_flagged=[image.safety_flagged for image in response.images],
        )
