"""adopt: real img2dataset outputs (parquet, webdataset, files) made on a loopback server become a download folder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dallekit.config import AdoptConfig, CleanConfig, IngestConfig
from dallekit.demo.synthetic import ShapesServer, make_dataset
from dallekit.errors import BadInputError
from dallekit.pipeline.adopt import adopt, plan_adopt
from dallekit.pipeline.clean import clean
from dallekit.pipeline.ingest import ingest, make_uid
from tests.helpers import check_accounting, read_stage

FORMATS = ["parquet", "webdataset", "files"]
SHARD_ROWS = 16


def run_img2dataset(url_list: Path, output: Path, output_format: str, *extra: str) -> None:
    """img2dataset's own CLI, as a user runs it (a LAION-style list: URL, TEXT and a similarity column)."""
    command = [str(Path(sys.executable).parent / "img2dataset"), "--url_list", str(url_list), "--input_format", "parquet",
               "--url_col", "URL", "--caption_col", "TEXT", "--save_additional_columns", '["similarity"]',
               "--output_format", output_format, "--output_folder", str(output), "--processes_count", "1", "--thread_count", "8",
               "--image_size", "64", "--resize_mode", "center_crop", "--number_sample_per_shard", str(SHARD_ROWS),
               "--enable_wandb", "False", "--distributor", "multiprocessing", *extra]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]


def img2dataset_parquet(folder: Path, n: int, seed: int, broken_fraction: float) -> int:
    """n of the demo's shapes (some URLs broken) downloaded by img2dataset's CLI to folder/img2dataset, parquet format; the URL count."""
    data = make_dataset(n, seed=seed, broken_fraction=broken_fraction)
    with ShapesServer(data.routes, max_seconds=300) as server:
        rows = [{"URL": server.url(r["path"]), "TEXT": r["caption"], "similarity": 0.3} for r in data.rows]
        pd.DataFrame(rows).to_parquet(folder / "laion.parquet")
        run_img2dataset(folder / "laion.parquet", folder / "img2dataset", "parquet")
    return len(rows)


@pytest.fixture(scope="module")
def img2dataset_outputs(tmp_path_factory):
    """One LAION-style URL list (with 404s, a repeated URL and a repeated row) downloaded by img2dataset in its three formats."""
    root = tmp_path_factory.mktemp("img2dataset")
    data = make_dataset(40, seed=5, broken_fraction=0.1)
    with ShapesServer(data.routes, max_seconds=900) as server:
        rows = [{"URL": server.url(r["path"]), "TEXT": r["caption"], "similarity": 0.3 + i / 100} for i, r in enumerate(data.rows)]
        rows.append({"URL": rows[3]["URL"], "TEXT": "the same URL with another caption", "similarity": 0.5})
        rows.append(dict(rows[5]))  # the same row twice: the same uid
        url_list = root / "laion.parquet"
        pd.DataFrame(rows).to_parquet(url_list)
        for output_format in FORMATS:
            run_img2dataset(url_list, root / output_format, output_format)
    return root, rows


def adopted(tmp_path, client, source, **options):
    out = tmp_path / "adopted"
    stats = adopt(str(source), str(out), AdoptConfig(**options), client)
    return out, stats


@pytest.mark.slow
def test_three_formats_adopt_to_the_same_rows(tmp_path, client, img2dataset_outputs):
    root, rows = img2dataset_outputs
    tables = {}
    for output_format in FORMATS:
        out = tmp_path / output_format
        stats = adopt(str(root / output_format), str(out), AdoptConfig(), client)
        assert stats["counters"]["layout"] == {output_format: 3}
        kept, rejects = check_accounting(out, len(rows), exact_duplicate_rows=True)
        tables[output_format] = (kept.drop(columns=["jpg"]), kept["jpg"].tolist())
    for output_format in ("webdataset", "files"):
        pd.testing.assert_frame_equal(tables[output_format][0], tables["parquet"][0])
        assert tables[output_format][1] == tables["parquet"][1]  # the very bytes img2dataset stored


