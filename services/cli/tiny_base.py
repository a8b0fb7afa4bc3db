"""`atelier base-model create-tiny|pretrain-tiny`: build, pretrain and install the tiny SD base model.

These commands work on local folders (and the registry named by ATELIER_* settings), not over
gRPC: they are how a fresh checkout gets a base model without downloading anything.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

FAMILY_NAMES = ("sd1", "sdxl", "flux")  # services.families.FAMILIES, without importing torch here


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def create_tiny(
    random: bool = typer.Option(False, "--random", help="Random-initialised weights instead of the pretrained asset."),
    out: Path = typer.Option(None, help="Pipeline folder [default: <data_dir>/base-models/<name>]."),
    seed: int = typer.Option(0, help="Seed of the random weights (--random only)."),
    import_: bool = typer.Option(False, "--import", help="Also import it into the configured registry."),
    name: str = typer.Option(None, help="Registry name [default: tiny-sd, or tiny-<family>-random]."),
    family: str = typer.Option("sd1", "--family", help="Model family: sd1, sdxl or flux (sdxl/flux: --random only)."),
) -> None:
    """Write a tiny pipeline (SD pretrained on synthetic shapes, or --random of any family) to a folder."""
    from services.common.config import Settings
    from services.common.errors import AtelierError
    from services.registry.names import validate_name
    from services.registry.registry import Registry
    from services.registry.store import open_store
    from services.tinymodel.families import build_tiny_family
    from services.tinymodel.install import import_into_registry, install_pretrained

    settings = Settings(**{})  # every field from ATELIER_* variables
    if family not in FAMILY_NAMES:
        raise _fail(f"--family must be one of {', '.join(FAMILY_NAMES)}")
    if family != "sd1" and not random:
        raise _fail(f"only the sd1 family has a pretrained tiny model: use --family {family} --random")
    short = "sd" if family == "sd1" else family
    name = name or (f"tiny-{short}-random" if random else "tiny-sd")
    folder = out or settings.data_dir / "base-models" / name
    try:
        if import_:
            validate_name(name, "--name")  # refuse before writing anything
        if random:
            build_tiny_family(family, folder, seed)
        else:
            install_pretrained(folder)
        typer.echo(f"wrote {folder}")
        if import_:
            registry = Registry(open_store(settings))
            before = {m.version for m in registry.base_models.versions(name)}
            manifest = import_into_registry(registry, folder, name)  # same bytes: that version again
            what = f"base model {manifest.ref} (digest {manifest.digest})"
            typer.echo(f"{what} already in {settings.registry_url}" if manifest.version in before
                       else f"imported {what} into {settings.registry_url}")
    except AtelierError as error:
        raise _fail(error.message) from None


def pretrain_tiny(
    out: Path = typer.Option(None, help="Output pipeline folder [default: the packaged tiny-sd asset]."),
    seed: int = typer.Option(0, help="Seed of the initial weights and of the data stream."),
    vae_steps: int = typer.Option(400, help="VAE reconstruction steps."),
    unet_steps: int = typer.Option(2500, help="UNet + text encoder denoising steps."),
    unet_lr: float = typer.Option(6e-4, help="Peak learning rate of the UNet + text encoder phase."),
    snr_gamma: float = typer.Option(5.0, help="Min-SNR loss weighting gamma; 0 for plain MSE."),
    ema_decay: float = typer.Option(0.998, help="Weight moving-average decay; 0 saves the raw weights."),
    prediction_type: str = typer.Option("epsilon", help="UNet target: epsilon (SD 1.x) or v_prediction (SD 2.x)."),
    resolution: int = typer.Option(32, help="Image side in pixels (latents are half of it)."),
    batch_size: int = typer.Option(32, help="Images per step."),
    threads: int = typer.Option(2, help="torch CPU threads."),
    eval_images: int = typer.Option(128, help="Held-out images for the final denoising loss."),
    eval_steps: int = typer.Option(20, help="Sampling steps of the red-vs-blue check."),
    device: str = typer.Option("cpu", help="torch device to train on (cpu, cuda); metrics run on the CPU."),
) -> None:
    """Train the tiny pipeline from scratch on procedural captioned shapes (CPU, ~20-30 min)."""
    from services.tinymodel.assets import PRETRAINED_DIR
    from services.tinymodel.pretrain import PretrainConfig, command_line, pretrain, write_report

    if resolution % 8 or resolution < 16:
        raise _fail("--resolution must be a multiple of 8, at least 16")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise _fail("--prediction-type must be epsilon or v_prediction")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    cfg = PretrainConfig(out_dir=out or PRETRAINED_DIR, seed=seed, resolution=resolution,
                         batch_size=batch_size, vae_steps=vae_steps, unet_steps=unet_steps, threads=threads,
                         unet_lr=unet_lr, snr_gamma=snr_gamma, ema_decay=ema_decay,
                         prediction_type=prediction_type,
                         eval_count=eval_images, eval_steps=eval_steps, device=device)
    result = pretrain(cfg)
    report = write_report(cfg, result, command_line(cfg, out_given=out is not None))
    typer.echo(f"wrote {cfg.out_dir} ({report.name}): {result.metrics}")
