"""The stage contract guards its folders: fingerprinted reruns, --overwrite, inputs it must not touch, unreadable shards."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess

import pandas as pd
import pytest

from dallekit.config import CleanConfig, FilterConfig, IngestConfig
from dallekit.errors import BadInputError
from dallekit.pipeline.clean import clean
from dallekit.pipeline.filter import filter
from dallekit.pipeline.ingest import ingest
from tests.helpers import check_accounting, read_stage, run_cli
from tests.stage_data import HUGE_IMAGES, downloaded_row, forbid_large_decodes, png_header_only, shape_jpeg, write_stage


def one_line(code: int, err: str, *needles: str, after_progress: bool = False) -> None:
    """Bad input: exit 2, one line on stderr with no traceback, naming what is wrong (after the progress bars of a started stage)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    if after_progress:
        err = err.rstrip("\n").rsplit("\n", 1)[-1] + "\n"
        assert err.startswith("dallekit: error: "), err
    assert err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


def interrupt(folder) -> None:
    """Make a finished stage look killed midway: no _SUCCESS, the last shard not committed."""
    (folder / "_SUCCESS").unlink()
    marks = sorted((folder / "_progress").glob("part-*.json"))
    marks[-1].unlink()
    (folder / f"{marks[-1].stem}.parquet").unlink()


def url_list(tmp_path, n: int = 30):
    (tmp_path / "in.tsv").write_text("".join(f"caption {i}\thttp://example.com/{i}.jpg\n" for i in range(n)))
    return tmp_path / "in.tsv"


def test_ingest_rerun_with_other_options_is_refused_and_overwrite_starts_afresh(tmp_path, client, capsys):
    src, out = url_list(tmp_path), tmp_path / "out"
    ingest([str(src)], str(out), IngestConfig(shard_size=10), client)
    interrupt(out)
    with pytest.raises(BadInputError, match=r"other inputs or options \(options.shard_size 10 -> 7\)"):
        ingest([str(src)], str(out), IngestConfig(shard_size=7), client)
    assert len(list(out.glob("part-*.parquet"))) == 2  # the refused rerun wrote nothing
    ingest([str(src)], str(out), IngestConfig(shard_size=7, overwrite=True), client)
    check_accounting(out, 30)
    assert len(list(out.glob("part-*.parquet"))) == 5  # 7+7+7+7+2: every shard is the new size
    # a complete stage rerun with other options is refused too, not reported as complete
    code, err = run_cli(capsys, "ingest", src, "--out", out, "--shard-size", "10")
    one_line(code, err, "shard_size 7 -> 10", "--overwrite")
    # the same options: already complete
    assert ingest([str(src)], str(out), IngestConfig(shard_size=7), client)["rows_in"] == 30


def test_changed_input_is_refused(tmp_path, client):
    src, out = url_list(tmp_path), tmp_path / "out"
    ingest([str(src)], str(out), IngestConfig(shard_size=10), client)
    url_list(tmp_path, n=40)
    with pytest.raises(BadInputError, match="other inputs or options"):
        ingest([str(src)], str(out), IngestConfig(shard_size=10), client)


