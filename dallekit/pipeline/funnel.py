"""The funnel of a filtering stage: rows remaining after each rule and rows each rule removed."""

from __future__ import annotations

import json

import fsspec


def funnel(stats: dict, rules: list[str]) -> list[dict]:
    """Funnel steps from a stage's stats; reasons are the first failing rule, so counts add up in order."""
    reasons = dict(stats["reasons"])
    order = [r for r in rules if r in reasons or r in rules] + [r for r in reasons if r not in rules]
    remaining = stats["rows_in"]
    steps = [{"rule": "input", "removed": 0, "remaining": remaining}]
    for rule in order:
        removed = reasons.get(rule, 0)
        remaining -= removed
        steps.append({"rule": rule, "removed": removed, "remaining": remaining})
    assert remaining == stats["rows_out"], "reasons do not add up to the rejected rows"
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
        f.write(_plot(stage, steps))
    return format_funnel(stage, steps)


def _plot(stage: str, steps: list[dict]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(steps) + 1.2))
    names = [s["rule"] for s in steps][::-1]
    remaining = [s["remaining"] for s in steps][::-1]
    removed = [s["removed"] for s in steps][::-1]
    ax.barh(names, remaining, color="#4c72b0", label="remaining")
    ax.barh(names, removed, left=remaining, color="#dd8452", label="removed by this rule")
    for y, (r, d) in enumerate(zip(remaining, removed)):
        ax.text(r + d, y, f"  {r}" + (f" (-{d})" if d else ""), va="center", fontsize=8)
    ax.set_xlim(0, max(steps[0]["remaining"], 1) * 1.25)
    ax.set_xlabel("rows")
    ax.set_title(f"{stage}: rows remaining after each rule")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
