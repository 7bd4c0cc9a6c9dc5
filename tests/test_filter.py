"""filter: each rule at its boundaries, CLIP scoring through open_clip (random and saved weights), the funnel."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dallekit.config import FilterConfig
from dallekit.errors import BadInputError
from dallekit.models.clip import load_clip, save_clip
from dallekit.pipeline import filter as filter_module
from dallekit.pipeline.filter import SCORE_BIN_WIDTH, global_threshold
from tests.helpers import check_accounting, read_stage
from tests.stage_data import HUGE_IMAGES, downloaded_row, forbid_large_decodes, png_header_only, shape_jpeg, write_stage

NO_CLIP = FilterConfig(clip=False)
TINY = dict(clip_model="dallekit-tiny-clip", clip_pretrained=None)
GOOD = "a red circle on blue"  # 5 words, 5 CLIP BPE tokens


def row(uid, caption=GOOD, original=(300, 300), **extra):
    return downloaded_row(uid, caption, shape_jpeg(hash(uid) % 1000), original=original, **extra)


def run_filter(tmp_path, client, shards, config):
    write_stage(tmp_path / "clean", shards)
    stats = filter_module.filter(str(tmp_path / "clean"), str(tmp_path / "filter"), config, client)
    kept, rejects = check_accounting(tmp_path / "filter", sum(len(s) for s in shards))
    return kept, rejects.set_index("uid")["reason"].to_dict(), stats


@pytest.mark.slow
def test_image_and_caption_rules_at_their_boundaries(tmp_path, client):
    rows = [
        row("side-ok", original=(256, 400)), row("side-low", original=(255, 400)),
        row("aspect-ok", original=(512, 256)), row("aspect-high", original=(515, 256)),
        row("words-ok", caption="red circle blue"), row("words-low", caption="red circle"),
        row("chars-ok", caption="ab c d"), row("chars-low", caption="a b c"),
        row("tokens-ok", caption="one two three four five"), row("tokens-high", caption="one two three four five six"),
    ]
    # short made-up captions have no clear language, so the language rule is tested on its own below
    config = FilterConfig(clip=False, min_caption_chars=6, max_caption_tokens=5, languages=["any"])
    kept, reasons, _ = run_filter(tmp_path, client, [rows[:6], rows[6:]], config)
    assert sorted(kept["uid"]) == ["aspect-ok", "chars-ok", "side-ok", "tokens-ok", "words-ok"]
    assert reasons == {
        "side-low": "min_side", "aspect-high": "aspect", "words-low": "caption_words",
        "chars-low": "caption_chars", "tokens-high": "caption_tokens",
    }
    scores = kept.set_index("uid")
    assert scores.loc["side-ok", "min_side"] == 256 and scores.loc["aspect-ok", "aspect"] == 2.0
    assert scores.loc["tokens-ok", "caption_tokens"] == 5 and scores.loc["chars-ok", "caption_chars"] == 6
    assert "clip_score" not in kept.columns  # --no-clip computes no CLIP score


def test_language_rule(tmp_path, client):
    rows = [
        row("en", caption="a photo of a dog running on the beach"),
        row("de", caption="ein Foto von einem Hund, der am Strand läuft"),
        row("fr", caption="une photo d'un chien qui court sur la plage"),
    ]
    kept, reasons, _ = run_filter(tmp_path / "en", client, [rows], NO_CLIP)
    assert kept["uid"].tolist() == ["en"] and reasons == {"de": "lang", "fr": "lang"}
    assert kept["lang"].tolist() == ["en"] and 0.5 < kept["lang_score"].iloc[0] <= 1
    kept, _, _ = run_filter(tmp_path / "de", client, [rows], FilterConfig(clip=False, languages=["de", "fr"]))
    assert kept["uid"].tolist() == ["de", "fr"]
    kept, _, _ = run_filter(tmp_path / "any", client, [rows], FilterConfig(clip=False, languages=["any"]))
    assert len(kept) == 3


def test_language_rule_decides_only_on_sure_guesses(tmp_path, client):
    """Short English names that py3langid guesses as other languages, unsure, are kept and counted; sure guesses reject."""
    rows = [
        row("unsure", caption="google emoji: rabbit face"),  # py3langid: la at 0.08
        row("unsure-2", caption="woman dancing emoji"),
        row("short", caption="red heart emoji"),  # 13 letters: identified (below 10 it would not be)
        row("tiny", caption="pile of poo"),  # 9 letters: too short to identify
        row("de", caption="Alle Menschen sind frei und gleich an Würde und Rechten geboren"),
        row("early", caption="rabbit face", original=(100, 100)),  # rejected by min_side before the rule
    ]
    kept, reasons, stats = run_filter(tmp_path / "new", client, [rows], NO_CLIP)
    assert reasons == {"de": "lang", "early": "min_side"}
    by_uid = kept.set_index("uid")
    assert by_uid.loc["tiny", "lang"] == "unknown" and np.isnan(by_uid.loc["tiny", "lang_score"])
    assert by_uid.loc["unsure", "lang"] != "en" and by_uid.loc["unsure", "lang_score"] < 0.5
    rejected = read_stage(tmp_path / "new" / "filter")[1].set_index("uid")
    assert rejected.loc["de", "lang"] == "de" and rejected.loc["de", "lang_score"] >= 0.5  # the guess and its score
    unsure = sum(by_uid.loc[u, "lang"] != "en" for u in ("unsure", "unsure-2", "short"))
    assert stats["counters"]["lang_kept"] == {"unknown": 1, "uncertain": unsure}  # "early" never reached the rule
    assert stats["counters"]["lang_rejected"] == {"de": 1}
    # the previous rule (every guess decides, however short the caption): the unsure English names are rejected
    old = FilterConfig(clip=False, min_lang_score=0.0, min_lang_letters=0)
    _, old_reasons, _ = run_filter(tmp_path / "old", client, [rows], old)
    assert {"unsure", "unsure-2", "de"} <= {u for u, r in old_reasons.items() if r == "lang"}


def test_laion_safety_and_watermark_columns(tmp_path, client):
    rows = [
        row("ok", punsafe=0.5, pwatermark=0.8), row("unsafe", punsafe=0.51, pwatermark=0.1),
        row("watermark", punsafe=0.1, pwatermark=0.81), row("unknown", punsafe=None, pwatermark=None),
    ]
    kept, reasons, _ = run_filter(tmp_path, client, [rows], NO_CLIP)
    assert sorted(kept["uid"]) == ["ok", "unknown"]
    assert reasons == {"unsafe": "punsafe", "watermark": "pwatermark"}


@pytest.mark.slow
def test_clip_threshold_with_a_random_tiny_model(tmp_path, client):
    """Random weights are seeded, so every worker scores alike and a threshold splits the rows exactly."""
    rows = [row(f"r{i}", caption=f"a red circle on a blue background number {i}") for i in range(12)]
    kept, _, _ = run_filter(tmp_path / "all", client, [rows[:6], rows[6:]], FilterConfig(**TINY, clip_threshold=-1.0))
    scores = kept.set_index("uid")["clip_score"]
    assert len(kept) == 12 and scores.between(-1, 1).all() and scores.nunique() > 1
    threshold = float(np.median(scores))
    kept2, reasons2, _ = run_filter(tmp_path / "half", client, [rows[:6], rows[6:]], FilterConfig(**TINY, clip_threshold=threshold))
    assert sorted(kept2["uid"]) == sorted(scores[scores >= threshold].index)
    assert set(reasons2.values()) == {"clip_score"}


def test_clip_top_fraction_is_global(tmp_path, client):
    rows = [row(f"r{i}", caption=f"a green square on a white background {i}") for i in range(10)]
    rows.append(row("too-small", original=(100, 100)))
    kept, reasons, _ = run_filter(tmp_path, client, [rows[:3], rows[3:]], FilterConfig(**TINY, clip_top_fraction=0.3))
    assert len(kept) == 3  # 30% of the 10 rows CLIP scored, across both shards
    assert reasons["too-small"] == "min_side"
    rejected = read_stage(tmp_path / "filter")[1]
    scored = rejected[rejected.reason == "clip_score"]["clip_score"]
    assert kept["clip_score"].min() > scored.max()
    assert np.isnan(rejected[rejected.uid == "too-small"]["clip_score"]).all()  # CLIP never ran on it
    threshold = json.loads((tmp_path / "filter" / "_stats.json").read_text())["config"]["prepared"]  # the global threshold, recorded
    assert scored.max() < threshold <= kept["clip_score"].min()


@pytest.mark.parametrize("fraction", [0.001, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_top_fraction_threshold_is_within_one_bin_below_the_exact_quantile(tmp_path, client, monkeypatch, fraction):
    monkeypatch.setattr(filter_module, "MAX_HISTOGRAM_TASKS", 3)  # 7 files in 3 histogram tasks
    rng = np.random.default_rng(int(fraction * 1000))
    parts = [rng.normal(0.25, 0.05, 3000), rng.uniform(-1, 1, 500), np.full(200, 0.3), rng.normal(0.31, 1e-4, 800),
             np.array([-1.0, 1.0, 0.9999999]), rng.normal(0.1, 0.2, 1500), np.zeros(0)]
    paths = []
    for i, part in enumerate(parts):
        path = tmp_path / f"part-{i:05d}.parquet"
        scores = np.clip(part, -1, 1).astype(np.float32)
        pq.write_table(pa.table({"uid": [f"{i}-{j}" for j in range(len(scores))], "clip_score": scores}), path)
        paths.append(str(path))
    scores = np.concatenate([np.clip(p, -1, 1).astype(np.float32) for p in parts])
    exact = float(np.quantile(scores, 1 - fraction, method="higher"))
    threshold = global_threshold(client, paths, fraction)
    assert exact - SCORE_BIN_WIDTH < threshold <= exact
    kept = int((scores >= threshold).sum())
    same_bin = int(((scores >= threshold) & (scores < threshold + SCORE_BIN_WIDTH)).sum())
    exact_kept = int((scores >= exact).sum())  # what the exact quantile keeps (about fraction * N)
    assert exact_kept <= kept <= exact_kept + same_bin


def test_top_fraction_of_no_scored_rows_keeps_none(tmp_path, client):
    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"uid": pa.array([], pa.string()), "clip_score": pa.array([], pa.float32())}), path)
    assert global_threshold(client, [str(path)], 0.5) == float("inf")


@pytest.mark.parametrize("name", ["dallekit-tiny-clip", "dallekit-tiny-rn-clip"])
def test_clip_checkpoint_saved_and_loaded_from_disk(tmp_path, name):
    from PIL import Image

    scorer = load_clip(name, None)
    folder = save_clip(scorer, name, tmp_path / "clip")
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    images = [Image.new("RGB", (80, 64), c) for c in ("red", "blue", "white")]
    captions = ["a red square", "a blue square", "a white square"]
    expected = scorer.score(images, captions)
    from_folder = load_clip("ignored-name", None, checkpoint=str(folder))
    from_file = load_clip(name, None, checkpoint=str(folder / "open_clip_model.safetensors"))
    np.testing.assert_allclose(from_folder.score(images, captions), expected, atol=1e-5)
    np.testing.assert_allclose(from_file.score(images, captions), expected, atol=1e-5)


def test_pickled_or_missing_checkpoints_are_refused(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(BadInputError, match="expected a .safetensors file"):
        load_clip("dallekit-tiny-clip", None, checkpoint=str(tmp_path / "weights.pt"))
    with pytest.raises(BadInputError, match="expected open_clip_config.json"):
        load_clip("dallekit-tiny-clip", None, checkpoint=str(tmp_path))
    with pytest.raises(BadInputError, match="not an open_clip model name"):
        load_clip("no-such-model", None)


@pytest.mark.slow
def test_unreachable_pretrained_weights_say_what_to_do(tmp_path):
    write_stage(tmp_path / "clean", [[row("a")]])
    proc = subprocess.run(
        [sys.executable, "-m", "dallekit.cli", "filter", str(tmp_path / "clean"), "--out", str(tmp_path / "f"),
         "--clip-model", "ViT-B-32", "--clip-pretrained", "laion2b_s34b_b79k"],
        capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "ViT-B-32/laion2b_s34b_b79k" in last and "--clip-checkpoint" in last and "Traceback" not in proc.stderr


def test_funnel_is_saved(tmp_path, client):
    rows = [row("a"), row("b", original=(100, 100)), row("c", caption="two words")]
    _, _, stats = run_filter(tmp_path, client, [rows], NO_CLIP)
    steps = json.loads((tmp_path / "filter" / "_funnel.json").read_text())["steps"]
    removed = {s["rule"]: s["removed"] for s in steps}
    assert removed["min_side"] == 1 and removed["caption_words"] == 1 and steps[-1]["remaining"] == 1
    assert [s["remaining"] for s in steps] == sorted((s["remaining"] for s in steps), reverse=True)
    assert (tmp_path / "filter" / "_funnel.png").read_bytes()[:4] == b"\x89PNG"


def test_rows_without_a_size_or_image_bytes_fail_min_side(tmp_path, client):
    rows = [
        row("ok"), row("no-size", original=(None, None)), row("no-width", original=(None, 300)),
        row("no-bytes", jpg=None), row("empty-bytes", jpg=b""),
    ]
    kept, reasons, _ = run_filter(tmp_path, client, [rows], FilterConfig(clip=False, languages=["any"]))
    assert kept["uid"].tolist() == ["ok"]
    assert reasons == {"no-size": "min_side", "no-width": "min_side", "no-bytes": "min_side", "empty-bytes": "min_side"}
    rejected = read_stage(tmp_path / "filter")[1].set_index("uid")
    assert np.isnan(rejected.loc["no-width", "min_side"])  # a missing side is no size, not the other side


def test_clip_never_decodes_an_image_over_64_mpx(tmp_path, monkeypatch):
    """CLIP is the filter's one decode: rows whose header says 20000x20000 or 9000x9000 are rejected before it, undecoded."""
    attempts = forbid_large_decodes(monkeypatch)  # the shard task runs in this process: a decode of a huge row fails the test
    huge = [downloaded_row(uid, GOOD, png_header_only(*size), size=size, original=size) for uid, size in HUGE_IMAGES.items()]
    write_stage(tmp_path / "clean", [[row("ok"), *huge]])
    task = filter_module.FilterShard(str(tmp_path / "clean" / "part-00000.parquet"), FilterConfig(**TINY, clip_threshold=-1.0), str(tmp_path / "work"))
    result = filter_module.filter_shard(task)
    assert result.kept.column("uid").to_pylist() == ["ok"]
    assert dict(zip(*(result.rejects.column(c).to_pylist() for c in ("uid", "reason")))) == {"huge": "image_too_large", "large": "image_too_large"}
    assert attempts == [] and "image_too_large" in filter_module.RULES
    no_clip = filter_module.filter_shard(filter_module.FilterShard(task.path, NO_CLIP, task.work_dir))
    assert no_clip.kept.num_rows == 3  # without CLIP the filter decodes nothing, so it has no reason to look


