"""download --retry-failed (timeouts, connection errors, 5xx, 429 only; in place; resumable) and the TDMRep opt-out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from dallekit.config import CleanConfig, DownloadConfig
from dallekit.demo.synthetic import Route, ShapesServer
from dallekit.errors import BadInputError
from dallekit.pipeline.clean import clean
from dallekit.pipeline.download import download
from dallekit.pipeline.fetch import TDM_REFUSED
from dallekit.pipeline.passes import read_marks
from dallekit.pipeline.retry import is_retryable, retry_failed
from dallekit.pipeline.shards import read_shard_marks
from tests.conftest import _image_bytes
from tests.helpers import check_accounting, read_stage
from tests.test_download import make_url_shards

GOOD = _image_bytes("RGB", "JPEG")
OTHER = _image_bytes("L", "JPEG")  # another picture, for the URL that comes back
JPEG = {"Content-Type": "image/jpeg"}
PATHS = ["/ok.jpg", "/flaky.jpg", "/busy.jpg", "/gone.jpg", "/tdm.jpg", "/tdm0.jpg"]


def failing_routes() -> dict[str, Route]:
    return {
        "/ok.jpg": Route(GOOD, headers=JPEG),
        "/flaky.jpg": Route(b"try later", 503),
        "/busy.jpg": Route(b"slow down", 429),
        "/gone.jpg": Route(b"gone", 404),
        "/tdm.jpg": Route(GOOD, headers=JPEG | {"tdm-reservation": "1"}),
        "/tdm0.jpg": Route(GOOD, headers=JPEG | {"tdm-reservation": "0"}),
    }


def downloaded(tmp_path, client, server, copies: int = 2):
    urls = [server.url(f"{p}?i={i}") for i in range(copies) for p in PATHS]
    shards = make_url_shards(tmp_path, client, urls, shard_size=4)
    download(str(shards), str(tmp_path / "images"), DownloadConfig(threads=4, timeout=5), client)
    return tmp_path / "images", urls


def by_path(kept):
    return {url.split("/")[-1].split("?")[0]: row for url, row in zip(kept["url"], kept.to_dict("records"))}


def test_tdm_reservation_is_an_opt_out_unless_disabled(tmp_path, client):
    with ShapesServer(failing_routes(), max_seconds=300) as server:
        images, urls = downloaded(tmp_path, client, server, copies=1)
        rows = by_path(read_stage(images)[0])
        assert (rows["tdm.jpg"]["status"], rows["tdm.jpg"]["error_message"]) == ("failed_to_download", TDM_REFUSED)
        assert "tdm-reservation: 1" in TDM_REFUSED and rows["tdm0.jpg"]["status"] == "success"
        shards = tmp_path / "urls"
        download(str(shards), str(tmp_path / "ignored"), DownloadConfig(threads=4, honour_tdm_reservation=False), client)
        assert by_path(read_stage(tmp_path / "ignored")[0])["tdm.jpg"]["status"] == "success"


def test_only_transient_failures_are_retryable():
    assert is_retryable("failed_to_download", "HTTP Error 503: Service Unavailable")
    assert is_retryable("failed_to_download", "HTTP Error 429: Too Many Requests")
    assert is_retryable("failed_to_download", "timed out")
    assert is_retryable("failed_to_download", "<urlopen error [Errno 111] Connection refused>")
    assert is_retryable("failed_to_download", "Remote end closed connection without response")
    assert is_retryable("failed_to_download", "[Errno 104] Connection reset by peer")
    assert is_retryable("failed_to_download", "<urlopen error [SSL: UNEXPECTED_EOF_WHILE_READING] EOF occurred in violation of protocol (_ssl.c:1006)>")
    assert not is_retryable("failed_to_download", "HTTP Error 404: Not Found")
    assert not is_retryable("failed_to_download", "HTTP Error 403: Connection refused")  # the server's own reason phrase
    assert not is_retryable("failed_to_download", "URL scheme not allowed: ftp: in ftp://h/timed out (only http and https are fetched)")
    assert not is_retryable("failed_to_download", "HTTP Error 4290: made up")
    assert not is_retryable("failed_to_download", "Use of image disallowed by X-Robots-Tag directive")
    assert not is_retryable("failed_to_download", TDM_REFUSED)
    assert not is_retryable("failed_to_download", "<urlopen error [Errno -2] Name or service not known>")
    assert not is_retryable("failed_to_resize", "timed out")  # a decoder's error is not the network's
    assert not is_retryable("success", None)


@pytest.mark.slow
def test_retry_fetches_only_retryable_rows_in_place(tmp_path, client):
    with ShapesServer(failing_routes(), max_seconds=300) as server:
        images, urls = downloaded(tmp_path, client, server)
        before = read_stage(images)[0]
        server.routes["/flaky.jpg"] = Route(GOOD, headers=JPEG)  # the server is back; the 429 one still refuses
        stats = retry_failed(str(images), client, {"threads": 2})
    kept, rejects = check_accounting(images, len(urls))
    assert rejects.empty and kept["url"].tolist() == urls and kept["key"].tolist() == before["key"].tolist()
    for row in kept.to_dict("records"):
        name = row["url"].split("/")[-1].split("?")[0]
        assert row["retries"] == (1 if name in ("flaky.jpg", "busy.jpg") else 0), name
        if name == "flaky.jpg":
            assert row["status"] == "success" and row["jpg"] is not None and row["error_message"] is None
    unchanged = kept[~kept.url.str.contains("flaky")].drop(columns=["retries"]).reset_index(drop=True)
    pd_before = before[~before.url.str.contains("flaky")].drop(columns=["retries"]).reset_index(drop=True)
    assert unchanged.equals(pd_before)  # 404, opt-outs and successes are left exactly as they were
    assert stats["counters"]["status"] == {"success": 6, "failed_to_download": 6}
    assert stats["retry"]["rounds"] == 1
    assert stats["retry"]["history"][0] | {"seconds": 0} == {"round": 1, "retried": 4, "recovered": 2, "shards_rewritten": 3,
                                                             "seconds": 0, "timeout": 5, "retries": 0}
    on_disk = json.loads((images / "_stats.json").read_text())
    assert on_disk["counters"] == stats["counters"] and (images / "_SUCCESS").exists() and not (images / "_retry").exists()
    marks = read_shard_marks(str(images), verify=True).values()  # the shards' marks, rewritten, vouch for the new shards
    assert len(marks) == 3 and sum(m["counters"]["status"].get("success", 0) for m in marks) == 6
    with pytest.raises(BadInputError, match="--image-size 64: a retry keeps the download's own options"):
        retry_failed(str(images), client, {"image_size": 64})
    (images / "_progress" / "part-00001.json").unlink()
    with pytest.raises(BadInputError, match=r"part-00001.parquet is not the shard its mark vouches for \(its mark is missing"):
        retry_failed(str(images), client)


@pytest.mark.slow
def test_later_stages_see_a_retried_folder_as_new_input(tmp_path, client):
    with ShapesServer(failing_routes(), max_seconds=300) as server:
        images, _ = downloaded(tmp_path, client, server, copies=1)
        assert clean(str(images), str(tmp_path / "clean"), CleanConfig(), client)["rows_out"] == 1  # tdm0.jpg is ok.jpg's image
        server.routes["/flaky.jpg"] = Route(OTHER, headers=JPEG)
        retry_failed(str(images), client)
    with pytest.raises(BadInputError, match="retry_rounds"):
        clean(str(images), str(tmp_path / "clean"), CleanConfig(), client)
    stats = clean(str(images), str(tmp_path / "clean"), CleanConfig(overwrite=True), client)
    assert stats["rows_out"] == 2  # and now flaky.jpg


def retry_cli(folder) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dallekit.cli", "download", "--retry-failed", str(folder), "--workers", "1", "--timeout", "20"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_killed_retry_resumes_with_every_row_once(tmp_path, client):
    with ShapesServer(failing_routes(), max_seconds=600) as server:
        images, urls = downloaded(tmp_path, client, server, copies=2)
        server.routes["/flaky.jpg"] = Route(GOOD, headers=JPEG, delay=3)  # back, but slow: each shard's retry takes 3 s
        proc = retry_cli(images)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not read_marks(str(images), "retry", verify=False, remove_damaged=False):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (images / "_SUCCESS").exists()  # later stages refuse a half-retried folder
        with pytest.raises(BadInputError, match="not a finished stage"):
            clean(str(images), str(tmp_path / "clean"), CleanConfig(), client)
        with pytest.raises(BadInputError, match="a --retry-failed round is under way"):
            download(str(tmp_path / "urls"), str(images), DownloadConfig(threads=4, timeout=5), client)  # would end the round half done
        proc = retry_cli(images)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "resuming round 1" in out
    kept, _ = check_accounting(images, len(urls))
    flaky = kept[kept.url.str.contains("flaky")]
    assert (flaky["status"] == "success").all() and (flaky["retries"] == 1).all()  # each fetched again exactly once
    assert json.loads((images / "_stats.json").read_text())["retry"]["history"][0]["recovered"] == 2


def test_retry_refuses_what_is_not_a_finished_download(tmp_path, client):
    from tests.stage_data import downloaded_row, write_stage

    write_stage(tmp_path / "clean", [[downloaded_row("a" * 16, "a caption", None, status="failed_to_download")]], stage="clean")
    with pytest.raises(BadInputError, match="expected the output of `dallekit download`"):
        retry_failed(str(tmp_path / "clean"), client)
    proc = subprocess.run([sys.executable, "-m", "dallekit.cli", "download", "--retry-failed", str(tmp_path / "clean"), "--out", "x"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "give no URLS or --out" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "dallekit.cli", "download"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "give URLS and --out" in proc.stderr
    assert pq.read_table(tmp_path / "clean" / "part-00000.parquet").num_rows == 1


def test_retry_refuses_a_folder_an_older_resizer_wrote(tmp_path, client):
    import json

    with ShapesServer(failing_routes(), max_seconds=300) as server:
        images, _ = downloaded(tmp_path, client, server)
        fingerprint = json.loads((images / "_fingerprint.json").read_text())
        del fingerprint["options"]["resizer"]  # as a download before reduced-scale JPEG decoding wrote it
        (images / "_fingerprint.json").write_text(json.dumps(fingerprint))
        before = {p.name: p.read_bytes() for p in images.glob("part-*.parquet")}
        with pytest.raises(BadInputError, match="another version of dallekit's resizer .*rerun the download with --overwrite"):
            retry_failed(str(images), client, {"threads": 2})
    assert {p.name: p.read_bytes() for p in images.glob("part-*.parquet")} == before


def test_retry_refuses_a_folder_downloaded_with_other_package_versions(tmp_path, client):
    import json

    with ShapesServer(failing_routes(), max_seconds=300) as server:
        images, _ = downloaded(tmp_path, client, server)
        fingerprint = json.loads((images / "_fingerprint.json").read_text())
        fingerprint["versions"]["opencv-python-headless"] = "4.5.0.0"  # the folder was downloaded under another OpenCV
        (images / "_fingerprint.json").write_text(json.dumps(fingerprint))
        before = {p.name: p.read_bytes() for p in images.glob("part-*.parquet")}
        with pytest.raises(BadInputError, match=r"other package versions \(opencv-python-headless 4.5.0.0 -> "):
            retry_failed(str(images), client, {"threads": 2})
    assert {p.name: p.read_bytes() for p in images.glob("part-*.parquet")} == before


def folder_files(folder, leave_out=("_lease.json",)) -> dict:
    """Every file under a folder (by relative path) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in leave_out}


