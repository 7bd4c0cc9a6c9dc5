"""download guards on real files and sockets: total deadline, byte cap, URL schemes, dallekit's resizer, stale temp folders.

The shard tests call `download_shard` in this process on URL shards written by hand (no Dask).
"""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from dallekit.config import DownloadConfig
from dallekit.demo.synthetic import encode, random_spec, render
from dallekit.pipeline.download import download_shard, plan_download

# ---------------------------------------------------------------- a scripted loopback server


@dataclass
class Script:
    """What the server does on one path: wait, answer, then send the body at once or one byte per `drip` seconds."""

    body: bytes = b""
    status: int = 200
    headers: dict = field(default_factory=lambda: {"Content-Type": "image/jpeg"})
    delay: float = 0.0
    drip: float = 0.0
    send_length: bool = True


class _ScriptHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the connection closes after each answer

    def do_GET(self) -> None:  # http.server's naming
        script = self.server.scripts.get(self.path, Script(b"not found", 404))  # type: ignore[attr-defined]
        time.sleep(script.delay)
        try:
            self.send_response(script.status)
            for key, value in script.headers.items():
                self.send_header(key, value)
            if script.send_length:
                self.send_header("Content-Length", str(len(script.body)))
            self.end_headers()
            self._send_body(script)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up: that is the point of most routes
            pass

    def _send_body(self, script: Script) -> None:
        if not script.drip:
            self.wfile.write(script.body)
            return
        for i in range(len(script.body)):
            if time.monotonic() > self.server.stop_at:  # type: ignore[attr-defined] - bounded, whatever the client does
                return
            self.wfile.write(script.body[i : i + 1])
            self.wfile.flush()
            time.sleep(script.drip)

    def log_message(self, *args) -> None:
        pass


