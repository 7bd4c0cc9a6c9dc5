"""The embedded default data: seeded captioned shapes, served over HTTP on 127.0.0.1.

Captions read "a {color} {shape} on a {background} background". The geometry follows
DESIGN.md so that a pixel check can judge any image: the shape's bounding box is square with
side 1/2 to 3/4 of the shorter image side, centred within 2% jitter, so the shape always
covers the central square of side 1/8. Image sizes and aspect ratios vary so the filters have
work to do; the zero-shot foreground/shape pairs never appear in the generated training set.
"""

from __future__ import annotations

import io
import ipaddress
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (128, 0, 128),
    "orange": (255, 165, 0),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}
SHAPES = ("circle", "square", "triangle")
ZERO_SHOT_PAIRS = frozenset(
    {("red", "triangle"), ("green", "square"), ("blue", "circle"), ("yellow", "triangle"), ("purple", "square"), ("orange", "circle")}
)
JITTER = 0.02  # centre jitter as a fraction of the shorter side; larger would uncover the central square


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to draw one synthetic image."""

    foreground: str
    shape: str
    background: str
    width: int
    height: int
    side_fraction: float  # bounding-box side / shorter image side, in [0.5, 0.75]
    dx: float  # centre offset as a fraction of the shorter side, in [-JITTER, JITTER]
    dy: float

    @property
    def caption(self) -> str:
        """The caption that describes this image."""
        return f"a {self.foreground} {self.shape} on a {self.background} background"


def random_spec(rng: random.Random, zero_shot: bool = False, width: int | None = None, height: int | None = None) -> ShapeSpec:
    """Draw a spec: a seen foreground/shape pair unless `zero_shot`, then a held-out pair."""
    while True:
        foreground, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
        if ((foreground, shape) in ZERO_SHOT_PAIRS) == zero_shot:
            break
    background = rng.choice([c for c in COLORS if c != foreground])
    if width is None or height is None:
        short = rng.randint(192, 512)
        aspect = rng.choice([1.0, 1.0, rng.uniform(0.6, 1.7), rng.uniform(0.35, 2.8)])  # some fail a 1:2 rule
        width, height = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
    return ShapeSpec(
        foreground, shape, background, width, height,
        side_fraction=rng.uniform(0.5, 0.75), dx=rng.uniform(-JITTER, JITTER), dy=rng.uniform(-JITTER, JITTER),
    )


def render(spec: ShapeSpec) -> Image.Image:
    """Draw the spec as an RGB image."""
    image = Image.new("RGB", (spec.width, spec.height), COLORS[spec.background])
    draw = ImageDraw.Draw(image)
    short = min(spec.width, spec.height)
    side = spec.side_fraction * short
    cx, cy = spec.width / 2 + spec.dx * short, spec.height / 2 + spec.dy * short
    box = (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
    color = COLORS[spec.foreground]
    if spec.shape == "circle":
        draw.ellipse(box, fill=color)
    elif spec.shape == "square":
        draw.rectangle(box, fill=color)
    else:  # apex at the top centre, base on the bottom edge
        draw.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=color)
    return image


def encode(image: Image.Image, fmt: str = "JPEG", quality: int = 90) -> bytes:
    """Image bytes in the given PIL format."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format=fmt, quality=quality)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()


