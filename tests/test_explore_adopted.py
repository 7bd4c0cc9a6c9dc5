"""Issue 32's chain on a stage folder made from an adopted img2dataset output: embed, filter with semantic dedup, index, search."""

from __future__ import annotations

import pytest

import dallekit.search
from dallekit.config import AdoptConfig, CleanConfig, EmbedConfig, FilterConfig
from dallekit.pipeline.adopt import adopt
from dallekit.pipeline.clean import clean
from dallekit.pipeline.embed import embed
from dallekit.pipeline.filter import filter as filter_stage
from tests.helpers import check_accounting
from tests.test_adopt import img2dataset_parquet

TINY = dict(clip_model="dallekit-tiny-clip", clip_pretrained=None, device="cpu")


@pytest.mark.slow
def test_embed_semantic_dedup_index_and_search_on_an_adopted_img2dataset_folder(tmp_path, client):
    img2dataset_parquet(tmp_path, 30, seed=5, broken_fraction=0.2)
    adopt(str(tmp_path / "img2dataset"), str(tmp_path / "adopted"), AdoptConfig(), client)
    cleaned = clean(str(tmp_path / "adopted"), str(tmp_path / "clean"), CleanConfig(near_dup_distance=-1), client)["rows_out"]
    embed(str(tmp_path / "clean"), str(tmp_path / "embed"), EmbedConfig(**TINY), client)
    config = FilterConfig(**TINY, min_side=0, max_aspect=10, languages=["any"], clip_threshold=-1.0,
                          embeddings=str(tmp_path / "embed"), semantic_dedup_eps=0.02)
    filter_stage(str(tmp_path / "clean"), str(tmp_path / "filter"), config, client)
    kept, rejects = check_accounting(tmp_path / "filter", cleaned)
    assert set(rejects["reason"]) <= {"semantic_duplicate"}  # every other rule is open: only the dedup drops
    duplicates = rejects[rejects["reason"] == "semantic_duplicate"]
    assert set(duplicates["duplicate_of"]) <= set(kept["uid"]) | set(duplicates["uid"])
    assert (duplicates["semantic_similarity"] > 1 - 0.02).all() and kept["semantic_cluster"].notna().all()

    dallekit.search.build_index(str(tmp_path / "embed"), str(tmp_path / "index"))
    hits = dallekit.search.open(str(tmp_path / "index")).text("a red circle on a blue background", k=5)
    assert len(hits) == 5 and hits["jpg"].notna().all() and set(hits["uid"]) <= set(kept["uid"]) | set(rejects["uid"])
    assert hits["score"].is_monotonic_decreasing
