"""Per-step batches from the caches: pure functions of (seed, step, micro-batch).

Nothing here keeps an iterator position or a random stream between steps, which is what
makes resume exact: step N's batch is the same whether the process ran steps 0..N-1 or just
loaded a checkpoint taken at step N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.training.trainers.cache import Conditioning, LatentCache, TextCache
from services.training.trainers.captions import CAPTION_STREAM, CaptionBuilder
from services.training.trainers.config import TrainConfig
from services.training.trainers.data import ViewSet, choose_views, sample_indices, step_rng
from services.training.trainers.models import Components

CLASS_STREAM = 0x5EED


class PromptEncoder:
    """Prompt conditioning (the family's dict of tensors): cached when the text encoders are
    frozen, computed live when one trains.

    With `open_ended` (shuffled tags: too many orders to keep) only warmed prompts are cached
    and any other prompt is encoded on the fly, so memory stays bounded by the dataset.
    """

    def __init__(self, comps: Components, cached: bool, open_ended: bool = False) -> None:
        self.comps = comps
        self.cache = TextCache(self._encode) if cached else None
        self.open_ended = open_ended

    def _encode(self, prompts: list[str]) -> Conditioning:
        with self.comps.autocast():
            return {k: v.float() for k, v in self.comps.encode_prompts(prompts).items()}

    def warm(self, prompts: list[str]) -> None:
        if self.cache is not None:
            self.cache.warm(prompts)

    def __call__(self, prompts: list[str]) -> Conditioning:
        if self.cache is None or (self.open_ended and not all(p in self.cache for p in prompts)):
            return self._encode(prompts)
        return self.cache(prompts)


@dataclass
class Batch:
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    embeddings: Conditioning  # the family's conditioning, batch first
    num_prior: int


@dataclass
class MicroBatchSampler:
    """Draws instance (and class) samples, their latents, noise and timesteps for one micro-batch."""

    config: TrainConfig
    instance: ViewSet
    instance_cache: LatentCache
    instance_prompts: list[str]
    klass: ViewSet | None
    class_cache: LatentCache | None
    class_prompts: list[str]
    encoder: PromptEncoder
    captions: CaptionBuilder | None = None  # per-step prompt variants; None: the fixed prompts

    def batch(self, step: int, micro: int) -> Batch:
        c = self.config
        comps = self.encoder.comps
        size = c.train_batch_size
        position = (step * c.gradient_accumulation_steps + micro) * size
        rng = step_rng(c.seed, step, micro, 0)
        images = sample_indices(c.seed, len(self.instance_prompts), size, position)
        views = choose_views(self.instance, images, rng)
        prompts = self._prompts(step, micro, images)
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        latents = self.instance_cache.sample(views, self._eps(self.instance_cache, len(views), generator))
        num_prior = 0
        if self.klass is not None and self.class_cache is not None:
            picks = sample_indices(c.seed + CLASS_STREAM, len(self.class_prompts), size, position)
            class_views = choose_views(self.klass, picks, rng)
            class_latents = self.class_cache.sample(class_views, self._eps(self.class_cache, size, generator))
            latents = torch.cat([latents, class_latents])
            prompts += [self.class_prompts[i] for i in picks]
            num_prior = size
        noise, timesteps = comps.schedule.draw(tuple(latents.shape), generator, c.noise_offset)
        noise, timesteps = noise.to(comps.device), timesteps.to(comps.device)
        return Batch(
            noisy=comps.schedule.add_noise(latents, noise, timesteps),
            timesteps=timesteps,
            target=comps.schedule.target(latents, noise, timesteps),
            embeddings=self.encoder(prompts),
            num_prior=num_prior,
        )

    def _prompts(self, step: int, micro: int, images: list[int]) -> list[str]:
        if self.captions is None or not self.captions.varies:
            return [self.instance_prompts[i] for i in images]
        return self.captions.for_batch(images, step_rng(self.config.seed, step, micro, CAPTION_STREAM))

    @staticmethod
    def _eps(cache: LatentCache, count: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((count, *cache.latent_shape), generator=generator)

    def eval_views(self) -> list[int]:
        """The first view of every instance image (the centre crop when centre-cropping)."""
        return [views[0] for views in self.instance.by_image]

    @torch.no_grad()
    def eval_embeddings(self) -> Conditioning:
        return self.encoder(self.instance_prompts)
