"""`atelier dataset upload DIR [--captions FILE]`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from atelier.cli.context import options
from atelier.cli.output import console, handle_errors, print_json, to_dict

app = typer.Typer(no_args_is_help=True, help="Training datasets.")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def read_captions(images: list[Path], captions_file: Path | None) -> list[str]:
    """Captions from a JSON {filename: caption} file, or `<image>.txt` files beside the images."""
    mapping: dict[str, str] = json.loads(captions_file.read_text()) if captions_file else {}
    captions = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        caption = mapping.get(image.name) or (sidecar.read_text().strip() if sidecar.exists() else "")
        captions.append(caption)
    return captions


@app.command("upload")
@handle_errors
def upload(
    ctx: typer.Context,
    directory: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder of PNG/JPEG/WebP images."),
    captions: Path | None = typer.Option(None, "--captions", exists=True, help="JSON {filename: caption}."),
    name: str = typer.Option("", "--name", help="A label for the dataset."),
) -> None:
    """Upload a folder of images as a dataset; prints its id."""
    opts = options(ctx)
    images = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    with opts.client() as client:
        dataset = client.upload_dataset(images, captions=read_captions(images, captions), name=name)
    if opts.json:
        print_json(to_dict(dataset))
    else:
        console.print(f"dataset [bold]{dataset.id}[/bold]: {len(dataset.images)} images, {dataset.total_bytes} bytes")
