"""encode: token Parquet readable with plain pandas/pyarrow, metadata checks, rejects, decode, BPE."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dallekit.config import EncodeConfig
from dallekit.errors import BadInputError
from dallekit.generation.decode import decode_tokens
from dallekit.images import load_square
from dallekit.models.dvae import DVAE, dvae_config, save_dvae_config
from dallekit.models.weights import save_model
from dallekit.pipeline.encode import encode, encode_shard, plan_encode
from dallekit.tokenize.image import ImageTokenizer
from dallekit.tokenize.text import load_text_tokenizer, train_bpe
from dallekit.tokenize.tokens import check_token_files
from tests.helpers import check_accounting
from tests.stage_data import HUGE_IMAGES, downloaded_row, forbid_large_decodes, png_header_only, shape_jpeg, write_stage


@pytest.fixture(scope="module")
def random_dvae(tmp_path_factory):
    """A randomly initialised tiny dVAE saved as train-dvae saves one."""
    torch.manual_seed(0)
    config = dvae_config("tiny")
    folder = tmp_path_factory.mktemp("dvae")
    save_model(folder, DVAE(config), save_dvae_config(config))
    return folder


def filtered_stage(folder):
    good = [downloaded_row(f"u{i:02d}", f"a shape number {i}", shape_jpeg(i, size=80), clip_score=0.3 + i / 100) for i in range(10)]
    half = shape_jpeg(99, size=80)
    bad = downloaded_row("broken", "a truncated image", half[: len(half) // 2], clip_score=0.5)
    write_stage(folder, [good[:6], good[6:] + [bad]])
    return folder


@pytest.mark.slow
def test_token_files_read_with_plain_pandas_and_pyarrow(tmp_path, client, random_dvae):
    src = filtered_stage(tmp_path / "filtered")
    stats = encode(str(src), str(random_dvae), str(tmp_path / "tokens"), EncodeConfig(batch_size=4), client)
    kept, rejects = check_accounting(tmp_path / "tokens", 11)
    assert rejects["uid"].tolist() == ["broken"] and rejects["reason"].tolist() == ["undecodable"]
    assert stats["reasons"] == {"undecodable": 1}
    schema = pq.read_schema(tmp_path / "tokens" / "part-00000.parquet")
    assert schema.field("uid").type == pa.string() and schema.field("caption").type == pa.string()
    assert schema.field("text_tokens").type == pa.list_(pa.uint16())
    assert schema.field("image_tokens").type == pa.list_(pa.uint16(), 64)
    assert schema.field("clip_score").type == pa.float64()
    meta = json.loads(schema.metadata[b"dallekit"])
    assert meta["format"] == "dallekit.tokens/1"
    assert meta["image_tokenizer"] | {"sha256": None} == {"kind": "dallekit-dvae", "codebook_size": 128, "grid": 8, "image_size": 32, "sha256": None}
    assert meta["text_tokenizer"] == {"kind": "clip-bpe", "vocab_size": 49408}
    df = pd.read_parquet(tmp_path / "tokens")
    assert len(df) == 10 and df["image_tokens"].map(len).eq(64).all()
    assert df["image_tokens"].iloc[0].dtype == np.uint16 and df["text_tokens"].iloc[0].dtype == np.uint16
    row = df[df.uid == "u03"].iloc[0]
    assert list(row["text_tokens"]) == load_text_tokenizer("clip-bpe").encode("a shape number 3")
    # the codes are the dVAE's argmax codes of the centre-cropped image
    tokenizer = ImageTokenizer.load(str(random_dvae))
    expected = tokenizer.encode(load_square(shape_jpeg(3, size=80), 32)[None])[0]
    np.testing.assert_array_equal(row["image_tokens"], expected)


@pytest.mark.slow
def test_mismatched_metadata_is_a_clear_error(tmp_path, client, random_dvae):
    src = filtered_stage(tmp_path / "filtered")
    encode(str(src), str(random_dvae), str(tmp_path / "a"), EncodeConfig(), client)
    torch.manual_seed(1)
    other = tmp_path / "other-dvae"
    config = dvae_config("tiny", codebook_size=256)
    save_model(other, DVAE(config), save_dvae_config(config))
    encode(str(src), str(other), str(tmp_path / "b"), EncodeConfig(), client)
    paths = [str(tmp_path / "a" / "part-00000.parquet"), str(tmp_path / "b" / "part-00001.parquet")]
    with pytest.raises(BadInputError, match=r"b/part-00001.parquet: image_tokenizer codebook_size=256.*disagrees.*codebook_size=128"):
        check_token_files(paths)
    with pytest.raises(BadInputError, match=r"encoded with the image tokenizer dallekit-dvae \(256 codes.*is dallekit-dvae \(128 codes"):
        decode_tokens(str(tmp_path / "b"), str(random_dvae), str(tmp_path / "png"))


@pytest.mark.slow
def test_decode_gives_the_dvae_reconstruction(tmp_path, client, random_dvae):
    src = filtered_stage(tmp_path / "filtered")
    encode(str(src), str(random_dvae), str(tmp_path / "tokens"), EncodeConfig(), client)
    written = decode_tokens(str(tmp_path / "tokens"), str(random_dvae), str(tmp_path / "png"), limit=3)
    assert [p.name for p in written] == ["u00.png", "u01.png", "u02.png"] and (tmp_path / "png" / "grid.png").exists()
    tokenizer = ImageTokenizer.load(str(random_dvae))
    codes = pd.read_parquet(tmp_path / "tokens" / "part-00000.parquet")["image_tokens"].iloc[0]
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(written[0])), tokenizer.decode(np.stack([codes]))[0])


def test_trained_bpe_tokenizer_is_recorded(tmp_path, client, random_dvae):
    captions = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue") for s in ("circle", "square") for b in ("white", "black")] * 20
    bpe = train_bpe(captions, str(tmp_path / "bpe"), vocab_size=300)
    assert bpe.vocab_size <= 300 and bpe.decode(bpe.encode("A red circle")).strip() == "a red circle"
    src = filtered_stage(tmp_path / "filtered")
    encode(str(src), str(random_dvae), str(tmp_path / "tokens"), EncodeConfig(text_tokenizer=str(tmp_path / "bpe")), client)
    meta = check_token_files([str(p) for p in sorted((tmp_path / "tokens").glob("part-*.parquet"))])
    assert meta["text_tokenizer"]["kind"] == "bpe" and meta["text_tokenizer"]["vocab_size"] == bpe.vocab_size
    assert meta["text_tokenizer"]["path"] == str((tmp_path / "bpe" / "tokenizer.json").resolve())  # found from any working directory
    df = pd.read_parquet(tmp_path / "tokens")
    assert list(df["text_tokens"].iloc[0]) == bpe.encode(df["caption"].iloc[0])


@pytest.mark.slow
def test_hugging_face_datasets_reads_token_and_filtered_folders(tmp_path, client, random_dvae, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import datasets

    src = filtered_stage(tmp_path / "filtered")
    encode(str(src), str(random_dvae), str(tmp_path / "tokens"), EncodeConfig(batch_size=4), client)
    cache = str(tmp_path / "hf-cache")
    tokens = datasets.load_dataset("parquet", data_files=str(tmp_path / "tokens" / "part-*.parquet"), split="train", cache_dir=cache)
    feature = tokens.features["image_tokens"]
    assert getattr(feature, "length", None) == 64  # a fixed-length sequence, as the Arrow fixed_size_list says
    assert feature.feature.dtype == "uint16" and tokens.features["text_tokens"].feature.dtype == "uint16"
    by_uid = pd.read_parquet(tmp_path / "tokens").set_index("uid")
    assert len(tokens) == len(by_uid) == 10
    for row in tokens:
        assert row["image_tokens"] == by_uid.loc[row["uid"], "image_tokens"].tolist()
    images = datasets.load_dataset("parquet", data_files=str(src / "part-*.parquet"), split="train", cache_dir=cache)
    assert images.features["jpg"].dtype == "binary" and images.features["caption"].dtype == "string"
    source = pd.read_parquet(src).set_index("uid")
    assert all(row["jpg"] == source.loc[row["uid"], "jpg"] for row in images)


def test_images_over_64_mpx_are_rejected_without_a_decode(tmp_path, monkeypatch, random_dvae):
    attempts = forbid_large_decodes(monkeypatch)  # the shard task runs in this process: a decode of a huge row fails the test
    huge = [downloaded_row(uid, "a huge picture", png_header_only(*size), size=size, original=size) for uid, size in HUGE_IMAGES.items()]
    write_stage(tmp_path / "filtered", [[downloaded_row("ok", "a shape", shape_jpeg(1, size=80)), *huge]])
    (task,) = plan_encode(str(tmp_path / "filtered"), str(random_dvae), EncodeConfig()).tasks(None, str(tmp_path / "tokens"))
    result = encode_shard(task.payload)
    assert result.kept.column("uid").to_pylist() == ["ok"]
    reasons = dict(zip(result.rejects.column("uid").to_pylist(), result.rejects.column("reason").to_pylist()))
    assert reasons == {"huge": "image_too_large", "large": "image_too_large"} and attempts == []
    assert "9000x9000" in result.rejects.column("error_message").to_pylist()[1]


def test_hflip_column_holds_the_codes_of_the_mirrored_image(tmp_path, random_dvae):
    import io

    from PIL import Image

    def png(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")  # lossless: the mirror's pixels are exactly the mirrored pixels
        return buffer.getvalue()

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # the dVAE's size: no resampling
    rows = [downloaded_row("a", "noise", png(pixels)), downloaded_row("mirror", "noise", png(pixels[:, ::-1].copy()))]
    write_stage(tmp_path / "filtered", [rows])
    plan = plan_encode(str(tmp_path / "filtered"), str(random_dvae), EncodeConfig(hflip=True))
    assert plan.fingerprint["options"]["hflip"] is True  # a rerun without --hflip does not resume over these shards
    (task,) = plan.tasks(None, str(tmp_path / "tokens"))
    kept = encode_shard(task.payload).kept
    assert kept.schema.field("image_tokens_hflip").type == kept.schema.field("image_tokens").type == pa.list_(pa.uint16(), 64)
    codes = dict(zip(kept.column("uid").to_pylist(), kept.column("image_tokens").to_pylist()))
    mirrored = dict(zip(kept.column("uid").to_pylist(), kept.column("image_tokens_hflip").to_pylist()))
    assert codes["a"] != codes["mirror"]
    assert mirrored["a"] == codes["mirror"] and mirrored["mirror"] == codes["a"]
    (plain,) = plan_encode(str(tmp_path / "filtered"), str(random_dvae), EncodeConfig()).tasks(None, str(tmp_path / "plain"))
    assert "image_tokens_hflip" not in encode_shard(plain.payload).kept.column_names