@pytest.mark.slow
def test_adopted_rows_keep_img2dataset_columns_and_failures(tmp_path, client, img2dataset_outputs):
    root, rows = img2dataset_outputs
    out, stats = adopted(tmp_path, client, root / "webdataset")
    kept, rejects = check_accounting(out, len(rows), exact_duplicate_rows=True)
    assert list(kept.columns[:3]) == ["uid", "url", "caption"] and kept.columns[-1] == "jpg"
    assert {"similarity", "key", "status", "error_message", "width", "height", "original_width", "original_height", "exif", "sha256"} <= set(kept.columns)
    meta = pd.concat([pq.read_table(p).to_pandas() for p in sorted((root / "webdataset").glob("0*.parquet"))])
    assert kept["key"].tolist() == sorted(kept["key"])  # key order, not img2dataset's completion order
    failed = kept[kept.status != "success"]
    assert len(failed) >= 2 and failed["jpg"].isna().all()  # the 404s are kept with img2dataset's own message
    assert set(failed["error_message"]) == {"HTTP Error 404: Not Found"}
    ok = kept[kept.status == "success"]
    by_key = meta.set_index("key")
    assert (ok["sha256"] == by_key.loc[ok["key"], "sha256"].to_numpy()).all()  # img2dataset's own hash is kept
    assert all(hashlib.sha256(b).hexdigest() for b in ok["jpg"])
    for row in kept.itertuples():
        assert row.uid == make_uid(row.url, row.caption)
    # the URL downloaded twice: the later key is rejected as a repeat of the first, like ingest does
    assert rejects["reason"].tolist() == ["duplicate_url", "duplicate_url"]
    assert set(rejects["duplicate_of"]) <= set(kept["uid"]) and "jpg" not in rejects.columns
    assert json.loads((out / "_funnel.json").read_text())["steps"][-1]["remaining"] == len(kept)


@pytest.mark.slow
def test_uids_match_what_ingest_assigns(tmp_path, client, img2dataset_outputs):
    root, rows = img2dataset_outputs
    out, _ = adopted(tmp_path, client, root / "parquet")
    ingested = tmp_path / "ingested"
    ingest([str(root / "laion.parquet")], str(ingested), IngestConfig(format="laion"), client)
    assert set(read_stage(out)[0]["uid"]) == set(read_stage(ingested)[0]["uid"])


@pytest.mark.slow
def test_sha256_is_computed_when_img2dataset_kept_none(tmp_path, client, img2dataset_outputs):
    root, rows = img2dataset_outputs
    source = tmp_path / "nohash"
    source.mkdir()
    for p in sorted((root / "parquet").glob("0*.parquet")):
        pq.write_table(pq.read_table(p).drop_columns(["sha256"]), source / p.name)
    out, _ = adopted(tmp_path, client, source)
    kept = read_stage(out)[0]
    ok = kept[kept.status == "success"]
    assert ok["sha256"].tolist() == [hashlib.sha256(b).hexdigest() for b in ok["jpg"]]
    assert kept[kept.status != "success"]["sha256"].isna().all()


@pytest.mark.slow
def test_an_input_column_named_uid_is_kept_as_source_uid(tmp_path, client, img2dataset_outputs):
    root, rows = img2dataset_outputs
    source = tmp_path / "withuid"
    source.mkdir()
    for p in sorted((root / "parquet").glob("0*.parquet")):
        table = pq.read_table(p)
        pq.write_table(table.append_column("uid", table.column("key")), source / p.name)  # --save_additional_columns '["uid"]'
    out, _ = adopted(tmp_path, client, source)
    kept = read_stage(out)[0]
    assert (kept["source_uid"] == kept["key"]).all()
    assert all(u == make_uid(url, c) for u, url, c in zip(kept["uid"], kept["url"], kept["caption"]))


@pytest.mark.slow
def test_clean_accepts_an_adopted_folder(tmp_path, client, img2dataset_outputs):
    root, rows = img2dataset_outputs
    out, stats = adopted(tmp_path, client, root / "files")
    cleaned = tmp_path / "clean"
    clean(str(out), str(cleaned), CleanConfig(), client)
    kept, rejects = check_accounting(cleaned, stats["rows_out"])
    assert rejects["reason"].value_counts()["failed_to_download"] == stats["counters"]["status"]["failed_to_download"]


