"""The trainers' shared core: image views, sampling order, loss weighting, checkpoint format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from services.training.trainers import checkpoint as ckpt
from services.training.trainers.data import build_views, crop_offsets, resize_short_side, sample_indices
from services.training.trainers.loss import diffusion_loss, min_snr_weights
from services.training.trainers.noise import NoiseSchedule


def _image(path: Path, w: int, h: int, colour: tuple[int, int, int] = (200, 10, 10)) -> Path:
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = colour  # left half coloured: a flip is visible
    Image.fromarray(arr).save(path)
    return path


def test_resize_short_side_then_crop_positions() -> None:
    img = resize_short_side(Image.new("RGB", (200, 100)), 32)
    assert img.size == (64, 32)
    assert crop_offsets(64, 32, center=True) == [16]
    offsets = crop_offsets(64, 32, center=False)
    assert offsets[0] == 0 and offsets[-1] == 32 and len(offsets) <= 8
    assert crop_offsets(32, 32, center=False) == [0]


def test_views_cover_crops_and_flips_and_are_normalised(tmp_path: Path) -> None:
    paths = [_image(tmp_path / "a.png", 64, 64), _image(tmp_path / "b.png", 96, 64)]
    vs = build_views(paths, 32, center_crop=False, random_flip=True)
    assert len(vs.by_image[0]) == 2  # square: one crop, two flips
    assert len(vs.by_image[1]) > 2  # wide: several crops
    assert vs.pixels.shape[1:] == (3, 32, 32)
    assert vs.pixels.min() >= -1.0 and vs.pixels.max() <= 1.0
    plain, flipped = vs.pixels[vs.by_image[0][0]], vs.pixels[vs.by_image[0][1]]
    np.testing.assert_allclose(flipped, plain[:, :, ::-1])


def test_sampling_is_a_reproducible_shuffle_per_epoch() -> None:
    first = sample_indices(5, 4, 4, 0)
    assert sorted(first) == [0, 1, 2, 3]  # one epoch sees every image once
    assert sample_indices(5, 4, 8, 0)[4:] == sample_indices(5, 4, 4, 4)  # position alone decides
    assert sample_indices(5, 4, 4, 0) == first


def _schedule(prediction_type: str = "epsilon") -> NoiseSchedule:
    return NoiseSchedule(DDPMScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type))


def test_min_snr_weights_match_the_paper() -> None:
    s = _schedule()
    t = torch.tensor([10, 500, 990])
    snr = s.snr(t)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    torch.testing.assert_close(min_snr_weights(s, t, 5.0), expected)
    v = _schedule("v_prediction")
    torch.testing.assert_close(min_snr_weights(v, t, 5.0), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))
    assert float(min_snr_weights(s, t, 5.0)[0]) < 1.0  # low-noise steps are down-weighted


def test_prior_preservation_loss_is_added_with_its_weight() -> None:
    s = _schedule()
    pred = torch.zeros(4, 4, 2, 2)
    target = torch.cat([torch.ones(2, 4, 2, 2), 2 * torch.ones(2, 4, 2, 2)])
    t = torch.tensor([1, 2, 3, 4])
    total, prior = diffusion_loss(pred, target, t, s, num_prior=2, prior_weight=0.5)
    assert prior is not None and float(prior) == pytest.approx(4.0)
    assert float(total) == pytest.approx(1.0 + 0.5 * 4.0)
    plain, none = diffusion_loss(pred, target, t, s)
    assert none is None and float(plain) == pytest.approx(2.5)


def test_noise_draws_depend_only_on_the_generator() -> None:
    s = _schedule()
    a = s.draw((2, 4, 8, 8), torch.Generator().manual_seed(3), noise_offset=0.1)
    b = s.draw((2, 4, 8, 8), torch.Generator().manual_seed(3), noise_offset=0.1)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[1], b[1])


def test_checkpoint_round_trips_optimizer_scheduler_and_rng_without_pickle(tmp_path: Path) -> None:
    from diffusers.optimization import get_scheduler

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 3))
    opt = torch.optim.AdamW([w], lr=1e-2, weight_decay=0.01)
    sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=10)
    for _ in range(3):
        (w**2).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    ckpt.save_state(tmp_path, step=3, trainable={"w": w}, optimizer=opt, lr_scheduler=sched, scaler=None, extra={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]
    json.loads((tmp_path / "state.json").read_text())
    expected_rand = torch.rand(3)

    state = ckpt.load_state(tmp_path)
    w2 = torch.nn.Parameter(state.trainable["w"].clone())
    opt2 = torch.optim.AdamW([w2], lr=1e-2, weight_decay=0.01)
    sched2 = get_scheduler("linear", opt2, num_warmup_steps=1, num_training_steps=10)
    opt2.load_state_dict(state.optimizer)
    sched2.load_state_dict(state.lr_scheduler)
    ckpt.rng_restore(state.rng_tensors, state.rng_meta)
    assert state.step == 3
    torch.testing.assert_close(torch.rand(3), expected_rand)
    for p, o, s in ((w, opt, sched), (w2, opt2, sched2)):
        (p**2).sum().backward()
        o.step()
        s.step()
    torch.testing.assert_close(w2, w)
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_incomplete_checkpoint_is_refused(tmp_path: Path) -> None:
    from services.common.errors import FailedPrecondition

    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(FailedPrecondition):
        ckpt.load_state(tmp_path)
