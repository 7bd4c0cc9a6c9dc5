"""export --format webdataset: tars the webdataset package reads back with the same images and captions; resume; hostile uids."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pytest

from dallekit.config import ExportConfig
from dallekit.errors import BadInputError
from dallekit.pipeline.export import export
from tests.stage_data import downloaded_row, shape_jpeg, write_stage


def stage_with_images(folder, uids=None):
    rows = [downloaded_row(u, f"a shape number {i}", shape_jpeg(i, size=48), clip_score=0.3 + i / 100)
            for i, u in enumerate(uids or [f"{i:016x}" for i in range(9)])]
    rows[-1] |= {"status": "failed_to_download", "jpg": None}  # a download's failure: no image to export
    rows[0]["clip_score"] = float("nan")
    write_stage(folder, [rows[:5], rows[5:]], stage="filter")
    return folder, rows


def read_webdataset(folder):
    import webdataset as wds

    return list(wds.WebDataset(sorted(str(p) for p in folder.glob("part-*.tar")), shardshuffle=False))


@pytest.mark.slow
def test_webdataset_reads_back_the_same_images_and_captions(tmp_path, client):
    src, rows = stage_with_images(tmp_path / "filter")
    result = export(str(src), str(tmp_path / "wds"), ExportConfig(), client)
    assert (result["samples"], result["no_image"], result["shards"]) == (8, 1, 2)
    samples = read_webdataset(tmp_path / "wds")
    assert [s["__key__"] for s in samples] == [r["uid"] for r in rows[:-1]]  # shard and row order
    for s, row in zip(samples, rows):
        assert s["jpg"] == row["jpg"] and s["txt"].decode() == row["caption"]
        meta = json.loads(s["json"])
        assert meta["uid"] == row["uid"] and meta["url"] == row["url"] and "jpg" not in meta
        assert meta["clip_score"] == (None if row is rows[0] else pytest.approx(row["clip_score"]))  # NaN is not JSON
    assert (tmp_path / "wds" / "_SUCCESS").exists()


def test_export_resumes_and_is_byte_identical(tmp_path, client):
    src, _ = stage_with_images(tmp_path / "filter")
    out = tmp_path / "wds"
    export(str(src), str(out), ExportConfig(), client)
    first = {p.name: p.read_bytes() for p in out.glob("part-*.tar")}
    (out / "part-00001.tar").unlink()
    (out / "_progress" / "part-00001.json").unlink()
    (out / "_SUCCESS").unlink()
    (out / "_tmp-dead-part-00001.tar").write_bytes(b"partial")  # an interrupted write
    (out / "_progress" / "part-00000.json").write_text("{damaged")  # by hand: that tar is written again
    result = export(str(src), str(out), ExportConfig(), client)
    assert {p.name: p.read_bytes() for p in out.glob("part-*.tar")} == first
    assert not list(out.glob("_tmp-*")) and result["samples"] == 8


def test_export_refuses_other_folders_and_unsafe_uids(tmp_path, client):
    src, _ = stage_with_images(tmp_path / "filter")
    with pytest.raises(BadInputError, match="is the input"):
        export(str(src), str(src), ExportConfig(), client)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(BadInputError, match="not a dallekit export"):
        export(str(src), str(busy), ExportConfig(), client)
    other, _ = stage_with_images(tmp_path / "other-filter", uids=[f"{i:016x}" for i in range(10, 19)])
    export(str(src), str(tmp_path / "wds"), ExportConfig(), client)
    with pytest.raises(BadInputError, match="another input"):
        export(str(other), str(tmp_path / "wds"), ExportConfig(), client)
    hostile, _ = stage_with_images(tmp_path / "hostile-filter", uids=["../../evil", "a.b"] + [f"{i:016x}" for i in range(7)])
    with pytest.raises(BadInputError, match=r"uid '\.\./\.\./evil' cannot name a WebDataset sample"):
        export(str(hostile), str(tmp_path / "hostile"), ExportConfig(), client)
    assert not (tmp_path / "evil.jpg").exists() and not list(tmp_path.rglob("evil*"))
    assert not (tmp_path / "hostile" / "part-00000.tar").exists() and not (tmp_path / "hostile" / "_SUCCESS").exists()


def test_nested_nan_is_null_in_the_json(tmp_path, client):
    rows = [downloaded_row(f"{i:016x}", f"caption {i}", shape_jpeg(i, size=32), scores=[0.5, float("nan")]) for i in range(2)]
    write_stage(tmp_path / "filter", [rows], stage="filter")
    export(str(tmp_path / "filter"), str(tmp_path / "wds"), ExportConfig(), client)
    assert [json.loads(s["json"])["scores"] for s in read_webdataset(tmp_path / "wds")] == [[0.5, None], [0.5, None]]


def test_tar_members_are_plain_files_named_by_uid(tmp_path, client):
    src, rows = stage_with_images(tmp_path / "filter")
    export(str(src), str(tmp_path / "wds"), ExportConfig(), client)
    with tarfile.open(tmp_path / "wds" / "part-00000.tar") as tar:
        members = tar.getmembers()
    assert all(m.isreg() and m.mtime == 0 for m in members)
    assert [m.name for m in members[:3]] == [f"{rows[0]['uid']}.jpg", f"{rows[0]['uid']}.txt", f"{rows[0]['uid']}.json"]


def test_export_cli_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dallekit.cli", "export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "missing: no such folder" in proc.stderr and "Traceback" not in proc.stderr


def test_a_long_uid_is_exported_and_a_too_long_one_is_refused_by_its_length(tmp_path, client):
    long_uids = ["a" * 200] + [f"{i:016x}" for i in range(8)]
    src, _ = stage_with_images(tmp_path / "filter", uids=long_uids)
    export(str(src), str(tmp_path / "wds"), ExportConfig(), client)
    assert [s["__key__"] for s in read_webdataset(tmp_path / "wds")][0] == "a" * 200
    src, _ = stage_with_images(tmp_path / "other-filter", uids=["b" * 300] + [f"{i:016x}" for i in range(8)])
    with pytest.raises(BadInputError, match="has 300 characters; a WebDataset sample's name takes at most 240"):
        export(str(src), str(tmp_path / "too-long"), ExportConfig(), client)


def test_the_image_member_is_named_by_its_format_not_by_the_column(tmp_path, client):
    import io

    from PIL import Image

    def encoded(fmt: str) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format=fmt)
        return buffer.getvalue()

    src, rows = stage_with_images(tmp_path / "filter")
    images = {rows[1]["uid"]: encoded("PNG"), rows[2]["uid"]: encoded("WEBP"), rows[3]["uid"]: b"not an image"}
    for row in rows:
        row["jpg"] = images.get(row["uid"], row["jpg"])
    write_stage(src, [rows[:5], rows[5:]], stage="filter")
    export(str(src), str(tmp_path / "wds"), ExportConfig(), client)
    names = {}
    for path in sorted((tmp_path / "wds").glob("part-*.tar")):
        with tarfile.open(path) as tar:
            names |= {m.name.split(".")[0]: m.name.split(".", 1)[1] for m in tar.getmembers() if not m.name.endswith((".txt", ".json"))}
    assert names[rows[0]["uid"]] == "jpg" and names[rows[1]["uid"]] == "png" and names[rows[2]["uid"]] == "webp"
    assert names[rows[3]["uid"]] == "bin"
    samples = {s["__key__"]: s for s in read_webdataset(tmp_path / "wds")}
    assert samples[rows[1]["uid"]]["png"] == images[rows[1]["uid"]] and samples[rows[2]["uid"]]["webp"] == images[rows[2]["uid"]]


@pytest.mark.parametrize("closed", [False, True], ids=["mid-run", "after-success"])
def test_a_deleted_or_truncated_tar_with_its_mark_is_written_again(tmp_path, client, closed):
    src, _ = stage_with_images(tmp_path / "filter")
    out = tmp_path / "wds"
    export(str(src), str(out), ExportConfig(), client)
    first = {p.name: p.read_bytes() for p in out.glob("part-*.tar")}
    if not closed:
        (out / "_SUCCESS").unlink()  # as if killed after both tars were marked
    (out / "part-00000.tar").unlink()
    (out / "part-00001.tar").write_bytes(first["part-00001.tar"][:1000])  # an interrupted copy: its mark stays
    result = export(str(src), str(out), ExportConfig(), client)
    assert {p.name: p.read_bytes() for p in out.glob("part-*.tar")} == first
    assert (result["samples"], result["shards"]) == (8, 2) and (out / "_SUCCESS").exists()
    assert [s["__key__"] for s in read_webdataset(out)] == [f"{i:016x}" for i in range(8)]


def test_an_export_written_by_the_previous_version_is_written_again(tmp_path, client, capsys):
    src, _ = stage_with_images(tmp_path / "filter")
    out = tmp_path / "wds"
    export(str(src), str(out), ExportConfig(), client)
    first = {p.name: p.read_bytes() for p in out.glob("part-*.tar")}
    claim = json.loads((out / "_export.json").read_text())
    del claim["layout"]  # the claim and marks as the previous version wrote them, its tar cut short since
    (out / "_export.json").write_text(json.dumps(claim))
    for mark in (out / "_progress").glob("*.json"):
        mark.write_text(json.dumps({"shard": mark.stem, "rows": 5, "samples": 5, "no_image": 0}))
    (out / "part-00001.tar").write_bytes(first["part-00001.tar"][:1000])
    capsys.readouterr()
    result = export(str(src), str(out), ExportConfig(), client)
    assert "written by an earlier dallekit version" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("part-*.tar")} == first and result["samples"] == 8
    assert "already complete" in (export(str(src), str(out), ExportConfig(), client) and capsys.readouterr().out)


@pytest.mark.parametrize("claim", [b"{", b"\xb9", b"[1]"], ids=["cut", "binary", "a list"])
def test_a_damaged_claim_is_one_line_naming_it(tmp_path, client, claim):
    (src, _), out = stage_with_images(tmp_path / "filter"), tmp_path / "wds"
    export(str(src), str(out), ExportConfig(), client)
    (out / "_export.json").write_bytes(claim)
    with pytest.raises(BadInputError, match=r"wds/_export.json: damaged \(expected dallekit's JSON object"):
        export(str(src), str(out), ExportConfig(), client)
