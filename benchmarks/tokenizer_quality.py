"""Image tokenizers and generation on real pictures: the tiny dVAE against the FSQ tokenizer.

The pictures are real: the 64 px PNGs of emoji-datasource-apple@16.0.0, fetched at run time
with `npm pack` into .bench/npm/ (gitignored), matted on white, each captioned with its Unicode
name from the package's emoji.json (skin-tone variants add CLDR's tone names). 10% of the names
(by hash) are held out; the other 90% are laid out as a user's folder (`img/<file>.png` and a
same-named `.txt`) and go through ingest, download, clean and filter with the packaged
`configs/small-real.toml`, the recipe the README documents.

Tokenizers: the `tiny` dVAE and `fsq-tiny` train on the filtered pictures at 32 px with 8x8 codes,
for the same steps and batch size (alternating, one after the other); each one's held-out PSNR
and code usage are measured on the held-out names' pictures, with its CPU seconds.

Generation: each tokenizer's tokens train the `tiny` transformer for the same steps (the
recipe's [train] section); for a fixed sample of 200 training captions, 8 candidates are
generated and reranked by the recipe's CLIP (trained once on the cleaned pairs), and
retrieval@1 is how often the top-1's nearest training picture (pixel L2 at 32 px) is the
caption's own: for the published model (the best validation image loss) and for the trainer's
last moving-average weights (what `[train] val_fraction = 0` publishes). Sample grids of both go to docs/tokenizer_samples.png and
docs/tokenizer_reconstructions.png.

Last line: ratio=<dVAE held-out MSE / FSQ held-out MSE> (target >= 2.5; retrieval@1 of the FSQ
path >= 0.5, code usage >= 90%).

    python benchmarks/tokenizer_quality.py [--tokenizer-steps N] [--train-steps N] [--captions 200] [--work DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import resource
import tarfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from language_rule import npm_pack
from PIL import Image
from real_folder_funnel import captioned_images

ROOT = Path(__file__).resolve().parent.parent
SIDE = 32  # the tokenizers' input side


def emoji_pictures() -> list[tuple[str, bytes]]:
    """(caption, PNG bytes matted on white) for every apple emoji picture, captioned with its Unicode name."""
    pictures = []
    with tarfile.open(npm_pack("emoji-datasource-apple@16.0.0")) as tar:
        emoji = json.load(tar.extractfile("package/emoji.json"))
        members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.name.startswith("package/img/apple/64/")}
        for image, caption in sorted(captioned_images(emoji, "apple").items()):
            if image in members:
                rgba = Image.open(tar.extractfile(members[image])).convert("RGBA")
                matted = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                matted.alpha_composite(rgba)
                buffer = io.BytesIO()
                matted.convert("RGB").save(buffer, format="PNG")
                pictures.append((caption.removeprefix("apple emoji: "), buffer.getvalue()))
    return pictures


def is_held_out(name: str) -> bool:
    """The 10% of names held out from every training step, by a stable hash."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little") % 10 == 0


def square(data: bytes) -> np.ndarray:
    """A picture at the tokenizers' side, decoded the way they decode (header first, Lanczos, centre crop)."""
    from dallekit.images import load_square

    return load_square(data, SIDE)


def lay_out(folder: Path, pictures: list[tuple[str, bytes]]) -> None:
    """img/<n>.png and img/<n>.txt: a user's folder of captioned pictures."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i, (caption, data) in enumerate(pictures):
        (folder / "img" / f"{i:05d}.png").write_bytes(data)
        (folder / "img" / f"{i:05d}.txt").write_text(caption)


def recipe(work: Path, args):
    """The packaged small-real recipe as a Pipeline, with the benchmark's run folder and step counts."""
    from dallekit.config import load_toml
    from dallekit.jobs.steps import load_pipeline

    toml = load_toml(str(ROOT / "dallekit" / "configs" / "small-real.toml"))
    toml["run"] = toml["run"] | {"out": str(work / "run"), "inputs": [str(work / "folder")]}
    pipeline = load_pipeline(toml, "small-real.toml")
    tokenizer = replace(pipeline.train_tokenizer, max_steps=args.tokenizer_steps, batch_size=32, checkpoint_every=args.tokenizer_steps)
    return replace(pipeline, train_tokenizer=tokenizer, train=replace(pipeline.train, max_steps=args.train_steps))


