"""`atelier generate "prompt" --adapter dog-lora=0.8 --adapter style@3=0.5 -o out.png`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TextColumn

from atelier.cli.context import options
from atelier.cli.output import console, handle_errors, print_json, to_dict
from atelier.requests import GenerationResult


def output_paths(output: Path, count: int) -> list[Path]:
    """out.png for one image; out-0.png, out-1.png ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


@handle_errors
def generate(
    ctx: typer.Context,
    prompt: str = typer.Argument(..., help="The prompt."),
    base: str = typer.Option("tiny-sd", "--base", help="Base model name."),
    adapter: list[str] = typer.Option([], "--adapter", help="name[@version|:alias][=weight], repeatable."),
    negative: str = typer.Option("", "--negative", help="Negative prompt."),
    output: Path = typer.Option(Path("out.png"), "-o", "--output", help="Where to write the PNG."),
    seed: int | None = typer.Option(None, "--seed"),
    steps: int = typer.Option(0, "--steps", help="0 = server default."),
    size: int = typer.Option(0, "--size", help="Width and height in pixels; 0 = server default."),
    num_images: int = typer.Option(1, "--num-images"),
    guidance: float = typer.Option(0.0, "--guidance", help="Guidance scale; 0 = server default."),
    scheduler: str = typer.Option("", "--scheduler", help="ddim, euler, euler-ancestral, dpm-solver, pndm, lms."),
    init_image: Path | None = typer.Option(None, "--init-image", help="img2img: start from this image (its size)."),
    strength: float | None = typer.Option(None, "--strength", help="With --init-image: how much to repaint, (0, 1]."),
    mask: Path | None = typer.Option(None, "--mask", help="Inpainting: white = repaint, black = keep."),
) -> None:
    """Generate images, mixing any number of adapters with weights (img2img / inpainting too)."""
    opts = options(ctx)
    kwargs = dict(base_model=base, adapters=list(adapter), negative_prompt=negative, seed=seed, steps=steps,
                  width=size, height=size, num_images=num_images, guidance_scale=guidance, scheduler=scheduler,
                  init_image=init_image, strength=strength, mask_image=mask)
    with opts.client() as client:
        result = _run(client.generate_stream(prompt, **kwargs), opts.json)  # type: ignore[arg-type]
    paths = output_paths(output, len(result.images))
    for image, path in zip(result.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    if opts.json:
        print_json({"files": [str(p) for p in paths], "response": to_dict(result.raw)
                    | {"images": [{"seed": s, "safety_flagged": f}
                                  for s, f in zip(result.seeds, result.safety_flagged, strict=True)]}})
    else:
        used = ", ".join(f"{a.name}@{a.version}={a.weight:g}" for a in result.adapters) or "none"
        flagged = sum(result.safety_flagged)
        note = f"; {flagged} replaced by the safety check" if flagged else ""
        console.print(f"wrote {', '.join(map(str, paths))} (seeds {result.seeds}; adapters {used}; "
                      f"{result.timings.total_ms:.0f} ms{note})")


def _run(events: object, json_mode: bool) -> GenerationResult:
    """Drive the stream, showing a progress bar unless output is JSON."""
    result: GenerationResult | None = None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=console, disable=json_mode) as progress:
        task = progress.add_task("queued", total=None)
        for event in events:  # type: ignore[attr-defined]
            if isinstance(event, GenerationResult):
                result = event
            else:
                progress.update(task, description=event.stage, completed=event.step,
                                total=event.total_steps or None)
    if result is None:
        raise ValueError("the server ended the stream without a result")
    return result
