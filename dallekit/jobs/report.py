"""`report.html` of a run folder: the funnel, data histograms, the dVAE, training curves and samples.

Every figure is a PNG in `report/` next to the HTML, referenced by a relative path, so the
folder can be copied or served as it is. Sections whose step has not run yet are left out;
histograms read at most `max_shards` shards of a stage (the report says so).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from PIL import Image

from dallekit.charts import bar_chart, histogram, line_chart
from dallekit.images import labelled_grid
from dallekit.io import list_shards, read_shard, shard_schema
from dallekit.jobs.timing import TIMING_HEADER, load_timings, timing_table
from dallekit.pipeline.funnel import draw_funnel
from dallekit.pipeline.shards import read_stats, stage_complete
from dallekit.pipeline.stage import STAGES as STAGE_MODULES

STAGES = list(STAGE_MODULES)  # in pipeline order
# the funnel's chain; embed is a branch beside it (filter reads clean's rows, not embed's), so it is no step of the funnel
STAGE_FOLDERS = {"ingest": "ingest", "download": "download", "adopt": "adopt", "clean": "clean", "filter": "filter", "encode": "tokens"}


def run_funnel(run_dir: Path) -> list[dict]:
    """Rows remaining after each complete stage of a run, with the rows each stage rejected."""
    steps: list[dict] = []
    for stage in [s for s in STAGES if s in STAGE_FOLDERS]:
        folder = run_dir / STAGE_FOLDERS[stage]
        if not folder.exists():  # a run has ingest and download, or adopt
            continue
        if not stage_complete(str(folder)):
            break
        stats = read_stats(str(folder))
        if not steps:
            steps.append({"rule": "input rows", "removed": 0, "remaining": stats["rows_in"], "reasons": {}})
        steps.append({"rule": stage, "removed": stats["rows_rejected"], "remaining": stats["rows_out"], "reasons": stats["reasons"]})
    return steps


def _columns(folder: Path, columns: list[str], max_shards: int) -> dict[str, list]:
    """Some columns of a stage's first shards (those present)."""
    values: dict[str, list] = {c: [] for c in columns}
    for path in list_shards(str(folder))[:max_shards]:
        names = shard_schema(path)[0].names
        present = [c for c in columns if c in names]
        table = read_shard(path, columns=present)
        for c in present:
            values[c].extend(table.column(c).to_pylist())
    return values


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