@pytest.mark.slow
def test_adopt_resumes_and_refuses_other_options(tmp_path, client, img2dataset_outputs):
    root, rows = img2dataset_outputs
    out, _ = adopted(tmp_path, client, root / "webdataset")
    before = pq.read_table(out / "part-00001.parquet")
    for p in (out / "part-00001.parquet", out / "_progress" / "part-00001.json", out / "_SUCCESS"):
        p.unlink()  # as a run killed while writing that shard leaves it
    adopt(str(root / "webdataset"), str(out), AdoptConfig(), client)
    assert pq.read_table(out / "part-00001.parquet").equals(before)
    check_accounting(out, len(rows), exact_duplicate_rows=True)
    with pytest.raises(BadInputError, match="max_image_bytes"):
        adopt(str(root / "webdataset"), str(out), AdoptConfig(max_image_bytes=1000), client)


def copy_output(root: Path, output_format: str, tmp_path: Path) -> Path:
    target = tmp_path / f"copy-{output_format}"
    shutil.copytree(root / output_format, target)
    return target


def rewrite_tar(path: Path, edit) -> None:
    """Rebuild a tar with `edit(members) -> [(TarInfo, bytes or None)]`."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read() if m.isreg() else None) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for info, data in edit(members):
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


@pytest.mark.slow
def test_hostile_tar_members_are_never_followed_or_read_whole(tmp_path, client, img2dataset_outputs):
    root, rows = img2dataset_outputs
    source = copy_output(root, "webdataset", tmp_path)
    meta = pq.read_table(source / "00000.parquet").to_pandas()
    ok_keys = sorted(meta[meta.status == "success"]["key"])
    link_key, big_key, escape_key = ok_keys[:3]

    def edit(members):
        out = []
        for info, data in members:
            if info.name == f"{link_key}.jpg":  # a symlink to a file of this machine
                info = tarfile.TarInfo(info.name)
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                data = None
            elif info.name == f"{big_key}.jpg":
                data = data + b"\0" * 5000
                info.size = len(data)
            elif info.name == f"{escape_key}.jpg":
                info.name = f"../{escape_key}.jpg"  # a path out of the folder: not img2dataset's member, never matched
            out.append((info, data))
        return out

    rewrite_tar(source / "00000.tar", edit)
    out, stats = adopted(tmp_path, client, source, max_image_bytes=4000)
    kept = read_stage(out)[0].set_index("key")
    assert kept.loc[link_key, "status"] == "failed_to_download" and "not a regular file" in kept.loc[link_key, "error_message"]
    assert "more than --max-image-bytes 4000" in kept.loc[big_key, "error_message"]
    assert "no image for key" in kept.loc[escape_key, "error_message"]
    assert kept.loc[[link_key, big_key, escape_key], "jpg"].isna().all()
    assert not (tmp_path / f"{escape_key}.jpg").exists()
    check_accounting(out, len(rows), exact_duplicate_rows=True)


@pytest.mark.slow
def test_a_linked_image_folder_is_refused_also_as_a_file_url(tmp_path, img2dataset_outputs):
    root, rows = img2dataset_outputs
    source = copy_output(root, "files", tmp_path)
    outside = tmp_path / "elsewhere"
    shutil.move(source / "00001", outside)
    (source / "00001").symlink_to(outside)
    for given in (str(source), f"file://{source}"):
        with pytest.raises(BadInputError, match=r"00001: a symlink"):
            plan_adopt(given, AdoptConfig())


@pytest.mark.slow
def test_rows_without_url_are_rejected_and_oversized_stored_images_fail(tmp_path, client, img2dataset_outputs):
    root, rows = img2dataset_outputs
    source = tmp_path / "edited"
    source.mkdir()
    table = pq.read_table(root / "parquet" / "00000.parquet")
    urls = table.column("url").to_pylist()
    urls[0] = urls[1] = ""  # two rows with no URL and the same caption would share a uid
    captions = table.column("caption").to_pylist()
    captions[1] = captions[0]
    table = table.set_column(table.column_names.index("url"), "url", pa.array(urls)).set_column(
        table.column_names.index("caption"), "caption", pa.array(captions))
    pq.write_table(table, source / "00000.parquet")
    sizes = [len(b) for b, s in zip(table.column("jpg").to_pylist(), table.column("status").to_pylist()) if s == "success"]
    limit = sorted(sizes)[len(sizes) // 2]
    out, stats = adopted(tmp_path, client, source, max_image_bytes=limit)
    kept, rejects = check_accounting(out, table.num_rows, exact_duplicate_rows=True)  # the two URL-less rows: one uid, both rejected
    assert stats["reasons"]["empty_url"] == 2 and kept["uid"].is_unique
    big = kept[kept.error_message.fillna("").str.contains(f"more than --max-image-bytes {limit}")]
    expected = sum(bool(s == "success" and u and len(b) > limit)
                   for b, s, u in zip(table.column("jpg").to_pylist(), table.column("status").to_pylist(), urls))
    assert len(big) == expected > 0
    assert big["jpg"].isna().all() and (big["status"] == "failed_to_download").all()


@pytest.mark.slow
def test_webdataset_images_come_from_the_tar_even_if_the_metadata_has_a_jpg_column(tmp_path, client, img2dataset_outputs):
    root, rows = img2dataset_outputs
    source = copy_output(root, "webdataset", tmp_path)
    table = pq.read_table(source / "00000.parquet")
    pq.write_table(table.append_column("jpg", pa.array([b"not-from-tar"] * table.num_rows)), source / "00000.parquet")
    out, _ = adopted(tmp_path, client, source, format="webdataset")
    kept = read_stage(out)[0]
    assert b"not-from-tar" not in set(kept["jpg"].dropna()) and (kept["source_jpg"].dropna() == b"not-from-tar").all()


@pytest.mark.slow
def test_files_layout_skips_symlinked_images(tmp_path, client, img2dataset_outputs):
    root, rows = img2dataset_outputs
    source = copy_output(root, "files", tmp_path)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"not yours")
    image = sorted((source / "00001").glob("*.jpg"))[0]
    image.unlink()
    image.symlink_to(outside)
    out, _ = adopted(tmp_path, client, source)
    kept = read_stage(out)[0].set_index("key")
    assert kept.loc[image.stem, "status"] == "failed_to_download" and kept.loc[image.stem, "jpg"] is None
    assert b"not yours" not in b"".join(b for b in kept["jpg"] if b is not None)


@pytest.mark.slow
def test_bad_img2dataset_folders_are_refused_with_the_file_named(tmp_path, img2dataset_outputs):
    root, rows = img2dataset_outputs
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInputError, match="no img2dataset shards"):
        plan_adopt(str(empty), AdoptConfig())
    missing_tar = copy_output(root, "webdataset", tmp_path)
    (missing_tar / "00001.tar").unlink()
    with pytest.raises(BadInputError, match=r"00001\.tar: missing"):
        plan_adopt(str(missing_tar), AdoptConfig(format="webdataset"))
    no_caption = tmp_path / "nocaption"
    no_caption.mkdir()
    pq.write_table(pq.read_table(root / "parquet" / "00000.parquet").drop_columns(["caption"]), no_caption / "00000.parquet")
    with pytest.raises(BadInputError, match=r"00000\.parquet: no caption column"):
        plan_adopt(str(no_caption), AdoptConfig())
    no_images = tmp_path / "noimages"
    no_images.mkdir()
    shutil.copy(root / "webdataset" / "00000.parquet", no_images / "00000.parquet")
    with pytest.raises(BadInputError, match="no image column"):
        plan_adopt(str(no_images), AdoptConfig())
    twice = tmp_path / "twice"
    twice.mkdir()
    shutil.copy(root / "parquet" / "00001.parquet", twice / "00001.parquet")
    shutil.copy(root / "parquet" / "00001.parquet", twice / "1.parquet")
    with pytest.raises(BadInputError, match="two shards are numbered 1"):
        plan_adopt(str(twice), AdoptConfig())
    int_keys = tmp_path / "intkeys"
    int_keys.mkdir()
    table = pq.read_table(root / "parquet" / "00000.parquet")
    pq.write_table(table.set_column(table.column_names.index("key"), "key", table.column("key").cast("int64")), int_keys / "00000.parquet")
    with pytest.raises(BadInputError, match="column key holds int64, expected string"):
        plan_adopt(str(int_keys), AdoptConfig())
    for column, value in (("url", pa.nulls(SHARD_ROWS)), ("sha256", pa.array(range(SHARD_ROWS)))):
        bad = tmp_path / f"bad-{column}"
        bad.mkdir()
        table = pq.read_table(root / "parquet" / "00000.parquet")
        pq.write_table(table.set_column(table.column_names.index(column), column, value), bad / "00000.parquet")
        with pytest.raises(BadInputError, match=f"00000.parquet: column {column} holds"):
            plan_adopt(str(bad), AdoptConfig())
    escaping = tmp_path / "escaping"
    escaping.mkdir()
    (escaping / "00000.parquet").symlink_to(root / "parquet" / "00000.parquet")
    with pytest.raises(BadInputError, match="outside"):
        plan_adopt(str(escaping), AdoptConfig())


@pytest.mark.slow
def test_a_corrupt_tar_is_one_line_naming_it(tmp_path, img2dataset_outputs):
    root, rows = img2dataset_outputs
    source = copy_output(root, "webdataset", tmp_path)
    data = (source / "00002.tar").read_bytes()
    (source / "00002.tar").write_bytes(data[:700] + b"\xff" * 600)
    proc = subprocess.run([sys.executable, "-m", "dallekit.cli", "adopt", str(source), "--out", str(tmp_path / "out"), "--workers", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "00002.tar: not a readable tar" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_laion_style_webdataset_goes_through_the_chain_without_redownload(tmp_path, client, img2dataset_outputs):
    """adopt -> clean -> filter -> train-dvae -> encode -> train, then export the filtered set and read it with webdataset."""
    import webdataset as wds

    from dallekit.config import EncodeConfig, ExportConfig, FilterConfig, TrainConfig, TrainDVAEConfig
    from dallekit.pipeline.encode import encode
    from dallekit.pipeline.export import export
    from dallekit.pipeline.filter import filter
    from dallekit.training.dvae import train_dvae
    from dallekit.training.transformer import train_transformer

    root, rows = img2dataset_outputs
    source = copy_output(root, "webdataset", tmp_path)
    server_gone = [r["URL"] for r in rows]  # the loopback server is stopped: nothing can be downloaded again
    out, _ = adopted(tmp_path, client, source)
    clean(str(out), str(tmp_path / "clean"), CleanConfig(), client)
    filter(str(tmp_path / "clean"), str(tmp_path / "filter"), FilterConfig(clip=False, min_side=32, max_aspect=4.0, languages=["any"]), client)
    filtered, _ = check_accounting(tmp_path / "filter", read_stage(tmp_path / "clean")[2]["rows_out"])
    assert len(filtered) >= 20 and set(filtered["url"]) <= set(server_gone)
    train_dvae(str(tmp_path / "filter"), str(tmp_path / "dvae"), TrainDVAEConfig(preset="tiny", max_steps=4, batch_size=8, checkpoint_every=4,
                                                                                             val_percent=25))  # 37 images: 5% can hold none
    encode(str(tmp_path / "filter"), str(tmp_path / "dvae"), str(tmp_path / "tokens"), EncodeConfig(device="cpu"), client)
    tokens = read_stage(tmp_path / "tokens")[0]
    assert set(tokens["uid"]) == set(filtered["uid"])
    metrics = train_transformer(str(tmp_path / "tokens"), str(tmp_path / "model"),
                                TrainConfig(max_steps=3, batch_size=4, warmup_steps=1, text_len=8, val_fraction=0, num_workers=0))
    assert metrics["loss"] > 0 and (tmp_path / "model" / "model.safetensors").is_file()
    result = export(str(tmp_path / "filter"), str(tmp_path / "wds"), ExportConfig(), client)
    assert result["samples"] == len(filtered)
    samples = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "wds").glob("*.tar")), shardshuffle=False))
    by_uid = filtered.set_index("uid")
    assert sorted(s["__key__"] for s in samples) == sorted(filtered["uid"])
    for s in samples:
        assert s["jpg"] == by_uid.loc[s["__key__"], "jpg"] and s["txt"].decode() == by_uid.loc[s["__key__"], "caption"]
        assert json.loads(s["json"])["url"] == by_uid.loc[s["__key__"], "url"]


# ---------------------------------------------------------------- hand-made img2dataset folders (fast, no download)


def small_jpeg(seed: int, side: int = 16) -> bytes:
    """A small JPEG whose pixels depend on seed."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256)).save(buffer, format="JPEG")
    return buffer.getvalue()


