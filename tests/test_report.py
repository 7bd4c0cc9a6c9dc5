"""The run report's training section."""

from __future__ import annotations

import json

import dallekit.jobs.report as report


def test_training_and_validation_image_loss_share_one_chart_with_the_published_step(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    lines = [{"step": s, "loss": 5 - s / 10, "text_loss": 4.0, "image_loss": 5 - s / 10} for s in range(1, 9)]
    lines[3] |= {"val_image_loss": 3.0}
    lines[7] |= {"val_image_loss": 3.5}
    (model / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    (model / "config.json").write_text(json.dumps({"best_step": 4, "best_val_image_loss": 3.0}))
    charts: dict[str, dict] = {}
    real_chart = report.line_chart

    def recording_chart(xs, series, title, *args, **kwargs):
        charts[title] = dict(zip(xs, zip(*series.values()))) | {"names": list(series)}
        return real_chart(xs, series, title, *args, **kwargs)

    monkeypatch.setattr(report, "line_chart", recording_chart)
    page = open(report.write_report(str(tmp_path))).read()
    assert "report/image_loss.png" in page and (tmp_path / "report" / "image_loss.png").stat().st_size > 0
    chart = charts["training and validation image loss"]
    assert chart["names"] == ["training image loss", "validation image loss", "published: step 4"]
    assert chart[4] == (4.6, 3.0, 3.0) and chart[8][:2] == (4.2, 3.5) and chart[8][2] != chart[8][2]  # NaN: no mark at step 8
    assert chart[1][1] != chart[1][1]  # no validation at step 1
    assert "lowest validation image loss (step 4)" in page
