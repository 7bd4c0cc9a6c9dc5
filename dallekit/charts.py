"""Small PNG charts drawn with PIL (no plotting library needed)."""

from __future__ import annotations

import io

from PIL import Image, ImageDraw, ImageFont


def line_chart(xs: list[float], series: dict[str, list[float]], title: str, xlabel: str, ylabel: str, log2_x: bool = False) -> bytes:
    """A line chart of one or more series as PNG bytes."""
    import math

    width, height, left, bottom, top, right = 560, 340, 70, 50, 40, 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    px = [math.log2(x) if log2_x else x for x in xs]
    values = [v for ys in series.values() for v in ys if v == v]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    x0, x1 = min(px), max(px) if max(px) > min(px) else min(px) + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right), height - bottom - (y - lo) / (hi - lo) * (height - top - bottom))

    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    draw.text((left, 12), title, fill="black", font=font)
    draw.text((width // 2 - 40, height - 22), xlabel, fill="black", font=font)
    draw.text((6, top - 14), ylabel, fill="black", font=font)
    every = max(1, math.ceil(len(xs) / 10))  # at most 10 x labels, so that long series stay readable
    for x, label in list(zip(px, xs))[::every]:
        draw.text((at(x, lo)[0] - 6, height - bottom + 6), f"{label:.4g}", fill="black", font=font)
    for frac in (0, 0.5, 1):
        y = lo + frac * (hi - lo)
        draw.text((8, at(x0, y)[1] - 6), f"{y:.3f}", fill="black", font=font)
    colors = [(76, 114, 176), (221, 132, 82), (85, 168, 104), (196, 78, 82)]
    for k, (name, ys) in enumerate(series.items()):
        points = [at(x, y) for x, y in zip(px, ys) if y == y]
        color = colors[k % len(colors)]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for p in points:
            draw.ellipse((p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3), fill=color)
        draw.text((width - right - 150, top + 6 + 14 * k), name, fill=color, font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bar_chart(labels: list[str], values: list[float], title: str, xlabel: str, ylabel: str) -> bytes:
    """A vertical bar chart (a histogram when the labels are bins) as PNG bytes."""
    width, height, left, bottom, top, right = 560, 340, 70, 60, 40, 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    hi = max(max(values, default=0), 1e-9)
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    draw.text((left, 12), title, fill="black", font=font)
    draw.text((width // 2 - 40, height - 20), xlabel, fill="black", font=font)
    draw.text((6, top - 14), ylabel, fill="black", font=font)
    draw.text((8, top - 4), f"{hi:g}", fill="black", font=font)
    slot = (width - left - right) / max(len(values), 1)
    every = max(1, len(labels) // 10)  # at most ~10 tick labels
    for i, (label, value) in enumerate(zip(labels, values)):
        x = left + i * slot
        y = height - bottom - value / hi * (height - top - bottom)
        draw.rectangle((x + 1, y, x + max(slot - 1, 1), height - bottom), fill=(76, 114, 176))
        if i % every == 0:
            draw.text((x, height - bottom + 6), str(label), fill="black", font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def histogram(values, bins: int, title: str, xlabel: str) -> bytes:
    """A histogram of numbers as PNG bytes."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    counts, edges = np.histogram(values, bins=bins) if len(values) else (np.zeros(bins), np.linspace(0, 1, bins + 1))
    return bar_chart([f"{e:.3g}" for e in edges[:-1]], counts.tolist(), title, xlabel, "rows")
