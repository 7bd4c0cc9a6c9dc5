"""An import-linter contract: only the pass engine names mark files, leases and the `_work/` layout.

The engine (`dallekit/pipeline/passes.py`) is the one place that knows what a mark looks like on
disk and where scratch lives; every other module asks it (`run_pass`, `read_marks`, `work_dir`).
This contract reads each module's source and fails on a string constant (docstrings aside) that
spells one of those names, so a second mark format cannot creep back in.
"""

from __future__ import annotations

import ast
import pathlib

from importlinter import Contract, ContractCheck, fields, output

ENGINE_NAMES = ("_progress", "_done/", "_work", "_lease", "_consumed", "_layout")


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the docstring nodes of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def engine_names_outside(root: pathlib.Path, engine: str) -> list[str]:
    """'module:line: "string"' for each string constant outside the engine that names its files."""
    broken = []
    for path in sorted(root.rglob("*.py")):
        module = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        if module == engine:
            continue
        tree = ast.parse(path.read_text(), str(path))
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                if any(name in node.value for name in ENGINE_NAMES):
                    broken.append(f"{module}:{node.lineno}: {node.value!r}")
    return broken


class EngineNamesContract(Contract):
    """Only `engine` may spell the names of mark files, leases and the `_work/` layout."""

    engine = fields.StringField()

    def check(self, graph, verbose: bool) -> ContractCheck:
        root = pathlib.Path(__file__).resolve().parent.parent / self.session_options["root_packages"][0]
        broken = engine_names_outside(root, str(self.engine))
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["broken"]:
            output.print_error(f"{line} names an engine file; ask dallekit.pipeline.passes instead", bold=False)
