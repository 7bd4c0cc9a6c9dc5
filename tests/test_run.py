"""`dallekit run` and `dallekit demo --quick` end to end: accounting, the report, the notebooks, resume after a kill."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dallekit.errors import BadInputError

STAGES = ["ingest", "download", "clean", "filter", "tokens"]
NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def dallekit_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dallekit.cli", *args]


def uids(folder: Path, rejects: bool = False) -> list[str]:
    folder = folder / "_rejects" if rejects else folder
    return [u for p in sorted(folder.glob("part-*.parquet")) for u in pq.read_table(p, columns=["uid"]).column("uid").to_pylist()]


def check_run_accounting(run: Path) -> None:
    """Every stage: rows in = rows out + rejected, each uid once, and each stage reads what the previous one kept."""
    previous_out = None
    for stage in STAGES:
        folder = run / stage
        stats = json.loads((folder / "_stats.json").read_text())
        kept, rejected = uids(folder), uids(folder, rejects=True)
        assert stats["rows_in"] == stats["rows_out"] + stats["rows_rejected"], stage
        assert (len(kept), len(rejected)) == (stats["rows_out"], stats["rows_rejected"]), stage
        if stage == "ingest":  # an input row repeated exactly has the uid of the row kept (uid = hash of url and caption)
            repeats = pq.read_table(folder / "_rejects", columns=["uid", "duplicate_of"]).to_pylist()
            rejected = [r["uid"] for r in repeats if r["uid"] != r["duplicate_of"]]
        assert len(set(kept)) == len(kept) and not set(kept) & set(rejected) and len(set(rejected)) == len(rejected), f"{stage}: a uid twice"
        assert sum(stats["reasons"].values()) == stats["rows_rejected"], stage
        if previous_out is not None:
            assert stats["rows_in"] == previous_out, f"{stage} read {stats['rows_in']} rows, the previous stage kept {previous_out}"
        previous_out = stats["rows_out"]


@pytest.mark.slow
def test_quick_demo_accounts_for_every_row(quick_demo):
    check_run_accounting(quick_demo)
    stdout = (quick_demo / "stdout.txt").read_text()
    assert "demo: pixel check, seen pairs" in stdout and "zero-shot pairs" in stdout
    records = [json.loads(line) for line in (quick_demo / "samples" / "samples.jsonl").read_text().splitlines()]
    assert {"prompt", "file", "rank", "clip_score"} <= set(records[0])
    assert all((quick_demo / "samples" / r["file"]).is_file() for r in records)
    assert len({r["prompt"] for r in records}) == 24  # every foreground/shape pair
    ranked = sorted((r for r in records if r["prompt"] == records[0]["prompt"]), key=lambda r: r["rank"])
    assert [r["clip_score"] for r in ranked] == sorted((r["clip_score"] for r in ranked), reverse=True)


@pytest.mark.slow
def test_quick_demo_report_references_existing_images(quick_demo):
    page = (quick_demo / "report.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) >= 10
    missing = [s for s in sources if not (quick_demo / s).is_file()]
    assert not missing, missing
    for section in ("Funnel", "Captions and images", "Image tokenizer: dVAE", "Transformer training", "Evaluation on held-out captions", "Pixel check", "Samples"):
        assert f"<h2>{section}" in page, section
    for figure in ("report/funnel.png", "report/caption_words.png", "report/image_short_side.png", "report/codebook_usage.png",
                   "report/loss.png", "eval/clip_vs_n.png"):
        assert figure in sources, figure
    assert "zero-shot" in page and "random candidate right" in page


def _burn_cpu(seconds: float) -> int:
    end, spins = time.process_time() + seconds, 0
    while time.process_time() < end:
        spins += 1
    return spins


def test_step_timer_counts_the_dask_workers_cpu(client, tmp_path):
    from dallekit.jobs.timing import StepTimer, load_timings

    timer = StepTimer()
    with timer.step("on-workers", client):
        client.gather(client.map(_burn_cpu, [1.0, 1.0], pure=False))  # 2 CPU seconds on the workers, ~none here
    with timer.step("here"):
        _burn_cpu(0.5)
    timer.save(str(tmp_path))
    rows = {r["step"]: r for r in load_timings(tmp_path)}
    assert rows["on-workers"]["cpu_s"] >= 1.9, rows  # the workers' seconds, not the driver's idle wait
    assert 0.45 <= rows["here"]["cpu_s"] < 1.0 and rows["here"]["wall_s"] >= 0.45, rows


@pytest.mark.slow
def test_quick_demo_times_every_step_in_summary_and_report(quick_demo):
    rows = json.loads((quick_demo / "timings.json").read_text())
    steps = [r["step"] for r in rows]
    assert steps == ["generate", "ingest", "download", "clean", "train-clip", "embed", "filter", "train-tokenizer", "train-bpe", "encode",
                     "train", "sample", "evaluate"]
    assert all(r["wall_s"] > 0 and r["cpu_s"] > 0 for r in rows), rows
    by_step = {r["step"]: r for r in rows}
    assert by_step["train-tokenizer"]["cpu_s"] > 0.5 * by_step["train-tokenizer"]["wall_s"], by_step  # the trainer runs in this process
    stdout = (quick_demo / "stdout.txt").read_text()
    assert "demo: time per step" in stdout and re.search(r"demo:\s+train-tokenizer\s+[\d.]+\s+[\d.]+", stdout)
    page = (quick_demo / "report.html").read_text()
    assert "<h2>Time per step" in page and "<td>train-tokenizer</td>" in page


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_execute_on_the_quick_demo(quick_demo, notebook, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("DALLEKIT_RUN", str(quick_demo))
    nb = nbformat.read(notebook, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), f"{notebook.name} is stored with outputs"
    NotebookClient(nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}).execute()
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_load_stage_gives_kept_and_rejected_rows(tmp_path):
    import dallekit
    from tests.stage_data import downloaded_row, shape_jpeg, write_stage

    write_stage(tmp_path / "s", [[downloaded_row(f"{i:016x}", "a red circle", shape_jpeg(i)) for i in range(3)]])
    frame = dallekit.load_stage(str(tmp_path / "s"))
    assert frame.compute()["uid"].tolist() == [f"{i:016x}" for i in range(3)]
    rejected = dallekit.load_stage(str(tmp_path / "s"), rejects=True).compute()
    assert len(rejected) == 0 and "reason" in rejected.columns


def pipeline_toml(tmp_path: Path, url_list: Path, dvae: Path) -> Path:
    config = tmp_path / "pipeline.toml"
    config.write_text(f"""