def data_steps(p) -> dict:
    """ingest, download, clean, train-clip and filter of the recipe (the run's own code path, stopped before the tokenizer)."""
    from dallekit.jobs.steps import run_pipeline

    started = time.time()
    result = run_pipeline(replace(p, run=replace(p.run, stop_after="filter")))
    kept = {s["stage"]: s["rows_out"] for s in result["stages"]}
    print(f"data: {json.dumps(kept)} in {time.time() - started:.0f} s")
    return kept


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (the trainers run in it)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_tokenizers(p, work: Path) -> dict[str, dict]:
    """Both tokenizers, the same steps and batch size, one after the other; {kind: {folder, cpu_s}}."""
    from dallekit.training.tokenizer import train_tokenizer

    out = {}
    for kind, preset in (("dVAE", "tiny"), ("FSQ", "fsq-tiny")):
        folder = work / f"tokenizer-{kind}"
        before = cpu_seconds()
        if not (folder / "model.safetensors").exists():
            train_tokenizer(str(work / "run" / "filter"), str(folder), replace(p.train_tokenizer, preset=preset))
        out[kind] = {"folder": folder, "cpu_s": cpu_seconds() - before}
    return out


def held_out_quality(folder: Path, held_out: np.ndarray) -> dict:
    """Held-out MSE, PSNR and code usage of a tokenizer folder, plus its reconstructions."""
    from dallekit.tokenize.image import ImageTokenizer

    tokenizer = ImageTokenizer.load(str(folder), "cpu")
    codes = np.concatenate([tokenizer.encode(held_out[i : i + 64]) for i in range(0, len(held_out), 64)])
    recon = np.concatenate([tokenizer.decode(codes[i : i + 64]) for i in range(0, len(codes), 64)])
    mse = float(((recon.astype(np.float64) - held_out) ** 2).mean() / 255**2)
    used = len(np.unique(codes)) / tokenizer.config.codebook_size
    return {"mse": mse, "psnr": 10 * np.log10(1 / mse), "codes_used": used, "codebook": tokenizer.config.codebook_size, "recon": recon}


def train_transformers(p, work: Path, tokenizers: dict) -> None:
    """Encode the filtered pictures with each tokenizer and train the recipe's transformer on them, the same steps."""
    from dallekit.pipeline.cluster import dask_client
    from dallekit.pipeline.encode import encode
    from dallekit.training.transformer import train_transformer

    for kind, t in tokenizers.items():
        t["tokens"], t["model"] = work / f"tokens-{kind}", work / f"model-{kind}"
        with dask_client(p.cluster) as client:
            encode(str(work / "run" / "filter"), str(t["folder"]), str(t["tokens"]), replace(p.encode, text_tokenizer=str(work / "run" / "bpe")), client)
        before = cpu_seconds()
        if not (t["model"] / "model.safetensors").exists():
            train_transformer(str(t["tokens"]), str(t["model"]), p.train)
        t["train_cpu_s"] = cpu_seconds() - before


