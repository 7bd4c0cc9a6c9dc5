"""One config system: TOML sections give defaults, command-line options override, bad values are bad input."""

from __future__ import annotations

import pytest

from dallekit.cli import build_parser
from dallekit.config import (
    DownloadConfig,
    IngestConfig,
    build_config,
    load_toml,
)
from dallekit.errors import BadInputError


def parse(*argv):
    return build_parser().parse_args(list(argv))


def test_defaults_follow_img2dataset():
    config = build_config(DownloadConfig, parse("download", "in", "--out", "o"))
    assert (config.image_size, config.resize_mode, config.timeout, config.retries) == (256, "center_crop", 10, 0)
    assert config.max_image_area == 64e6 and config.compute_hash == "sha256"  # a bomb is refused by its header
    assert config.disallowed_header_directives == ["noai", "noimageai", "noindex", "noimageindex"]


def test_toml_then_command_line(tmp_path):
    path = tmp_path / "pipeline.toml"
    path.write_text('[download]\nimage-size = 128\nthreads = 8\nmax_aspect_ratio = 2\n[ingest]\nshard_size = 5\n')
    toml = load_toml(str(path))
    config = build_config(DownloadConfig, parse("download", "in", "--out", "o", "--threads", "4"), toml["download"])
    assert (config.image_size, config.threads, config.max_aspect_ratio) == (128, 4, 2.0)
    assert build_config(IngestConfig, parse("ingest", "x", "--out", "o"), toml["ingest"]).shard_size == 5


@pytest.mark.parametrize(
    "section, message",
    [({"image_sise": 1}, "unknown key 'image_sise'"), ({"resize_mode": "stretch"}, "expected one of no, keep_ratio"), ({"threads": "many"}, "expected int")],
)
def test_bad_toml_values(section, message):
    with pytest.raises(BadInputError, match=message):
        build_config(DownloadConfig, parse("download", "in", "--out", "o"), section)


def test_bad_toml_file(tmp_path):
    (tmp_path / "bad.toml").write_text("[download\n")
    with pytest.raises(BadInputError, match="bad.toml: not valid TOML"):
        load_toml(str(tmp_path / "bad.toml"))
    with pytest.raises(BadInputError, match="config file not found"):
        load_toml(str(tmp_path / "missing.toml"))


def test_toml_is_read_with_tomli_where_the_standard_library_has_no_tomllib(monkeypatch, tmp_path):
    """Python 3.10 has no tomllib: config falls back to tomli, whose API tomllib copied."""
    import importlib.util
    import sys
    import types

    import tomllib

    import dallekit.config

    calls = []
    tomli = types.ModuleType("tomli")
    tomli.TOMLDecodeError = tomllib.TOMLDecodeError
    tomli.loads = lambda text: calls.append(text) or tomllib.loads(text)
    monkeypatch.setitem(sys.modules, "tomllib", None)  # `import tomllib` raises ModuleNotFoundError, as on 3.10
    monkeypatch.setitem(sys.modules, "tomli", tomli)
    # a second copy of the module, so the one every other module imported keeps its classes
    spec = importlib.util.spec_from_file_location("dallekit_config_without_tomllib", dallekit.config.__file__)
    fallback = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fallback)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(fallback)
    assert fallback.tomllib is tomli
    path = tmp_path / "c.toml"
    path.write_text("[ingest]\nshard_size = 7\n")
    assert fallback.load_toml(str(path)) == {"ingest": {"shard_size": 7}}
    assert calls == ["[ingest]\nshard_size = 7\n"]
    path.write_text("[ingest\n")
    with pytest.raises(BadInputError, match="not valid TOML"):
        fallback.load_toml(str(path))