[run]
inputs = ["{url_list}"]
dvae = "{dvae}"
stop_after = "encode"
[cluster]
workers = 2
[ingest]
shard_size = 10
[download]
threads = 4
timeout = 5
image_size = 32
[clean]
near_dup_distance = -1
[filter]
clip = false
min_side = 100
""")
    return config


@pytest.mark.slow
def test_run_killed_midway_then_rerun_equals_an_uninterrupted_run(tmp_path, shapes_server, trained_dvae):
    from dallekit.demo.job import write_url_list

    server, rows = shapes_server
    url_list = tmp_path / "urls.csv"
    write_url_list(str(url_list), rows, server)
    config = pipeline_toml(tmp_path, url_list, trained_dvae[0])
    whole = subprocess.run(dallekit_cli("run", "--config", str(config), "--out", str(tmp_path / "whole")),
                           capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]
    check_run_accounting(tmp_path / "whole")
    # kill the whole process group once some download shards are done, then rerun the same command
    out = tmp_path / "killed"
    proc = subprocess.Popen(dallekit_cli("run", "--config", str(config), "--out", str(out)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while len(list((out / "download" / "_progress").glob("*.json"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "tokens" / "_SUCCESS").exists()
    again = subprocess.run(dallekit_cli("run", "--config", str(config), "--out", str(out)), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    check_run_accounting(out)
    for stage in STAGES:
        for rejects in (False, True):
            columns = ["uid", "reason"] if rejects else (["uid", "text_tokens", "image_tokens"] if stage == "tokens" else ["uid"])
            a, b = (sorted(map(tuple, read_rows(run / stage, columns, rejects))) for run in (tmp_path / "whole", out))
            assert a == b, (stage, rejects)


def read_rows(folder: Path, columns: list[str], rejects: bool) -> list[list]:
    folder = folder / "_rejects" if rejects else folder
    rows = []
    for path in sorted(folder.glob("part-*.parquet")):
        table = pq.read_table(path, columns=columns).to_pydict()
        rows += [[tuple(v) if isinstance(v, list) else v for v in row] for row in zip(*table.values())]
    return rows


def test_pipeline_config_errors_are_bad_input(tmp_path):
    from dallekit.jobs.steps import load_pipeline

    with pytest.raises(BadInputError, match=r"unknown section \[trian\]"):
        load_pipeline({"run": {"inputs": ["x.csv"]}, "trian": {}}, "p.toml")
    with pytest.raises(BadInputError, match=r"p.toml \[run\]: inputs = \[\]: expected at least one value"):
        load_pipeline({"run": {}}, "p.toml")
    with pytest.raises(BadInputError, match=r"p.toml \[train\]: unknown key 'max_step'"):
        load_pipeline({"run": {"inputs": ["x.csv"]}, "train": {"max_step": 3}}, "p.toml")
    with pytest.raises(BadInputError, match=r"p.toml \[run\]: stop_after = 'trian': expected one of ingest"):
        load_pipeline({"run": {"inputs": ["x.csv"], "stop_after": "trian"}}, "p.toml")


@pytest.mark.slow
def test_run_cli_with_missing_inputs_is_one_line_exit_2(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text(f'[run]\ninputs = ["{tmp_path / "nope.csv"}"]\n')
    proc = subprocess.run(dallekit_cli("run", "--config", str(config), "--out", str(tmp_path / "o")), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "nope.csv" in proc.stderr, proc.stderr


def test_example_configs_load():
    """Every packaged config loads, and each value it sets reaches the pipeline's config of its section."""
    from dallekit.config import load_toml
    from dallekit.jobs.steps import load_pipeline

    root = Path(__file__).parent.parent / "dallekit" / "configs"
    paths = {path.name: path for path in root.glob("*.toml")}
    assert {"demo.toml", "cc3m.toml", "small-real.toml"} <= set(paths), sorted(paths)
    for path in paths.values():
        toml = load_toml(str(path))
        toml.pop("quick", None)  # the demo's --quick overrides, not a section
        assert {"run", "ingest", "download", "filter", "train-tokenizer", "train", "sample", "evaluate"} <= set(toml), path.name
        toml["run"].setdefault("inputs", ["urls.csv"])
        pipeline = load_pipeline(toml, str(path))
        for section, values in toml.items():
            options = getattr(pipeline, section.replace("-", "_"))
            for key, value in values.items():
                assert getattr(options, key) == value, f"{path.name} [{section}] {key}"


