"""What a stage's driver keeps per shard stays bounded: error kinds, not messages; capped counters."""

from __future__ import annotations

from dallekit.pipeline.download import error_kind
from dallekit.pipeline.shards import MAX_COUNTER_KEYS, summarize


def test_error_kind_drops_each_rows_url_and_sizes():
    assert error_kind("Refused http://a.example/x.jpg?y=1 (not allowed)") == error_kind("Refused https://b.example/z (not allowed)")
    assert error_kind("image_too_large: 20000x30000 pixels") == error_kind("image_too_large: 9000x12000 pixels")
    assert error_kind("HTTP Error 404: Not Found") == "HTTP Error 404: Not Found"  # short codes are the kind


def test_summarized_counters_keep_the_most_common_and_sum_the_rest():
    marks = [{"rows_in": 300, "rows_out": 0, "rows_rejected": 300, "reasons": {"failed_to_download": 300},
              "counters": {"error_message": {f"message {s}-{i}": 1 for i in range(150)} | {"timed out": 150}}}
             for s in range(2)]
    stats = summarize("download", marks, 1.0, None)
    counted = stats["counters"]["error_message"]
    assert len(counted) == MAX_COUNTER_KEYS + 1 and counted["timed out"] == 300
    assert sum(counted.values()) == 600 and counted["other"] == 600 - 300 - (MAX_COUNTER_KEYS - 1)
