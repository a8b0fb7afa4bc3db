"""`atelier train lora|dreambooth|textual-inversion ...` with a live progress bar."""

from __future__ import annotations

from typing import Any

import typer

from atelier.cli.context import options
from atelier.cli.jobs import follow_or_detach
from atelier.cli.output import console, handle_errors, print_json, to_dict
from atelier.train_choices import LEGACY_LR_SCHEDULERS, LR_SCHEDULERS, OPTIMIZERS

app = typer.Typer(no_args_is_help=True, help="Train an adapter (LoRA, DreamBooth, Textual Inversion).")


def _common_options(
    base: str, dataset: str, name: str, prompt: str, steps: int | None, lr: float | None, batch: int | None,
    resolution: int | None, seed: int | None, alias: str, optimizer: str | None = None,
    lr_scheduler: str | None = None,
) -> dict[str, Any]:
    return {
        "base_model": base, "dataset": dataset, "name": name, "instance_prompt": prompt,
        "max_train_steps": steps, "learning_rate": lr, "train_batch_size": batch, "resolution": resolution,
        "seed": seed, "alias": alias, "optimizer": optimizer, "lr_scheduler": lr_scheduler,
    }


def _start(ctx: typer.Context, method: str, detach: bool, **kwargs: Any) -> None:
    opts = options(ctx)
    with opts.client() as client:
        handle = client.train(method, **kwargs)
        if opts.json and detach:
            print_json(to_dict(handle.job))
            return
        if not opts.json:
            console.print(f"job [bold]{handle.id}[/bold] {method} -> {kwargs['name']}")
        if not detach:
            follow_or_detach(handle, opts.json)


BASE = typer.Option(..., "--base", help="Base model name in the registry.")
DATASET = typer.Option(..., "--dataset", help="Dataset id from `atelier dataset upload`.")
NAME = typer.Option(..., "--name", help="Adapter name to publish a new version of.")
STEPS = typer.Option(None, "--steps", help="max_train_steps.")
LR = typer.Option(None, "--lr", help="Learning rate.")
BATCH = typer.Option(None, "--batch", help="train_batch_size.")
RESOLUTION = typer.Option(None, "--resolution", help="Training resolution in pixels.")
SEED = typer.Option(None, "--seed", help="Seed for reproducible training.")
ALIAS = typer.Option("", "--alias", help="Point this alias at the published version.")
DETACH = typer.Option(False, "--detach", help="Print the job and return without watching.")
OPTIMIZER = typer.Option(None, "--optimizer", help=f"One of {', '.join(sorted(OPTIMIZERS))} (default adamw).")
PUBLISH = typer.Option(None, "--publish", help="last (default) or best: the lowest held-out validation loss.")
OVERFIT_PATIENCE = typer.Option(None, "--overfit-patience",
                                help="Warn when the held-out loss rose at K evaluations in a row (0: off).")
LR_SCHEDULER = typer.Option(None, "--lr-scheduler",
                            help=f"One of {', '.join(sorted([*LR_SCHEDULERS, *LEGACY_LR_SCHEDULERS]))}.")


@app.command("lora")
@handle_errors
def lora(ctx: typer.Context, base: str = BASE, dataset: str = DATASET, name: str = NAME,
         prompt: str = typer.Option(..., "--prompt", help="Instance prompt, e.g. 'a photo of sks dog'."),
         rank: int | None = typer.Option(None, "--rank"), alpha: float | None = typer.Option(None, "--alpha"),
         train_text_encoder: bool | None = typer.Option(None, "--train-text-encoder/--no-train-text-encoder"),
         dora: bool | None = typer.Option(None, "--dora/--no-dora", help="DoRA: weight-decomposed LoRA."),
         conv_rank: int | None = typer.Option(None, "--conv-rank", help="Also adapt the UNet's conv layers (LoCon)."),
         conv_alpha: float | None = typer.Option(None, "--conv-alpha", help="Conv layers' alpha (default: conv rank)."),
         steps: int | None = STEPS, lr: float | None = LR, batch: int | None = BATCH,
         resolution: int | None = RESOLUTION, seed: int | None = SEED, alias: str = ALIAS,
         optimizer: str | None = OPTIMIZER, lr_scheduler: str | None = LR_SCHEDULER,
         publish: str | None = PUBLISH, overfit_patience: int | None = OVERFIT_PATIENCE,
         detach: bool = DETACH) -> None:
    """Train a LoRA on attention layers (base frozen); --dora and --conv-rank pick the variants."""
    _start(ctx, "lora", detach, publish=publish, overfit_patience=overfit_patience, rank=rank, lora_alpha=alpha,
           train_text_encoder=train_text_encoder,
           use_dora=dora, conv_rank=conv_rank, conv_alpha=conv_alpha,
           **_common_options(base, dataset, name, prompt, steps, lr, batch, resolution, seed, alias, optimizer,
                             lr_scheduler))


@app.command("dreambooth")
@handle_errors
def dreambooth(ctx: typer.Context, base: str = BASE, dataset: str = DATASET, name: str = NAME,
               prompt: str = typer.Option(..., "--prompt", help="Prompt with identifier: 'a photo of sks dog'."),
               class_prompt: str = typer.Option("", "--class-prompt", help="Enables prior preservation."),
               num_class_images: int | None = typer.Option(None, "--num-class-images"),
               steps: int | None = STEPS, lr: float | None = LR, batch: int | None = BATCH,
               resolution: int | None = RESOLUTION, seed: int | None = SEED, alias: str = ALIAS,
               optimizer: str | None = OPTIMIZER, lr_scheduler: str | None = LR_SCHEDULER,
               publish: str | None = PUBLISH, overfit_patience: int | None = OVERFIT_PATIENCE,
               detach: bool = DETACH) -> None:
    """Fine-tune the UNet on the concept, optionally with prior preservation."""
    _start(ctx, "dreambooth", detach, publish=publish, overfit_patience=overfit_patience, class_prompt=class_prompt,
           num_class_images=num_class_images,
           **_common_options(base, dataset, name, prompt, steps, lr, batch, resolution, seed, alias, optimizer,
                             lr_scheduler))


@app.command("textual-inversion")
@handle_errors
def textual_inversion(ctx: typer.Context, base: str = BASE, dataset: str = DATASET, name: str = NAME,
                      token: str = typer.Option(..., "--token", help="Placeholder token, e.g. '<cat-toy>'."),
                      init: str = typer.Option(..., "--init", help="Single-token initializer word, e.g. 'toy'."),
                      prompt: str = typer.Option("", "--prompt", help="Defaults to 'a photo of <token>'."),
                      num_vectors: int | None = typer.Option(None, "--num-vectors"),
                      steps: int | None = STEPS, lr: float | None = LR, batch: int | None = BATCH,
                      resolution: int | None = RESOLUTION, seed: int | None = SEED, alias: str = ALIAS,
                      optimizer: str | None = OPTIMIZER, lr_scheduler: str | None = LR_SCHEDULER,
                      publish: str | None = PUBLISH, overfit_patience: int | None = OVERFIT_PATIENCE,
                      detach: bool = DETACH) -> None:
    """Learn a new token embedding; the model itself is untouched."""
    _start(ctx, "textual-inversion", detach, publish=publish, overfit_patience=overfit_patience,
           placeholder_token=token, initializer_token=init,
           num_vectors=num_vectors,
           **_common_options(base, dataset, name, prompt or f"a photo of {token}", steps, lr, batch, resolution,
                             seed, alias, optimizer, lr_scheduler))
