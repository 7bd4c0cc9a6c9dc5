"""The README's Python API example runs as a script; without its __main__ guard the error names the cause."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.stage_data import downloaded_row, shape_jpeg, write_stage

README = Path(__file__).parent.parent / "README.md"


def stage_function_example() -> str:
    """The README's code block that calls a stage function from a script."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return next(b for b in blocks if "dask_client(" in b and "from dallekit.pipeline.clean import clean" in b)


@pytest.mark.slow
def test_readme_stage_function_example_runs_as_a_script(tmp_path):
    rows = [downloaded_row(f"{i:016x}", f"a shape number {i}", shape_jpeg(i, size=32), size=(32, 32)) for i in range(4)]
    write_stage(tmp_path / "runs" / "demo" / "download", [rows])
    (tmp_path / "example.py").write_text(stage_function_example())
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "4 rows kept" in proc.stdout and (tmp_path / "runs" / "clean-again" / "_SUCCESS").exists()


@pytest.mark.slow
def test_an_unguarded_script_is_told_to_add_the_main_guard(tmp_path):
    rows = [downloaded_row(f"{i:016x}", f"a shape number {i}", shape_jpeg(i, size=32), size=(32, 32)) for i in range(2)]
    write_stage(tmp_path / "runs" / "demo" / "download", [rows])
    code = stage_function_example().replace('if __name__ == "__main__":\n', "if True:\n")
    (tmp_path / "example.py").write_text(code)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert 'start the cluster under `if __name__ == "__main__":`' in proc.stderr.splitlines()[-1], proc.stderr
    assert "--host" not in proc.stderr