def photo_like(seed: int, size: tuple[int, int] = (512, 384), decay: float = 0.7, grain: float = 3.0, edges: int = 0) -> Image.Image:
    """A photo-like RGB image (width, height): detail at every scale, as photographs have, plus a little grain.

    Octaves of random colour fields from 4 cells across up to half the image width, each `decay`
    times the amplitude of the one before (smooth gradients below, texture above), so it
    compresses and decodes like a photograph (JPEG at quality 90: ~300 KB at 1280x960) and still
    has detail when shrunk to 256 px, where the shapes' flat colours have none. The benchmarks
    and the reduced-decode tests use it. `edges` adds that many hard-edged rectangles and disks
    (objects' outlines); with a faster `decay` and less `grain` the image is smooth between them,
    so JPEG at quality 95 keeps it well and a misplaced edge shows.
    """
    import cv2

    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.full((height, width, 3), 128, np.float32)
    amplitude, cells = 60.0, 4
    while cells <= max(size) // 2:
        grid = rng.normal(0, 1, (max(2, cells * height // max(size)), max(2, cells * width // max(size)), 3)).astype(np.float32)
        pixels += amplitude * cv2.resize(grid, size, interpolation=cv2.INTER_CUBIC)
        amplitude, cells = amplitude * decay, cells * 2
    for _ in range(edges):
        layer = np.zeros_like(pixels)
        colour = [float(c) for c in rng.uniform(-60, 60, 3)]
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(min(size) // 10, min(size) // 3 + 1))
        if rng.random() < 0.5:
            cv2.circle(layer, (x, y), r, colour, -1, lineType=cv2.LINE_AA)
        else:
            cv2.rectangle(layer, (x - r, y - r // 2), (x + r, y + r // 2), colour, -1)
        pixels += layer
    pixels += rng.normal(0, grain, (height, width, 1)).astype(np.float32)  # grain, the same in every channel
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@dataclass
class Route:
    """What the server answers on one path."""

    body: bytes = b""
    status: int = 200
    headers: dict = field(default_factory=dict)
    delay: float = 0.0  # seconds to wait before answering (a slow server)


NOT_FOUND = Route(b"not found", 404, {"Content-Type": "text/plain"})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        server: ShapesServer = self.server.owner  # type: ignore[attr-defined]
        server.count_request()
        self.answer(server.routes.get(self.path.split("?", 1)[0], NOT_FOUND), server.max_delay)

    def answer(self, route: Route, max_delay: float) -> None:
        """Send the route's answer after its delay (at most max_delay)."""
        if route.delay:
            time.sleep(min(route.delay, max_delay))
        try:
            self.send_response(route.status)
            for key, value in route.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass

    def log_message(self, *args) -> None:  # keep test and demo output clean
        pass


class ShapesServer:
    """A loopback HTTP server for generated images that stops by itself after `max_seconds` or `max_requests`.

    `address` is any 127.x.x.x address (on Linux all of them are this machine's loopback), so
    several servers can stand for several hosts; any other address is refused.
    """

    handler: type[_Handler] = _Handler

    def __init__(self, routes: dict[str, Route] | None = None, port: int = 0, max_seconds: float = 3600, max_requests: int = 10**7,
                 address: str = "127.0.0.1"):
        if ipaddress.ip_address(address) not in ipaddress.ip_network("127.0.0.0/8"):
            raise ValueError(f"address {address!r}: expected a loopback address 127.x.x.x")
        self.routes: dict[str, Route] = dict(routes or {})
        self.max_seconds, self.max_requests, self.max_delay = max_seconds, max_requests, 30.0
        self.address = address
        self.requests = 0
        self._received = 0  # every request in the server's life: the bound, which resetting `requests` does not lift
        self._lock = threading.Lock()
        self._httpd = self._bind(address, port, self.handler)
        self._httpd.owner = self  # type: ignore[attr-defined]
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._timer = threading.Timer(max_seconds, self.stop)
        self._timer.daemon = True

    @staticmethod
    def _bind(address: str, port: int, handler: type[_Handler]) -> ThreadingHTTPServer:
        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024  # many download threads connect at once

        try:
            return Server((address, port), handler)
        except OSError:  # the preferred port is taken: any free one
            return Server((address, 0), handler)

    def url(self, path: str) -> str:
        """The full URL of a path on this server."""
        return f"http://{self.address}:{self.port}{path}"

    def count_request(self) -> None:
        """Count a request and stop once the bound is reached."""
        with self._lock:
            self.requests += 1
            self._received += 1
            if self._received >= self.max_requests:
                threading.Thread(target=self.stop, daemon=True).start()

    def start(self) -> ShapesServer:
        """Start serving in a background thread."""
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._timer.cancel()
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ShapesServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class ShapesDataset:
    """A generated set: one route per image, and the rows (path, caption, labels) of its URL list."""

    routes: dict[str, Route]
    rows: list[dict]


def make_dataset(n: int, seed: int = 0, broken_fraction: float = 0.03, png_fraction: float = 0.1) -> ShapesDataset:
    """Generate `n` captioned shapes (seen pairs only) plus a few broken URLs, reproducibly from `seed`."""
    rng = random.Random(seed)
    routes: dict[str, Route] = {}
    rows: list[dict] = []
    for i in range(n):
        spec = random_spec(rng)
        row = {"path": "", "caption": spec.caption, "foreground": spec.foreground, "shape": spec.shape, "background": spec.background}
        if rng.random() < broken_fraction:
            row["path"] = f"/missing/{i}.jpg"  # no route: answers 404
        else:
            fmt, ext, mime = ("PNG", "png", "image/png") if rng.random() < png_fraction else ("JPEG", "jpg", "image/jpeg")
            row["path"] = f"/img/{i:06d}.{ext}"
            routes[row["path"]] = Route(encode(render(spec), fmt), headers={"Content-Type": mime})
        rows.append(row)
    return ShapesDataset(routes, rows)


_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _PALETTE_NAMES], dtype=np.float32)  # (8, 3)


def nearest_colors(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour of each pixel (..., 3) -> (...)."""
    d = ((pixels[..., None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def judge(image: np.ndarray) -> dict:
    """Read foreground, background and shape off an image (H, W, 3) uint8 by pixels alone (DESIGN's check).

    Foreground: majority palette colour of the central square of side 1/8; background: the same over
    the four corner squares; shape: how much of its bounding box the foreground fills
    (square ~1, circle ~0.79, triangle ~0.5).
    """
    h, w = image.shape[:2]
    side = max(1, min(h, w) // 8)
    labels = nearest_colors(image)  # (H, W)
    cy, cx = h // 2, w // 2
    centre = labels[cy - side // 2 : cy - side // 2 + side, cx - side // 2 : cx - side // 2 + side]
    corners = np.concatenate([labels[:side, :side].ravel(), labels[:side, -side:].ravel(), labels[-side:, :side].ravel(), labels[-side:, -side:].ravel()])
    fg = int(np.bincount(centre.ravel(), minlength=len(_PALETTE_NAMES)).argmax())
    bg = int(np.bincount(corners, minlength=len(_PALETTE_NAMES)).argmax())
    mask = labels == fg
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    fill = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].mean() if len(rows) else 0.0
    shape = "square" if fill > 0.9 else ("circle" if fill > 0.64 else "triangle")
    return {"foreground": _PALETTE_NAMES[fg], "background": _PALETTE_NAMES[bg], "shape": shape, "fill": float(fill)}


def parse_caption(caption: str) -> dict | None:
    """(foreground, shape, background) of a demo caption 'a {color} {shape} on a {background} background', or None."""
    words = caption.lower().split()
    if len(words) == 7 and words[0] == "a" and words[3:5] == ["on", "a"] and words[6] == "background":
        return {"foreground": words[1], "shape": words[2], "background": words[5]}
    return None


def is_right(image: np.ndarray, caption: str) -> bool:
    """Whether an image shows what a demo caption says: foreground, background and shape all right."""
    want, got = parse_caption(caption), judge(image)
    return want is not None and all(got[k] == want[k] for k in ("foreground", "background", "shape"))


def is_zero_shot(caption: str) -> bool:
    """Whether a demo caption names a foreground/shape pair held out of the training data."""
    want = parse_caption(caption)
    return want is not None and (want["foreground"], want["shape"]) in ZERO_SHOT_PAIRS


class ShapesJudge:
    """The pixel judge of the demo's shape captions, handed to sample and evaluate by the demo and the CLI."""

    def judges(self, caption: str) -> bool:
        """Whether the caption is one of the demo's, which the pixels can confirm."""
        return parse_caption(caption) is not None

    is_right = staticmethod(is_right)
    is_zero_shot = staticmethod(is_zero_shot)


SHAPES_JUDGE = ShapesJudge()
