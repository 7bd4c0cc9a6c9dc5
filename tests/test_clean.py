"""clean: caption repairs, boilerplate, undecodable images, global exact and near-duplicate removal."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import subprocess
import sys

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFilter

from dallekit.config import CleanConfig
from dallekit.demo.synthetic import ShapeSpec, encode, random_spec, render
from dallekit.errors import BadInputError
from dallekit.images import (
    color_distance,
    decode_reduced,
    image_signature,
    jpeg_size,
    phash,
    phash_of_gray,
    signature_columns,
    thumbs_array,
)
from dallekit.pipeline.clean import (
    caption_reason,
    clean,
    repair_caption,
    scan_shard,
)
from dallekit.pipeline.uids import check_unique_uids
from tests.helpers import check_accounting, hamming
from tests.stage_data import (
    HUGE_IMAGES,
    downloaded_row,
    forbid_large_decodes,
    noise_jpeg,
    png_header_only,
    shape_jpeg,
    write_stage,
)


@pytest.mark.parametrize(
    "raw, fixed",
    [
        ("cafÃ© on the corner", "café on the corner"),  # mojibake
        ("salt &amp;amp; pepper", "salt & pepper"),  # double-escaped entity
        ("a <b>red</b> circle<br/>on blue", "a red circle on blue"),  # tags
        ("a red\x00circle\x07 here", "a red circle here"),  # NUL and control bytes
        ("  lots \n\t of   space ", "lots of space"),
        (None, ""),
        (3.5, ""),
        (b"bytes", ""),
    ],
)
def test_repair_caption(raw, fixed):
    assert repair_caption(raw) == fixed


def test_lowercase_option():
    assert repair_caption("A Red CIRCLE", lowercase=True) == "a red circle"


@pytest.mark.parametrize(
    "caption, reason",
    [
        ("IMG_1234.jpg", "boilerplate_caption"),
        ("DSC01234 holiday", "boilerplate_caption"),
        ("https://example.com/photo.jpg", "boilerplate_caption"),
        ("Sunset over the bay, photographed on May 4, 2019", "boilerplate_caption"),
        ("Image may contain: dog, grass", "boilerplate_caption"),
        ("", "empty_caption"),
        ("word " * 500, "caption_too_long"),
        ("a photo of a dog on the beach", None),
        ("the image.jpg format explained in a long caption", None),
    ],
)
def test_caption_rules(caption, reason):
    assert caption_reason(caption.strip(), CleanConfig()) == reason


def test_phash_resized_copy_is_near_and_other_images_are_far():
    original, resized = shape_jpeg(1), shape_jpeg(1, resize_to=200)
    assert hamming(phash(original), phash(resized)) <= 4
    assert hamming(phash(original), phash(noise_jpeg(2))) > 10
    assert hamming(phash(noise_jpeg(3)), phash(noise_jpeg(4))) > 10


def test_clean_stage_dedups_globally(tmp_path, client):
    shape_a, shape_b = shape_jpeg(10), shape_jpeg(11)
    shards = [
        [
            downloaded_row("u1", "cafÃ© with a &amp; sign", shape_a),
            downloaded_row("u5", "a failed row", None, status="failed_to_download"),
            downloaded_row("u6", "broken bytes", b"\xff\xd8\xff\xe0 not really a jpeg"),
            downloaded_row("u7", "IMG_2024.JPG", noise_jpeg(7)),
            downloaded_row("u8", "half a real jpeg", shape_jpeg(12)[: len(shape_jpeg(12)) // 2]),
            downloaded_row("u9", "a text body", b"<html>not an image</html>"),
        ],
        [
            downloaded_row("u0", "the same bytes, smaller uid", shape_a),  # exact duplicate across shards: u0 is kept
            downloaded_row("u2", "a resized copy", shape_jpeg(10, resize_to=220)),
            downloaded_row("u3", "a different image", noise_jpeg(3)),
            downloaded_row("u4", "another different image", shape_b),
        ],
    ]
    write_stage(tmp_path / "download", shards)
    stats = clean(str(tmp_path / "download"), str(tmp_path / "clean"), CleanConfig(), client)
    kept, rejects = check_accounting(tmp_path / "clean", 10)
    assert sorted(kept["uid"]) == ["u0", "u3", "u4"]
    by_uid = rejects.set_index("uid")
    assert by_uid.loc["u1", "reason"] == "duplicate_image" and by_uid.loc["u1", "duplicate_of"] == "u0"
    assert by_uid.loc["u2", "reason"] == "near_duplicate_image" and by_uid.loc["u2", "duplicate_of"] == "u0"
    assert by_uid.loc["u2", "duplicate_distance"] <= 4
    assert by_uid.loc["u5", "reason"] == "failed_to_download" and by_uid.loc["u5", "error_message"].startswith("HTTP Error")
    assert by_uid.loc["u6", "reason"] == by_uid.loc["u8", "reason"] == by_uid.loc["u9", "reason"] == "undecodable"
    assert by_uid.loc["u7", "reason"] == "boilerplate_caption"
    u0 = kept.set_index("uid").loc["u0"]
    assert u0["caption_raw"] == "the same bytes, smaller uid" and u0["phash"] == phash(shape_a)
    rejected_u1 = by_uid.loc["u1"]
    assert rejected_u1["caption"] == "café with a & sign" and rejected_u1["caption_raw"] == "cafÃ© with a &amp; sign"
    funnel = json.loads((tmp_path / "clean" / "_funnel.json").read_text())["steps"]
    assert [s["remaining"] for s in funnel][-1] == 3 and funnel[0]["remaining"] == 10
    assert {s["rule"]: s["removed"] for s in funnel}["duplicate_image"] == 1
    assert (tmp_path / "clean" / "_funnel.png").stat().st_size > 1000
    assert stats["reasons"]["near_duplicate_image"] == 1


def test_near_dup_check_can_be_turned_off(tmp_path, client):
    write_stage(tmp_path / "download", [[downloaded_row("a", "one image", shape_jpeg(10)), downloaded_row("b", "its resized copy", shape_jpeg(10, resize_to=220))]])
    clean(str(tmp_path / "download"), str(tmp_path / "clean"), CleanConfig(near_dup_distance=-1), client)
    kept, _ = check_accounting(tmp_path / "clean", 2)
    assert sorted(kept["uid"]) == ["a", "b"]


def old_phash(data: bytes) -> int:
    """The hash clean used before: every JPEG decoded at 1/8 scale, whatever its size."""
    return phash_of_gray(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8))


def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


@pytest.mark.parametrize("side", [20, 32, 63, 64, 100, 127, 128, 200, 256, 300, 511, 512, 1000])
def test_hash_decode_keeps_at_least_64_px(side):
    image = render(random_spec(random.Random(side), width=side + 7, height=side))
    for data in (jpeg(image), jpeg(image, progressive=True), jpeg(image, exif=b"Exif\x00\x00" + bytes(5000))):
        assert jpeg_size(data) == (side + 7, side)
        shorter = min(decode_reduced(data).shape[:2])
        assert shorter == side if side < 127 else 64 <= shorter < 128  # the largest reduction that keeps 64 px
    assert jpeg_size(encode(image, "PNG")) is None and min(decode_reduced(encode(image, "PNG")).shape[:2]) == side


def _edge_column(img: np.ndarray) -> float:
    """Where a vertical edge is, in pixels from the left: the centroid of the column profile's steps."""
    steps = np.abs(np.diff(img.reshape(img.shape[0], img.shape[1], -1).mean(axis=(0, 2))))
    return float((np.arange(1, len(steps) + 1) * steps).sum() / steps.sum())


