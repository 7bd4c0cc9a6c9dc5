"""The embedded default job from the command line, and the synthetic data it serves."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest

from dallekit.demo.synthetic import (
    COLORS,
    ZERO_SHOT_PAIRS,
    make_dataset,
    random_spec,
    render,
)
from tests.helpers import check_accounting


def test_synthetic_geometry_covers_the_central_square():
    rng = random.Random(3)
    for _ in range(200):
        spec = random_spec(rng, zero_shot=rng.random() < 0.2)
        image = np.asarray(render(spec))
        short = min(spec.width, spec.height)
        half = short // 16
        cy, cx = spec.height // 2, spec.width // 2
        centre = image[cy - half : cy + half, cx - half : cx + half].reshape(-1, 3)
        assert (centre == COLORS[spec.foreground]).all(), spec
        assert spec.foreground != spec.background


def test_generated_set_holds_out_zero_shot_pairs():
    rows = make_dataset(400, seed=5).rows
    pairs = {(r["foreground"], r["shape"]) for r in rows}
    assert not pairs & ZERO_SHOT_PAIRS and len(pairs) == 18


@pytest.mark.slow
def test_demo_quick_runs_the_pipeline_stages(quick_demo):
    out = quick_demo
    stdout = (out / "stdout.txt").read_text()
    assert "download summary" in stdout and "success" in stdout
    ingested, rejects = check_accounting(out / "ingest", 300 + 3 + 2, exact_duplicate_rows=True)  # 3 repeated URLs, 2 empty captions
    assert set(rejects["reason"]) == {"duplicate_url", "empty_caption"}
    downloaded, _ = check_accounting(out / "download", len(ingested))
    statuses = downloaded["status"].value_counts().to_dict()
    assert statuses["success"] > 250 and statuses["failed_to_download"] > 0  # the broken URLs
    cleaned, rejects = check_accounting(out / "clean", len(downloaded))
    assert set(rejects["reason"]) == {"failed_to_download"} and len(cleaned) == statuses["success"]
    embedded, rejects = check_accounting(out / "embed", len(cleaned))  # every cleaned pair embedded once, by the trained CLIP
    assert len(rejects) == 0 and sorted(embedded["uid"]) == sorted(cleaned["uid"])
    assert json.loads(pq.read_schema(sorted((out / "embed").glob("part-*.parquet"))[0]).metadata[b"dallekit"])["model"]["checkpoint"]
    filtered, rejects = check_accounting(out / "filter", len(cleaned))
    assert set(rejects["reason"]) <= {"min_side", "aspect"} and len(rejects) > 0  # image sizes vary on purpose
    assert filtered["clip_score"].notna().all() and (filtered["lang"] == "en").all()
    assert "filter funnel" in stdout and (out / "filter" / "_funnel.png").exists()
    assert "trained on the demo's own cleaned pairs" in stdout and (out / "clip" / "open_clip_model.safetensors").exists()
    tokens, _ = check_accounting(out / "tokens", len(filtered))
    assert tokens["image_tokens"].map(len).eq(64).all()
    assert (out / "tokenizer" / "model.safetensors").exists() and list((out / "tokenizer").glob("recon_step*.png"))
    assert "reconstruction grid" in stdout
    assert (out / "bpe" / "tokenizer.json").exists() and (out / "model" / "model.safetensors").exists()
    metrics = [json.loads(line) for line in (out / "model" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 40 and "val_loss" in metrics[-1] and "demo: transformer step 40" in stdout