class ScriptServer:
    """A loopback HTTP server of scripted routes that stops by itself after `max_seconds`."""

    def __init__(self, scripts: dict[str, Script], max_seconds: float = 30):
        class Server(ThreadingHTTPServer):
            daemon_threads = True

        self.httpd = Server(("127.0.0.1", 0), _ScriptHandler)
        self.httpd.scripts, self.httpd.stop_at = scripts, time.monotonic() + max_seconds  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.timer = threading.Timer(max_seconds, self.httpd.shutdown)
        self.timer.daemon = True

    def url(self, path: str) -> str:
        """The full URL of a path on this server."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def __enter__(self):
        self.thread.start()
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()


# ---------------------------------------------------------------- helpers


def image_bytes(size=(300, 200), seed: str = "a", fmt: str = "JPEG") -> bytes:
    """A generated shape image of the given size, encoded."""
    import random

    return encode(render(random_spec(random.Random(seed), width=size[0], height=size[1])), fmt)


def noisy_jpeg(n_bytes: int) -> bytes:
    """A real JPEG of at least `n_bytes` (noise compresses badly)."""
    side = 64
    while True:
        rng = np.random.default_rng(side)
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=95)
        if buffer.tell() >= n_bytes:
            return buffer.getvalue()
        side *= 2


def run_shard(folder: Path, urls: list[str], roots: list[str] | None = None, **options):
    """Write a URL shard by hand (uid, url, caption), download it in this process; its rows (input order), all of them."""
    folder.mkdir(parents=True)
    n = len(urls)
    pq.write_table(pa.table({"uid": [f"{i:016x}" for i in range(n)], "url": urls, "caption": [f"c{i}" for i in range(n)]}),
                   folder / "part-00000.parquet")
    if roots is not None:
        (folder / "_file_roots.json").write_text(json.dumps({"roots": roots}))
    [task] = plan_download(str(folder), DownloadConfig(**({"threads": 4} | options))).tasks(None, "")
    result = download_shard(task.payload)
    assert result.rows_in == n and result.kept.num_rows == n  # rows in = rows out
    rows = result.kept.to_pandas()
    assert rows["url"].tolist() == urls
    return rows


def by_url(rows, url: str):
    """The row of one URL."""
    return rows[rows.url == url].iloc[0]


def stored(row) -> np.ndarray:
    """The pixels a row stores (as OpenCV decodes them: BGR)."""
    return cv2.imdecode(np.frombuffer(row.jpg, np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module", autouse=True)
def _imported():
    """Import img2dataset once, so the timed tests time downloads, not imports."""
    import img2dataset.downloader  # noqa: F401


# ---------------------------------------------------------------- 1. total deadline per URL


def test_timeout_is_a_total_deadline_per_url(tmp_path):
    good = image_bytes()
    scripts = {
        "/ok.jpg": Script(good),
        "/drip.jpg": Script(good, drip=0.3),  # headers at once, then 1 byte every 0.3 s: each read is quick
        "/hop1.jpg": Script(b"", 302, {"Location": "/hop2.jpg"}, delay=1.0),  # each hop alone fits in the timeout,
        "/hop2.jpg": Script(good, delay=1.0),  # the chain does not
    }
    with ScriptServer(scripts) as server:
        urls = [server.url(p) for p in scripts]
        start = time.monotonic()
        rows = run_shard(tmp_path / "urls", urls, timeout=1.5)
        elapsed = time.monotonic() - start
    assert by_url(rows, urls[0]).status == by_url(rows, urls[3]).status == "success"  # the second hop alone is in time
    for url in urls[1:3]:
        row = by_url(rows, url)
        assert row.status == "failed_to_download" and "timed out" in row.error_message, (url, row.error_message)
    assert elapsed < 5, f"the shard took {elapsed:.1f} s with --timeout 1.5"


# ---------------------------------------------------------------- 2. byte cap


def test_bodies_are_capped_at_max_image_bytes(tmp_path):
    small, big = image_bytes(), noisy_jpeg(30_000)
    assert len(small) < 10_000 < len(big)
    (tmp_path / "big.jpg").write_bytes(big)
    scripts = {"/small.jpg": Script(small), "/big.jpg": Script(big), "/big-no-length.jpg": Script(big, send_length=False)}
    with ScriptServer(scripts) as server:
        urls = [server.url(p) for p in scripts] + [(tmp_path / "big.jpg").as_uri()]
        rows = run_shard(tmp_path / "urls", urls, max_image_bytes=10_000, allow_file_urls=True)
    assert by_url(rows, urls[0]).status == "success"
    for url, kind in zip(urls[1:], ["Content-Length", "body larger", "Content-Length"]):
        row = by_url(rows, url)
        assert row.status == "failed_to_download" and row.jpg is None, url
        assert kind in row.error_message and "max_image_bytes (10000 bytes)" in row.error_message, row.error_message


# ---------------------------------------------------------------- 3. URL schemes and file roots


def test_only_http_and_https_are_fetched_unless_files_are_allowed(tmp_path):
    picture = tmp_path / "pictures" / "cat.jpg"
    picture.parent.mkdir()
    picture.write_bytes(image_bytes())
    data_url = "data:image/png;base64," + base64.b64encode(image_bytes(fmt="PNG")).decode()
    urls = [picture.as_uri(), "ftp://127.0.0.1:9/x.jpg", data_url, "gopher://127.0.0.1/x.jpg"]
    rows = run_shard(tmp_path / "refused", urls)
    assert rows.status.tolist() == ["failed_to_download"] * 4 and rows.jpg.isna().all()
    assert rows.error_message[0] == f"file:// URL not allowed: {picture.as_uri()} (outside the ingested folders; pass --allow-file-urls)"
    assert all("URL scheme not allowed" in e for e in rows.error_message[1:]), rows.error_message.tolist()
    allowed = run_shard(tmp_path / "allowed", urls[:1], allow_file_urls=True)
    assert allowed.status.tolist() == ["success"] and allowed.original_width[0] == 300
    # outside a download task urllib's default opener is back: it reads any file:// URL again
    with urllib.request.urlopen(picture.as_uri()) as r:
        assert r.read() == picture.read_bytes()


def test_file_urls_only_inside_the_ingested_folders(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "in.jpg").write_bytes(image_bytes())
    (outside / "secret.jpg").write_bytes(image_bytes(seed="b"))
    (root / "link.jpg").symlink_to(outside / "secret.jpg")  # a link inside the root to a file outside it
    (root / "inner-link.jpg").symlink_to(root / "sub" / "in.jpg")
    inside = (root / "sub" / "in.jpg").as_uri()
    escape = (root / "sub").as_uri() + "/..%2F..%2Foutside%2Fsecret.jpg"  # unquoted by urllib into ../../outside
    urls = [inside, (root / "inner-link.jpg").as_uri(), (root / "link.jpg").as_uri(), escape, (outside / "secret.jpg").as_uri()]
    rows = run_shard(tmp_path / "urls", urls, roots=[os.path.realpath(root)])
    assert rows.status.tolist() == ["success", "success"] + ["failed_to_download"] * 3, rows.error_message.tolist()
    assert all(e.startswith("file:// URL not allowed:") and "outside the ingested folders" in e for e in rows.error_message[2:])


# ---------------------------------------------------------------- 4. dallekit's resizer


def _both_resizers(config: DownloadConfig):
    from img2dataset.resizer import Resizer as Img2datasetResizer

    from dallekit.resize import Resizer

    theirs = Img2datasetResizer(
        image_size=config.image_size, resize_mode=config.resize_mode, resize_only_if_bigger=config.resize_only_if_bigger,
        encode_quality=config.quality, encode_format=config.encode_format, min_image_size=config.min_image_size,
        max_image_area=config.max_image_area, max_aspect_ratio=config.max_aspect_ratio,
    )
    return Resizer(config), theirs


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def _sample_images() -> dict[str, bytes]:
    rgba = Image.open(io.BytesIO(image_bytes((200, 500), "c", "PNG"))).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    out = {}
    for name, image, fmt in [("rgba", rgba, "PNG"), ("gray", Image.open(io.BytesIO(image_bytes((120, 90), "d"))).convert("L"), "JPEG"),
                             ("cmyk", Image.open(io.BytesIO(image_bytes((333, 250), "e"))).convert("CMYK"), "JPEG")]:
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        out[name] = buffer.getvalue()
    return out | {"rgb": image_bytes((300, 200)), "small-png": image_bytes((64, 48), "f", "PNG")}


def test_resizer_matches_img2dataset_on_ordinary_images():
    from dallekit.resize import read_header

    images = _sample_images()
    checked = 0
    for mode in ["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]:
        for size, only_bigger, fmt in [(256, False, "jpg"), (100, False, "png"), (128, True, "webp"), (400, False, "jpg")]:
            config = DownloadConfig(image_size=size, resize_mode=mode, resize_only_if_bigger=only_bigger, encode_format=fmt)
            ours, theirs = _both_resizers(config)
            for name, data in images.items():
                a, b = ours(io.BytesIO(data)), theirs(io.BytesIO(data))
                where = (mode, size, only_bigger, fmt, name)
                assert a[1:] == b[1:], where
                pixels_a, pixels_b = (cv2.imdecode(np.frombuffer(x[0], np.uint8), cv2.IMREAD_UNCHANGED) for x in (a, b))
                reduced = ours.reduction(read_header(data)) > 1  # a reduced-scale decode: within what re-encoding costs
                assert pixels_a.shape == pixels_b.shape and _psnr(pixels_a, pixels_b) > (38 if reduced else 45), (where, _psnr(pixels_a, pixels_b))
                checked += a[0] == b[0]
    assert checked > 0  # same pixels through the same encoder: mostly the very same bytes
    # the refusals keep img2dataset's messages
    for options, name in [({"min_image_size": 100}, "small-png"), ({"max_aspect_ratio": 2}, "rgba")]:
        ours, theirs = _both_resizers(DownloadConfig(**options))
        assert ours(io.BytesIO(images[name]))[5] == theirs(io.BytesIO(images[name]))[5] is not None


def png_of_zeros(path: Path, width: int, height: int, color_type: int, level: int) -> None:
    """A valid 8-bit PNG of zero pixels, small on disk however many pixels it declares (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    channels = {0: 1, 2: 3}[color_type]
    compressor, rows = zlib.compressobj(level), bytes((1 + width * channels) * 100)  # filter byte + pixels, 100 rows
    idat = b"".join(compressor.compress(rows) for _ in range(height // 100)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


RSS_PROBE = """
import io, json, resource, sys
from dallekit.config import DownloadConfig
from dallekit.resize import Resizer
resizer = Resizer(DownloadConfig())
resizer(io.BytesIO(open(sys.argv[1], "rb").read()))  # a small image first: one-time allocations are not the bomb's
out = {}
for path in sys.argv[2:]:
    data = open(path, "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = resizer(io.BytesIO(data))
    out[path] = {"grew_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, "error": result[5]}
print(json.dumps(out))
"""


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    png_of_zeros(tmp_path / "bomb.png", 20000, 20000, color_type=0, level=9)  # 400 Mpx: over PIL's own limit too
    png_of_zeros(tmp_path / "rgb-bomb.png", 9000, 9000, color_type=2, level=1)  # 81 Mpx RGB (243 MB decoded): ours alone
    assert (tmp_path / "bomb.png").stat().st_size < 1_000_000 and (tmp_path / "rgb-bomb.png").stat().st_size < 2_000_000
    (tmp_path / "small.png").write_bytes(image_bytes(fmt="PNG"))
    paths = [str(tmp_path / n) for n in ("small.png", "bomb.png", "rgb-bomb.png")]
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, *paths], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    bomb, rgb = out[paths[1]], out[paths[2]]
    assert bomb["error"] == "image_too_large: 400000000 pixels is more than max_image_area 64000000"
    assert rgb["error"] == "image_too_large: 9000x9000 pixels (81000000) is more than max_image_area 64000000"
    assert bomb["grew_kb"] < 200 * 1024 and rgb["grew_kb"] < 200 * 1024, out
    # through a download task: failed_to_resize with that message
    rows = run_shard(tmp_path / "urls", [Path(paths[2]).as_uri()], allow_file_urls=True)
    assert rows.status[0] == "failed_to_resize" and rows.error_message[0].startswith("image_too_large: 9000x9000")


def _resize_file(path: Path, **options):
    from dallekit.resize import Resizer

    return Resizer(DownloadConfig(**options))(io.BytesIO(path.read_bytes()))


def test_16_bit_pngs_become_8_bit_not_white(tmp_path):
    cases = {
        "gray16.png": (np.full((40, 60), 32768, np.uint16), [128]),
        "rgb48.png": (np.dstack([np.full((40, 60), v, np.uint16) for v in (16384, 32768, 49152)]), [64, 128, 191]),
        "rgba64.png": (np.dstack([np.full((40, 60), v, np.uint16) for v in (32768, 32768, 32768, 65535)]), [128, 128, 128]),
    }
    for name, (pixels, expected) in cases.items():
        cv2.imwrite(str(tmp_path / name), pixels)
        assert Image.open(tmp_path / name).mode in ("I;16", "RGB", "RGBA")
        img, width, height, original_width, original_height, error = _resize_file(tmp_path / name, resize_mode="no", encode_format="png")
        assert error is None and (width, height, original_width, original_height) == (60, 40, 60, 40)
        out = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_UNCHANGED)
        assert out.dtype == np.uint8 and np.abs(out.reshape(-1, len(expected)) - expected).max() <= 1, (name, out.mean(axis=(0, 1)))
    rows = run_shard(tmp_path / "urls", [(tmp_path / "gray16.png").as_uri()], allow_file_urls=True)
    assert rows.status[0] == "success" and abs(float(stored(rows.iloc[0]).mean()) - 128) < 3  # mid-gray, not white


def _phone_photo(path: Path, orientation: int) -> None:
    """A 300x200 JPEG, red in its stored top-left corner, whose EXIF says how to show it."""
    image = Image.new("RGB", (300, 200), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = orientation
    image.save(path, "JPEG", quality=95, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(tmp_path, orientation):
    path = tmp_path / "photo.jpg"
    _phone_photo(path, orientation)
    img, width, height, original_width, original_height, error = _resize_file(path, resize_mode="no", encode_format="png")
    shown = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))[..., ::-1]  # as a viewer shows it, BGR
    assert error is None and (original_width, original_height) == (width, height) == (shown.shape[1], shown.shape[0])
    out = cv2.imdecode(np.frombuffer(img, np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.abs(out.astype(int) - shown).mean() < 2
    if orientation == 6:  # rotated 90 degrees clockwise: portrait, the red corner now top right
        assert (width, height) == (200, 300)
        assert out[20, 180, 2] > 200 and out[20, 20, 0] > 200  # red at the top right, blue at the top left


def test_exif_rotation_through_a_download_task(tmp_path):
    _phone_photo(tmp_path / "photo.jpg", 8)
    rows = run_shard(tmp_path / "urls", [(tmp_path / "photo.jpg").as_uri()], allow_file_urls=True, resize_mode="keep_ratio")
    row = rows.iloc[0]
    assert row.status == "success" and (row.original_width, row.original_height) == (200, 300) and (row.width, row.height) == (256, 384)
    assert stored(row)[370, 20, 2] > 200  # orientation 8 (90 degrees anticlockwise): the red corner at the bottom left


# ---------------------------------------------------------------- 5. stale temporary folders


def test_stale_download_folders_of_dead_workers_are_removed(tmp_path, monkeypatch):
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    dead = subprocess.Popen(["true"])
    dead.wait()  # reaped: its pid is gone
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale, kept = tmp / f"dallekit-download-{dead.pid}-abc123", tmp / f"dallekit-download-{live.pid}-def456"
        for folder in (stale, kept, tmp / "dallekit-download-oldstyle"):
            folder.mkdir()
            (folder / "input.arrow").write_bytes(b"x" * 100)
        (tmp_path / "x.jpg").write_bytes(image_bytes())
        run_shard(tmp_path / "urls", [(tmp_path / "x.jpg").as_uri()], allow_file_urls=True)
        assert not stale.exists() and kept.exists() and (tmp / "dallekit-download-oldstyle").exists()
        assert sorted(p.name for p in tmp.iterdir()) == sorted([kept.name, "dallekit-download-oldstyle"])  # its own folder is gone too
    finally:
        live.kill()
        live.wait()


def test_in_memory_writer_gives_img2dataset_parquet_writers_rows(tmp_path):
    """ShardTableWriter replaces ParquetSampleWriter: through the same Downloader, the same table (columns, types, values)."""
    import functools

    import pyarrow.feather as feather
    from img2dataset.writer import ParquetSampleWriter

    from dallekit.pipeline.fetch import FetchPolicy, fetching
    from dallekit.pipeline.img2dataset_glue import ShardTableWriter, downloader_class
    from dallekit.resize import Resizer

    good, other = tmp_path / "a.jpg", tmp_path / "b.png"
    good.write_bytes(image_bytes())
    other.write_bytes(image_bytes(fmt="PNG"))
    urls = [good.as_uri(), (tmp_path / "missing.jpg").as_uri(), other.as_uri(), "http://127.0.0.1:9/none.jpg"]
    source = pa.table({"url": urls, "caption": ["one", None, "three", "four"], "extra": [1, 2, 3, 4]})
    tables = {}
    for name, writer in (("img2dataset", ParquetSampleWriter), ("dallekit", None)):
        folder = tmp_path / name
        folder.mkdir()
        feather.write_feather(source, folder / "input.arrow")
        delivered = []
        downloader = downloader_class()(
            sample_writer_class=writer or functools.partial(ShardTableWriter, delivered.append), resizer=Resizer(DownloadConfig()),
            thread_count=2, save_caption=True, extract_exif=True, output_folder=str(folder), column_list=source.column_names,
            timeout=2, number_sample_per_shard=10, oom_shard_count=5, compute_hash="sha256", verify_hash_type=None,
            encode_format="jpg", retries=0, user_agent_token=None, disallowed_header_directives=None)
        with fetching(FetchPolicy(1 << 20, True, (), True)):
            ok, _ = downloader((0, str(folder / "input.arrow")))
        assert ok
        tables[name] = pq.read_table(folder / "00000.parquet") if writer else delivered[0]
    mine, theirs = (tables[k].sort_by("key") for k in ("dallekit", "img2dataset"))
    assert mine.schema.equals(theirs.schema) and mine.num_rows == 4
    assert mine.to_pylist() == theirs.to_pylist()
    assert sorted(mine.column("status").to_pylist()) == ["failed_to_download", "failed_to_download", "success", "success"]


def test_downloader_is_imported_without_img2dataset_cli_and_its_names_still_resolve():
    probe = (
        "import sys\n"
        "from dallekit.pipeline.img2dataset_glue import downloader_class\n"
        "assert downloader_class().__name__ == 'Downloader'\n"
        "print(sorted(m for m in ('torch', 'albumentations', 'webdataset', 'img2dataset.main') if m in sys.modules))\n"
        "import img2dataset\n"
        "print(img2dataset.download.__module__, type(img2dataset.main).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "img2dataset.main function"]