def handmade(folder: Path, layout: str, rows: list[dict], shard: int = 0, row_group_size: int | None = None) -> Path:
    """One img2dataset shard written as img2dataset lays it out: rows of url, caption, key, status and `image` (bytes or None)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(rows)
    table = pa.table({"url": pa.array([r["url"] for r in rows], pa.string()), "caption": pa.array([r["caption"] for r in rows], pa.string()),
                      "key": pa.array([r["key"] for r in rows], pa.string()), "status": pa.array([r.get("status", "success") for r in rows], pa.string()),
                      "error_message": pa.array([None] * n, pa.string()), "width": pa.array([16] * n, pa.int64()),
                      "height": pa.array([16] * n, pa.int64()), "sha256": pa.array([None] * n, pa.string())})
    if layout == "parquet":
        table = table.append_column("jpg", pa.array([r.get("image") for r in rows], pa.binary()))
    pq.write_table(table, folder / f"{shard:05d}.parquet", row_group_size=row_group_size)
    members = [(f"{r['key']}.jpg", r["image"]) for r in rows if r.get("image") is not None] + [
        (f"{r['key']}.txt", r["caption"].encode()) for r in rows]
    if layout == "webdataset":
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    elif layout == "files":
        (folder / f"{shard:05d}").mkdir()
        for name, data in members:
            (folder / f"{shard:05d}" / name).write_bytes(data)
    return folder


def handmade_rows(n: int, shard: int = 0) -> list[dict]:
    """n successful rows with distinct URLs, captions and images, listed out of key order as img2dataset writes them."""
    rows = [{"url": f"http://example.com/{shard}/{i}.jpg", "caption": f"picture {i}", "key": f"{shard:05d}{i:04d}", "image": small_jpeg(i)}
            for i in range(n)]
    return rows[1::2] + rows[::2]


@pytest.mark.parametrize("layout", FORMATS)
def test_handmade_shard_is_adopted_in_key_order_with_its_own_images(tmp_path, client, layout):
    rows = handmade_rows(9)
    source = handmade(tmp_path / "in", layout, rows, row_group_size=2)
    out, stats = adopted(tmp_path, client, source)
    kept, _ = check_accounting(out, len(rows))
    by_key = {r["key"]: r for r in rows}
    assert kept["key"].tolist() == sorted(by_key)
    assert all(by_key[k]["image"] == jpg and by_key[k]["caption"] == c for k, jpg, c in zip(kept["key"], kept["jpg"], kept["caption"]))


def run_one_task(source: Path, layout: str, out: Path, config: AdoptConfig | None = None) -> dict:
    """adopt_shard for shard 0 through the shard engine, in this process (no repeated URLs), as a Dask worker runs it."""
    from dallekit.io import write_table_atomic
    from dallekit.pipeline.adopt import AdoptShard, adopt_shard
    from dallekit.pipeline.shards import ShardTask, _run_shard

    scratch = out / "_work"
    write_table_atomic(pa.table({"_order": pa.array([], pa.int64()), "duplicate_of": pa.array([], pa.string())}),
                       str(scratch / "block_dups" / "b-000000.parquet"))
    (out / "_progress").mkdir()
    task = ShardTask("part-00000", (AdoptShard(str(source / "00000.parquet"), layout, 0, config or AdoptConfig()), str(scratch)))
    return _run_shard(task, str(out), adopt_shard, {})


ONE_TASK = """
import json, sys, tracemalloc
from pathlib import Path
import pyarrow as pa
import dallekit.pipeline.adopt as adopt_module
from dallekit.config import AdoptConfig
from tests.test_adopt import run_one_task
adopt_module.SLICE_BYTES = int(sys.argv[3])
tracemalloc.start()
mark = run_one_task(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[4]))
print(json.dumps({"rows_out": mark["rows_out"], "arrow_peak": pa.default_memory_pool().max_memory(),
                  "python_peak": tracemalloc.get_traced_memory()[1]}))