class _Page:
    """The HTML being written and the figures it references."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.figures = run_dir, run_dir / "report"
        self.figures.mkdir(exist_ok=True)
        self.parts: list[str] = []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def figure(self, name: str, png: bytes, caption: str = "") -> None:
        (self.figures / name).write_bytes(png)
        self.image(f"report/{name}", caption)

    def image(self, relative: str, caption: str = "", width: int | None = None) -> None:
        size = f' width="{width}"' if width else ""
        self.parts.append(f'<figure><img src="{html.escape(relative)}"{size}><figcaption>{html.escape(caption)}</figcaption></figure>')

    def table(self, header: list[str], rows: list[list]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")


def _data_section(page: _Page, max_shards: int) -> None:
    funnel = run_funnel(page.run_dir)
    if not funnel:
        return
    page.heading("Funnel")
    page.figure("funnel.png", draw_funnel("run", funnel), "rows remaining after each stage (orange: rejected by it)")
    page.table(["stage", "rows rejected", "rows remaining", "reasons"],
               [[s["rule"], s["removed"], s["remaining"], ", ".join(f"{r}: {n}" for r, n in s["reasons"].items())] for s in funnel])
    clean_dir, filter_dir = page.run_dir / "clean", page.run_dir / "filter"
    if stage_complete(str(clean_dir)):
        page.heading("Captions and images")
        page.text(f"From the first {max_shards} shards of clean/ (every downloaded, cleaned pair, before filtering).")
        cols = _columns(clean_dir, ["caption", "original_width", "original_height"], max_shards)
        words = [len(c.split()) for c in cols["caption"] if c]
        page.figure("caption_words.png", histogram(words, 20, "caption length", "words"))
        sides = [min(w, h) for w, h in zip(cols["original_width"], cols["original_height"]) if w and h]
        aspects = [max(w, h) / min(w, h) for w, h in zip(cols["original_width"], cols["original_height"]) if w and h]
        page.figure("image_short_side.png", histogram(sides, 20, "source image size", "shorter side (pixels)"))
        page.figure("image_aspect.png", histogram(aspects, 20, "source aspect ratio", "long side / short side"))
    if stage_complete(str(filter_dir)):
        scores = [s for s in _columns(filter_dir, ["clip_score"], max_shards)["clip_score"] if s is not None]
        if scores:
            page.figure("clip_scores.png", histogram(scores, 20, "CLIP score of the kept pairs", "cosine similarity"))


TOKENIZER_NAMES = {"dallekit-dvae": "dVAE", "dallekit-fsq": "FSQ tokenizer"}


def _dvae_section(page: _Page, max_shards: int) -> None:
    """The image tokenizer (dVAE or FSQ): held-out reconstructions, PSNR and code usage over training, codebook usage of the tokens."""
    folder = next((page.run_dir / n for n in ("tokenizer", "dvae") if (page.run_dir / n).is_dir()), page.run_dir / "tokenizer")
    tokens_dir = page.run_dir / "tokens"
    grids = sorted(folder.glob("recon_step*.png"), key=lambda p: int(p.stem.removeprefix("recon_step")))
    metrics = _metrics(folder / "metrics.jsonl")
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    name = TOKENIZER_NAMES.get(config.get("model", "dallekit-dvae"), "image tokenizer")
    if grids or metrics:
        page.heading(f"Image tokenizer: {name}" + (f", {config['codebook_size']} codes on a {config['grid']}x{config['grid']} grid"
                                                   if "codebook_size" in config and "grid" in config else ""))
    if grids:
        page.image(f"{folder.name}/{grids[-1].name}", f"held-out images (top) and their reconstructions from codes (bottom), {grids[-1].stem}",
                   width=512)
    evals = [m for m in metrics if "val_psnr" in m]
    if evals:
        last = evals[-1]
        page.text(f"held-out PSNR {last['val_psnr']:.2f} dB, {last['codes_used']:.0%} of codes used (perplexity {last['perplexity']:.0f}) at step {last['step']}")
        page.figure("dvae_psnr.png", line_chart([m["step"] for m in evals], {"held-out PSNR": [m["val_psnr"] for m in evals]},
                                                 f"{name} reconstruction", "step", "PSNR (dB)"))
    if stage_complete(str(tokens_dir)):
        counts = _code_counts(tokens_dir, max_shards)
        if counts.size:
            ranked = np.sort(counts)[::-1]
            page.figure("codebook_usage.png", bar_chart([str(i) for i in range(len(ranked))], ranked.tolist(),
                                                         f"codebook usage: {int((counts > 0).sum())} of {len(counts)}+ codes used",
                                                         "codes, most used first", "image tokens"))


def _code_counts(tokens_dir: Path, max_shards: int) -> np.ndarray:
    """How often each image code occurs in the first shards, summed shard by shard with numpy."""
    counts = np.zeros(0, np.int64)
    for path in list_shards(str(tokens_dir))[:max_shards]:
        codes = pc.list_flatten(read_shard(path, columns=["image_tokens"]).column("image_tokens")).to_numpy()
        shard = np.bincount(codes.astype(np.int64), minlength=counts.size)
        shard[: counts.size] += counts
        counts = shard
    return counts


def _training_section(page: _Page) -> None:
    metrics = _metrics(page.run_dir / "model" / "metrics.jsonl")
    train = [m for m in metrics if "loss" in m]
    if not train:
        return
    page.heading("Transformer training")
    steps = [m["step"] for m in train]
    page.figure("loss.png", line_chart(steps, {"loss": [m["loss"] for m in train], "image loss": [m["image_loss"] for m in train],
                                               "text loss": [m["text_loss"] for m in train]}, "training loss", "step", "cross-entropy"))
    val = [m for m in metrics if "val_image_loss" in m]
    if val:
        _image_loss_figure(page, train, val)
    mfu = [m for m in train if m.get("mfu") is not None]
    if mfu:
        page.figure("mfu.png", line_chart([m["step"] for m in mfu], {"MFU": [m["mfu"] for m in mfu]}, "model FLOPs utilisation", "step", "MFU"))


def _image_loss_figure(page: _Page, train: list[dict], val: list[dict]) -> None:
    """Training and validation image loss on one chart (over- or underfitting shows as their gap), with the published step."""
    model_config = page.run_dir / "model" / "config.json"
    best = json.loads(model_config.read_text()).get("best_step") if model_config.exists() else None
    steps = sorted({m["step"] for m in train} | {m["step"] for m in val})
    by_step = {"training image loss": {m["step"]: m["image_loss"] for m in train},
               "validation image loss": {m["step"]: m["val_image_loss"] for m in val}}
    if best in by_step["validation image loss"]:
        by_step[f"published: step {best}"] = {best: by_step["validation image loss"][best]}
    series = {name: [values.get(s, float("nan")) for s in steps] for name, values in by_step.items()}  # NaN: no point there
    page.figure("image_loss.png", line_chart(steps, series, "training and validation image loss", "step", "cross-entropy"),
                f"the published model is the checkpoint with the lowest validation image loss (step {best})" if best is not None else "")


def _samples_section(page: _Page) -> None:
    eval_file, samples_dir = page.run_dir / "eval" / "eval.json", page.run_dir / "samples"
    if eval_file.exists():
        results = json.loads(eval_file.read_text())
        page.heading("Evaluation on held-out captions")
        page.image("eval/clip_vs_n.png", "mean CLIP score of the best of N candidates (N = 1: a random candidate)")
        page.table(["metric", "value"], [[k, f"{v:.4g}"] for k, v in results.items() if isinstance(v, float)] + [["FID", results["fid_note"]]])
    check_file = samples_dir / "pixel_check.json"
    if check_file.exists():
        check = json.loads(check_file.read_text())
        page.heading("Pixel check (foreground, background and shape all right)")
        rows = [[split.replace("_", "-"), s["prompts"], f"{s['random_right']:.0%}", f"{s['reranked_right']:.0%}"]
                for split in ("seen", "zero_shot") if (s := check.get(split))]
        page.table(["pairs", "prompts", "random candidate right", "reranked top-1 right"], rows)
    records = _metrics(samples_dir / "samples.jsonl")
    prompts = list(dict.fromkeys(r["prompt"] for r in records))
    if prompts:
        verdicts = {c["prompt"]: c for c in json.loads(check_file.read_text())["prompts"]} if check_file.exists() else {}
        top = [r for r in records if r["rank"] == 0]
        labels = [r["prompt"].removeprefix("a ").replace(" background", "") + (" (zero-shot)" if verdicts.get(r["prompt"], {}).get("zero_shot") else "")
                  for r in top]
        overview = labelled_grid([np.asarray(Image.open(samples_dir / Path(r["file"]).name).convert("RGB")) for r in top], labels)
        overview.save(page.figures / "samples_top1.png")
        page.heading("Samples (best by CLIP first)")
        page.image("report/samples_top1.png", "the reranked top-1 sample of every prompt")
        for p, prompt in enumerate(prompts):
            best = next(r for r in records if r["prompt"] == prompt and r["rank"] == 0)
            grid = best["file"].replace("_rank0.png", "_grid.png")
            note = ""
            if prompt in verdicts:
                v = verdicts[prompt]
                note = f" ({'zero-shot' if v['zero_shot'] else 'seen'} pair; top-1 {'right' if v['reranked_right'] else 'wrong'})"
            page.image(f"samples/{grid}", f"{prompt}{note}; CLIP score {best['clip_score']:.3f}" if best["clip_score"] is not None
                       else f"{prompt}{note}", width=256)


STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
figure{display:inline-block;margin:8px;vertical-align:top}figcaption{font-size:12px;max-width:560px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}"""


def _timing_section(page: _Page) -> None:
    rows = load_timings(page.run_dir)
    if not rows:
        return
    page.heading("Time per step")
    page.text("Wall and CPU seconds (user + system, of dallekit and its Dask workers) of each step in the run's last "
              "invocation; a step already done when it resumed shows the time it took to find that out.")
    page.table(TIMING_HEADER, timing_table(rows))


def write_report(run_dir: str, max_shards: int = 20) -> str:
    """Write `report.html` (and its figures in `report/`) for a run folder; returns its path."""
    page = _Page(Path(run_dir))
    _data_section(page, max_shards)
    _dvae_section(page, max_shards)
    _training_section(page)
    _samples_section(page)
    _timing_section(page)
    title = f"dallekit run: {html.escape(str(run_dir))}"
    body = "\n".join(page.parts)
    path = Path(run_dir) / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head>"
                   f"<body><h1>{title}</h1>\n{body}\n</body></html>\n")
    tmp.replace(path)
    return str(path)
