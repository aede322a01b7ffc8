"""What a training run shows a reader: sample grids (tiles apart, the lambda sweep in labelled rows) and the model
card. ``training/train_ve.py`` writes both into its output folder; a custom loop can call the same functions::

    save_sample_grids(unet, scheduler, "ve-run", num_images=16, reverse_noise=1.0, num_inference_steps=25)
    write_model_card("ve-run", "training/model_card_template.md", dataset="my images", summary={...})
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

LAMBDA_SWEEP = (0.0, 0.5, 1.0, 2.0)  # the reverse-noise levels of the sweep grid
ROW_GAP = 4  # white pixels between the tiles of a sample grid (and the lambda rows of the sweep)
LABEL_WIDTH = 44  # the lambda column left of the sweep
CARD_TAGS = ["diffusers", "unconditional-image-generation", "diffusers-ve", "variance-exploding", "ddpm"]


def tile(images, cols: int, gap: int = ROW_GAP):
    """Equal-size images in rows of ``cols``, ``gap`` white pixels between tiles (so that digits do not touch)."""
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), "white")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * (w + gap), (i // cols) * (h + gap)))
    return grid


def labelled_rows(rows, labels, gap: int = ROW_GAP, label_width: int = LABEL_WIDTH):
    """Rows of tiles (equal size) stacked with ``gap`` white pixels between them, each row's label on its left."""
    from PIL import Image, ImageDraw

    w, h = rows[0].size
    out = Image.new("RGB", (label_width + w, len(rows) * h + (len(rows) - 1) * gap), "white")
    draw = ImageDraw.Draw(out)
    for i, (row, label) in enumerate(zip(rows, labels)):
        out.paste(row, (label_width, i * (h + gap)))
        draw.multiline_text((3, i * (h + gap) + h // 2 - 11), label, fill="black")
    return out


def save_sample_grids(unet, scheduler, output_dir: str, num_images: int, reverse_noise: float,
                      num_inference_steps: int, seed: int = 0, sweep: Sequence[float] = LAMBDA_SWEEP,
                      tag: str = "") -> tuple:
    """``samples{tag}.png`` (``num_images`` samples at ``reverse_noise``, in a square) and
    ``samples_lambda_sweep{tag}.png`` (8 samples per lambda of ``sweep``, one labelled row each, the same seed in
    each column) in ``output_dir``, tiles upscaled to at least 64 px; returns the two file names."""
    from PIL import Image

    from .pipelines.pipeline_ve import VEPipeline

    pipe = VEPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)

    def run(lam, n):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        imgs = pipe(batch_size=n, generator=gens, num_inference_steps=num_inference_steps, reverse_noise=lam).images
        scale = max(1, 64 // imgs[0].width)
        return [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in imgs]

    grid = tile(run(reverse_noise, num_images), math.ceil(math.sqrt(num_images)))
    rows = labelled_rows([tile(run(lam, 8), 8) for lam in sweep], [f"lambda\n= {lam:g}" for lam in sweep])
    names = (f"samples{tag}.png", f"samples_lambda_sweep{tag}.png")
    grid.save(os.path.join(output_dir, names[0]))
    rows.save(os.path.join(output_dir, names[1]))
    return names


def install_line() -> str:
    """How a stranger installs diffusers-ve (not on the package index under that name): from the repository URL
    of the package metadata (``[project.urls] Repository``), else from a clone."""
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        for url in importlib.metadata.metadata("diffusers-ve").get_all("Project-URL") or []:
            if url.lower().startswith(("repository", "source")):
                return f'pip install "diffusers-ve @ git+{url.split(",", 1)[1].strip()}"'
    return "pip install -e .  # in a clone of the diffusers-ve repository"


def write_model_card(output_dir: str, template_path: str, hub_repo_id: Optional[str] = None,
                     base_model: Optional[str] = None, **context) -> None:
    """``README.md`` of ``output_dir``, rendered from a Jinja ``template_path`` by ``huggingface_hub.ModelCard``
    with ``context`` and ``repo_id``, ``load_id`` (the Hub repo when pushed, else the folder's name and path),
    ``version`` and ``install`` (:func:`install_line`)."""
    from huggingface_hub import ModelCard, ModelCardData

    from . import __version__
    from .run_directory import CARD

    data = ModelCardData(library_name="diffusers", license="apache-2.0", tags=CARD_TAGS,
                         pipeline_tag="unconditional-image-generation",
                         **({"base_model": base_model} if base_model else {}))
    card = ModelCard.from_template(
        data, template_path=str(template_path), repo_id=hub_repo_id or Path(output_dir).name,
        load_id=hub_repo_id or output_dir, version=__version__, install=install_line(), **context)
    card.save(os.path.join(output_dir, CARD))


__all__ = ["LAMBDA_SWEEP", "tile", "labelled_rows", "save_sample_grids", "install_line", "write_model_card"]
