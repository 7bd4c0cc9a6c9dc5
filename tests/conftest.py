"""Shared fixtures: a loopback image server with the edge cases of the web, and one Dask cluster."""

from __future__ import annotations

import io
import os
import random

import pytest

from dallekit.demo.synthetic import Route, ShapesServer, random_spec, render

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

SLOW_SECONDS = 4  # the "never answers" route waits this long; tests use a shorter --timeout


def _image_bytes(mode: str, fmt: str, size=(300, 200)) -> bytes:
    rng = random.Random(mode + fmt)
    image = render(random_spec(rng, width=size[0], height=size[1]))
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(128)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def edge_routes() -> dict[str, tuple[Route, str, str | None]]:
    """path -> (route, expected img2dataset status, expected error_message or None)."""
    good = _image_bytes("RGB", "JPEG")
    jpeg = {"Content-Type": "image/jpeg"}
    return {
        "/ok.jpg": (Route(good, headers=jpeg), "success", None),
        "/404.jpg": (Route(b"gone", 404), "failed_to_download", "HTTP Error 404: Not Found"),
        "/500.jpg": (Route(b"boom", 500), "failed_to_download", "HTTP Error 500: Internal Server Error"),
        "/slow.jpg": (Route(good, headers=jpeg, delay=SLOW_SECONDS), "failed_to_download", "timed out"),
        "/not-image.jpg": (Route(b"<html>hello</html>", headers={"Content-Type": "text/html"}), "failed_to_resize", "Image decoding error"),
        "/truncated.jpg": (Route(good[:150], headers=jpeg), "failed_to_resize", "Image decoding error"),
        "/huge.jpg": (Route(_image_bytes("RGB", "JPEG", (1500, 1200)), headers=jpeg), "failed_to_resize", "image_too_large: 1500x1200 pixels (1800000) is more than max_image_area 1000000"),
        "/noai.jpg": (Route(good, headers=jpeg | {"X-Robots-Tag": "noai"}), "failed_to_download", "Use of image disallowed by X-Robots-Tag directive: noai"),
        "/redirect.jpg": (Route(b"", 302, {"Location": "/ok.jpg"}), "success", None),
        "/alpha.png": (Route(_image_bytes("RGBA", "PNG"), headers={"Content-Type": "image/png"}), "success", None),
        "/gray.jpg": (Route(_image_bytes("L", "JPEG"), headers=jpeg), "success", None),
        "/cmyk.jpg": (Route(_image_bytes("CMYK", "JPEG"), headers=jpeg), "success", None),
    }


@pytest.fixture(scope="session")
def edge_server():
    """A server of the edge cases; yields (server, {url: (status, error)})."""
    cases = edge_routes()
    with ShapesServer({p: r for p, (r, _, _) in cases.items()}, max_seconds=1800) as server:
        yield server, {server.url(p): (status, error) for p, (_, status, error) in cases.items()}


@pytest.fixture(scope="session")
def shapes_server():
    """A server of 120 generated shapes; yields (server, rows)."""
    from dallekit.demo.synthetic import make_dataset

    data = make_dataset(120, seed=1)
    with ShapesServer(data.routes, max_seconds=1800) as server:
        yield server, data.rows


@pytest.fixture(scope="session")
def client():
    """One local Dask cluster (2 worker processes) for the whole test session."""
    from dallekit.config import ClusterConfig
    from dallekit.pipeline.cluster import dask_client

    with dask_client(ClusterConfig(workers=2), quiet=True) as c:
        yield c


@pytest.fixture(scope="session")
def shapes_filtered(tmp_path_factory):
    """A filtered-like stage of 2400 captioned synthetic shapes (seen pairs only), no network needed."""
    from dallekit.demo.synthetic import encode
    from tests.stage_data import downloaded_row, write_stage

    rng = random.Random(7)
    rows = []
    for i in range(2400):
        spec = random_spec(rng, width=96, height=96)
        rows.append(downloaded_row(f"{i:016x}", spec.caption, encode(render(spec))))
    folder = tmp_path_factory.mktemp("shapes") / "filtered"
    write_stage(folder, [rows[i : i + 400] for i in range(0, len(rows), 400)])
    return folder


@pytest.fixture(scope="session")
def trained_dvae(shapes_filtered, tmp_path_factory):
    """The tiny dVAE trained for 1300 steps (~3 minutes on 2 cores); (folder, last metrics)."""
    from dallekit.config import TrainDVAEConfig
    from dallekit.training.dvae import train_dvae

    out = tmp_path_factory.mktemp("dvae")
    metrics = train_dvae(str(shapes_filtered), str(out), TrainDVAEConfig(preset="tiny", max_steps=1300, checkpoint_every=650))
    return out, metrics


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One `dallekit demo --quick` run (at most 3 minutes on 2 cores); its run folder, with the printed output in stdout.txt."""
    import subprocess
    import sys
    import time

    out = tmp_path_factory.mktemp("demo") / "run"
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "dallekit.cli", "demo", "--quick", "--out", str(out), "--workers", "2"],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out / "stdout.txt").write_text(proc.stdout)
    print(f"demo --quick took {time.time() - start:.0f} s")
    return out