def latest_weights(model_dir: Path) -> Path:
    """A model folder holding the trainer's last moving-average weights (from its checkpoint), beside the published best-validation one."""
    from safetensors.torch import load_file, save_file

    folder = model_dir.with_name(model_dir.name + "-last")
    folder.mkdir(exist_ok=True)
    state = load_file(str(model_dir / "checkpoint" / "state.safetensors"))
    save_file({k.removeprefix("ema."): v.contiguous() for k, v in state.items() if k.startswith("ema.")}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text((model_dir / "config.json").read_text())
    return folder


def training_pictures(filter_dir: Path) -> tuple[list[str], np.ndarray]:
    """(captions, pictures (N, 32, 32, 3)) of every filtered row: what retrieval searches."""
    from dallekit.io import list_shards, read_shard

    captions, pictures = [], []
    for path in list_shards(str(filter_dir)):
        table = read_shard(path, columns=["caption", "jpg"])
        for caption, data in zip(table.column("caption").to_pylist(), table.column("jpg").to_pylist()):
            captions.append(caption)
            pictures.append(square(data))
    return captions, np.stack(pictures)


def sampled_captions(tokens: Path, p, count: int) -> list[str]:
    """A fixed sample of `count` captions from the transformer's training shards (not its validation shards)."""
    import pyarrow.parquet as pq

    from dallekit.io import list_shards
    from dallekit.training.transformer import split_shards

    train_paths, _ = split_shards(list_shards(str(tokens)), p.train.val_fraction, p.train.seed)
    captions = sorted({c for path in train_paths for c in pq.read_table(path, columns=["caption"]).column("caption").to_pylist()})
    return random.Random(0).sample(captions, min(count, len(captions)))


def retrieval_at_1(t: dict, p, captions: list[str], pictures: tuple[list[str], np.ndarray], scorer) -> tuple[float, list[np.ndarray]]:
    """How often the CLIP-reranked top-1 of 8 candidates is nearest (pixel L2) to its caption's own training picture; the top-1s."""
    from dallekit.generation.sample import generate_images, load_transformer, text_tokenizer_for
    from dallekit.tokenize.image import ImageTokenizer

    model, metadata = load_transformer(str(t["model"]), "cpu")
    tokenizer, text = ImageTokenizer.load(str(t["folder"]), "cpu"), text_tokenizer_for(metadata)
    names, library = pictures
    flat = library.reshape(len(library), -1).astype(np.float32)
    options = replace(p.sample, n=8, batch_size=64)
    hits, tops = 0, []
    generated = generate_images(model, tokenizer, [text.encode(c) for c in captions], options, [1000 + i for i in range(len(captions))])
    for caption, images in zip(captions, generated):
        scores = scorer.score([Image.fromarray(im) for im in images], [caption] * len(images))
        top = images[int(np.argmax(scores))]
        distances = ((flat - top.reshape(1, -1).astype(np.float32)) ** 2).sum(axis=1)
        hits += names[int(np.argmin(distances))] == caption
        tops.append(top)
    return hits / len(captions), tops


def save_grids(quality: dict, held_out: np.ndarray, tops: dict, library: tuple[list[str], np.ndarray], captions: list[str]) -> None:
    """docs/tokenizer_reconstructions.png (held-out originals, dVAE, FSQ) and docs/tokenizer_samples.png (own picture, dVAE, FSQ top-1)."""
    from dallekit.images import labelled_grid

    n = 12
    rows = [held_out[:n], quality["dVAE"]["recon"][:n], quality["FSQ"]["recon"][:n]]
    labels = [f"{name} {i}" for name in ("held-out", "dVAE", "FSQ") for i in range(n)]
    labelled_grid([im for row in rows for im in row], labels, columns=n, side=96).save(ROOT / "docs" / "tokenizer_reconstructions.png")
    names, pictures = library
    own = [pictures[names.index(c)] for c in captions[:n]]
    images = own + tops["dVAE"][:n] + tops["FSQ"][:n]
    labels = [c[:14] for c in captions[:n]] + ["dVAE"] * n + ["FSQ"] * n
    labelled_grid(images, labels, columns=n, side=96).save(ROOT / "docs" / "tokenizer_samples.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-steps", type=int, default=1500)
    parser.add_argument("--train-steps", type=int, default=4000)
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--work", default=str(ROOT / ".bench" / "tokenizer_quality"))
    args = parser.parse_args()
    work = Path(args.work)
    pictures = emoji_pictures()
    train = [(c, d) for c, d in pictures if not is_held_out(c)]
    held_out = np.stack([square(d) for c, d in pictures if is_held_out(c)])
    print(f"pictures: {len(pictures)}, {len(train)} for training, {len(held_out)} held out by name")
    if not (work / "folder").exists():
        lay_out(work / "folder", train)
    p = recipe(work, args)
    data_steps(p)
    if not (work / "run" / "bpe" / "tokenizer.json").exists():
        from dallekit.io import iter_captions
        from dallekit.tokenize.text import train_bpe

        train_bpe(iter_captions(str(work / "run" / "filter")), str(work / "run" / "bpe"), vocab_size=p.run.bpe_vocab_size)
    tokenizers = train_tokenizers(p, work)
    quality = {kind: held_out_quality(t["folder"], held_out) for kind, t in tokenizers.items()}
    for kind, q in quality.items():
        print(f"{kind:<5} held-out PSNR {q['psnr']:.2f} dB  MSE {q['mse']:.5f}  codes used {q['codes_used']:.1%} of {q['codebook']}  "
              f"CPU {tokenizers[kind]['cpu_s']:.0f} s  ({args.tokenizer_steps} steps of 32)")
    train_transformers(p, work, tokenizers)
    from dallekit.models.clip import load_clip

    scorer = load_clip(p.train_clip.model, None, str(work / "run" / "clip"))
    library = training_pictures(work / "run" / "filter")
    captions = sampled_captions(tokenizers["FSQ"]["tokens"], p, args.captions)
    tops = {}
    for kind, t in tokenizers.items():
        best_step = json.loads((t["model"] / "config.json").read_text()).get("best_step")
        score, tops[kind] = retrieval_at_1(t, p, captions, library, scorer)
        last, _ = retrieval_at_1(t | {"model": latest_weights(t["model"])}, p, captions, library, scorer)
        print(f"{kind:<5} transformer {args.train_steps} steps (CPU {t['train_cpu_s']:.0f} s): retrieval@1 over {len(captions)} training "
              f"captions {score:.3f} for the published model (best validation, step {best_step}), {last:.3f} for the last (EMA) weights")
    save_grids(quality, held_out, tops, library, captions)
    print(f"ratio={quality['dVAE']['mse'] / quality['FSQ']['mse']:.3f}")


if __name__ == "__main__":
    main()