def test_clip_rejects_images_that_do_not_decode_instead_of_failing(tmp_path):
    """A row with no readable header and one whose JPEG body is cut short are `undecodable`, and the rest of the shard is scored."""
    good = row("ok")
    cut = downloaded_row("cut", GOOD, good["jpg"][:200], original=(300, 300))  # the header is whole, the scan is not
    garbage = downloaded_row("garbage", GOOD, b"not an image at all", original=(300, 300))
    write_stage(tmp_path / "clean", [[good, cut, garbage]])
    task = filter_module.FilterShard(str(tmp_path / "clean" / "part-00000.parquet"), FilterConfig(**TINY, clip_threshold=-1.0), str(tmp_path / "work"))
    result = filter_module.filter_shard(task)
    assert result.kept.column("uid").to_pylist() == ["ok"]
    assert dict(zip(*(result.rejects.column(c).to_pylist() for c in ("uid", "reason")))) == {"cut": "undecodable", "garbage": "undecodable"}


def test_a_rerun_of_the_clip_pass_skips_whole_scores_and_redoes_truncated_ones(tmp_path, client):
    from dallekit.pipeline.filter import plan_filter
    from dallekit.pipeline.passes import claim_work_dir

    rows = [row(f"r{i}", caption=f"a green square on a white background {i}") for i in range(6)]
    write_stage(tmp_path / "clean", [rows[:3], rows[3:]], stage="clean")
    plan, out = plan_filter(str(tmp_path / "clean"), FilterConfig(**TINY, clip_top_fraction=0.5)), tmp_path / "filter"
    out.mkdir()
    claim_work_dir(str(out))
    threshold = plan.global_pass(client, str(out))  # the CLIP pass and the global threshold, as the stage runs them
    scores = out / "_work" / "clip"
    first = {p.name: p.read_bytes() for p in scores.glob("part-*")}
    whole = (scores / "part-00001.parquet").stat()
    (scores / "part-00000.parquet").write_bytes(first["part-00000.parquet"][:100])  # cut short: its mark stays
    assert plan.global_pass(client, str(out)) == threshold
    assert {p.name: p.read_bytes() for p in scores.glob("part-*")} == first
    assert ((scores / "part-00001.parquet").stat().st_ino, (scores / "part-00001.parquet").stat().st_mtime_ns) == (whole.st_ino, whole.st_mtime_ns)


def test_loading_clip_leaves_the_root_logger_without_a_handler(monkeypatch):
    """open_clip's root-logger INFO call would install a stderr handler that prints Dask's INFO lines in every CLIP stage."""
    import logging

    monkeypatch.setattr(logging.root, "handlers", [])
    load_clip("dallekit-tiny-clip", None, device="cpu")
    assert logging.root.handlers == []
