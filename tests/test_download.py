"""download: img2dataset statuses for the web's edge cases, row accounting, resume after kills."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dallekit.config import DownloadConfig, IngestConfig
from dallekit.images import image_signature
from dallekit.pipeline.download import download
from dallekit.pipeline.ingest import ingest
from tests.conftest import edge_routes
from tests.helpers import check_accounting, read_stage


def make_url_shards(tmp_path, client, urls: list[str], shard_size: int = 100):
    """Ingest a CSV of the given URLs; returns the URL shard folder."""
    csv = tmp_path / "urls.csv"
    pd.DataFrame({"url": urls, "caption": [f"caption {i}" for i in range(len(urls))]}).to_csv(csv, index=False)
    ingest([str(csv)], str(tmp_path / "urls"), IngestConfig(shard_size=shard_size), client)
    return tmp_path / "urls"


@pytest.mark.slow
def test_edge_cases_get_img2dataset_statuses(tmp_path, client, edge_server):
    server, expected = edge_server
    urls = list(expected)
    shards = make_url_shards(tmp_path, client, urls, shard_size=5)
    config = DownloadConfig(threads=8, timeout=2, max_image_area=1_000_000)
    stats = download(str(shards), str(tmp_path / "images"), config, client)
    kept, rejects = check_accounting(tmp_path / "images", len(urls))
    assert rejects.empty  # download drops nothing
    assert kept["url"].tolist() == urls  # input order is kept, not completion order
    for row in kept.itertuples():
        status, error = expected[row.url]
        assert (row.status, row.error_message) == (status, error), row.url
        if status == "success":
            image = Image.open(io.BytesIO(row.jpg))
            # img2dataset mattes alpha on white and converts CMYK, but keeps grayscale as one channel
            assert image.size == (256, 256) and image.mode == ("L" if "gray" in row.url else "RGB")
            assert (row.width, row.height) == (256, 256) and row.original_width == 300
        else:
            assert row.jpg is None and pd.isna(row.width)
    ok = kept[kept.url.str.endswith("/ok.jpg")].iloc[0]
    assert ok.sha256 == hashlib.sha256(edge_routes()["/ok.jpg"][0].body).hexdigest()  # hash of the raw bytes
    assert stats["counters"]["status"] == {"success": 5, "failed_to_download": 4, "failed_to_resize": 3}
    assert stats["counters"]["error_message"]["timed out"] == 1
    assert list(kept.columns[:3]) == ["uid", "url", "caption"]
    assert {"key", "status", "error_message", "width", "height", "original_width", "original_height", "sha256", "exif"} <= set(kept.columns)


def test_opt_out_can_be_disabled(tmp_path, client, edge_server):
    server, _ = edge_server
    shards = make_url_shards(tmp_path, client, [server.url("/noai.jpg")])
    download(str(shards), str(tmp_path / "images"), DownloadConfig(threads=2, disallowed_header_directives=["none"]), client)
    kept, _ = read_stage(tmp_path / "images")[:2]
    assert kept["status"].tolist() == ["success"]


def test_rows_carry_clean_signature_of_the_stored_image(tmp_path, client, edge_server):
    """download stores clean's near-duplicate signature of the bytes it stores (so clean decodes nothing); failed rows get nulls."""
    server, _ = edge_server
    shards = make_url_shards(tmp_path, client, [server.url("/ok.jpg"), server.url("/gray.jpg"), server.url("/404.jpg")])
    download(str(shards), str(tmp_path / "images"), DownloadConfig(threads=2), client)
    table = pq.read_table(tmp_path / "images" / "part-00000.parquet")
    assert table.schema.field("phash").type == pa.uint64()
    assert table.schema.field("color_thumb").type == pa.binary(192)
    assert table.schema.field("detail_thumb").type == pa.binary(3072)
    for row in table.to_pylist():
        if row["status"] == "success":
            assert (row["phash"], row["color_thumb"], row["detail_thumb"]) == tuple(image_signature(row["jpg"]))
        else:
            assert row["phash"] is None and row["color_thumb"] is None and row["detail_thumb"] is None


def slow_shards(tmp_path, client, server, n_shards: int, rows: int = 4):
    """URL shards whose every shard holds one URL that times out, so each shard takes a while."""
    urls = []
    for s in range(n_shards):
        urls += [server.url(f"/ok.jpg?s={s}&i={i}") for i in range(rows - 1)] + [server.url(f"/slow.jpg?s={s}")]
    return make_url_shards(tmp_path, client, urls, shard_size=rows), len(urls)


def marks(folder) -> int:
    return len(list((folder / "_progress").glob("part-*.json"))) if (folder / "_progress").exists() else 0


@pytest.mark.slow
def test_killed_worker_is_retried(tmp_path, client, edge_server):
    server, _ = edge_server
    shards, n = slow_shards(tmp_path, client, server, n_shards=6)
    out = tmp_path / "images"
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(stats=download(str(shards), str(out), DownloadConfig(threads=4, timeout=1.5), client))
    )
    thread.start()
    deadline = time.time() + 60
    while marks(out) < 1 and time.time() < deadline:
        time.sleep(0.1)
    victim = next(iter(client.scheduler_info()["workers"]))
    finished_at_kill = marks(out)
    try:
        client.run(os._exit, 1, workers=[victim])  # the worker dies mid-shard; its nanny starts a new one
    except Exception:  # noqa: BLE001 - the dying worker may not answer
        pass
    thread.join(timeout=120)
    assert finished_at_kill < 6, "the stage had finished before the kill: nothing was retried"
    assert "stats" in result
    kept, _ = check_accounting(out, n)
    assert sorted(kept["uid"]) == sorted(read_stage(shards)[0]["uid"])
    client.wait_for_workers(2, timeout=60)
    assert victim not in client.scheduler_info()["workers"]  # the kill happened: a new worker took its place