@pytest.mark.parametrize("damage", ["mark", "shard"])
def test_a_failed_precondition_leaves_the_folder_as_it_was(tmp_path, client, capsys, damage):
    from tests.helpers import run_cli
    from tests.test_guard_stage import one_line

    with ShapesServer(failing_routes(), max_seconds=300) as server:
        images, _ = downloaded(tmp_path, client, server)
    if damage == "mark":
        (images / "_progress" / "part-00001.json").unlink()
    else:
        data = (images / "part-00001.parquet").read_bytes()
        (images / "part-00001.parquet").write_bytes(data[: len(data) // 2])
    before = folder_files(images, leave_out=())
    code, err = run_cli(capsys, *["download", "--retry-failed", images, "--workers", "1"])
    one_line(code, err, "part-00001.parquet is not the shard its mark vouches for", "rerun the download")
    assert folder_files(images, leave_out=()) == before  # _SUCCESS still there, no _retry/, nothing removed or added
    assert (images / "_SUCCESS").exists() and not (images / "_retry").exists()


def test_a_retry_into_a_held_folder_is_refused_naming_its_owner(tmp_path, client, capsys):
    from dallekit.pipeline.passes import hold_folder
    from tests.helpers import run_cli
    from tests.test_guard_stage import one_line

    with ShapesServer(failing_routes(), max_seconds=300) as server:
        images, urls = downloaded(tmp_path, client, server)
        before = folder_files(images)
        with hold_folder(str(images), "another retry"):  # as a second retry running beside it
            code, err = run_cli(capsys, *["download", "--retry-failed", images, "--workers", "1"])
            one_line(code, err, "another dallekit run is writing it (another retry", f"pid {os.getpid()}")
            assert folder_files(images) == before
            code, err = run_cli(capsys, *["download", "--retry-failed", images, "--workers", "1"])
            assert code == 2 and folder_files(images) == before  # refused again: nothing was claimed by the first refusal
        assert not (images / "_lease.json").exists()
        server.routes["/flaky.jpg"] = Route(GOOD, headers=JPEG)
        stats = retry_failed(str(images), client)  # released: the retry runs
    assert stats["retry"]["history"][0]["retried"] == 4 and not (images / "_lease.json").exists()
    check_accounting(images, len(urls))


def test_a_round_the_previous_version_began_is_resumed(tmp_path, client, capsys):
    with ShapesServer(failing_routes(), max_seconds=300) as server:
        images, urls = downloaded(tmp_path, client, server)
        (images / "_retry" / "done").mkdir(parents=True)  # round 1 as dallekit 0.29 left it: part-00000 retried
        (images / "_retry" / "round.json").write_text(json.dumps({"round": 1}))
        (images / "_retry" / "done" / "part-00000.json").write_text(json.dumps({"shard": "part-00000", "retried": 2, "recovered": 0}))
        (images / "_SUCCESS").unlink()
        server.routes["/flaky.jpg"] = Route(GOOD, headers=JPEG)
        capsys.readouterr()
        stats = retry_failed(str(images), client)
    assert "resuming round 1" in capsys.readouterr().out
    kept, _ = check_accounting(images, len(urls))
    first = kept[kept.key.isin(pq.read_table(images / "part-00000.parquet").column("key").to_pylist())]
    assert (first["retries"] == 0).all()  # its shard was marked done by the previous version: not fetched again
    assert kept["retries"].sum() == 2 and stats["retry"]["history"][0]["retried"] == 4  # the old mark's 2 and 2 more
    assert not (images / "_retry").exists() and stats["retry"]["rounds"] == 1


@pytest.mark.slow
def test_a_damaged_round_file_or_stats_config_is_one_line_naming_it_and_changes_nothing(tmp_path, client, capsys):
    import shutil

    from tests.helpers import run_cli
    from tests.test_guard_stage import one_line

    with ShapesServer(failing_routes(), max_seconds=300) as server:
        images, _ = downloaded(tmp_path, client, server)
    stats = json.loads((images / "_stats.json").read_text())
    damages = {"_retry/round.json": [b"\xb9{", b"[1]", b'{"round": "x"}'], "_stats.json": [json.dumps(stats | {"config": [1]}).encode()]}
    for name, contents in damages.items():
        for content in contents:
            folder = tmp_path / f"case-{len(list(tmp_path.glob('case-*')))}"
            shutil.copytree(images, folder)
            (folder / name).parent.mkdir(exist_ok=True)
            (folder / name).write_bytes(content)
            before = folder_files(folder, leave_out=())
            code, err = run_cli(capsys, *["download", "--retry-failed", folder, "--workers", "1"])
            one_line(code, err, f"{folder / name}: ", "expected", after_progress=True)
            assert folder_files(folder, leave_out=()) == before
