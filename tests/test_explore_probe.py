"""Hostile-input probe of issue 32 (embed, filter --embeddings, semantic dedup, index/search): each test is a defect found by probing."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dallekit.search
from dallekit.errors import BadInputError
from dallekit.pipeline.filter import embedding_scores
from dallekit.pipeline.semdedup.columns import read_vectors
from tests.test_search import RANDOM_TINY, clustered, make_folders


def _vectors(values: np.ndarray, dtype=np.float16) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.astype(dtype).reshape(-1)), values.shape[1])


def _tamper(table: pa.Table, case: str) -> pa.Table:
    """The first embeddings shard edited by hand the way `case` names."""
    n, meta = table.num_rows, table.schema.metadata

    def put(name, column):
        return table.set_column(table.schema.get_field_index(name), name, column).replace_schema_metadata(meta)

    rng = np.random.default_rng(1)
    if case == "wrong_dim":
        table = put("image_embedding", _vectors(rng.standard_normal((n, 8))))
        return put("text_embedding", _vectors(rng.standard_normal((n, 8))))
    if case == "float32":
        return put("image_embedding", _vectors(rng.standard_normal((n, 16)), np.float32))
    if case == "nan_vectors":
        return put("image_embedding", _vectors(np.full((n, 16), np.nan)))
    if case == "one_infinite_value":
        values = np.asarray(table.column("text_embedding").to_pylist(), np.float32)
        values[-1, 3] = np.inf
        return put("text_embedding", _vectors(values))
    if case == "null_vector":
        return put("image_embedding", pa.array([None] + table.column("image_embedding").to_pylist()[1:], table.schema.field("image_embedding").type))
    if case == "variable_list":
        return put("image_embedding", pa.array(table.column("image_embedding").to_pylist(), pa.list_(pa.float16())))
    if case == "null_uid":
        return put("uid", pa.array([None] + table.column("uid").to_pylist()[1:], pa.string()))
    if case == "duplicate_uid":
        return pa.concat_tables([table, table.slice(0, 1)]).replace_schema_metadata(meta)
    assert case == "no_metadata"
    return table.replace_schema_metadata(None)


CASES = ["wrong_dim", "float32", "nan_vectors", "one_infinite_value", "null_vector", "variable_list", "null_uid", "duplicate_uid", "no_metadata"]


def tampered_folders(tmp_path, case: str):
    stage, embed = make_folders(tmp_path, clustered(30, 16), shards=2)
    shard = embed / "part-00000.parquet"
    pq.write_table(_tamper(pq.read_table(shard), case), shard)
    return stage, embed


@pytest.mark.parametrize("case", CASES)
def test_filter_refuses_a_tampered_embeddings_shard_naming_it(tmp_path, case):
    # before: wrong_dim/float32/duplicate_uid/no_metadata scored silently, nan_vectors rejected rows as "undecodable",
    # null_uid/null_vector/variable_list raised a traceback (TypeError, ValueError, AttributeError)
    stage, embed = tampered_folders(tmp_path, case)
    path = stage / "part-00000.parquet"
    table = pq.read_table(path)
    task = SimpleNamespace(path=str(path), config=SimpleNamespace(embeddings=str(embed)))
    with pytest.raises(BadInputError, match="part-00000.parquet"):
        embedding_scores(task, table, list(range(table.num_rows)))


@pytest.mark.parametrize("case", CASES)
def test_semantic_dedup_reader_refuses_a_tampered_embeddings_shard(tmp_path, case):
    _, embed = tampered_folders(tmp_path, case)
    with pytest.raises(BadInputError, match="part-00000.parquet"):
        read_vectors(str(embed / "part-00000.parquet"), None, text=True)


@pytest.mark.parametrize("case", ["wrong_dim", "nan_vectors", "null_vector", "variable_list", "null_uid", "duplicate_uid"])
def test_index_refuses_a_tampered_embeddings_shard(tmp_path, case):
    _, embed = tampered_folders(tmp_path, case)
    with pytest.raises(BadInputError, match="part-00000.parquet"):
        dallekit.search.build_index(str(embed), str(tmp_path / "index"))


def test_search_refuses_an_index_json_whose_shard_names_a_path_outside_the_embeddings(tmp_path):
    # the embeddings shard's path is built from index.json's shard names: an edited one read <embed>/../outside/part-00000.parquet
    import json
    import shutil

    _, embed = make_folders(tmp_path, clustered(30, 16), shards=2)
    index = tmp_path / "index"
    dallekit.search.build_index(str(embed), str(index))
    (tmp_path / "outside").mkdir()
    shutil.copy(embed / "part-00000.parquet", tmp_path / "outside" / "part-00000.parquet")
    info = json.loads((index / "index.json").read_text())
    info["shards"][0][0] = "../outside/part-00000"
    (index / "index.json").write_text(json.dumps(info))
    with pytest.raises(BadInputError, match=r"index.json: shards name '\.\./outside/part-00000'; expected shard names"):
        dallekit.search.open(str(index)).vector(clustered(30, 16)[0], k=30)


def test_search_refuses_a_device_file_as_query_image_without_reading_it(tmp_path):
    # before: Path.read_bytes() read the whole file first: /dev/zero grows memory without end; /dev/null read as b""
    from dallekit.search.query import query_image

    with pytest.raises(BadInputError, match="/dev/null: not a regular file"):
        query_image("/dev/null")


def test_too_many_clusters_for_a_few_rows_names_a_bound_that_can_be_given():
    # before: "expected at most 0 (4 sampled rows per centroid); raise --semantic-dedup-sample" for 2 rows and 2 clusters,
    # though 1 cluster is accepted and every row was already sampled
    from dallekit.pipeline.semdedup import SemanticParams, choose_clusters

    with pytest.raises(BadInputError, match=r"expected at most 1 \(4 sampled rows per centroid, 2 sampled\)$"):
        choose_clusters(SemanticParams(eps=0.05, clusters=2, sample=1000), 2)
    assert choose_clusters(SemanticParams(eps=0.05, clusters=1, sample=1000), 2) == 1


def test_semantic_dedup_with_no_clip_accepts_the_embeddings_it_needs(tmp_path):
    # before: "--embeddings ...: given with --no-clip; the embeddings are read only for the CLIP score", so
    # --semantic-dedup-eps (which needs --embeddings) could never run with --no-clip
    import json

    from dallekit.config import FilterConfig
    from dallekit.pipeline.embeddings import embedding_array, embedding_metadata
    from dallekit.pipeline.filter import plan_filter
    from dallekit.pipeline.shards import input_identity
    from tests.stage_data import downloaded_row, shape_jpeg, write_stage

    stage, embed = tmp_path / "clean", tmp_path / "embed"
    write_stage(stage, [[downloaded_row(f"r{i:02d}", f"a shape number {i}", shape_jpeg(i, size=32)) for i in range(8)]], stage="clean")
    embed.mkdir()
    table = pa.table({"uid": [f"r{i:02d}" for i in range(8)], "image_embedding": embedding_array(clustered(8, 16)),
                      "text_embedding": embedding_array(clustered(8, 16, seed=1))})
    other_clip = {"model": "some-other-clip", "pretrained": None, "checkpoint": None}
    pq.write_table(table.replace_schema_metadata(embedding_metadata(other_clip, 16)), embed / "part-00000.parquet")
    (embed / "_fingerprint.json").write_text(json.dumps({"input": input_identity(str(stage), ("clean",)), "model": other_clip}))
    (embed / "_stats.json").write_text(json.dumps({"stage": "embed", "shards": 1, "rows_in": 8, "rows_out": 8, "rows_rejected": 0}))
    (embed / "_SUCCESS").write_text("")
    plan = plan_filter(str(stage), FilterConfig(clip=False, embeddings=str(embed), semantic_dedup_eps=0.1, languages=["any"]))
    assert plan.global_pass is not None
    with pytest.raises(BadInputError, match="--no-clip and no --semantic-dedup-eps"):
        plan_filter(str(stage), FilterConfig(clip=False, embeddings=str(embed), languages=["any"]))


INDEX_JSON_EDITS = {
    "no_embeddings": lambda info: info.pop("embeddings"),
    "embeddings_a_string": lambda info: info.update(embeddings="elsewhere"),
    "embeddings_path_null": lambda info: info["embeddings"].update(path=None),
    "search_param_text": lambda info: info.update(search={"efSearch": "lots"}),
    "search_param_unknown": lambda info: info.update(search={"bogus": 4}),
    "search_a_list": lambda info: info.update(search=[1]),
    "model_null": lambda info: info.update(model=None),
    "files_a_list": lambda info: info.update(files=[]),
    "file_entry_a_list": lambda info: info["files"].update({"index.faiss": [1]}),
}


@pytest.mark.parametrize("case", sorted(INDEX_JSON_EDITS))
def test_search_refuses_a_hand_edited_index_json_in_one_line(tmp_path, capsys, case):
    # before: KeyError, TypeError, ValueError, AttributeError or faiss's RuntimeError tracebacks (exit 1)
    import json

    from tests.helpers import run_cli

    _, embed = make_folders(tmp_path, clustered(30, 16), shards=2)
    index = tmp_path / "index"
    dallekit.search.build_index(str(embed), str(index))
    info = json.loads((index / "index.json").read_text())
    INDEX_JSON_EDITS[case](info)
    (index / "index.json").write_text(json.dumps(info))
    code, err = run_cli(capsys, "search", index, "a shape", "--grid", tmp_path / "grid.png")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "index.json" in err, err


def test_filter_names_a_stray_uid_when_the_embed_rejects_hold_a_null_one(tmp_path):
    # before: sorted() of {None, "zzz"} raised TypeError (a traceback) while naming the stray uid
    stage, embed = make_folders(tmp_path, clustered(30, 16), shards=2)
    (embed / "_rejects").mkdir()
    pq.write_table(pa.table({"uid": pa.array([None, "zzz"], pa.string()), "reason": ["no_image"] * 2}), embed / "_rejects" / "part-00000.parquet")
    path = stage / "part-00000.parquet"
    table = pq.read_table(path)
    task = SimpleNamespace(path=str(path), config=SimpleNamespace(embeddings=str(embed)))
    with pytest.raises(BadInputError, match="its uids are not the rows of"):
        embedding_scores(task, table, list(range(table.num_rows)))


def test_a_budget_too_small_for_a_few_vectors_names_max_memory_not_a_kind_never_given():
    # before: "--kind ivfpq: 24 vectors are too few to train an IVF-PQ index ..." though --kind was auto
    from dallekit.search.choice import choose_index

    with pytest.raises(BadInputError, match=r"^--max-memory 1\.0 KB: too small for 24 vectors of 64 dimensions"):
        choose_index(24, 64, 1000, "auto")
    with pytest.raises(BadInputError, match=r"^--kind ivfpq: 24 vectors are too few"):
        choose_index(24, 64, 1000, "ivfpq")


@pytest.mark.parametrize("device", ["cuda", "cuda:3"])
def test_a_cuda_device_the_machine_lacks_is_one_line_bad_input(monkeypatch, device):
    # before: `dallekit embed ... --device cuda` on a machine without a GPU ended in torch's RuntimeError traceback (exit 1)
    import torch

    from dallekit.models.weights import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(BadInputError, match=f"--device {device}: this machine has no CUDA device"):
        pick_device(device)
    assert pick_device("auto").type == "cpu"


def test_search_refuses_when_the_stage_folder_changed_since_it_was_embedded(tmp_path):
    # before: the hits were joined by uid to the stage's new rows: a hit showed an image its vector is not of
    stage, embed = make_folders(tmp_path, clustered(30, 16), shards=2)
    dallekit.search.build_index(str(embed), str(tmp_path / "index"))
    shard = stage / "part-00000.parquet"
    table = pq.read_table(shard)
    captions = pa.array([f"another picture {i}" for i in range(table.num_rows)])
    pq.write_table(table.set_column(table.schema.get_field_index("caption"), "caption", captions), shard)  # same uids, other rows
    with pytest.raises(BadInputError, match="filter: changed since .*embed was computed from it"):
        dallekit.search.open(str(tmp_path / "index")).vector(clustered(30, 16)[0], k=3)


def test_a_tampered_shards_message_names_the_row_or_uid():
    from dallekit.pipeline.embeddings import check_table, embedding_array, embedding_metadata

    vectors = clustered(3, 16)
    vectors[1, 4] = np.nan
    meta = embedding_metadata(RANDOM_TINY, 16)
    nan = pa.table({"uid": ["a", "b", "c"], "image_embedding": embedding_array(vectors)}).replace_schema_metadata(meta)
    twice = pa.table({"uid": ["a", "b", "a"], "image_embedding": embedding_array(clustered(3, 16))}).replace_schema_metadata(meta)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dallekit.pipeline.embeddings.shard_metadata", lambda path: {"dim": 16})
        with pytest.raises(BadInputError, match=r"s.parquet: column image_embedding holds a null, NaN or infinite vector \(row 1, uid b\)"):
            check_table("s.parquet", nan)
        with pytest.raises(BadInputError, match="s.parquet: column uid holds a more than once"):
            check_table("s.parquet", twice)