def downloaded(tmp_path, n: int = 12):
    rows = [downloaded_row(f"{i:016x}", f"a shape number {i} on a background", shape_jpeg(i, size=64), size=(64, 64)) for i in range(n)]
    write_stage(tmp_path / "download", [rows[: n // 2], rows[n // 2 :]])
    return tmp_path / "download"


@pytest.mark.slow
def test_clean_and_filter_reruns_name_the_changed_option(tmp_path, client):
    src = downloaded(tmp_path)
    clean(str(src), str(tmp_path / "clean"), CleanConfig(), client)
    interrupt(tmp_path / "clean")
    with pytest.raises(BadInputError, match="near_dup_distance 4 -> 2"):
        clean(str(src), str(tmp_path / "clean"), CleanConfig(near_dup_distance=2), client)
    clean(str(src), str(tmp_path / "clean"), CleanConfig(), client)  # the same options resume
    check_accounting(tmp_path / "clean", 12)
    config = FilterConfig(clip=False, min_side=0, languages=["any"])
    filter(str(tmp_path / "clean"), str(tmp_path / "filter"), config, client)
    interrupt(tmp_path / "filter")
    with pytest.raises(BadInputError, match="min_side 0 -> 32"):
        filter(str(tmp_path / "clean"), str(tmp_path / "filter"), FilterConfig(clip=False, min_side=32, languages=["any"]), client)
    # a runtime-only option (batch size, device) does not change the fingerprint
    filter(str(tmp_path / "clean"), str(tmp_path / "filter"), FilterConfig(clip=False, min_side=0, languages=["any"], clip_batch_size=8), client)
    check_accounting(tmp_path / "filter", 12)


def test_out_must_not_be_an_input_or_another_stage(tmp_path, client, capsys):
    src = downloaded(tmp_path)
    before = sorted(p.name for p in src.iterdir())
    for out in (src, src / "inner"):
        code, err = run_cli(capsys, "clean", src, "--out", out)
        one_line(code, err, "the input")
    assert sorted(p.name for p in src.iterdir()) == before  # the input is untouched
    clean(str(src), str(tmp_path / "clean"), CleanConfig(), client)
    code, err = run_cli(capsys, "filter", tmp_path / "clean", "--out", src, "--no-clip")
    one_line(code, err, "holds a `download` stage", "give another folder")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    for flags in ([], ["--overwrite"]):
        code, err = run_cli(capsys, "clean", src, "--out", tmp_path / "notes", *flags)
        one_line(code, err, "files that are not a dallekit stage")
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_input_must_be_the_upstream_stage(tmp_path, client, capsys):
    src = downloaded(tmp_path)
    code, err = run_cli(capsys, "filter", src, "--out", tmp_path / "f", "--no-clip")
    one_line(code, err, "holds a `download` stage", "`dallekit clean`")
    (src / "_SUCCESS").unlink()  # an unfinished download
    code, err = run_cli(capsys, "clean", src, "--out", tmp_path / "c")
    one_line(code, err, "not a finished stage folder", "`dallekit download`")


@pytest.mark.parametrize("command", ["download", "clean", "filter", "encode", "train"])
@pytest.mark.parametrize("damage", ["garbage", "empty", "misnamed"])
def test_unreadable_shards_are_one_line_errors(tmp_path, capsys, command, damage):
    folder = tmp_path / {"download": "ingest", "clean": "download", "filter": "clean", "encode": "filter", "train": "tokens"}[command]
    write_stage(folder, [[downloaded_row("00000000000000aa", "a red circle", shape_jpeg(1, size=32))]],
                stage={"ingest": "ingest", "download": "download", "clean": "clean"}.get(folder.name, "filter"))
    if command == "train":  # an image shard is no token shard: leave only the damaged one
        (folder / "part-00000.parquet").unlink()
    name = {"garbage": "part-00001.parquet", "empty": "part-00001.parquet", "misnamed": "part-abc.parquet"}[damage]
    (folder / name).write_bytes({"garbage": b"PAR1 this is not parquet at all PAR1", "empty": b""}.get(damage, b""))
    extra = {"encode": ["--dvae", tmp_path], "filter": ["--no-clip"]}.get(command, [])
    code, err = run_cli(capsys, command, folder, "--out", tmp_path / "out", *extra)
    one_line(code, err, name)


def test_output_that_is_a_file_or_under_one(tmp_path, capsys):
    src = downloaded(tmp_path)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        code, err = run_cli(capsys, "clean", src, "--out", out)
        one_line(code, err, "--out", "file")
    code, err = run_cli(capsys, "train-bpe", src, "--out", tmp_path / "file" / "bpe")
    one_line(code, err, "--out")


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A small tmpfs mounted at `path` (root only): a real full or read-only disk."""
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@needs_root
def test_full_and_read_only_disks_are_one_line_errors(tmp_path, capsys):
    src = downloaded(tmp_path, n=40)
    with tmpfs(tmp_path / "full", "size=48k") as full:  # room for the fingerprint, not for the shards
        code, err = run_cli(capsys, "clean", src, "--out", full / "clean", "--workers", "1")
        one_line(code, err, "No space left on device", after_progress=True)
        assert f"{full / 'clean'}/_work/" in err, err  # names the file it could not write, not a function
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        code, err = run_cli(capsys, "clean", src, "--out", ro / "clean")
        one_line(code, err, "--out", "Read-only file system")
        code, err = run_cli(capsys, "train-bpe", src, "--out", ro / "bpe")
        one_line(code, err, "--out", "Read-only file system")


def test_rejects_and_stats_after_overwrite_hold_only_the_new_run(tmp_path, client):
    src = downloaded(tmp_path)
    out = tmp_path / "clean"
    clean(str(src), str(out), CleanConfig(max_caption_chars=10), client)  # every caption is too long
    assert read_stage(out)[2]["reasons"] == {"caption_too_long": 12}
    clean(str(src), str(out), CleanConfig(overwrite=True), client)
    kept, rejects = check_accounting(out, 12)
    assert rejects.empty and len(kept) == 12
    fingerprint = json.loads((out / "_fingerprint.json").read_text())
    assert fingerprint["options"]["max_caption_chars"] == 2000 and fingerprint["stage"] == "clean"
    assert isinstance(pd.read_parquet(out).uid.iloc[0], str)


def test_download_rerun_with_another_image_size_is_refused(tmp_path, client, edge_server):
    from dallekit.config import DownloadConfig
    from dallekit.pipeline.download import download

    server, _ = edge_server
    (tmp_path / "in.csv").write_text("url,caption\n" + "".join(f"{server.url('/ok.jpg')}?{i},a shape {i}\n" for i in range(6)))
    ingest([str(tmp_path / "in.csv")], str(tmp_path / "urls"), IngestConfig(shard_size=2), client)
    out = tmp_path / "images"
    download(str(tmp_path / "urls"), str(out), DownloadConfig(image_size=64, threads=2), client)
    interrupt(out)
    with pytest.raises(BadInputError, match="image_size 64 -> 128"):
        download(str(tmp_path / "urls"), str(out), DownloadConfig(image_size=128, threads=2), client)
    download(str(tmp_path / "urls"), str(out), DownloadConfig(image_size=64, threads=4, timeout=3), client)  # threads, timeout: runtime only
    kept, _ = check_accounting(out, 6)
    assert set(kept["width"]) == {64}  # never a mix of 64 px and 128 px shards


@pytest.mark.slow
def test_encode_rerun_with_another_dvae_is_refused(tmp_path, client):
    import torch

    from dallekit.config import EncodeConfig
    from dallekit.models.dvae import DVAE, DVAEConfig, config_dict
    from dallekit.models.weights import save_model
    from dallekit.pipeline.encode import encode

    config = DVAEConfig(image_size=16, codebook_size=16, n_groups=2, n_hid=8, n_blk_per_group=1, n_init=8)
    dvaes = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_model(tmp_path / f"dvae{seed}", DVAE(config), config_dict(config))
        dvaes.append(str(tmp_path / f"dvae{seed}"))
    rows = [downloaded_row(f"{i:016x}", f"a shape {i}", shape_jpeg(i, size=32)) for i in range(6)]
    write_stage(tmp_path / "filter", [rows[:3], rows[3:]])
    out = tmp_path / "tokens"
    encode(str(tmp_path / "filter"), dvaes[0], str(out), EncodeConfig(), client)
    interrupt(out)
    with pytest.raises(BadInputError, match="tokens.image_tokenizer.sha256"):
        encode(str(tmp_path / "filter"), dvaes[1], str(out), EncodeConfig(), client)
    encode(str(tmp_path / "filter"), dvaes[1], str(out), EncodeConfig(overwrite=True), client)
    kept, _ = check_accounting(out, 6)
    from dallekit.tokenize.image import ImageTokenizer
    from dallekit.tokenize.tokens import check_token_files

    metadata = check_token_files(sorted(str(p) for p in out.glob("part-*.parquet")))  # every shard agrees ...
    assert metadata["image_tokenizer"]["sha256"] == ImageTokenizer.load(dvaes[1], "cpu").sha256  # ... on the second dVAE


def test_an_edited_input_of_the_same_size_is_a_changed_input(tmp_path, client):
    (tmp_path / "in.csv").write_text("url,caption\nhttp://x/1.jpg,aaaa\nhttp://x/2.jpg,bbbb\n")
    ingest([str(tmp_path / "in.csv")], str(tmp_path / "out"), IngestConfig(shard_size=1), client)
    interrupt(tmp_path / "out")
    (tmp_path / "in.csv").write_text("url,caption\nhttp://x/1.jpg,aaaa\nhttp://x/2.jpg,BBBB\n")
    with pytest.raises(BadInputError, match="inputs"):
        ingest([str(tmp_path / "in.csv")], str(tmp_path / "out"), IngestConfig(shard_size=1), client)
    (tmp_path / "in.csv").write_text("url,caption\nhttp://x/1.jpg,aaaa\nhttp://x/2.jpg,bbbb\n")  # rewritten, same rows
    ingest([str(tmp_path / "in.csv")], str(tmp_path / "out"), IngestConfig(shard_size=1), client)
    assert sorted(read_stage(tmp_path / "out")[0]["caption"]) == ["aaaa", "bbbb"]


def test_damaged_stage_files_are_one_line_or_redone(tmp_path, client, capsys):
    src = downloaded(tmp_path)
    (src / "_stats.json").write_text("[]")
    code, err = run_cli(capsys, "clean", src, "--out", tmp_path / "c")
    one_line(code, err, "_stats.json", "not a stage's stats")
    src = downloaded(tmp_path / "again")
    clean(str(src), str(tmp_path / "clean"), CleanConfig(), client)
    interrupt(tmp_path / "clean")
    (tmp_path / "clean" / "_progress" / "part-00000.json").write_text("garbage")  # a damaged mark: its shard is redone
    clean(str(src), str(tmp_path / "clean"), CleanConfig(), client)
    check_accounting(tmp_path / "clean", 12)
    (tmp_path / "clean" / "_fingerprint.json").write_text("[1]")
    code, err = run_cli(capsys, "clean", src, "--out", tmp_path / "clean")
    one_line(code, err, "_fingerprint.json", "not a stage fingerprint")


def test_a_column_of_the_wrong_type_is_one_line(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = downloaded(tmp_path)
    table = pq.read_table(src / "part-00000.parquet")
    table = table.set_column(table.column_names.index("jpg"), "jpg", pa.array(["not bytes"] * table.num_rows))
    pq.write_table(table, src / "part-00000.parquet")
    for command in (["clean", src, "--out", tmp_path / "c"], ["train-dvae", src, "--out", tmp_path / "d"],
                    ["train-clip", src, "--out", tmp_path / "e"]):
        code, err = run_cli(capsys, *command)
        one_line(code, err, "column jpg holds string, expected binary")


@pytest.mark.slow
def test_trainers_do_not_write_into_a_stage_or_replace_a_model(tmp_path, client, capsys):
    src = downloaded(tmp_path)
    code, err = run_cli(capsys, "train-dvae", src, "--out", src.parent / "other", "--max-steps", "1", "--val-percent", "50")
    assert code == 0, err
    code, err = run_cli(capsys, "train-dvae", src, "--out", src.parent / "other", "--max-steps", "1", "--val-percent", "50")
    one_line(code, err, "holds a trained model", "--resume")
    clean(str(src), str(tmp_path / "clean"), CleanConfig(), client)
    code, err = run_cli(capsys, "train-dvae", src, "--out", tmp_path / "clean", "--max-steps", "1")
    one_line(code, err, "holds a dallekit stage")


def test_train_clip_with_fewer_pairs_than_a_batch_is_one_line(tmp_path, capsys):
    src = downloaded(tmp_path, n=4)
    code, err = run_cli(capsys, "train-clip", src, "--out", tmp_path / "clip", "--batch-size", "8", "--max-steps", "1")
    one_line(code, err, "4 image-caption pairs, fewer than --batch-size 8")


def test_a_moved_run_folder_resumes_and_an_edited_upstream_shard_is_refused(tmp_path, client):
    import shutil

    src = downloaded(tmp_path / "run")
    clean(str(src), str(tmp_path / "run" / "clean"), CleanConfig(), client)
    filter(str(tmp_path / "run" / "clean"), str(tmp_path / "run" / "filter"), FilterConfig(clip=False, min_side=1), client)
    interrupt(tmp_path / "run" / "filter")
    shutil.move(tmp_path / "run", tmp_path / "moved")  # another disk: every absolute path changes
    moved = tmp_path / "moved"
    clean(str(moved / "download"), str(moved / "clean"), CleanConfig(), client)  # complete: not refused, not redone
    filter(str(moved / "clean"), str(moved / "filter"), FilterConfig(clip=False, min_side=1), client)  # resumes
    check_accounting(moved / "filter", 12)
    assert json.loads((moved / "filter" / "_fingerprint.json").read_text())["input"]["path"] == str(moved / "clean")
    interrupt(moved / "filter")
    shard = moved / "clean" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    image = pd.read_parquet(shard).jpg.iloc[0]
    at = bytes(data).index(image) + len(image) // 2  # image bytes are stored plain: one of them, edited in place
    data[at] ^= 0xFF
    size = shard.stat().st_size
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == size  # the same size: only the content (and its time) tell
    with pytest.raises(BadInputError, match=r"input.shards"):
        filter(str(moved / "clean"), str(moved / "filter"), FilterConfig(clip=False, min_side=1), client)


def test_a_mark_whose_shard_is_gone_or_cut_is_redone(tmp_path, client):
    src = downloaded(tmp_path)
    out = tmp_path / "clean"
    clean(str(src), str(out), CleanConfig(), client)
    expected = sorted(pd.read_parquet(out).uid)
    (out / "_SUCCESS").unlink()  # as if killed after both shards were marked
    (out / "part-00000.parquet").unlink()
    data = (out / "part-00001.parquet").read_bytes()
    (out / "part-00001.parquet").write_bytes(data[: len(data) // 2])  # an interrupted copy
    clean(str(src), str(out), CleanConfig(), client)
    check_accounting(out, 12)
    assert sorted(pd.read_parquet(out).uid) == expected


def test_a_resume_under_other_package_versions_is_refused_and_stats_record_them(tmp_path, client):
    from dallekit.pipeline.stage import package_versions

    src = downloaded(tmp_path)
    clean(str(src), str(tmp_path / "clean"), CleanConfig(), client)
    stats = json.loads((tmp_path / "clean" / "_stats.json").read_text())
    assert stats["config"]["versions"] == package_versions(("ftfy", "pillow", "opencv-python-headless"))
    interrupt(tmp_path / "clean")
    fingerprint_path = tmp_path / "clean" / "_fingerprint.json"
    fingerprint = json.loads(fingerprint_path.read_text())
    fingerprint["versions"]["pillow"] = "9.0.0"  # the run was started under another Pillow
    fingerprint_path.write_text(json.dumps(fingerprint))
    with pytest.raises(BadInputError, match=r"other package versions \(versions.pillow \"9.0.0\" -> "):
        clean(str(src), str(tmp_path / "clean"), CleanConfig(), client)
    clean(str(src), str(tmp_path / "clean"), CleanConfig(overwrite=True), client)
    check_accounting(tmp_path / "clean", 12)


def test_a_worker_with_other_package_versions_is_refused():
    from dallekit.pipeline.stage import check_worker_versions

    class Workers:  # what Client.run returns: each worker's answer
        def run(self, fn, names):
            return {"tcp://127.0.0.1:1": fn(names), "tcp://127.0.0.1:2": fn(names) | {"pillow": "9.0.0"}}

    from dallekit.pipeline.stage import package_versions

    mine = package_versions(("pillow",))
    with pytest.raises(BadInputError, match=r"tcp://127.0.0.1:2 has pillow 9.0.0 \(driver"):
        check_worker_versions(Workers(), "clean", mine)


def test_train_clip_skips_and_counts_images_over_64_mpx_without_a_decode(tmp_path, monkeypatch):
    from collections import Counter

    from dallekit.training.clip import pair_batches

    attempts = forbid_large_decodes(monkeypatch)  # the loader runs in this process: a decode of a huge row fails the test
    rows = [downloaded_row(f"u{i}", f"a shape number {i}", shape_jpeg(i, size=48)) for i in range(4)]
    rows += [downloaded_row(uid, "a huge picture", png_header_only(*size), size=size, original=size) for uid, size in HUGE_IMAGES.items()]
    write_stage(tmp_path / "filtered", [rows])
    skipped: Counter = Counter()
    batches = pair_batches([str(tmp_path / "filtered" / "part-00000.parquet")], 4, seed=0, draft=64, skipped=skipped)
    (images, captions), _ = next(batches), next(batches)  # an epoch's 4 decodable pairs each: the first epoch was read to its end
    assert [image.size for image in images] == [(48, 48)] * 4 and sorted(captions) == [f"a shape number {i}" for i in range(4)]
    assert set(skipped) == {"image_too_large"} and skipped["image_too_large"] >= 2 and attempts == []
