"""clean: caption repairs, boilerplate, undecodable images, global exact and near-duplicate removal."""

from __future__ import annotations

import json
import random

import pytest

from dallekit.config import CleanConfig
from dallekit.images import hamming, phash
from dallekit.pipeline.clean import NearDuplicateIndex, caption_reason, clean, repair_caption
from tests.stage_data import downloaded_row, noise_jpeg, shape_jpeg, write_stage
from tests.test_ingest import check_accounting


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


def test_near_duplicate_index_matches_brute_force():
    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(300)]
    values = base + [b ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for b in base[:100]] + [b ^ ((1 << 7) - 1) for b in base[:50]]
    for distance in (0, 2, 4, 8):
        index, kept = NearDuplicateIndex(distance), []
        for i, v in enumerate(values):
            found = index.find(v)
            brute = [k for k in kept if hamming(values[k], v) <= distance]
            assert (found is not None) == bool(brute), (distance, i)
            if found is None:
                index.add(v, str(i))
                kept.append(i)


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
