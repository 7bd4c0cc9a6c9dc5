"""The embedded default job: synthetic shapes served on 127.0.0.1, run through every step.

`dallekit demo` generates the shapes set, serves it over HTTP on loopback, writes its URL list
and runs the packaged pipeline config `dallekit/configs/demo.toml` (with its [quick] overrides
for `--quick`) through `dallekit.jobs.steps`, so the demo is `dallekit run` on local data.
"""

from __future__ import annotations

import csv
import json
import os
import random
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path

from dallekit.config import ClusterConfig, DemoOptions, parse_toml
from dallekit.demo.synthetic import COLORS, SHAPES, SHAPES_JUDGE, ShapesServer, make_dataset
from dallekit.jobs.steps import Pipeline, load_pipeline, run_pipeline
from dallekit.jobs.timing import StepTimer, format_timings, process_cpu_seconds


def write_url_list(path: str, rows: list[dict], server: ShapesServer) -> None:
    """The demo's URL list as CSV, with a few rows that ingest must reject (a repeat, an empty caption)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["url", "caption", "foreground", "shape", "background"])
        writer.writeheader()
        for i, row in enumerate(rows):
            record = {k: v for k, v in row.items() if k != "path"} | {"url": server.url(row["path"])}
            writer.writerow(record)
            if i % 100 == 7:  # a repeated URL
                writer.writerow(record)
            if i % 250 == 11:  # a row with no caption
                writer.writerow(record | {"url": server.url(row["path"]) + "?copy", "caption": ""})


# Backgrounds per foreground/shape pair in the full demo's prompts: 4 gives 96 prompts, 24 of them
# zero-shot, enough that one prompt does not swing the zero-shot rate (docs/demo-notes.md, run B).
DEMO_BACKGROUNDS = 4


def demo_pipeline(config: DemoOptions, cluster: ClusterConfig, inputs: list[str]) -> Pipeline:
    """The packaged demo config, with --quick's overrides, the run folder, the inputs and the demo prompts."""
    toml = parse_toml(resources.files("dallekit").joinpath("configs/demo.toml").read_text(), "dallekit/configs/demo.toml")
    quick = toml.pop("quick", {})
    if config.quick:
        for name, values in quick.items():
            toml[name] = toml.get(name, {}) | values
    toml["run"] = toml.get("run", {}) | {"out": config.out, "inputs": inputs}
    pipeline = load_pipeline(toml, "dallekit/configs/demo.toml")
    pipeline = replace(pipeline, cluster=cluster)
    if not pipeline.sample.prompts:
        pipeline = replace(pipeline, sample=replace(pipeline.sample, prompts=demo_prompts(config.seed, 1 if config.quick else DEMO_BACKGROUNDS)))
    return pipeline


def demo_prompts(seed: int, backgrounds: int = 1) -> list[str]:
    """Prompts for all 24 foreground/shape pairs (the 6 zero-shot pairs included), each with `backgrounds` seeded backgrounds."""
    rng = random.Random(seed)
    return [f"a {fg} {shape} on a {bg} background" for fg in COLORS for shape in SHAPES
            for bg in rng.sample([c for c in COLORS if c != fg], backgrounds)]


def run_demo(config: DemoOptions, cluster: ClusterConfig) -> dict:
    """Generate the shapes set, serve it on loopback and run the demo pipeline; returns run_pipeline's result."""
    started = time.time()
    samples = config.samples or (300 if config.quick else 6000)
    os.makedirs(config.out, exist_ok=True)
    timer, cpu = StepTimer(), process_cpu_seconds()
    data = make_dataset(samples, seed=config.seed)
    timer.add("generate", time.time() - started, process_cpu_seconds() - cpu)
    server_file = os.path.join(config.out, "server.json")
    port = json.load(open(server_file))["port"] if os.path.exists(server_file) else 0  # reuse: URLs name the port
    with ShapesServer(data.routes, port=port, max_seconds=3 * 3600) as server:
        with open(server_file, "w") as f:
            json.dump({"port": server.port}, f)
        print(f"demo: serving {len(data.routes)} synthetic images on {server.url('/')}")
        url_list = os.path.join(config.out, "urls.csv")
        write_url_list(url_list, data.rows, server)
        print("demo: clean checks exact duplicates only (the shapes are near duplicates of each other by design); "
              "the CLIP that filters and reranks is trained on the demo's own cleaned pairs (no weights offline)")
        result = run_pipeline(demo_pipeline(config, cluster, [url_list]), judge=SHAPES_JUDGE, timer=timer)
    print_summary(config.out, result)
    print(f"demo: done in {(time.time() - started) / 60:.1f} minutes, {process_cpu_seconds() - cpu:.0f} CPU seconds "
          "(user + system of this process and its children)")
    return result


def print_summary(out: str, result: dict) -> None:
    """The demo's headline numbers: image tokenizer, transformer, evaluation and the pixel check."""
    if result.get("tokenizer"):
        m = result["tokenizer"]
        print(f"demo: image tokenizer held-out PSNR {m['val_psnr']:.1f} dB, {m['codes_used']:.0%} of codes used")
    grids = sorted(Path(out, "tokenizer").glob("recon_step*.png")) or sorted(Path(out, "dvae").glob("recon_step*.png"))
    if grids:
        print(f"demo: reconstruction grid (originals above, reconstructions below): {grids[-1]}")
    if result.get("train"):
        m = result["train"]
        print(f"demo: transformer step {m['step']}: loss {m['loss']:.3f} (image {m['image_loss']:.3f})"
              + (f", validation image loss {m['val_image_loss']:.3f}" if "val_image_loss" in m else ""))
    if result.get("evaluate"):
        e = result["evaluate"]
        print(f"demo: held-out captions: CLIP score random {e['clip_score_random']:.3f} vs reranked {e['clip_score_reranked']:.3f}; {e['fid_note']}")
    check_file = os.path.join(out, "samples", "pixel_check.json")
    if os.path.exists(check_file):
        check = json.load(open(check_file))
        for split in ("seen", "zero_shot"):
            if split in check:
                s = check[split]
                print(f"demo: pixel check, {split.replace('_', '-')} pairs ({s['prompts']} prompts): "
                      f"random candidate right {s['random_right']:.0%}, reranked top-1 right {s['reranked_right']:.0%}")
    if result.get("timings"):
        print("demo: time per step (CPU s: user + system of dallekit and its Dask workers)")
        for line in format_timings(result["timings"]):
            print(f"demo:   {line}")
    print(f"demo: report in {os.path.join(out, 'report.html')}, sample grids in {os.path.join(out, 'samples')}/")