"""


@pytest.mark.parametrize("layout", FORMATS)
def test_one_task_holds_a_slice_of_a_shard_not_the_shard(tmp_path, layout):
    """Arrow's and Python's peak allocations (in a fresh process) stay a fraction of a shard forty times the slice budget."""
    import numpy as np
    from PIL import Image

    def noise(seed: int) -> bytes:  # about 11 KB each, all different: noise does not compress
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()

    rows = [{"url": f"http://example.com/{i}.jpg", "caption": f"picture {i}", "key": f"00000{i:04d}", "image": noise(i)} for i in range(1200)]
    source = handmade(tmp_path / "in", layout, rows[::-1], row_group_size=10)
    shard_bytes = sum(len(r["image"]) for r in rows)
    budget = shard_bytes // 40
    proc = subprocess.run([sys.executable, "-c", ONE_TASK, str(source), layout, str(budget), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peaks = json.loads(proc.stdout.splitlines()[-1])
    assert peaks["rows_out"] == len(rows)
    kept = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert kept.column("jpg").to_pylist() == [r["image"] for r in rows]
    # a few slices and the fixed costs (metadata, imports), where holding the shard would take it whole, several times over
    assert peaks["arrow_peak"] < shard_bytes / 4 and peaks["python_peak"] < shard_bytes / 4, (peaks, budget, shard_bytes)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height: signature, IHDR, one tiny IDAT and IEND (no big allocation)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("layout", FORMATS)
def test_images_over_the_area_limit_are_failed_from_their_header(tmp_path, client, layout):
    rows = handmade_rows(4)
    rows[0]["image"] = png_header_only(20000, 20000)  # over PIL's own bomb limit
    rows[1]["image"] = png_header_only(9000, 9000)  # 81 Mpx: over adopt's 64 Mpx, under PIL's limit
    source = handmade(tmp_path / "in", layout, rows)
    out, stats = adopted(tmp_path, client, source)
    kept = check_accounting(out, len(rows))[0].set_index("key")
    big = kept.loc[[rows[0]["key"], rows[1]["key"]]]
    assert (big["status"] == "failed_to_resize").all() and big["jpg"].isna().all() and big["sha256"].isna().all()
    assert big["error_message"].str.startswith("image_too_large: ").all()
    assert big.loc[rows[1]["key"], "error_message"].startswith("image_too_large: 9000x9000 pixels")
    assert (kept.loc[[rows[2]["key"], rows[3]["key"]], "status"] == "success").all()
    assert stats["counters"]["status"] == {"success": 2, "failed_to_resize": 2}
    out_area, _ = adopted(tmp_path / "area", client, source, max_image_area=1e9)
    assert check_accounting(out_area, len(rows))[0].set_index("key").loc[rows[1]["key"], "status"] == "success"


@pytest.mark.parametrize("layout", FORMATS)
def test_a_key_repeated_in_a_shard_never_pairs_a_caption_with_another_rows_image(tmp_path, client, layout):
    rows = handmade_rows(5)
    twin = {"url": "http://example.com/other.jpg", "caption": "another picture", "key": rows[0]["key"], "image": small_jpeg(99)}
    source = handmade(tmp_path / "in", layout, [*rows, twin])
    if layout != "parquet":  # one more key with two images: 1.jpg and 1.png
        folder_or_tar = source / "00000.tar" if layout == "webdataset" else source / "00000"
        extra = f"{rows[1]['key']}.png"
        if layout == "webdataset":
            with tarfile.open(folder_or_tar, "a") as tar:
                info = tarfile.TarInfo(extra)
                info.size = len(small_jpeg(98))
                tar.addfile(info, io.BytesIO(small_jpeg(98)))
        else:
            (folder_or_tar / extra).write_bytes(small_jpeg(98))
    out, stats = adopted(tmp_path, client, source)
    kept, rejects = check_accounting(out, len(rows) + 1)
    images = {r["url"]: r["image"] for r in [*rows, twin]}
    ok = kept[kept.status == "success"]
    assert all(images[u] == jpg for u, jpg in zip(ok["url"], ok["jpg"]))  # every kept image is its own row's
    if layout == "parquet":  # the bytes are in the rows: no ambiguity
        assert len(ok) == 6 and rejects.empty
    else:
        assert sorted(rejects["url"]) == sorted([rows[0]["url"], twin["url"]]) and set(rejects["reason"]) == {"duplicate_key"}
        assert stats["reasons"] == {"duplicate_key": 2}
        two = kept.set_index("key").loc[rows[1]["key"]]
        assert two["status"] == "failed_to_download" and "more than one image" in two["error_message"] and two["jpg"] is None


def test_empty_urls_empty_shards_and_bad_utf8_captions_are_adopted_through_the_cli(tmp_path):
    source = tmp_path / "in"
    no_urls = handmade_rows(3, shard=0)
    for row in no_urls:
        row["url"] = ""
    handmade(source, "parquet", no_urls, shard=0)  # every URL empty: every row rejected as empty_url
    handmade(source, "parquet", [], shard=1)  # no rows at all
    handmade(source, "parquet", handmade_rows(2, shard=2), shard=2)
    handmade(source, "parquet", handmade_rows(2, shard=3), shard=3)
    latin1 = pa.array(["café au lait".encode("latin-1"), b"plain"], pa.binary())
    table = pq.read_table(source / "00002.parquet")  # a string column holding latin-1 bytes, as a writer that never checks leaves it
    pq.write_table(table.set_column(table.column_names.index("caption"), "caption", latin1.view(pa.string())), source / "00002.parquet")
    table = pq.read_table(source / "00003.parquet")  # captions stored as bytes
    pq.write_table(table.set_column(table.column_names.index("caption"), "caption", latin1), source / "00003.parquet")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "dallekit.cli", "adopt", str(source), "--out", str(out), "--workers", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    kept, rejects = check_accounting(out, 7)
    stats = json.loads((out / "_stats.json").read_text())
    assert stats["reasons"] == {"empty_url": 3} and stats["counters"]["utf8_repaired"] == {"caption": 2}
    assert pq.read_table(out / "part-00001.parquet").num_rows == 0
    assert sorted(kept["caption"]) == sorted(["caf\ufffd au lait", "plain"] * 2)
    assert all(u == make_uid(url, c) for u, url, c in zip(kept["uid"], kept["url"], kept["caption"]))


def test_a_shard_with_no_rows_and_untyped_columns_is_not_bad_input(tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    pd.DataFrame({c: pd.Series([], dtype=object) for c in ["url", "caption", "key", "status", "error_message"]}).to_parquet(source / "00000.parquet")
    with tarfile.open(source / "00000.tar", "w"):
        pass
    assert plan_adopt(str(source), AdoptConfig()).stats_config["layout"] == "webdataset"


@pytest.mark.parametrize("layout", ["webdataset", "files"])
def test_members_no_row_names_are_counted_once_not_dropped_silently(tmp_path, client, capsys, layout):
    rows = handmade_rows(3)
    source = handmade(tmp_path / "in", layout, rows)
    extras = {"999999999.jpg": small_jpeg(7), "999999999.txt": b"a caption of no row", "notes": b"hello"}
    if layout == "webdataset":
        with tarfile.open(source / "00000.tar", "a") as tar:
            for name, data in extras.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        for name, data in extras.items():
            (source / "00000" / name).write_bytes(data)
    out, stats = adopted(tmp_path, client, source)
    check_accounting(out, len(rows))
    counter = "unmatched_tar_members" if layout == "webdataset" else "unmatched_files"
    assert stats["counters"][counter] == {"jpg": 1, "txt": 1, "other": 1}
    lines = [line for line in capsys.readouterr().out.splitlines() if "named no metadata row" in line]
    assert len(lines) == 1 and lines[0].startswith("adopt: 3 ")


def test_a_shard_of_one_row_group_is_read_once_not_once_a_slice(tmp_path, monkeypatch):
    """pandas writes a shard as one row group; slices of it come from that one read, not a read of the whole shard each."""
    import dallekit.pipeline.adopt as adopt_module

    reads = []
    real = adopt_module.read_row_groups
    monkeypatch.setattr(adopt_module, "read_row_groups", lambda *args: reads.append(args[2]) or real(*args))
    monkeypatch.setattr(adopt_module, "SLICE_BYTES", 2000)  # several slices of a few small images each
    rows = handmade_rows(30)
    source = handmade(tmp_path / "in", "parquet", rows)  # no row_group_size: one row group
    mark = run_one_task(source, "parquet", tmp_path / "out")
    assert mark["rows_out"] == len(rows) and pq.read_table(tmp_path / "out" / "part-00000.parquet").num_rows == len(rows)
    assert len(pq.ParquetFile(source / "00000.parquet").metadata.to_dict()["row_groups"]) == 1
    assert reads == [[0]]


def test_an_image_replaced_by_one_of_the_same_size_is_a_changed_input(tmp_path, client):
    """adopt's input is identified by its files' sizes and times: an edited image of the same size is refused, not mixed in."""
    rows = handmade_rows(6)
    source = handmade(tmp_path / "in", "files", rows)
    out, _ = adopted(tmp_path, client, source)
    (out / "_SUCCESS").unlink()
    image = next(p for p in (source / "00000").iterdir() if p.suffix == ".jpg")
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF
    image.write_bytes(bytes(data))  # the same size, another picture, a later time
    with pytest.raises(BadInputError, match="other inputs or options"):
        adopt(str(source), str(out), AdoptConfig(), client)
