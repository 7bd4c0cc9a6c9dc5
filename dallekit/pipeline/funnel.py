"""The funnel of a filtering stage: rows remaining after each rule and rows each rule removed."""

from __future__ import annotations

import io
import json

import fsspec
from PIL import Image, ImageDraw, ImageFont


def funnel(stats: dict, rules: list[str]) -> list[dict]:
    """Funnel steps from a stage's stats; reasons are the first failing rule, so counts add up in order."""
    reasons = dict(stats["reasons"])
    remaining = stats["rows_in"]
    steps = [{"rule": "input", "removed": 0, "remaining": remaining}]
    for rule in rules + [r for r in reasons if r not in rules]:
        removed = reasons.get(rule, 0)
        remaining -= removed
        steps.append({"rule": rule, "removed": removed, "remaining": remaining})
    if remaining != stats["rows_out"]:
        raise RuntimeError(f"{stats['stage']}: reasons add up to {stats['rows_in'] - remaining}, not {stats['rows_rejected']} rejected rows")
    return steps


def format_funnel(stage: str, steps: list[dict]) -> str:
    """The funnel as a text table."""
    lines = [f"{stage} funnel", f"  {'rule':<28}{'removed':>10}{'remaining':>12}{'kept %':>9}"]
    total = steps[0]["remaining"] or 1
    for s in steps:
        lines.append(f"  {s['rule']:<28}{s['removed']:>10}{s['remaining']:>12}{100 * s['remaining'] / total:>8.1f}%")
    return "\n".join(lines)


def write_funnel(output_dir: str, stage: str, stats: dict, rules: list[str]) -> str:
    """Save `_funnel.json` and `_funnel.png` in the stage folder; returns the text table."""
    steps = funnel(stats, rules)
    fs, root = fsspec.core.url_to_fs(output_dir)
    root = root.rstrip("/")
    with fs.open(f"{root}/_funnel.json", "w") as f:
        json.dump({"stage": stage, "steps": steps}, f, indent=2)
    with fs.open(f"{root}/_funnel.png", "wb") as f:
        f.write(draw_funnel(stage, steps))
    return format_funnel(stage, steps)


def draw_funnel(stage: str, steps: list[dict]) -> bytes:
    """A horizontal bar chart as PNG bytes: remaining rows (blue) and rows each rule removed (orange)."""
    row_h, label_w, bar_w, pad = 22, 170, 420, 12
    width, height = label_w + bar_w + 150, pad * 3 + 18 + row_h * len(steps)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    draw.text((pad, pad), f"{stage}: rows remaining after each rule", fill="black", font=font)
    total = max(steps[0]["remaining"], 1)
    for i, step in enumerate(steps):
        y = pad * 2 + 18 + i * row_h
        kept = round(bar_w * step["remaining"] / total)
        cut = round(bar_w * step["removed"] / total)
        draw.text((pad, y + 4), step["rule"], fill="black", font=font)
        draw.rectangle((label_w, y + 2, label_w + kept, y + row_h - 4), fill=(76, 114, 176))
        if cut:
            draw.rectangle((label_w + kept, y + 2, label_w + kept + cut, y + row_h - 4), fill=(221, 132, 82))
        note = f"{step['remaining']}" + (f" (-{step['removed']})" if step["removed"] else "")
        draw.text((label_w + kept + cut + 6, y + 4), note, fill="black", font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