def run_download_cli(shards, out, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dallekit.cli", "download", str(shards), "--out", str(out), "--threads", "4", "--timeout", "1.5", "--workers", "2", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_marks(folder, count: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while marks(folder) < count and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)


@pytest.mark.slow
def test_interrupted_and_killed_driver_resumes(tmp_path, client, edge_server):
    server, _ = edge_server
    n_shards = 24  # about 12 s of downloading on 2 workers: the interrupts land mid-run even on a loaded machine
    shards, n = slow_shards(tmp_path, client, server, n_shards=n_shards)
    out = tmp_path / "images"
    # Ctrl-C: exit 130 with a one-line hint
    proc = run_download_cli(shards, out)
    wait_for_marks(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err
    # a killed driver and its workers (SIGKILL to the whole process group)
    proc = run_download_cli(shards, out)
    wait_for_marks(out, marks(out) + 2, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = marks(out)
    assert 0 < done_before < n_shards and not (out / "_SUCCESS").exists()
    proc = run_download_cli(shards, out)
    stdout, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert f"resuming, {done_before} of {n_shards} shards already complete" in stdout + err
    kept, _ = check_accounting(out, n)
    assert sorted(kept["uid"]) == sorted(read_stage(shards)[0]["uid"])
    assert not list(out.glob("_tmp-*")) and not list((out / "_rejects").glob("_tmp-*"))
    assert "download summary" in stdout


def test_cli_on_an_existing_scheduler(tmp_path, client, capsys):
    (tmp_path / "in.tsv").write_text("a red circle\thttp://example.com/1.jpg\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dallekit.cli", "ingest", str(tmp_path / "in.tsv"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env=os.environ | {"DASK_SCHEDULER_ADDRESS": client.scheduler.address},
    )
    assert proc.returncode == 0, proc.stderr
    assert f"scheduler {client.scheduler.address}" in proc.stderr
    assert pq.read_table(tmp_path / "out" / "part-00000.parquet").num_rows == 1


def test_download_of_a_non_stage_folder_is_bad_input(tmp_path, capsys):
    from dallekit.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["download", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "no part-*.parquet shards" in err and err.count("\n") == 1


@pytest.mark.slow
def test_exifread_per_row_warnings_are_counted_not_printed(tmp_path, client):
    """img2dataset's EXIF read logs `File format not recognized.` per PNG: the stage counts it once, stderr stays quiet."""
    from dallekit.demo.synthetic import Route, ShapesServer

    def png(i: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (300, 300), (40 * i, 90, 200)).save(buffer, format="PNG")
        return buffer.getvalue()

    routes = {f"/{i}.png": Route(png(i), headers={"Content-Type": "image/png"}) for i in range(5)}
    with ShapesServer(routes, max_seconds=300) as server:
        shards = make_url_shards(tmp_path, client, [server.url(p) for p in routes])
        proc = run_download_cli(shards, tmp_path / "images")
        stdout, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "File format not recognized" not in err  # was one line per PNG, from each worker's stderr
    assert stdout.count("exifread: File format not recognized.") == 1  # one line of the summary, with the count
    stats = json.loads((tmp_path / "images" / "_stats.json").read_text())
    assert stats["counters"]["status"] == {"success": 5}
    assert stats["counters"]["logs"] == {"exifread: File format not recognized.": 5}


def test_counting_row_logs_counts_only_its_own_thread(caplog):
    import logging

    from dallekit.pipeline.row_logs import counting_row_logs

    logger = logging.getLogger("exifread")
    with counting_row_logs() as counts:
        for offset in (1234, 5678):
            logger.warning("Possibly corrupted field at offset %d", offset)
        other = threading.Thread(target=logger.warning, args=("from another thread",))
        other.start()
        other.join()
    logger.warning("after the block")
    assert counts == {"exifread: Possibly corrupted field at offset <…>": 2}
    assert [r.getMessage() for r in caplog.records if r.name == "exifread"] == ["from another thread", "after the block"]


@pytest.mark.slow
def test_a_png_download_keeps_its_bytes_in_jpg_as_every_stage_reads_them(tmp_path, client, edge_server):
    """img2dataset names the image column after --encode-format; dallekit keeps `jpg`, so clean reads a PNG download too."""
    from dallekit.config import CleanConfig
    from dallekit.pipeline.clean import clean

    server, _ = edge_server
    shards = make_url_shards(tmp_path, client, [server.url("/ok.jpg"), server.url("/gray.jpg")])
    download(str(shards), str(tmp_path / "images"), DownloadConfig(threads=2, encode_format="png"), client)
    table = pq.read_table(tmp_path / "images" / "part-00000.parquet")
    assert "png" not in table.column_names and all(b.startswith(b"\x89PNG") for b in table.column("jpg").to_pylist())
    clean(str(tmp_path / "images"), str(tmp_path / "clean"), CleanConfig(near_dup_distance=-1), client)
    assert pq.read_table(tmp_path / "clean").num_rows == 2
