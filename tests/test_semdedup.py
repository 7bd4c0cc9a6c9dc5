"""Semantic dedup (pipeline/semdedup/): planted groups, split clusters, keep order, brute force, resume, and the filter's options."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dallekit.config import EmbedConfig, FilterConfig
from dallekit.errors import BadInputError
from dallekit.pipeline import filter as filter_module
from dallekit.pipeline import semdedup
from dallekit.pipeline.embed import embed
from dallekit.pipeline.embeddings import embedding_array, embedding_metadata
from dallekit.pipeline.filter import FILTER_RULES
from dallekit.pipeline.semdedup import SemanticParams, semantic_dedup, semantic_path
from tests.helpers import check_accounting, run_cli
from tests.stage_data import downloaded_row, shape_jpeg, write_stage

DIM = 32
IDENTITY = {"model": "test", "pretrained": None, "checkpoint": None}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embeddings(folder, image: np.ndarray, text: np.ndarray | None = None, shard_rows: int = 50, uids=None) -> list[tuple[str, str]]:
    """An embeddings folder of these vectors (uids u00000...), `shard_rows` per shard; its [(name, path)]."""
    folder.mkdir(parents=True, exist_ok=True)
    text = image if text is None else text
    uids = uids or [f"u{i:05d}" for i in range(len(image))]
    shards = []
    for i, lo in enumerate(range(0, len(image), shard_rows)):
        hi = min(len(image), lo + shard_rows)
        table = pa.table({"uid": pa.array(uids[lo:hi]), "image_embedding": embedding_array(image[lo:hi]),
                          "text_embedding": embedding_array(text[lo:hi])})
        table = table.replace_schema_metadata(embedding_metadata(IDENTITY, image.shape[1]))
        path = folder / f"part-{i:05d}.parquet"
        pq.write_table(table, path)
        shards.append((path.stem, str(path)))
    return shards


def read_result(scratch, shards) -> dict[str, dict]:
    """uid -> its output row, over every shard."""
    rows = {}
    for name, _ in shards:
        for row in pq.read_table(semantic_path(str(scratch), name)).to_pylist():
            rows[row["uid"]] = row
    return rows


def planted(rng, groups: int, per_group: int, singles: int, noise: float = 0.02) -> np.ndarray:
    """`groups` tight groups of `per_group` near-copies (cosine > 0.99 within) among `singles` random rows, shuffled."""
    bases = unit(rng.standard_normal((groups, DIM)))
    copies = unit(np.repeat(bases, per_group, axis=0) + noise * rng.standard_normal((groups * per_group, DIM)))
    return np.concatenate([copies, unit(rng.standard_normal((singles, DIM)))]).astype(np.float32)


def brute_force(result: dict[str, dict], image: np.ndarray, scores: np.ndarray, eps: float) -> dict[str, str]:
    """The rule over every row at once (the clusters the run chose): uid -> duplicate_of."""
    uids = [f"u{i:05d}" for i in range(len(image))]
    x = image.astype(np.float16).astype(np.float64)
    clusters = np.array([result[u]["semantic_cluster"] for u in uids])
    found = {}
    for c in np.unique(clusters):
        members = [i for i in np.flatnonzero(clusters == c)]
        members.sort(key=lambda i: (-scores[i], uids[i]))
        sims = x[members] @ x[members].T
        for p in range(len(members)):
            earlier = np.flatnonzero(sims[p, :p] > 1 - eps)
            if len(earlier):
                found[uids[members[p]]] = uids[members[earlier[0]]]
    return found


def duplicates(result: dict[str, dict]) -> dict[str, str]:
    return {u: row["duplicate_of"] for u, row in result.items() if row["duplicate_of"] is not None}


def test_planted_groups_found_exactly(tmp_path):
    rng = np.random.default_rng(0)
    image = planted(rng, groups=12, per_group=4, singles=150)
    shards = write_embeddings(tmp_path / "emb", image)
    stats = semantic_dedup(None, shards, str(tmp_path / "scratch"), SemanticParams(eps=0.05, clusters=6, sample=1000))
    result = read_result(tmp_path / "scratch", shards)
    dups = duplicates(result)
    assert len(result) == len(image) and stats["duplicates"] == len(dups) == 12 * 3
    for g in range(12):  # every group keeps exactly one row, and drops the others for a row of their group
        members = {f"u{i:05d}" for i in range(g * 4, g * 4 + 4)}
        assert len(members - set(dups)) == 1
        assert all(dups[u] in members for u in members & set(dups))
    assert all(u < "u00048" for u in dups)  # no single row is dropped


def test_split_cluster_gives_the_same_drops_as_one_block(tmp_path):
    rng = np.random.default_rng(1)
    image = planted(rng, groups=10, per_group=5, singles=60, noise=0.05)
    shards = write_embeddings(tmp_path / "emb", image, shard_rows=30)
    whole = semantic_dedup(None, shards, str(tmp_path / "a"), SemanticParams(eps=0.1, clusters=2, sample=1000))
    split = semantic_dedup(None, shards, str(tmp_path / "b"), SemanticParams(eps=0.1, clusters=2, sample=1000, pair_rows=16))
    assert whole["split_clusters"] == 0 and split["split_clusters"] == 2 and split["pairs_tasks"] > 10
    assert read_result(tmp_path / "a", shards) == read_result(tmp_path / "b", shards)


def test_keep_centroid_and_clip_score_choose_different_rows(tmp_path):
    rng = np.random.default_rng(2)
    image = planted(rng, groups=1, per_group=2, singles=40, noise=0.01)
    text = image.copy()
    near = int(np.argmax(image[:2] @ unit(image.mean(axis=0, keepdims=True))[0]))  # one cluster: its centroid is the mean
    text[near] = -image[near]  # the row nearer the centroid has the worse caption
    shards = write_embeddings(tmp_path / "emb", image, text)
    kept = {}
    for keep in ("centroid", "clip_score"):
        semantic_dedup(None, shards, str(tmp_path / keep), SemanticParams(eps=0.05, clusters=1, sample=1000, keep=keep))
        dups = duplicates(read_result(tmp_path / keep, shards))
        assert len(dups) == 1
        kept[keep] = next(iter(dups.values()))
    assert kept["centroid"] == f"u{near:05d}" and kept["clip_score"] == f"u{1 - near:05d}"


@pytest.mark.parametrize("keep", ["centroid", "clip_score"])
def test_brute_force_equality_on_random_data(tmp_path, keep):
    rng = np.random.default_rng(3)
    image = planted(rng, groups=40, per_group=3, singles=200, noise=0.06)
    text = unit(rng.standard_normal(image.shape)).astype(np.float32)
    shards = write_embeddings(tmp_path / "emb", image, text, shard_rows=64)
    eps = 0.15
    semantic_dedup(None, shards, str(tmp_path / "s"), SemanticParams(eps=eps, clusters=4, sample=1000, keep=keep, pair_rows=40))
    result = read_result(tmp_path / "s", shards)
    x16 = image.astype(np.float16).astype(np.float32)
    t16 = text.astype(np.float16).astype(np.float32)
    scores = np.array([result[f"u{i:05d}"]["centroid_similarity"] for i in range(len(image))], np.float32) if keep == "centroid" \
        else (x16 * t16).sum(axis=1)
    expected = brute_force(result, image, scores, eps)
    assert len(expected) > 20
    assert duplicates(result) == expected


def test_eligibility_limits_who_takes_part(tmp_path):
    rng = np.random.default_rng(4)
    image = planted(rng, groups=5, per_group=2, singles=30)
    shards = write_embeddings(tmp_path / "emb", image)
    stats = semantic_dedup(None, shards, str(tmp_path / "s"), SemanticParams(eps=0.05, clusters=2, sample=1000), eligible=odd_rows)
    result = read_result(tmp_path / "s", shards)
    assert set(result) == {f"u{i:05d}" for i in range(1, len(image), 2)}
    assert stats["duplicates"] == 0  # each planted pair is rows 2g, 2g+1: one of them takes part


def odd_rows(name: str, uids: pa.ChunkedArray) -> np.ndarray:
    return np.array([int(u[1:]) % 2 == 1 for u in uids.to_pylist()])


def test_resume_after_a_killed_task_and_a_removed_output(tmp_path, monkeypatch):
    rng = np.random.default_rng(5)
    image = planted(rng, groups=8, per_group=3, singles=80, noise=0.05)
    shards = write_embeddings(tmp_path / "emb", image, shard_rows=40)
    params = SemanticParams(eps=0.1, clusters=3, sample=1000, pair_rows=30)
    semantic_dedup(None, shards, str(tmp_path / "ref"), params)
    reference = read_result(tmp_path / "ref", shards)

    calls = []
    original = semdedup.pairs_task

    def dying(item, **kwargs):
        calls.append(item[0]["key"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the driver killed in the middle of the pairs pass
        return original(item, **kwargs)

    monkeypatch.setattr(semdedup, "pairs_task", dying)
    with pytest.raises(KeyboardInterrupt):
        semantic_dedup(None, shards, str(tmp_path / "s"), params)
    monkeypatch.setattr(semdedup, "pairs_task", original)
    stats = semantic_dedup(None, shards, str(tmp_path / "s"), params)
    assert read_result(tmp_path / "s", shards) == reference
    assert stats["pass_seconds"]["eligible"][1] == 0  # the finished passes were not redone
    (tmp_path / "s" / "semantic" / f"{shards[1][0]}.parquet").unlink()
    semantic_dedup(None, shards, str(tmp_path / "s"), params)  # the result's mark no longer vouches: the run is redone
    assert read_result(tmp_path / "s", shards) == reference


def test_more_clusters_than_rows_and_no_eligible_row_are_bad_input(tmp_path):
    rng = np.random.default_rng(6)
    shards = write_embeddings(tmp_path / "emb", planted(rng, groups=2, per_group=2, singles=10))
    with pytest.raises(BadInputError, match="--semantic-dedup-clusters 15: expected at most the 14 rows"):
        semantic_dedup(None, shards, str(tmp_path / "a"), SemanticParams(eps=0.05, clusters=15))
    with pytest.raises(BadInputError, match="no row takes part"):
        semantic_dedup(None, shards, str(tmp_path / "b"), SemanticParams(eps=0.05), eligible=no_rows)


def no_rows(name: str, uids: pa.ChunkedArray) -> np.ndarray:
    return np.zeros(len(uids), bool)


@pytest.mark.parametrize(("args", "expected"), [
    (["--semantic-dedup-eps", "0"], "--semantic-dedup-eps 0.0: expected a number > 0 and < 1"),
    (["--semantic-dedup-eps", "1"], "--semantic-dedup-eps 1.0: expected a number > 0 and < 1"),
    (["--semantic-dedup-eps", "0.05", "--no-embeddings-given"], None),
    (["--semantic-dedup-clusters", "0"], "--semantic-dedup-clusters 0: expected a number >= 1"),
    (["--semantic-dedup-keep", "first"], "--semantic-dedup-keep"),
    (["--semantic-dedup-sample", "0"], "--semantic-dedup-sample 0: expected a number >= 1"),
])
def test_bad_option_values_exit_2_naming_the_option(tmp_path, capsys, args, expected):
    if "--no-embeddings-given" in args:  # the dedup needs the image embeddings
        args, expected = args[:2], "--semantic-dedup-eps 0.05: expected --embeddings DIR as well"
    else:
        args = args + ["--embeddings", str(tmp_path / "emb")]
    code, err = run_cli(capsys, "filter", tmp_path / "clean", "--out", tmp_path / "out", *args)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_filter_drops_semantic_duplicates_among_rows_every_other_rule_keeps(tmp_path, client):
    groups = (("a", 1, 3), ("b", 2, 2), ("c", 3, 1), ("d", 4, 1), ("e", 5, 1), ("f", 6, 1))
    rows = [downloaded_row(f"{g}{i}", f"a shape called {g}{i}", shape_jpeg(seed, size=96)) for g, seed, n in groups for i in range(n)]
    rows.append(downloaded_row("x0", "short", shape_jpeg(1, size=96)))  # group a's picture, but its caption fails caption_words
    write_stage(tmp_path / "clean", [rows[:5], rows[5:]], stage="clean")
    tiny = dict(clip_model="dallekit-tiny-clip", clip_pretrained=None, device="cpu")
    embed(str(tmp_path / "clean"), str(tmp_path / "embed"), EmbedConfig(**tiny), client)
    config = FilterConfig(**tiny, min_side=0, min_caption_words=3, languages=["any"], clip_threshold=-1.0,
                          embeddings=str(tmp_path / "embed"), semantic_dedup_eps=0.01)  # only identical pictures (~0.94 at most else)
    filter_module.filter(str(tmp_path / "clean"), str(tmp_path / "out"), config, client)
    kept, rejects = check_accounting(tmp_path / "out", len(rows))
    reasons = dict(zip(rejects["uid"], rejects["reason"]))
    assert reasons.pop("x0") == "caption_words" and rejects.set_index("uid").loc["x0", ["semantic_cluster", "duplicate_of"]].isna().all()
    assert set(reasons.values()) == {"semantic_duplicate"} and len(reasons) == 3
    of = dict(zip(rejects["uid"], rejects["duplicate_of"]))
    assert {uid[0] for uid in reasons} == {"a", "b"} and all(of[uid][0] == uid[0] and of[uid] in set(kept["uid"]) for uid in reasons)
    assert (rejects.set_index("uid").loc[list(reasons), "semantic_similarity"] > 0.99).all()
    assert kept["semantic_cluster"].notna().all() and kept["centroid_similarity"].between(-1, 1.01).all()
    assert FILTER_RULES[-1].name == "semantic_duplicate"
    with pytest.raises(BadInputError, match="--semantic-dedup-clusters 10: expected at most the 9 rows that take part"):
        filter_module.filter(str(tmp_path / "clean"), str(tmp_path / "out2"), replace(config, semantic_dedup_clusters=10), client)


def test_the_sample_is_read_from_shards_spread_over_the_input():
    from dallekit.pipeline.semdedup.kmeans import spread

    assert spread([100_000] * 40, 200_000) == [0, 3, 5, 8, 10, 13, 16, 18, 21, 23, 26, 29, 31, 34, 36, 39]
    assert len(spread([10] * 100, 400)) == 40
    assert spread([0, 5, 0, 5, 7], 100) == [1, 3, 4]