def test_every_stage_is_one_entry_of_stages_and_every_run_step_one_entry_of_the_step_table():
    import importlib
    import inspect

    from dallekit.cli import COMMANDS
    from dallekit.commands import HANDLERS
    from dallekit.config import RUN_STEPS
    from dallekit.jobs.steps import RUN_STEP_TABLE
    from dallekit.pipeline.registry import STAGES

    assert [step.name for step in RUN_STEP_TABLE] == RUN_STEPS  # [run] stop_after's choices are the steps, in order
    assert {step.name for step in RUN_STEP_TABLE if step.dask} <= set(STAGES)
    dask_commands = {c.name for c in COMMANDS if c.dask}
    for name, entry in STAGES.items():
        module = importlib.import_module(entry.module)
        assert name in dask_commands and name in HANDLERS, name
        assert callable(getattr(module, entry.python_name)), f"{entry.module} has no function named {name}"
        plan_inputs = list(inspect.signature(getattr(module, f"plan_{entry.python_name}")).parameters)[:-1]  # its config comes last
        assert len(plan_inputs) == len(entry.inputs) + len(entry.option_inputs), (name, plan_inputs)


def test_a_new_stage_entry_is_a_subcommand_with_its_inputs_and_options():
    from dallekit.cli import stage_command
    from dallekit.commands import stage_inputs
    from dallekit.pipeline.registry import STAGES, StageEntry

    entry = StageEntry("caption-stats", "cleaned shards -> caption statistics", (("cleaned", "", "a clean folder"),), "statistics",
                       "CleanConfig")
    command = stage_command(entry)
    assert (command.name, command.dask, command.positionals) == ("caption-stats", True, [("cleaned", "", "a clean folder")])
    assert command.out_help == "output folder of statistics shards" and list(command.sections) == ["caption-stats"]
    args = argparse.Namespace(filtered="runs/f", dvae="runs/tok", cleaned="runs/c")
    assert stage_inputs("encode", args) == ["runs/f", "runs/tok"]  # positionals, then the options that are inputs
    assert "caption-stats" not in STAGES and entry.module == "dallekit.pipeline.caption_stats"


