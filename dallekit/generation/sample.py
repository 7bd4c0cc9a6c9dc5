"""Generation with CLIP reranking: N candidates per prompt, decoded by the dVAE, the best K kept.

`dallekit sample --model DIR --dvae DIR --prompt TEXT...` writes, per prompt, the kept PNGs
(rank 0 = best by CLIP), a grid, and one `samples.jsonl` line per kept image (prompt, file,
rank, clip_score, seed). A seed makes a run reproducible. With a pixel judge (the demo passes
its shapes judge), the prompts it understands are also judged: `pixel_right` per kept image, and
`pixel_check.json` with how often a random candidate and the reranked top-1 are right, for seen
and zero-shot pairs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from dallekit.config import SampleConfig
from dallekit.errors import BadInputError
from dallekit.images import save_image_grid
from dallekit.models.transformer import DalleConfig, DalleTransformer
from dallekit.models.weights import (
    build_model,
    load_model_state,
    load_weights,
    pick_device,
)
from dallekit.progress import progress
from dallekit.tokenize.image import ImageTokenizer
from dallekit.tokenize.text import load_text_tokenizer
from dallekit.tokenize.tokens import check_same_tokenizer


class PixelJudge(Protocol):
    """Judges generated images by their pixels, for the captions it understands (the demo's shapes judge is one)."""

    def judges(self, caption: str) -> bool: ...
    def is_right(self, image: np.ndarray, caption: str) -> bool: ...
    def is_zero_shot(self, caption: str) -> bool: ...


def load_transformer(model_dir: str, device: str = "auto") -> tuple[DalleTransformer, dict]:
    """The trained transformer and the token metadata it was trained on."""
    values, state = load_model_state(model_dir)
    if values.get("model") != "dallekit-dalle":
        raise BadInputError(f"{model_dir}: not a transformer folder written by `dallekit train`")
    model = build_model(DalleTransformer, DalleConfig, values, model_dir)
    load_weights(model, state, model_dir)
    return model.to(pick_device(device)).eval(), values["tokens"]


def text_tokenizer_for(metadata: dict):
    """The text tokenizer the token files were made with."""
    text = metadata["text_tokenizer"]
    return load_text_tokenizer("clip-bpe" if text["kind"] == "clip-bpe" else text["path"])


def check_dvae(metadata: dict, dvae: ImageTokenizer, dvae_dir: str) -> None:
    """The image tokenizer (dVAE or FSQ) must be the one whose codes the transformer learned: bad input naming both."""
    check_same_tokenizer(dvae.metadata(), metadata["image_tokenizer"], dvae_dir, "the model", found_is="is")


@torch.no_grad()
def generate_images(model: DalleTransformer, dvae: ImageTokenizer, prompt_ids: list[list[int]], options: SampleConfig,
                    seeds: list[int]) -> Iterator[np.ndarray]:
    """options.n images (n, S, S, 3) uint8 per caption's BPE ids, in order; prompt i's candidates come from seeds[i] alone.

    Prompts whose candidates fit in options.batch_size together share one generation (small
    batches leave the CPU mostly idle between kernels); a prompt with more candidates than that
    is generated in batches of options.batch_size.
    """
    n, batch_size = options.n, options.batch_size
    per_call = max(1, batch_size // n)  # prompts generated together
    for first in range(0, len(prompt_ids), per_call):
        group = prompt_ids[first : first + per_call]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[first : first + per_call]]
        if n <= batch_size:
            yield from np.split(_decoded_candidates(model, dvae, [ids for ids in group for _ in range(n)], options, generators), len(group))
        else:  # one prompt, its candidates in batches drawn one after another from its generator
            yield np.concatenate([_decoded_candidates(model, dvae, [group[0]] * min(batch_size, n - start), options, generators[0])
                                  for start in range(0, n, batch_size)])


def _decoded_candidates(model: DalleTransformer, dvae: ImageTokenizer, rows: list[list[int]], options: SampleConfig, generator) -> np.ndarray:
    """One generation of image tokens for these rows of BPE ids, decoded to (rows, S, S, 3) uint8."""
    text = model.pad_text(rows).to(next(model.parameters()).device)
    codes = model.generate(text, options.temperature, options.top_k, options.top_p, options.cond_scale, generator)
    return dvae.decode(codes.cpu().numpy())


def sample(model_dir: str, dvae_dir: str, prompts: list[str], out_dir: str, options: SampleConfig, scorer=None,
           device: str = "auto", judge: PixelJudge | None = None) -> list[dict]:
    """Generate, rerank with CLIP (`scorer`, or keep generation order without one) and save; returns the jsonl records."""
    if not prompts:
        raise BadInputError("no prompts: pass --prompt TEXT or --prompts FILE")
    if options.keep > options.n:
        raise BadInputError(f"--keep {options.keep} is more than -n {options.n}")
    model, metadata = load_transformer(model_dir, device)
    dvae = ImageTokenizer.load(dvae_dir, device)
    check_dvae(metadata, dvae, dvae_dir)
    tokenizer = text_tokenizer_for(metadata)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records, checks = [], []
    seeds = [options.seed * 100_003 + p for p in range(len(prompts))]
    generated = generate_images(model, dvae, [tokenizer.encode(prompt) for prompt in prompts], options, seeds)
    for p, (prompt, images) in enumerate(progress(zip(prompts, generated), total=len(prompts), desc="sample", unit="prompt")):
        seed = seeds[p]
        scores = scorer.score([Image.fromarray(im) for im in images], [prompt] * len(images)) if scorer is not None else np.full(len(images), np.nan)
        order = np.argsort(-scores, kind="stable") if scorer is not None else np.arange(len(images))
        kept = [images[i] for i in order[: options.keep]]
        # a caption the judge reads is judged by pixels: keep every candidate's verdict
        right = [judge.is_right(im, prompt) for im in images] if judge is not None and judge.judges(prompt) else None
        for rank, i in enumerate(order[: options.keep]):
            name = f"prompt{p:03d}_rank{rank}.png"
            Image.fromarray(images[i]).save(out / name)
            record = {"prompt": prompt, "file": name, "rank": rank, "clip_score": None if np.isnan(scores[i]) else float(scores[i]), "seed": seed}
            records.append(record | ({"pixel_right": right[i]} if right else {}))
        save_image_grid(kept, out / f"prompt{p:03d}_grid.png")
        if right:
            checks.append({"prompt": prompt, "zero_shot": judge.is_zero_shot(prompt), "grid": f"prompt{p:03d}_grid.png",
                           "random_right": float(np.mean(right)), "reranked_right": float(right[order[0]])})
    with (out / "samples.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if checks:
        (out / "pixel_check.json").write_text(json.dumps(pixel_check_summary(checks), indent=2))
    return records


def pixel_check_summary(checks: list[dict]) -> dict:
    """Seen and zero-shot rates of a random candidate and of the reranked top-1 being right, from per-prompt checks."""
    summary: dict = {"prompts": checks}
    for split, zero_shot in (("seen", False), ("zero_shot", True)):
        rows = [c for c in checks if c["zero_shot"] == zero_shot]
        if rows:
            summary[split] = {
                "prompts": len(rows),
                "random_right": float(np.mean([c["random_right"] for c in rows])),
                "reranked_right": float(np.mean([c["reranked_right"] for c in rows])),
            }
    return summary
