"""The recipes' training loss: MSE, optional min-SNR weighting, optional prior preservation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.training.trainers.noise import Schedule


def min_snr_weights(schedule: Schedule, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample weights of Min-SNR-gamma (Hang et al. 2023) for the model's prediction type.

    epsilon: min(snr, gamma) / snr; v: min(snr, gamma) / (snr + 1); sample: min(snr, gamma).
    """
    snr = schedule.snr(timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if schedule.prediction_type == "epsilon":
        return clipped / snr
    if schedule.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def _mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return F.mse_loss(pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    return (per_sample * weights).mean()


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    schedule: Schedule,
    *,
    snr_gamma: float = 0.0,
    num_prior: int = 0,
    prior_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss of one batch whose last `num_prior` rows are prior-preservation (class) samples.

    Returns (total loss, prior loss or None). As in the DreamBooth recipe, min-SNR weights the
    instance part only; the prior part is a plain MSE scaled by `prior_weight`.
    """
    n = pred.shape[0] - num_prior
    weights = min_snr_weights(schedule, timesteps[:n], snr_gamma) if snr_gamma > 0 else None
    loss = _mse(pred[:n], target[:n], weights)
    if not num_prior:
        return loss, None
    prior = _mse(pred[n:], target[n:], None)
    return loss + prior_weight * prior, prior
