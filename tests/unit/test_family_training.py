"""The per-family training cores: Flux's flow-matching objective (sigma draws, x_t and target),
latent packing, and the conditioning each family hands its denoiser (on the tiny pipelines)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from services.families import FLUX, SD1, SDXL
from services.families.flux import training as flux
from services.training.trainers.models import load_components


def _flow(**config: object) -> flux.FlowMatchingSchedule:
    return flux.make_schedule(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config).config)


def test_sigmas_are_a_pure_function_of_the_generator_and_cover_the_training_range() -> None:
    schedule = _flow(shift=3.0, use_dynamic_shifting=True)
    draws = [schedule.draw((256, 4, 2, 2), torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    (noise_a, sig_a), (noise_b, sig_b), (_, sig_c) = draws
    assert torch.equal(noise_a, noise_b) and torch.equal(sig_a, sig_b)  # resume draws the same batch
    assert not torch.equal(sig_a, sig_c)
    assert sig_a.dtype == torch.float32 and float(sig_a.min()) > 0 and float(sig_a.max()) <= 1
    assert set(sig_a.tolist()) <= set(schedule.sigmas.tolist())  # the scheduler's training sigmas
    # uniform over them: with dynamic shifting the table is linear, so the mean is about 0.5
    assert abs(float(sig_a.mean()) - 0.5) < 0.08


def test_static_shift_is_applied_to_the_sigma_table_like_the_scheduler() -> None:
    plain, shifted = _flow(shift=1.0), _flow(shift=3.0)
    assert torch.allclose(shifted.sigmas, 3 * plain.sigmas / (1 + 2 * plain.sigmas))


def test_x_t_interpolates_clean_and_noise_and_the_target_is_their_difference() -> None:
    schedule = _flow()
    x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    x_t = schedule.add_noise(x0, noise, sigmas)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], noise[2])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(schedule.target(x0, noise, sigmas), noise - x0)
    # one Euler step of the scheduler along the target from x_t lands on x0 (sigma -> 0)
    torch.testing.assert_close(x_t[1] + (0.0 - 0.25) * (noise[1] - x0[1]), x0[1])
    assert torch.equal(schedule.fixed(450, 2, torch.device("cpu")), torch.tensor([0.45, 0.45]))
    with pytest.raises(ValueError, match="min-SNR"):
        schedule.snr(sigmas)


def test_pack_and_unpack_are_inverse_and_match_the_pipeline_layout() -> None:
    latents = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).view(2, 4, 4, 6)
    tokens = flux.pack(latents)
    assert tokens.shape == (2, 2 * 3, 16)
    assert torch.equal(flux.unpack(tokens, 4, 4, 6), latents)
    # token 0 holds the top-left 2x2 patch of every channel, channel-major (FluxPipeline's order)
    assert torch.equal(tokens[0, 0, :4], latents[0, 0, :2, :2].reshape(-1))


@pytest.mark.parametrize("name", ["sd1", "sdxl", "flux"])
def test_each_family_conditions_and_runs_its_denoiser(tiny_family_dirs: dict[str, Path], name: str) -> None:
    torch.set_num_threads(1)
    comps = load_components(tiny_family_dirs[name], "cpu", "no")
    assert comps.family is {"sd1": SD1, "sdxl": SDXL, "flux": FLUX}[name]
    with torch.no_grad():
        cond = comps.encode_prompts(["a photo of a toy", "a dog"])
        assert all(v.shape[0] == 2 for v in cond.values())
        latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        noise, timesteps = comps.schedule.draw(tuple(latents.shape), torch.Generator().manual_seed(3))
        pred = comps.predict(comps.schedule.add_noise(latents, noise, timesteps), timesteps, cond)
    assert pred.shape == latents.shape and torch.isfinite(pred).all()
    expected = {"sd1": {"encoder_hidden_states"}, "sdxl": {"encoder_hidden_states", "text_embeds"},
                "flux": {"encoder_hidden_states", "pooled_projections"}}[name]
    assert set(cond) == expected
    if name == "sdxl":  # both encoders' penultimate states, concatenated (32 + 32)
        assert cond["encoder_hidden_states"].shape[-1] == 64


@pytest.mark.parametrize("name", ["sd1", "sdxl", "flux"])
def test_training_conditioning_is_what_the_family_pipeline_encodes(tiny_family_dirs: dict[str, Path],
                                                                    name: str) -> None:
    """The trainers condition the denoiser exactly as plain diffusers does at generation."""
    torch.set_num_threads(1)
    prompts = ["a photo of a toy", "a dog"]
    comps = load_components(tiny_family_dirs[name], "cpu", "no")
    pipe = DiffusionPipeline.from_pretrained(tiny_family_dirs[name])
    cpu = torch.device("cpu")
    with torch.no_grad():
        ours = comps.encode_prompts(prompts)
        if name == "sd1":
            theirs = {"encoder_hidden_states": pipe.encode_prompt(prompts, cpu, 1, False)[0]}
        elif name == "sdxl":
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=cpu, do_classifier_free_guidance=False)
            theirs = {"encoder_hidden_states": embeds, "text_embeds": pooled}
        else:
            embeds, pooled, _ = pipe.encode_prompt(prompts, prompt_2=None, device=cpu,
                                                   max_sequence_length=flux.MAX_SEQUENCE_LENGTH)
            theirs = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
    torch.testing.assert_close(ours, theirs)


def test_flux_prediction_follows_the_pipeline_conventions(tiny_family_dirs: dict[str, Path]) -> None:
    """One FluxPipeline step from sigma 1 to 0 is x - v: our predict (timestep = sigma, guidance,
    packing, ids) must give the same v as the pipeline's own transformer call."""
    torch.set_num_threads(1)
    folder = tiny_family_dirs["flux"]
    comps = load_components(folder, "cpu", "no")
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    prompt = "a photo of a toy"
    with torch.no_grad():
        stepped = pipe(prompt, num_inference_steps=1, height=32, width=32, latents=flux.pack(x),
                       output_type="latent", max_sequence_length=flux.MAX_SEQUENCE_LENGTH,
                       guidance_scale=flux.GUIDANCE_SCALE).images
        v = comps.predict(x, torch.ones(1), comps.encode_prompts([prompt]))
    torch.testing.assert_close(stepped, flux.pack(x - v), rtol=1e-4, atol=1e-5)
