"""`dallekit evaluate`: validation loss, the CLIP reranking effect, and FID when Inception weights are local.

For held-out captions it generates N candidates each and reports the mean CLIP score of a random
candidate (N = 1) against the best of N for N = 1, 2, 4, ... (the DALL-E paper's reranking
effect), plots it (`clip_vs_n.png`), and, with a pixel judge (the demo's), how often a random and
the reranked candidate are right by its pixel check. Everything goes to `eval.json`. FID is
reported as skipped, with the reason: its Inception weights exist only as a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from dallekit.charts import line_chart
from dallekit.config import EvaluateConfig, SampleConfig
from dallekit.generation.sample import (
    PixelJudge,
    check_dvae,
    generate_images,
    load_transformer,
    text_tokenizer_for,
)
from dallekit.io import list_shards, read_shard
from dallekit.models.weights import pick_device
from dallekit.tokenize.image import ImageTokenizer
from dallekit.tokenize.tokens import check_token_files
from dallekit.training.transformer import validation_loss


def held_out_captions(paths: list[str], limit: int) -> list[str]:
    """Up to `limit` distinct captions, in file order."""
    seen: dict[str, None] = {}
    for path in paths:
        for caption in read_shard(path, columns=["caption"]).column("caption").to_pylist():
            seen.setdefault(caption, None)
            if len(seen) == limit:
                return list(seen)
    return list(seen)


def fid_status() -> str:
    """Why FID is not reported: its Inception v3 weights exist only as a pickle, which dallekit never loads."""
    import os

    import torch

    hub = Path(os.environ.get("TORCH_HOME", Path(torch.hub.get_dir()))) / "checkpoints"
    found = list(hub.glob("inception_v3_google-*.pth"))
    where = f"found at {found[0]}" if found else f"not in {hub}, and they would have to be downloaded"
    return f"FID skipped: torchvision's Inception v3 weights are a pickle file ({where}); dallekit loads no pickles"


def evaluate(model_dir: str, dvae_dir: str, tokens: str | list[str], out_dir: str, scorer, options: EvaluateConfig,
             device: str = "auto", judge: PixelJudge | None = None) -> dict:
    """Run the evaluation on held-out token shards (a folder, or a list of shard paths); writes eval.json and clip_vs_n.png."""
    model, metadata = load_transformer(model_dir, device)
    dvae = ImageTokenizer.load(dvae_dir, device)
    check_dvae(metadata, dvae, dvae_dir)
    paths = list_shards(tokens) if isinstance(tokens, str) else tokens
    check_token_files(paths, expected=metadata)
    loss_options = SimpleNamespace(batch_size=options.batch_size, val_batches=options.val_batches, dtype="bf16")
    results: dict = validation_loss(model, paths, loss_options, model.config, pick_device(device))
    n, batch_size, seed = options.n, options.batch_size, options.seed
    tokenizer = text_tokenizer_for(metadata)
    ns = [2**k for k in range(int(np.log2(n)) + 1)]
    best_of = {m: [] for m in ns}
    random_right, reranked_right = [], []
    captions = held_out_captions(paths, options.captions)
    generated = generate_images(model, dvae, [tokenizer.encode(c) for c in captions], SampleConfig(n=n, batch_size=batch_size),
                                [seed * 100_003 + i for i in range(len(captions))])
    for caption, images in zip(captions, generated):
        scores = scorer.score([Image.fromarray(im) for im in images], [caption] * len(images))
        for m in ns:
            best_of[m].append(float(scores[:m].max()))
        if judge is not None and judge.judges(caption):
            right = [judge.is_right(im, caption) for im in images]
            random_right.append(float(np.mean(right)))
            reranked_right.append(float(right[int(np.argmax(scores))]))
    curve = {m: float(np.mean(v)) for m, v in best_of.items()}
    results |= {
        "captions": len(best_of[1]), "candidates": n, "clip_score_random": curve[1], "clip_score_reranked": curve[n],
        "clip_score_best_of_n": {str(m): v for m, v in curve.items()}, "fid": None, "fid_note": fid_status(),
    }
    if random_right:
        results |= {"pixel_right_random": float(np.mean(random_right)), "pixel_right_reranked": float(np.mean(reranked_right))}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(results, indent=2))
    (out / "clip_vs_n.png").write_bytes(line_chart(ns, {"best of N": [curve[m] for m in ns]}, "CLIP score of the reranked best vs N",
                                                   "candidates N", "CLIP score", log2_x=True))
    return results