@pytest.mark.parametrize("orientation", [1, 3, 6])
def test_hash_decode_registers_with_a_full_decode(orientation):
    """An edge at 80% of the stored side sits where a full decode puts it, for 30 sizes that are not multiples of the reduction.

    libjpeg rounds a reduced side up; taken as is, the reduced image was stretched, by 0.4 of a
    reduced pixel at the median.
    """
    rng = np.random.default_rng(orientation)
    errors = []
    for _ in range(30):
        width, height = (int(side) for side in rng.integers(130, 1200, 2))
        width, height = width + (width % 8 == 0), height + (height % 8 == 0)
        stored = np.full((height, width, 3), 40, np.uint8)
        if orientation < 5:
            stored[:, int(width * 0.8) :] = 220
        else:  # shown turned a quarter: the stored rows become the shown columns
            stored[int(height * 0.8) :, :] = 220
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = jpeg(Image.fromarray(stored), exif=exif.tobytes())
        reduced, full = decode_reduced(data), cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert reduced.shape[1] < full.shape[1] and (reduced.shape[1] > reduced.shape[0]) == (full.shape[1] > full.shape[0])
        errors.append(abs(_edge_column(reduced) - _edge_column(full) * reduced.shape[1] / full.shape[1]))  # in reduced pixels
    assert max(errors) <= 0.3 and np.median(errors) <= 0.05, (max(errors), np.median(errors))


