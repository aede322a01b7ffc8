"""A small PNG line plot of the ELBO integrand against ``log10 t`` (PIL only: no plotting dependency)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

TITLE_SIZE = 13  # px; Pillow's default font at its 10 px default squeezes some spaces to nothing ("bitsgo")


def title_font():
    """Pillow's default (FreeType) font at :data:`TITLE_SIZE`, or the bitmap default on an old Pillow."""
    try:
        return ImageFont.load_default(size=TITLE_SIZE)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def line_plot(x: Sequence[float], ys: dict, title: str = "", xlabel: str = "", ylabel: str = "",
              reference: Optional[float] = None, size=(640, 400)) -> Image.Image:
    """Draw curves ``ys = {label: values}`` over ``x`` on white; ``reference`` adds a dashed horizontal line."""
    w, h = size
    left, right, top, bottom = 64, 16, 28, 44
    img = Image.new("RGB", size, "white")
    dr = ImageDraw.Draw(img)
    vals = [v for vs in ys.values() for v in vs if math.isfinite(v)] + ([reference] if reference is not None else [])
    y0, y1 = min(vals + [0.0]), max(vals) * 1.05 or 1.0
    x0, x1 = min(x), max(x)
    px = lambda a: left + (a - x0) / (x1 - x0 or 1.0) * (w - left - right)  # noqa: E731
    py = lambda b: h - bottom - (b - y0) / (y1 - y0 or 1.0) * (h - top - bottom)  # noqa: E731
    dr.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(6):  # ticks
        a, b = x0 + i / 5 * (x1 - x0), y0 + i / 5 * (y1 - y0)
        dr.text((px(a) - 12, h - bottom + 4), f"{a:.1f}", fill="black")
        dr.text((4, py(b) - 6), f"{b:.3g}", fill="black")
    if reference is not None:
        for a in range(left, w - right, 12):
            dr.line([a, py(reference), a + 6, py(reference)], fill="gray")
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for k, (label, vs) in enumerate(ys.items()):
        c = colours[k % len(colours)]
        dr.line([(px(a), py(b)) for a, b in zip(x, vs)], fill=c, width=2)
        dr.text((left + 8, top + 4 + 12 * k), label, fill=c)
    dr.text((left, 6), title, fill="black", font=title_font())
    dr.text((w // 2 - 40, h - 18), xlabel, fill="black")
    dr.text((left + 8, h - bottom - 14), ylabel, fill="gray")
    return img
