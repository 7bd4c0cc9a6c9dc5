"""dallekit index and search: the index kinds, the joined hits, the CLIP queries and the bad inputs (issue 32)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dallekit.search
from dallekit.errors import BadInputError
from dallekit.pipeline.embeddings import embedding_array, embedding_metadata, model_identity
from dallekit.pipeline.passes import hold_folder
from dallekit.pipeline.shards import input_identity
from dallekit.search.choice import choose_index
from tests.helpers import run_cli
from tests.stage_data import png_header_only, shape_jpeg, write_stage

RANDOM_TINY = model_identity("dallekit-tiny-clip", None, None)


@pytest.fixture(autouse=True)
def one_faiss_thread():
    """faiss on one OpenMP thread: on a shared 2-core machine its threads' barriers wait out other work, 10x on these tiny indexes."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 20) -> np.ndarray:
    """Unit vectors around a few centres, as CLIP embeddings of a real folder are."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_folders(tmp_path, images: np.ndarray, texts: np.ndarray | None = None, shards: int = 3, identity: dict = RANDOM_TINY,
                 jpegs: list[bytes] | None = None):
    """A filter stage folder (uid, caption, jpg, width) and its embeddings folder, written as `dallekit embed` would."""
    n, dim = images.shape
    texts = images if texts is None else texts
    stage, embed = tmp_path / "filter", tmp_path / "embed"
    bounds = np.linspace(0, n, shards + 1).astype(int)
    rows = [[{"uid": f"{i:016x}", "caption": f"caption {i}", "jpg": jpegs[i] if jpegs else shape_jpeg(i % 7, size=32), "width": i}
             for i in range(lo, hi)] for lo, hi in zip(bounds[:-1], bounds[1:])]
    write_stage(stage, rows, stage="filter")
    embed.mkdir()
    for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        table = pa.table({"uid": [f"{i:016x}" for i in range(lo, hi)], "image_embedding": embedding_array(images[lo:hi]),
                          "text_embedding": embedding_array(texts[lo:hi])})
        pq.write_table(table.replace_schema_metadata(embedding_metadata(identity, dim)), embed / f"part-{s:05d}.parquet")
    (embed / "_fingerprint.json").write_text(json.dumps({"input": input_identity(str(stage), ("filter",)), "model": identity}))
    (embed / "_stats.json").write_text(json.dumps({"stage": "embed", "shards": shards, "rows_in": n, "rows_out": n, "rows_rejected": 0}))
    (embed / "_SUCCESS").write_text("")
    return stage, embed


def test_auto_picks_exact_then_hnsw_then_ivfpq_as_the_budget_shrinks():
    assert choose_index(50_000, 512, 4 * 10**9).kind == "flat"
    assert choose_index(1_000_000, 512, 4 * 10**9).factory == "HNSW32"
    assert choose_index(1_000_000, 512, 10**9).kind == "ivfpq"
    assert choose_index(1_000_000, 512, 10**9).estimated_bytes <= 10**9
    assert choose_index(1_000_000, 512, 10**8).params["m"] < choose_index(1_000_000, 512, 10**9).params["m"]
    with pytest.raises(BadInputError, match="too small for 1000000 vectors"):
        choose_index(1_000_000, 512, 10**6)


def test_top_hit_of_a_stored_vector_is_its_own_row_joined_to_the_stage(tmp_path):
    vectors = clustered(600, 32)
    stage, embed = make_folders(tmp_path, vectors)
    info = dallekit.search.build_index(str(embed), str(tmp_path / "index"))
    assert info["kind"] == "flat" and info["rows"] == 600 and sorted(os.listdir(tmp_path / "index")) == ["index.faiss", "index.json", "rows.parquet"]
    index = dallekit.search.open(str(tmp_path / "index"))
    for i in (0, 299, 599):
        hits = index.vector(vectors[i], k=5)
        assert hits["uid"][0] == f"{i:016x}" and hits["caption"][0] == f"caption {i}" and hits["width"][0] == i
        assert hits["jpg"][0] == shape_jpeg(i % 7, size=32) and hits["score"].is_monotonic_decreasing and len(hits) == 5
    assert index.vector(vectors[3], k=5000)["uid"].nunique() == 600  # k beyond the rows: every row once
    dallekit.search.write_grid(index.vector(vectors[0], k=3), str(tmp_path / "grid.png"))
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.format == "PNG" and grid.width >= 3 * 128


def test_hnsw_and_ivfpq_find_the_exact_top_hits_on_clustered_data(tmp_path):
    vectors = clustered(3000, 32, clusters=40)
    _, embed = make_folders(tmp_path, vectors, texts=clustered(3000, 32, seed=1, clusters=40))
    rng = np.random.default_rng(2)
    queries = vectors[rng.choice(3000, 20, replace=False)] + 0.05 * rng.standard_normal((20, 32)).astype(np.float32)  # near a stored row
    found = {}
    for kind in ("flat", "hnsw", "ivfpq"):
        info = dallekit.search.build_index(str(embed), str(tmp_path / kind), kind=kind)
        assert info["kind"] == kind
        index = dallekit.search.open(str(tmp_path / kind))
        found[kind] = [list(index.nearest(q, k=10)["uid"]) for q in queries]
    for kind in ("hnsw", "ivfpq"):  # scores are exact cosines of the stored (float16) vectors, whatever the index
        hits = dallekit.search.open(str(tmp_path / kind)).nearest(queries[0], k=5)
        stored = vectors[[int(u, 16) for u in hits["uid"]]].astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(hits["score"], stored @ queries[0], atol=1e-5)
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found["flat"], found[kind])])
        assert overlap >= 0.8, (kind, overlap)
        assert np.mean([a[0] == b[0] for a, b in zip(found["flat"], found[kind])]) >= 0.8


def test_hits_name_their_embeddings_shard_and_row_and_each_shard_is_opened_once(tmp_path, monkeypatch):
    from dallekit.search import query
    vectors = clustered(600, 32)
    _, embed = make_folders(tmp_path, vectors)  # shards of rows 0-199, 200-399, 400-599
    for kind in ("flat", "hnsw"):
        dallekit.search.build_index(str(embed), str(tmp_path / kind), kind=kind)
        index = dallekit.search.open(str(tmp_path / kind))
        for i in (0, 199, 200, 599):
            hit = index.nearest(vectors[i], k=3).iloc[0]
            assert (hit["uid"], hit["shard"], hit["row"], hit["id"]) == (f"{i:016x}", f"part-{i // 200:05d}", i % 200, i), kind
        reopened = []
        monkeypatch.setattr(query, "open_shard", lambda path, _open=query.open_shard: reopened.append(path) or _open(path))
        for i in (0, 199, 200, 599):  # every shard was opened by the queries above
            index.nearest(vectors[i], k=3)
        assert reopened == [], kind
        monkeypatch.undo()


def test_an_index_json_whose_shards_do_not_add_up_to_its_rows_is_refused(tmp_path):
    _, embed = make_folders(tmp_path, clustered(60, 16))
    dallekit.search.build_index(str(embed), str(tmp_path / "index"))
    info = json.loads((tmp_path / "index" / "index.json").read_text())
    info["shards"] = info["shards"][:-1]
    (tmp_path / "index" / "index.json").write_text(json.dumps(info))
    with pytest.raises(BadInputError, match="shards hold 40 rows, not the 60"):
        dallekit.search.open(str(tmp_path / "index"))


def test_an_index_older_than_its_embeddings_is_refused(tmp_path, capsys):
    vectors = clustered(300, 16)
    _, embed = make_folders(tmp_path, vectors)
    dallekit.search.build_index(str(embed), str(tmp_path / "index"))
    shard = embed / "part-00001.parquet"
    table = pq.read_table(shard)
    pq.write_table(table.set_column(1, "image_embedding", embedding_array(clustered(table.num_rows, 16, seed=9))), shard)
    with pytest.raises(BadInputError, match="older than its embeddings folder.*rebuild with `dallekit index`"):
        dallekit.search.open(str(tmp_path / "index"))
    code, err = run_cli(capsys, "search", tmp_path / "index", "a shape")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "rebuild with `dallekit index`" in err
    dallekit.search.build_index(str(embed), str(tmp_path / "index"))  # the rebuild is the fix
    assert dallekit.search.open(str(tmp_path / "index")).info["rows"] == 300


def test_a_stage_rerun_since_it_was_embedded_is_refused(tmp_path):
    stage, embed = make_folders(tmp_path, clustered(100, 16))
    dallekit.search.build_index(str(embed), str(tmp_path / "index"))
    table = pq.read_table(stage / "part-00000.parquet")
    pq.write_table(table.set_column(1, "caption", pa.array(["recaptioned"] * table.num_rows)), stage / "part-00000.parquet")
    with pytest.raises(BadInputError, match="changed since .* was computed from it"):
        dallekit.search.open(str(tmp_path / "index"))


def test_a_clip_other_than_the_embeddings_model_is_refused_naming_both(tmp_path, capsys):
    _, embed = make_folders(tmp_path, clustered(200, 16))
    dallekit.search.build_index(str(embed), str(tmp_path / "index"))
    with pytest.raises(BadInputError, match="dallekit-tiny-clip .*dallekit-tiny-rn-clip"):
        dallekit.search.open(str(tmp_path / "index"), clip_model="dallekit-tiny-rn-clip")
    code, err = run_cli(capsys, "search", tmp_path / "index", "a shape", "--clip-model", "dallekit-tiny-rn-clip")
    assert code == 2 and "dallekit-tiny-clip" in err and "dallekit-tiny-rn-clip" in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """The tiny CLIP with random weights, saved as a local checkpoint folder."""
    from dallekit.models.clip import load_clip, save_clip

    folder = tmp_path_factory.mktemp("clip") / "clip"
    save_clip(load_clip("dallekit-tiny-clip", None), "dallekit-tiny-clip", str(folder))
    return str(folder), load_clip("dallekit-tiny-clip", None, checkpoint=str(folder))


@pytest.mark.slow  # torch, open_clip and two CLIP loads: ~10 s
def test_text_and_image_queries_through_the_index_clip_from_the_cli(tmp_path, capsys, tiny_clip):
    from dallekit.images import decode_rgb

    folder, scorer = tiny_clip
    jpegs = [shape_jpeg(i, size=48) for i in range(40)]
    images = scorer.embed_images([decode_rgb(j) for j in jpegs]).numpy()
    texts = scorer.embed_texts([f"caption {i}" for i in range(40)]).numpy()
    _, embed = make_folders(tmp_path, images, texts, shards=2, identity=model_identity("dallekit-tiny-clip", None, folder), jpegs=jpegs)
    assert run_cli(capsys, "index", embed, "--out", tmp_path / "index")[0] == 0
    (tmp_path / "query.jpg").write_bytes(jpegs[17])
    code, err = run_cli(capsys, "search", tmp_path / "index", "--image", tmp_path / "query.jpg", "-k", "3", "--grid", tmp_path / "hits.png")
    out = capsys.readouterr().out if code else ""
    assert code == 0, err
    hits = dallekit.search.open(str(tmp_path / "index")).image(str(tmp_path / "query.jpg"), k=3)
    assert hits["uid"][0] == f"{17:016x}" and hits["score"][0] > 0.99, out
    assert (tmp_path / "hits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, err = run_cli(capsys, "search", tmp_path / "index", "caption 5", "-k", "4", "--grid", tmp_path / "text.png")
    assert code == 0, err and (tmp_path / "text.png").exists()
    expected = np.argsort(-(images @ scorer.embed_texts(["caption 5"]).numpy()[0]))[0]
    assert dallekit.search.open(str(tmp_path / "index")).text("caption 5", k=4)["uid"][0] == f"{expected:016x}"
    (tmp_path / "huge.png").write_bytes(png_header_only(20000, 20000))
    code, err = run_cli(capsys, "search", tmp_path / "index", "--image", tmp_path / "huge.png")
    assert code == 2 and "huge.png" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["k0", "missing", "no_json", "corrupt_json", "truncated", "empty", "not_embeddings", "held"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    stage, embed = make_folders(tmp_path, clustered(100, 16))
    index = tmp_path / "index"
    dallekit.search.build_index(str(embed), str(index))
    args = ["search", index, "a shape"]
    if case == "k0":
        args += ["-k", "0"]
    elif case == "missing":
        args[1] = tmp_path / "nowhere"
    elif case == "no_json":
        (index / "index.json").unlink()
    elif case == "corrupt_json":
        (index / "index.json").write_text("{not json")
    elif case == "truncated":
        (index / "index.faiss").write_bytes((index / "index.faiss").read_bytes()[:100])
    elif case == "empty":
        for shard in embed.glob("part-*.parquet"):
            table = pq.read_table(shard)
            pq.write_table(table.slice(0, 0), shard)
        args = ["index", embed, "--out", tmp_path / "index2"]
    elif case == "not_embeddings":
        args = ["index", stage, "--out", tmp_path / "index2"]
    else:
        args = ["index", embed, "--out", index]
    if case == "held":
        with hold_folder(str(index), "index"):
            code, err = run_cli(capsys, *args)
        assert "another dallekit run is writing it" in err
    else:
        code, err = run_cli(capsys, *args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("dallekit: error:")


@pytest.mark.slow
def test_the_embed_stage_then_index_and_search_join_hits_past_its_rejected_rows(tmp_path, capsys, client, tiny_clip):
    from dallekit.config import EmbedConfig
    from dallekit.pipeline.embed import embed
    from tests.stage_data import downloaded_row

    folder, _ = tiny_clip
    rows = [[downloaded_row(f"u{s}{i:02d}", f"shape {s} {i}", shape_jpeg(10 * s + i, size=48) if i % 4 else b"not an image")
             for i in range(12)] for s in range(2)]
    write_stage(tmp_path / "clean", rows)
    embed(str(tmp_path / "clean"), str(tmp_path / "embed"), EmbedConfig(clip_checkpoint=folder, device="cpu"), client)
    assert run_cli(capsys, "index", tmp_path / "embed", "--out", tmp_path / "index")[0] == 0
    (tmp_path / "q.jpg").write_bytes(shape_jpeg(17, size=48))
    hits = dallekit.search.open(str(tmp_path / "index")).image(str(tmp_path / "q.jpg"), k=5)
    assert hits["uid"][0] == "u107" and hits["caption"][0] == "shape 1 7" and hits["jpg"][0] == shape_jpeg(17, size=48)
    assert len(hits) == 5 and all(u[-2:] not in ("00", "04", "08") for u in hits["uid"])  # rejected rows are not in the index


def test_a_rebuild_is_answered_refused_or_redone_by_what_changed(tmp_path, capsys):
    _, embed = make_folders(tmp_path, clustered(200, 16))
    index = tmp_path / "index"
    dallekit.search.build_index(str(embed), str(index), kind="hnsw")
    built = (index / "index.faiss").stat().st_mtime_ns
    dallekit.search.build_index(str(embed), str(index), kind="hnsw")  # the same: answered from index.json
    assert (index / "index.faiss").stat().st_mtime_ns == built
    code, err = run_cli(capsys, "index", embed, "--out", index, "--kind", "flat")
    assert code == 2 and "holds an index of other options" in err and "--overwrite" in err
    other = tmp_path / "other"
    other.mkdir()
    _, other_embed = make_folders(other, clustered(50, 16, seed=3))
    with pytest.raises(BadInputError, match="holds an index of the embeddings .*embed; give another folder"):
        dallekit.search.build_index(str(other_embed), str(index), kind="hnsw")
    assert dallekit.search.build_index(str(other_embed), str(index), kind="flat", overwrite=True)["rows"] == 50
    (index / "index.faiss").write_bytes(b"damaged")  # the same index with a damaged file is built again
    assert dallekit.search.build_index(str(other_embed), str(index), kind="flat")["rows"] == 50
    assert dallekit.search.open(str(index)).info["kind"] == "flat"


def test_hits_read_only_the_stage_row_groups_that_hold_them(tmp_path, monkeypatch):
    """A stage shard's images are read by the row groups holding a hit, not the whole shard, per query."""
    from dallekit.io import BLOB_ROW_GROUP, write_table_atomic
    from dallekit.search import query

    vectors = clustered(3 * BLOB_ROW_GROUP, 16)
    stage, embed = make_folders(tmp_path, vectors, shards=1)
    shard = stage / "part-00000.parquet"
    table = pq.read_table(shard)
    shard.unlink()
    write_table_atomic(table, str(shard))  # as the stages write image shards: row groups of BLOB_ROW_GROUP rows
    (embed / "_fingerprint.json").write_text(json.dumps({"input": input_identity(str(stage), ("filter",)), "model": RANDOM_TINY}))
    assert pq.ParquetFile(shard).metadata.num_row_groups == 3
    dallekit.search.build_index(str(embed), str(tmp_path / "index"))
    reads = []
    real = query.read_row_groups
    monkeypatch.setattr(query, "read_row_groups", lambda f, path, groups, columns: reads.append((list(groups), columns)) or real(f, path, groups, columns))
    hit = dallekit.search.open(str(tmp_path / "index")).vector(vectors[BLOB_ROW_GROUP + 5], k=1)
    assert hit["uid"].tolist() == [f"{BLOB_ROW_GROUP + 5:016x}"] and hit["jpg"].notna().all()
    assert [groups for groups, columns in reads if columns is None] == [[1]]  # whole rows: the hit's group only
