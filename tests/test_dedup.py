"""The distributed dedup of clean gives exactly the sequential walk's marks, resumes, and stays linear on identical images."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dallekit.config import ClusterConfig
from dallekit.errors import BadInputError
from dallekit.images import THUMB_BYTES, color_distance
from dallekit.io import write_rows_file
from dallekit.pipeline import dedup as dedup_module
from dallekit.pipeline.clean import detail_key
from dallekit.pipeline.dedup import dedup, dedup_stats
from dallekit.pipeline.dedup.candidates import color_distance_bound, color_summary
from dallekit.pipeline.hash_blocks import block_edges, choose_blocks, equal_key_pairs, table_key, tables_led_by
from dallekit.pipeline.passes import PROGRESS
from dallekit.pipeline.passes import read_marks as read_pass_marks

PASSES = ["split", "exact", "signatures", "collapse", "table_partition", "tables", "pair_thumbnails", "confirm"]  # then components<r>, gather, walk, final


# ---------------------------------------------------------------- data and the reference


def write_scans(work: Path, rows: list[tuple], shards: int, seed: int = 0) -> list[str]:
    """Scan tables (uid, reason, caption, sha256, phash, color_thumb) of rows dealt at random to `shards` shards."""
    rng = random.Random(seed)
    dealt = [[] for _ in range(shards)]
    for row in rows:
        dealt[rng.randrange(shards)].append(row)
    names = []
    for i, part in enumerate(dealt):
        uid, reason, sha, ph, thumb = zip(*part) if part else ([],) * 5
        table = pa.table({"uid": pa.array(uid, pa.string()), "reason": pa.array(reason, pa.string()),
                          "caption": pa.array(["a caption"] * len(part), pa.string()), "sha256": pa.array(sha, pa.string()),
                          "phash": pa.array(ph, pa.uint64()), "color_thumb": pa.array(thumb, pa.binary(THUMB_BYTES))})
        (work / "scan").mkdir(parents=True, exist_ok=True)
        pq.write_table(table, work / "scan" / f"part-{i:05d}.parquet")
        names.append(f"part-{i:05d}")
    return names


def reference(rows: list[tuple], distance: int, max_color: float | None) -> dict[str, tuple]:
    """The brute-force O(N^2) walk: uid order, exact repeats of earlier survivors, else the nearest colour-agreeing kept row."""
    first, kept, out = {}, [], {}
    for uid, reason, sha, ph, thumb in sorted((r for r in rows if r[1] is None), key=lambda r: r[0].encode()):
        if sha is not None and sha in first:
            out[uid] = ("duplicate_image", first[sha], 0)
            continue
        if sha is not None:
            first[sha] = uid
        if distance < 0:
            continue
        near = [((ph ^ k_ph).bit_count(), k_uid.encode(), k_uid) for k_uid, k_ph, k_thumb in kept
                if (ph ^ k_ph).bit_count() <= distance
                and (max_color is None or color_distance(np.frombuffer(thumb, np.uint8), np.frombuffer(k_thumb, np.uint8))[0] <= max_color)]
        if near:
            bits, _, of = min(near)
            out[uid] = ("near_duplicate_image", of, bits)
        else:
            kept.append((uid, ph, thumb))
    return out


def read_marks(work: Path, names: list[str]) -> dict[str, tuple]:
    """Every shard's dups file as uid -> (reason, duplicate_of, distance); each file sorted by uid, with today's columns."""
    out = {}
    for name in names:
        table = pq.read_table(work / "dups" / f"{name}.parquet")
        assert table.schema == pa.schema([("uid", pa.string()), ("reason", pa.string()), ("duplicate_of", pa.string()),
                                          ("duplicate_distance", pa.int32())])
        uids = table.column("uid").to_pylist()
        assert uids == sorted(uids, key=str.encode)
        out |= {u: (r, o, d) for u, r, o, d in zip(*(table.column(c).to_pylist() for c in table.column_names))}
    return out


def random_thumb(rng: random.Random) -> bytes:
    """192 random bytes."""
    return bytes(rng.getrandbits(8) for _ in range(THUMB_BYTES))


def shifted(thumb: bytes, rng: random.Random, spread: int) -> bytes:
    """A thumbnail whose colours differ by up to `spread` per value (mean about spread/2)."""
    return bytes(min(255, max(0, x + rng.randint(-spread, spread))) for x in thumb)


def flip(ph: int, bits: int, rng: random.Random) -> int:
    """The hash with `bits` distinct random bits flipped."""
    for b in rng.sample(range(64), bits):
        ph ^= 1 << b
    return ph


def clustered_rows(n_clusters: int, seed: int) -> list[tuple]:
    """Clusters of 1-4 bit variants (chains too), identical copies, colour variants that must not merge, exact copies, rejected rows."""
    rng, rows, seen = random.Random(seed), [], set()

    def uid() -> str:
        while (u := f"{rng.getrandbits(40):010x}") in seen:
            pass
        seen.add(u)
        return u

    for _ in range(n_clusters):
        images = [(rng.getrandbits(64), random_thumb(rng))]
        for _ in range(rng.randint(0, 7)):
            ph, thumb = rng.choice(images)
            kind = rng.random()
            if kind < 0.2:
                images.append((ph, thumb))  # the same picture re-encoded: identical hash and thumbnail, another sha256
            elif kind < 0.35:
                images.append((flip(ph, rng.randint(0, 2), rng), bytes((x + 128) % 256 for x in thumb)))  # recoloured
            else:
                images.append((flip(ph, rng.randint(1, 4), rng), shifted(thumb, rng, rng.choice([2, 6, 12]))))
        for ph, thumb in images:
            reason = "undecodable" if rng.random() < 0.08 else None
            rows.append((uid(), reason, f"{rng.getrandbits(128):032x}", ph, thumb))
    for _ in range(len(rows) // 10):  # exact copies, some of rejected rows (which must not count)
        _, _, sha, ph, thumb = rng.choice(rows)
        rows.append((uid(), None, sha, ph, thumb))
    rows += [(uid(), None, None, rng.getrandbits(64), random_thumb(rng)) for _ in range(5)]  # no sha256: never an exact copy
    return rows


# ---------------------------------------------------------------- the permuted tables


def test_every_pair_within_d_bits_shares_a_table_key():
    rng = np.random.default_rng(0)
    for d in (0, 1, 2, 3, 4, 6, 8):
        for n in (10, 10**6, 10**9):
            k = choose_blocks(n, d)
            assert d + 1 <= k <= max(8, d + 1)
            edges = block_edges(k)
            widths = sorted(b - a for a, b in itertools.pairwise(edges))
            if k < 8 and k > d + 1:  # the smallest k whose shortest key reaches log2(n) + 2 bits
                assert sum(widths[: k - d]) >= np.log2(n) + 2
            tables = [t for lead in range(d + 1) for t in tables_led_by(k, d, lead)]
            assert len(tables) == len(set(tables)) and len({t[0] for t in tables}) <= d + 1
            ph = rng.integers(0, 2**63, 2000, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 2000, dtype=np.uint64)
            other = ph.copy()
            for i in range(len(other)):
                for b in rng.choice(64, rng.integers(0, d + 1), replace=False):
                    other[i] ^= np.uint64(1) << np.uint64(b)
            shared = np.zeros(len(ph), bool)
            for t in tables:
                shared |= table_key(ph, k, t) == table_key(other, k, t)
            assert shared.all(), (d, n)


def test_equal_key_pairs_is_every_close_pair_of_each_run():
    rng = np.random.default_rng(1)
    keys = np.sort(rng.integers(0, 40, 600)).astype(np.uint64)
    ph = rng.integers(0, 16, 600).astype(np.uint64)  # few bits set: many within 2
    i, j, bits, compared = equal_key_pairs(keys, ph, 2)
    brute = {(a, b) for a in range(600) for b in range(a + 1, 600) if keys[a] == keys[b] and int(ph[a] ^ ph[b]).bit_count() <= 2}
    assert set(zip(i.tolist(), j.tolist())) == brute and len(i) == len(brute)
    assert compared == sum(c * (c - 1) // 2 for c in np.unique(keys, return_counts=True)[1])
    assert all(int(ph[a] ^ ph[b]).bit_count() == n for a, b, n in zip(i, j, bits))


# ---------------------------------------------------------------- the dedup against the reference


@pytest.mark.parametrize("distance, max_color, rows_per_task", [
    (4, 6.0, 250), (4, 6.0, 10**6), (2, 6.0, 400), (4, None, 250), (8, 10.0, 300), (0, 6.0, 250), (-1, 6.0, 250),
])
def test_matches_the_brute_force_walk_on_clusters(tmp_path, client, monkeypatch, distance, max_color, rows_per_task):
    monkeypatch.setattr(dedup_module, "ROWS_PER_TASK", rows_per_task)  # the driver sizes every bucket from it
    rows = clustered_rows(300, seed=distance + 7)
    names = write_scans(tmp_path, rows, shards=5)
    found = dedup(client, names, str(tmp_path), distance, max_color)
    expected = reference(rows, distance, max_color)
    assert read_marks(tmp_path, names) == expected
    assert sum(found.values()) == len(expected) and set(found) == set(names)
    kinds = {r for r, _, _ in expected.values()}
    assert "duplicate_image" in kinds and (distance < 0) == ("near_duplicate_image" not in kinds)
    if rows_per_task < 1000:  # several tasks in every pass
        stats = dedup_stats(str(tmp_path))
        assert stats["rows"] == len(rows) and (distance < 0 or stats["table_tasks"] > distance + 1)


def test_matches_on_random_hashes_with_a_one_worker_cluster(tmp_path, monkeypatch):
    from dallekit.pipeline.cluster import dask_client

    monkeypatch.setattr(dedup_module, "ROWS_PER_TASK", 500)
    rng = random.Random(3)
    rows = [(f"u{i:05d}", rng.choice([None] * 9 + ["empty_caption"]), f"{rng.getrandbits(20):x}", rng.getrandbits(64),
             random_thumb(rng)) for i in range(2000)]  # 20-bit sha256s: some repeat
    rows += [(f"v{i:04d}", None, f"{rng.getrandbits(64):x}", flip(ph, rng.randint(0, 4), rng), shifted(th, rng, 4))
             for i, (_, _, _, ph, th) in enumerate(rows[:300])]
    names = write_scans(tmp_path, rows, shards=3)
    with dask_client(ClusterConfig(workers=1), quiet=True) as one:
        dedup(one, names, str(tmp_path), 4, 6.0)
    assert read_marks(tmp_path, names) == reference(rows, 4, 6.0)


def test_exact_duplicates_need_no_colour_and_ignore_rejected_rows(tmp_path, client):
    rng = random.Random(5)
    a, b = random_thumb(rng), random_thumb(rng)
    rows = [("u0", None, "s1", 1, a), ("u1", None, "s1", 2**63, b),  # the same bytes (sha256) however the hashes differ
            ("t0", "undecodable", "s2", 5, a), ("t1", None, "s2", 5, a), ("t2", None, "s2", 5, a),
            ("n0", None, None, 9, b), ("n1", None, None, 2**40, b)]
    names = write_scans(tmp_path, rows, shards=2)
    dedup(client, names, str(tmp_path), -1, 6.0)
    assert read_marks(tmp_path, names) == {"u1": ("duplicate_image", "u0", 0), "t2": ("duplicate_image", "t1", 0)}


def test_empty_shards_and_no_survivors_give_empty_mark_files(tmp_path, client):
    rng = random.Random(9)
    rows = [("a", "undecodable", "s", 1, random_thumb(rng)), ("b", "empty_caption", "s", 1, random_thumb(rng))]
    names = write_scans(tmp_path, rows, shards=4)
    assert dedup(client, names, str(tmp_path), 4, 6.0) == dict.fromkeys(names, 0)
    assert read_marks(tmp_path, names) == {}


def test_ten_thousand_identical_images_compare_few_pairs(tmp_path, client, monkeypatch):
    monkeypatch.setattr(dedup_module, "ROWS_PER_TASK", 3000)
    rng = random.Random(11)
    placeholder, thumb = rng.getrandbits(64), random_thumb(rng)
    rows = [(f"{rng.getrandbits(48):012x}-{i}", None, f"sha{i}", placeholder, thumb) for i in range(10_000)]
    rows += [(f"{rng.getrandbits(48):012x}-v{i}", None, f"vsha{i}", flip(placeholder, rng.randint(1, 4), rng), shifted(thumb, rng, 4))
             for i in range(30)]  # near variants interleaved in uid order: the copies' targets depend on them
    rows += [(f"{rng.getrandbits(48):012x}-r{i}", None, f"rsha{i}", rng.getrandbits(64), random_thumb(rng)) for i in range(1000)]
    names = write_scans(tmp_path, rows, shards=4)
    dedup(client, names, str(tmp_path), 4, 6.0)
    assert read_marks(tmp_path, names) == reference(rows, 4, 6.0)
    stats = dedup_stats(str(tmp_path))
    assert stats["representatives"] <= 1031 and stats["compared_pairs"] < 5000  # not 10,000^2 / 2 = 5e7


def test_a_repeated_or_missing_uid_is_bad_input_naming_its_shards(tmp_path, client):
    rng = random.Random(2)
    rows = [(f"u{i}", None, f"s{i}", rng.getrandbits(64), random_thumb(rng)) for i in range(40)]
    names = write_scans(tmp_path / "a", rows + [("u7", "undecodable", "x", 1, random_thumb(rng)), ("u3", None, "y", 2, random_thumb(rng))], 3)
    with pytest.raises(BadInputError, match=r"^part-\d+\.parquet( and part-\d+\.parquet)?: uid u3 appears twice \(uids must be unique"):
        dedup(client, names, str(tmp_path / "a"), 4, 6.0)
    assert not (tmp_path / "a" / "dups").exists()
    names = write_scans(tmp_path / "b", rows + [(None, None, "z", 3, random_thumb(rng))], 1)
    with pytest.raises(BadInputError, match=r"^part-00000\.parquet: 1 row\(s\) without a uid"):
        dedup(client, names, str(tmp_path / "b"), 4, 6.0)


def finished(work: Path) -> bool:
    """Whether the dedup in `work` recorded its result (the mark of its run's last step)."""
    return "result" in read_pass_marks(str(work / "dedup"), "run", verify=False, remove_damaged=False)


def _driver(address: str, names: list[str], work: Path) -> subprocess.Popen:
    script = ("import sys; from distributed import Client; from dallekit.pipeline import dedup as d; d.ROWS_PER_TASK = 250; "
              f"d.dedup(Client({address!r}), {names!r}, {str(work)!r}, 4, 6.0)")
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_a_rerun_after_the_driver_is_killed_midway_gives_the_same_marks(tmp_path, client, monkeypatch):
    rows = clustered_rows(400, seed=21)
    names = write_scans(tmp_path / "killed", rows, shards=6)
    proc = _driver(client.scheduler.address, names, tmp_path / "killed")
    done = tmp_path / "killed" / "dedup" / PROGRESS  # the marks of each pass
    deadline = time.time() + 240
    while not list((done / "tables").glob("*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-dedup; its running tasks may still finish
    proc.wait()
    assert not finished(tmp_path / "killed")
    started = [p for p in PASSES if list((done / p).glob("*.json"))]
    assert started[:2] == ["split", "exact"], started
    markers = sorted((done / started[-1]).glob("*.json"))
    for marker in markers[::2]:  # tasks that wrote their outputs but died before their marker
        marker.unlink()
    monkeypatch.setattr(dedup_module, "ROWS_PER_TASK", 250)
    dedup(client, names, str(tmp_path / "killed"), 4, 6.0)
    assert read_marks(tmp_path / "killed", names) == reference(rows, 4, 6.0)
    again = dedup(client, names, str(tmp_path / "killed"), 4, 6.0)  # finished: answered from its result mark
    assert again == {name: len(read_marks(tmp_path / "killed", [name])) for name in names}


@pytest.mark.slow
def test_a_worker_killed_midway_changes_nothing(tmp_path, monkeypatch):
    from dallekit.pipeline.cluster import dask_client

    monkeypatch.setattr(dedup_module, "ROWS_PER_TASK", 250)
    rows = clustered_rows(300, seed=31)
    names = write_scans(tmp_path, rows, shards=4)
    killed = []

    def kill_one_worker(client) -> None:  # once the tables pass has begun: its tasks and later ones lose a worker
        deadline = time.time() + 120
        while not list((tmp_path / "dedup" / PROGRESS / "tables").glob("*.json")) and time.time() < deadline:
            time.sleep(0.01)
        victim = min(client.scheduler_info()["workers"])
        midway = not finished(tmp_path)
        try:
            client.run(os._exit, 1, workers=[victim])
        except Exception:  # noqa: BLE001, S110 - the worker dies before it answers
            pass
        killed.append(midway)

    with dask_client(ClusterConfig(workers=2), quiet=True) as client:
        killer = threading.Thread(target=kill_one_worker, args=(client,))
        killer.start()
        dedup(client, names, str(tmp_path), 4, 6.0)
        killer.join()
    assert killed == [True] and read_marks(tmp_path, names) == reference(rows, 4, 6.0)


def test_colour_summary_bound_never_exceeds_the_colour_distance():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5000, THUMB_BYTES), dtype=np.uint8)
    b = np.clip(a.astype(np.int16) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    b[::3] = rng.integers(0, 256, (len(b[::3]), THUMB_BYTES), dtype=np.uint8)  # unrelated pictures too
    flat = np.repeat(rng.integers(0, 256, (5000, 1, 3), dtype=np.uint8), 64, axis=1).reshape(5000, THUMB_BYTES)
    for x, y in ((a, b), (flat, a), (flat, flat[::-1])):
        bound, exact = color_distance_bound(color_summary(x), color_summary(y)), color_distance(x, y)
        assert (bound <= exact).all()
    assert np.allclose(color_distance_bound(color_summary(flat), color_summary(flat[::-1])), color_distance(flat, flat[::-1]))  # tight on flat colours


@pytest.mark.parametrize("rows_per_task", [2, 10**6])  # several tasks a pass, and the one-task run
def test_detail_thumbnails_from_the_scans_split_what_colour_joins(tmp_path, client, monkeypatch, rows_per_task):
    """Rows with one pHash and colour thumbnail are near duplicates only when their detail thumbnails (the scans' .detail.arrow) agree."""
    monkeypatch.setattr(dedup_module, "ROWS_PER_TASK", rows_per_task)
    rng = np.random.default_rng(0)
    d1 = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    copy = np.clip(d1.astype(int) + rng.integers(-2, 3, d1.shape), 0, 255).astype(np.uint8)  # re-encoded: small everywhere
    d2 = d1.copy()
    d2[8:16, 8:16] = 255 - d2[8:16, 8:16]  # another emblem: large in one place
    ph, thumb = 0x0123456789ABCDEF, bytes(range(192))
    shards = [[("a", ph, d1), ("c", ph ^ 1, d2)], [("b", ph, copy), ("d", ph, d2)]]
    names = []
    for i, rows in enumerate(shards):
        uid, hashes, details = zip(*rows)
        (tmp_path / "scan").mkdir(exist_ok=True)
        pq.write_table(pa.table({"uid": list(uid), "reason": pa.array([None] * 2, pa.string()), "sha256": [f"{u}-sha" for u in uid],
                                 "phash": pa.array(hashes, pa.uint64()), "color_thumb": pa.array([thumb] * 2, pa.binary(THUMB_BYTES)),
                                 "detail_key": pa.array([detail_key(d.tobytes()) for d in details], pa.uint64())}),
                       tmp_path / "scan" / f"part-{i:05d}.parquet")
        write_rows_file(pa.array([d.tobytes() for d in details], pa.binary(3072)), str(tmp_path / "scan" / f"part-{i:05d}.detail.arrow"))
        names.append(f"part-{i:05d}")
    dedup(client, names, str(tmp_path), 4, 6.0, 6.0)
    assert read_marks(tmp_path, names) == {"b": ("near_duplicate_image", "a", 0), "d": ("near_duplicate_image", "c", 1)}


# ---------------------------------------------------------------- marks that vouch for their files


class _Stopped(Exception):
    """The driver stopped before a pass, as if killed there."""


def _redone_tasks(monkeypatch) -> dict[str, list[str]]:
    """Record, per pass of the next runs, the tasks that had no mark vouching for their files (the ones run again)."""
    from dallekit.pipeline.dedup import state

    redone, real = {}, state.run_pass

    def spy(client, folder, pass_name, fn, items, **kwargs):
        redone[pass_name] = sorted(set(items) - set(read_pass_marks(folder, pass_name)))
        return real(client, folder, pass_name, fn, items, **kwargs)

    monkeypatch.setattr(state, "run_pass", spy)
    return redone


@pytest.mark.parametrize("folder, damage, restarts", [
    ("table_entries", "truncate", False),  # its pass's consumer (tables) has not run: that one task is redone
    ("representatives", "delete", True),  # collapse's input was consumed already: the run starts over
    ("marks", "delete", True),  # exact's marks, read by the final pass after exact's other output was consumed
])
def test_a_damaged_intermediate_whose_mark_is_present_is_redone(tmp_path, client, monkeypatch, folder, damage, restarts):
    from dallekit.pipeline.dedup.state import DedupRun

    monkeypatch.setattr(dedup_module, "ROWS_PER_TASK", 250)
    rows = clustered_rows(300, seed=41)
    names = write_scans(tmp_path, rows, shards=4)
    real_run = DedupRun.run

    def stop_before_tables(self, pass_name, *args, **kwargs):
        if pass_name == "tables":
            raise _Stopped
        return real_run(self, pass_name, *args, **kwargs)

    monkeypatch.setattr(DedupRun, "run", stop_before_tables)
    with pytest.raises(_Stopped):
        dedup(client, names, str(tmp_path), 4, 6.0)
    monkeypatch.setattr(DedupRun, "run", real_run)
    victim = sorted((tmp_path / "dedup" / folder).glob("*"))[0]
    if damage == "truncate":
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    else:
        victim.unlink()
    redone = _redone_tasks(monkeypatch)
    found = dedup(client, names, str(tmp_path), 4, 6.0)
    assert read_marks(tmp_path, names) == reference(rows, 4, 6.0)
    assert found == {name: len(read_marks(tmp_path, [name])) for name in names}
    if restarts:
        assert redone["split"] == [str(g) for g in range(len(redone["split"]))] and redone["split"]
    else:
        assert redone["split"] == [] and redone["collapse"] == [] and redone["table_partition"] == [victim.stem]


def test_a_deleted_dups_file_of_a_finished_run_is_redone(tmp_path, client):
    rows = clustered_rows(100, seed=43)
    names = write_scans(tmp_path, rows, shards=3)
    dedup(client, names, str(tmp_path), 4, 6.0)
    (tmp_path / "dups" / f"{names[1]}.parquet").unlink()  # the run's result mark vouches for it
    dedup(client, names, str(tmp_path), 4, 6.0)
    assert read_marks(tmp_path, names) == reference(rows, 4, 6.0)


def test_the_dedup_package_does_not_import_clean():
    script = "import sys, dallekit.pipeline.dedup; sys.exit('dallekit.pipeline.clean' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 0