def test_color_distance_is_vectorised_over_pairs():
    rng = np.random.default_rng(0)
    a = rng.integers(20, 230, (5, 192), dtype=np.uint8)
    b = a.copy()
    b[1] += 10
    b[2, :96] -= 20
    np.testing.assert_allclose(color_distance(a, b), [0, 10, 10, 0, 0])
    np.testing.assert_allclose(color_distance(a, a[0]), [np.abs(a[i].astype(int) - a[0]).mean() for i in range(5)])
    assert thumbs_array([bytes(a[0]), bytes(a[1])]).shape == (2, 192) and thumbs_array([]).shape == (0, 192)


def test_colour_variants_of_one_shape_are_kept_and_copies_still_rejected(tmp_path, client):
    def picture(color: str, side: int) -> Image.Image:  # a circle at 256 px, a triangle at 64 px (not one picture at two sizes)
        return render(ShapeSpec(color, "circle" if side >= 256 else "triangle", "white", side, side, 0.7, -0.02, 0.015))

    rows, variants = [], {}
    for side in (256, 64):
        variants |= {f"{c}-{side}": encode(picture(c, side)) for c in ("red", "orange", "green", "blue", "purple", "black", "yellow")}
        hashes = [phash(data) for name, data in variants.items() if name.endswith(f"-{side}")]
        assert max(hamming(a, b) for a, b in itertools.combinations(hashes, 2)) <= 4  # grayscale pHash cannot tell them apart
        rows += [
            downloaded_row(f"zz-requality-{side}", "re-encoded", encode(picture("red", side), quality=70)),
            downloaded_row(f"zz-resource-{side}", "from a larger source", encode(picture("red", 2 * side).resize((side, side), Image.Resampling.BICUBIC))),
        ]
    rows.append(downloaded_row("zz-resized-256", "a resized copy", encode(Image.open(io.BytesIO(variants["red-256"])).resize((200, 200)))))
    rows += [downloaded_row(name, f"a {name.split('-')[0]} shape on a white background", data) for name, data in variants.items()]
    write_stage(tmp_path / "download", [rows[: len(rows) // 2], rows[len(rows) // 2 :]])
    clean(str(tmp_path / "download"), str(tmp_path / "clean"), CleanConfig(), client)
    kept, rejects = check_accounting(tmp_path / "clean", len(rows))
    assert sorted(kept["uid"]) == sorted(variants)
    by_uid = rejects.set_index("uid")
    assert set(by_uid["reason"]) == {"near_duplicate_image"}
    assert by_uid["duplicate_of"].to_dict() == {
        "zz-requality-256": "red-256", "zz-resource-256": "red-256", "zz-resized-256": "red-256",
        "zz-requality-64": "red-64", "zz-resource-64": "red-64",
    }
    thumbs = kept.set_index("uid")["color_thumb"]
    assert len(thumbs["red-64"]) == 192 and thumbs["red-64"] == image_signature(variants["red-64"])[1]


def face_jpeg(size: int, eyes: str, mouth: str) -> bytes:
    """An emoji-like face: one silhouette, the eyes and mouth small details."""
    s, w = 8 * size, size // 4
    image = Image.new("RGB", (s, s), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    draw.ellipse((s * 0.1, s * 0.1, s * 0.9, s * 0.9), fill=(255, 204, 0))
    for x in (0.37, 0.63):
        if eyes == "open":
            draw.ellipse((s * (x - 0.05), s * 0.33, s * (x + 0.05), s * 0.45), fill="black")
        elif eyes == "closed":
            draw.line((s * (x - 0.06), s * 0.4, s * (x + 0.06), s * 0.4), fill="black", width=w)
        else:
            draw.ellipse((s * (x - 0.08), s * 0.3, s * (x + 0.08), s * 0.48), fill="white", outline="black", width=w)
    mouths = {"smile": lambda: draw.arc((s * 0.3, s * 0.4, s * 0.7, s * 0.72), 20, 160, fill="black", width=w),
              "frown": lambda: draw.arc((s * 0.3, s * 0.6, s * 0.7, s * 0.9), 200, 340, fill="black", width=w),
              "open": lambda: draw.ellipse((s * 0.42, s * 0.58, s * 0.58, s * 0.74), fill="black"),
              "flat": lambda: draw.line((s * 0.35, s * 0.66, s * 0.65, s * 0.66), fill="black", width=w)}
    mouths[mouth]()
    return encode(image.resize((size, size), Image.Resampling.LANCZOS))


def distinct_shapes(sizes: list[int], seed: int = 0) -> list[tuple[str, bytes]]:
    """One synthetic picture per entry of `sizes` (its side in px), no two with the same colours and shape."""
    rng, seen, out = random.Random(seed), set(), []
    for size in sizes:
        spec = random_spec(rng, width=size, height=size)
        while (spec.foreground, spec.shape, spec.background) in seen:
            spec = random_spec(rng, width=size, height=size)
        seen.add((spec.foreground, spec.shape, spec.background))
        out.append((spec.caption, encode(render(spec))))
    return out


def close_pairs(images: list[bytes], hash_fn) -> int:
    hashes = [hash_fn(data) for data in images]
    return sum(hamming(a, b) <= 4 for a, b in itertools.combinations(hashes, 2))


def test_small_distinct_images_are_not_merged(tmp_path, client):
    shapes = distinct_shapes([64] * 40 + [32] * 30)
    shapes64 = shapes[:40]
    faces32 = [(f"a face, {e} eyes, {m} mouth", face_jpeg(32, e, m)) for e in ("open", "closed", "wide") for m in ("smile", "frown", "open", "flat")]
    assert close_pairs([d for _, d in shapes64], old_phash) >= 5  # the 1/8 decode hashed these from 8x8 gray pixels
    assert close_pairs([d for _, d in faces32], old_phash) >= 5  # and these from 4x4
    assert close_pairs([d for _, d in faces32], phash) == 0  # the 32x32 hash sees the faces' eyes and mouths
    pictures = shapes + faces32
    rows = [downloaded_row(f"u{i:03d}", caption, data, size=(64, 64)) for i, (caption, data) in enumerate(pictures)]
    write_stage(tmp_path / "download", [rows[::2], rows[1::2]])
    clean(str(tmp_path / "download"), str(tmp_path / "clean"), CleanConfig(), client)
    kept, _ = check_accounting(tmp_path / "clean", len(rows))
    assert len(kept) == len(rows)


def test_a_repeated_uid_is_bad_input(tmp_path, client):
    shard = [downloaded_row("u1", "a red circle", shape_jpeg(1)), downloaded_row("00ab", "a blue square", shape_jpeg(2)),
             downloaded_row("00ab", "a green circle", shape_jpeg(3))]
    write_stage(tmp_path / "download", [shard])
    proc = subprocess.run(
        [sys.executable, "-m", "dallekit.cli", "clean", str(tmp_path / "download"), "--out", str(tmp_path / "clean")],
        capture_output=True, text=True, timeout=300, env=os.environ | {"DASK_SCHEDULER_ADDRESS": client.scheduler.address},
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "part-00000.parquet: uid 00ab appears twice (uids must be unique" in last and "Traceback" not in proc.stderr
    # across shards, and with one of the two a failed download: every row of the input counts
    shards = [[downloaded_row("u1", "a red circle", shape_jpeg(1))],
              [downloaded_row("u2", "a blue square", shape_jpeg(2)), downloaded_row("u1", "a lost row", None, status="failed_to_download")]]
    write_stage(tmp_path / "download2", shards, stage="download")
    with pytest.raises(BadInputError, match=r"^part-00000\.parquet and part-00001\.parquet: uid u1 appears twice"):
        clean(str(tmp_path / "download2"), str(tmp_path / "clean2"), CleanConfig(), client)


def test_check_unique_uids_names_the_uid_and_its_shards():
    check_unique_uids(pa.chunked_array([["a", "b", "c"]]), "part-00000.parquet")
    with pytest.raises(BadInputError, match=r"^part-00004\.parquet: 1 row\(s\) without a uid"):
        check_unique_uids(pa.chunked_array([["a", None]]), "part-00004.parquet")
    shards = pa.chunked_array([["part-00002.parquet", "part-00001.parquet", "part-00002.parquet", "part-00001.parquet", "part-00001.parquet"]])
    with pytest.raises(BadInputError, match=r"^part-00001\.parquet and part-00002\.parquet: uid x appears 3 times \(uids must be unique"):
        check_unique_uids(pa.chunked_array([["x", "x", "y", "x", "y"]]), shards)


def huge_image_rows() -> list[dict]:
    """Rows whose PNG header says 20000x20000 (over PIL's bomb limit) and 9000x9000 (81 Mpx, under it): a few hundred bytes each."""
    return [downloaded_row(uid, f"a {uid} red circle", png_header_only(*size), size=size, original=size) for uid, size in HUGE_IMAGES.items()]


def test_images_over_64_mpx_are_rejected_from_the_header_without_a_decode(tmp_path, monkeypatch):
    attempts = forbid_large_decodes(monkeypatch)  # the scan runs in this process: a decode of a huge row fails the test
    write_stage(tmp_path / "download", [[downloaded_row("ok", "a red circle", shape_jpeg(1)), *huge_image_rows()]])
    scan_shard(str(tmp_path / "download" / "part-00000.parquet"), str(tmp_path / "work"), CleanConfig())
    scan = pq.read_table(tmp_path / "work" / "scan" / "part-00000.parquet").to_pydict()
    assert dict(zip(scan["uid"], scan["reason"])) == {"ok": None, "huge": "image_too_large", "large": "image_too_large"}
    assert attempts == []


def test_image_too_large_is_its_own_reason_before_undecodable(tmp_path, client):
    rows = [downloaded_row("ok", "a red circle", shape_jpeg(1)), downloaded_row("broken", "a red square", b"\x89PNG not really"),
            *huge_image_rows()]
    write_stage(tmp_path / "download", [rows])
    clean(str(tmp_path / "download"), str(tmp_path / "clean"), CleanConfig(), client)
    kept, rejects = check_accounting(tmp_path / "clean", 4)
    by_uid = rejects.set_index("uid")
    assert kept["uid"].tolist() == ["ok"] and by_uid.loc["broken", "reason"] == "undecodable"
    assert by_uid.loc["huge", "reason"] == by_uid.loc["large", "reason"] == "image_too_large"
    assert (by_uid.loc["large", "original_width"], by_uid.loc["large", "original_height"]) == (9000, 9000)  # the reject keeps its sizes
    funnel = [s["rule"] for s in json.loads((tmp_path / "clean" / "_funnel.json").read_text())["steps"]]
    assert funnel.index("failed_to_resize") < funnel.index("image_too_large") < funnel.index("undecodable")


# ---------------------------------------------------------------- near duplicates: details and copies


def _flag(emblem: str, side: int = 64) -> Image.Image:
    """A blue-white-blue striped flag with a small centred emblem: five dots, or a ringed disc (Honduras vs Nicaragua)."""
    image = Image.new("RGB", (side, side), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 12, side, 24), fill=(0, 103, 198))
    draw.rectangle((0, 24, side, 40), fill=(255, 255, 255))
    draw.rectangle((0, 40, side, 52), fill=(0, 103, 198))
    if emblem == "stars":
        for x, y in ((27, 29), (37, 29), (32, 32), (27, 35), (37, 35)):
            draw.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(0, 103, 198))
    else:
        draw.ellipse((28, 28, 36, 36), outline=(200, 160, 30), width=1, fill=(60, 120, 90))
    return image


def _speaker(waves: int, side: int = 64) -> Image.Image:
    """A speaker icon with `waves` sound waves."""
    image = Image.new("RGB", (side, side), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.polygon(((10, 24), (20, 24), (32, 12), (32, 52), (20, 40), (10, 40)), fill=(90, 90, 100))
    for i in range(waves):
        r = 8 + 7 * i
        draw.arc((32 - r, 32 - r, 32 + r, 32 + r), -45, 45, fill=(40, 40, 50), width=2)
    return image


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _copies(image: Image.Image) -> dict[str, bytes]:
    """A JPEG re-encode, a 1.5x resize and a 2% crop of an image."""
    w, h = image.size
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG", quality=80)
    return {"reencoded": jpeg.getvalue(), "resized": _png(image.resize((w * 3 // 2, h * 3 // 2), Image.Resampling.LANCZOS)),
            "cropped": _png(image.crop((1, 0, w, h - 1)).resize((w, h), Image.Resampling.LANCZOS))}


def test_near_duplicate_rule_keeps_pictures_that_differ_in_a_detail(tmp_path, client):
    """Two flags that differ only in their small emblem share pHash and colours, and both are kept."""
    pairs = [(_flag("stars"), _flag("disc"))]
    for a, b in pairs:  # the premise: the pHash and colour rules alone would call them duplicates
        sa, sb = image_signature(_png(a)), image_signature(_png(b))
        assert hamming(sa[0], sb[0]) <= CleanConfig.near_dup_distance  # (pHash, colour thumbnail, ...)
        assert color_distance(np.frombuffer(sa[1], np.uint8), np.frombuffer(sb[1], np.uint8))[0] <= CleanConfig.near_dup_color_distance
    rows = [downloaded_row(f"u{i}", "a picture with a caption", _png(image)) for i, image in enumerate(itertools.chain(*pairs))]
    write_stage(tmp_path / "download", [rows])
    clean(str(tmp_path / "download"), str(tmp_path / "clean"), CleanConfig(), client)
    kept, _ = check_accounting(tmp_path / "clean", 2)
    assert sorted(kept["uid"]) == ["u0", "u1"]


def test_near_duplicate_rule_catches_reencoded_resized_and_cropped_copies(tmp_path, client):
    """Copies of small pictures (re-encoded, resized, slightly cropped) are near duplicates of the original."""
    rows = []
    for name, image in (("speaker", _speaker(3)), ("photo", Image.open(io.BytesIO(noise_jpeg(5, size=64))).filter(ImageFilter.GaussianBlur(3)))):
        rows.append(downloaded_row(f"{name}-0", "the original", _png(image)))
        rows += [downloaded_row(f"{name}-{kind}", "a copy", data) for kind, data in _copies(image).items()]
    write_stage(tmp_path / "download", [rows])
    clean(str(tmp_path / "download"), str(tmp_path / "clean"), CleanConfig(), client)
    kept, rejects = check_accounting(tmp_path / "clean", len(rows))
    assert sorted(kept["uid"]) == ["photo-0", "speaker-0"]
    assert set(rejects["reason"]) == {"near_duplicate_image"}


def test_clean_takes_download_signature_columns_and_decodes_only_shards_without_them(tmp_path, client):
    """A shard with download's signature columns is not decoded (its values are used as they are); one without is; they dedup together."""
    original, copy = shape_jpeg(10), shape_jpeg(10, resize_to=220)
    with_columns = [downloaded_row("u1", "a picture", original), downloaded_row("u3", "another picture", noise_jpeg(4)),
                    downloaded_row("u4", "a failed row", None, status="failed_to_download")]
    write_stage(tmp_path / "download", [with_columns, [downloaded_row("u2", "a resized copy", copy)]])  # shard 2: no columns
    signature = signature_columns([r["jpg"] for r in with_columns])
    marked = signature["phash"].to_pylist()
    marked[1] ^= 1 << 63  # a value no decode gives: proof that the stored column is what clean keeps
    signature["phash"] = pa.array(marked, pa.uint64())
    shard = tmp_path / "download" / "part-00000.parquet"
    table = pq.read_table(shard)
    for name, column in signature.items():
        table = table.append_column(name, column)
    pq.write_table(table, shard)
    clean(str(tmp_path / "download"), str(tmp_path / "clean"), CleanConfig(), client)
    kept, rejects = check_accounting(tmp_path / "clean", 4)
    assert sorted(kept["uid"]) == ["u1", "u3"]
    assert rejects.set_index("uid").loc["u2", "duplicate_of"] == "u1"  # the decoded copy matches the stored signature
    assert kept.set_index("uid").loc["u3", "phash"] == marked[1]
    assert list(kept.columns).count("phash") == 1


def test_an_image_download_stored_without_a_signature_gets_the_reason_a_decode_would_give(tmp_path):
    """download hashes what it stores; a stored image over 64 Mpx has no signature, and clean calls it image_too_large, not undecodable."""
    rows = [downloaded_row("ok", "a red circle", shape_jpeg(1)), downloaded_row("broken", "a red square", b"\xff\xd8 not really"),
            downloaded_row("large", "a big picture", png_header_only(9000, 9000), size=(9000, 9000), original=(9000, 9000))]
    write_stage(tmp_path / "download", [rows])
    shard = tmp_path / "download" / "part-00000.parquet"
    table = pq.read_table(shard)
    for name, column in signature_columns([r["jpg"] for r in rows]).items():  # as download stores them: null where no hash
        table = table.append_column(name, column)
    pq.write_table(table, shard)
    scan_shard(str(shard), str(tmp_path / "work"), CleanConfig())
    scan = pq.read_table(tmp_path / "work" / "scan" / "part-00000.parquet").to_pydict()
    assert dict(zip(scan["uid"], scan["reason"])) == {"ok": None, "broken": "undecodable", "large": "image_too_large"}


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_rerun_of_the_scan_skips_whole_scans_and_redoes_damaged_ones(tmp_path, client, damage):
    from dallekit.pipeline.clean import plan_clean
    from dallekit.pipeline.passes import claim_work_dir

    rows = [downloaded_row(f"{i:016x}", f"a shape number {i}", shape_jpeg(i, size=64), size=(64, 64)) for i in range(8)]
    write_stage(tmp_path / "download", [rows[:4], rows[4:]])
    plan, out = plan_clean(str(tmp_path / "download"), CleanConfig()), tmp_path / "clean"
    out.mkdir()
    claim_work_dir(str(out))
    marked = plan.global_pass(client, str(out))  # the scan and dedup passes, as the stage runs them
    scan = out / "_work" / "scan"
    first = {p.name: p.read_bytes() for p in scan.glob("part-*")}
    untouched = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in scan.glob("part-00001.*")}
    if damage == "deleted":
        (scan / "part-00000.parquet").unlink()
    else:
        (scan / "part-00000.detail.arrow").write_bytes(first["part-00000.detail.arrow"][:500])
    assert plan.global_pass(client, str(out)) == marked  # as a rerun after a kill between the scan and the stage's mark
    assert {p.name: p.read_bytes() for p in scan.glob("part-*")} == first
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in scan.glob("part-00001.*")} == untouched  # not scanned again