def test_run_config_sections_the_run_refuses_are_not_offered(tmp_path):
    from dallekit.config import RUN_SECTION_NAMES
    from dallekit.jobs.steps import SECTIONS

    assert sorted(SECTIONS) == sorted(RUN_SECTION_NAMES)  # what the CLI checks is what the Pipeline reads
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    config = tmp_path / "p.toml"
    config.write_text(f'[run]\ninputs = ["{tmp_path / "urls.csv"}"]\n[trian]\nmax_steps = 3\n')
    proc = subprocess.run(dallekit_cli("run", "--config", str(config), "--out", str(tmp_path / "o")), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown section [trian]" in proc.stderr, proc.stderr
    offered = proc.stderr.split("(expected: ", 1)[1].rstrip(")\n").split(", ")
    assert sorted(offered) == sorted(RUN_SECTION_NAMES) and "export" not in offered  # every section offered is one `run` reads


def run_folder_config(tmp_path: Path, **run) -> Path:
    """A pipeline config over a one-row URL list, with extra [run] keys."""
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a cat\n")
    extra = "".join(f'{k} = "{v}"\n' for k, v in run.items())
    config = tmp_path / "p.toml"
    config.write_text(f'[run]\ninputs = ["{tmp_path / "urls.csv"}"]\n{extra}')
    return config


@pytest.mark.slow
def test_a_bad_run_dvae_is_refused_before_any_stage_runs(tmp_path):
    (tmp_path / "not-a-dvae").mkdir()
    config = run_folder_config(tmp_path, dvae=tmp_path / "not-a-dvae")
    proc = subprocess.run(dallekit_cli("run", "--config", str(config), "--out", str(tmp_path / "o")), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not-a-dvae: expected a model folder" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "o" / "ingest").exists()


def test_run_out_in_a_stage_folder_is_refused(tmp_path):
    from tests.stage_data import downloaded_row, shape_jpeg, write_stage

    write_stage(tmp_path / "download", [[downloaded_row("a" * 16, "a cat", shape_jpeg(0, size=32))]])
    before = sorted(p.name for p in (tmp_path / "download").iterdir())
    config = run_folder_config(tmp_path)
    for out in (tmp_path / "download", tmp_path / "download" / "run"):
        proc = subprocess.run(dallekit_cli("run", "--config", str(config), "--out", str(out)), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "a dallekit stage folder (_stats.json)" in proc.stderr, proc.stderr
    assert sorted(p.name for p in (tmp_path / "download").iterdir()) == before  # nothing written inside the stage
