"""Every subcommand checks its options the same way, from the command line and from TOML: exit 2 and one line naming the option."""

from __future__ import annotations

import pytest

from dallekit.cli import build_parser, main
from dallekit.config import (
    DownloadConfig,
    FilterConfig,
    RunConfig,
    build_config,
    load_toml,
)
from dallekit.errors import BadInputError
from tests.helpers import run_cli

STAGE_IN = ["in", "--out", "out"]
TRAINED = ["--model", "m", "--dvae", "d", "--out", "out"]

BAD_OPTIONS = [
    ("ingest", STAGE_IN + ["--shard-size", "0"], "--shard-size 0"),
    ("ingest", STAGE_IN + ["--format", "xls"], "--format"),
    ("download", STAGE_IN + ["--workers", "-2"], "--workers -2"),
    ("download", STAGE_IN + ["--retries", "-3"], "--retries -3"),
    ("download", STAGE_IN + ["--timeout", "0"], "--timeout 0"),
    ("download", STAGE_IN + ["--encode-quality", "200"], "--encode-quality 200"),
    ("download", STAGE_IN + ["--encode-format", "png", "--encode-quality", "95"], "--encode-quality 95"),
    ("download", STAGE_IN + ["--compute-hash", "sha999"], "--compute-hash"),
    ("download", STAGE_IN + ["--threads", "0"], "--threads 0"),
    ("download", STAGE_IN + ["--image-size", "-5"], "--image-size -5"),
    ("download", STAGE_IN + ["--max-image-area", "0"], "--max-image-area 0"),
    ("download", STAGE_IN + ["--max-aspect-ratio", "nan"], "--max-aspect-ratio nan"),
    ("clean", STAGE_IN + ["--max-caption-chars", "-1"], "--max-caption-chars -1"),
    ("clean", STAGE_IN + ["--near-dup-distance", "100"], "--near-dup-distance 100"),
    ("filter", STAGE_IN + ["--languages", "en", "klingon"], "--languages 'klingon'"),
    ("filter", STAGE_IN + ["--clip-top-fraction", "2"], "--clip-top-fraction 2"),
    ("filter", STAGE_IN + ["--clip-batch-size", "0"], "--clip-batch-size 0"),
    ("filter", STAGE_IN + ["--min-lang-score", "1.5"], "--min-lang-score 1.5"),
    ("encode", STAGE_IN + ["--dvae", "d", "--batch-size", "0"], "--batch-size 0"),
    ("train", STAGE_IN + ["--grad-accum", "0"], "--grad-accum 0"),
    ("train", STAGE_IN + ["--lr", "-1"], "--lr -1"),
    ("train", STAGE_IN + ["--checkpoint-every", "0"], "--checkpoint-every 0"),
    ("train", STAGE_IN + ["--log-every", "0"], "--log-every 0"),
    ("train", STAGE_IN + ["--batch-size", "0"], "--batch-size 0"),
    ("train", STAGE_IN + ["--max-steps", "0"], "--max-steps 0"),
    ("train", STAGE_IN + ["--dropout", "1"], "--dropout 1"),
    ("train", STAGE_IN + ["--val-fraction", "1"], "--val-fraction 1"),
    ("train-dvae", STAGE_IN + ["--batch-size", "0"], "--batch-size 0"),
    ("train-dvae", STAGE_IN + ["--max-steps", "0"], "--max-steps 0"),
    ("train-dvae", STAGE_IN + ["--val-percent", "0"], "--val-percent 0"),
    ("train-clip", STAGE_IN + ["--batch-size", "1"], "--batch-size 1"),
    ("sample", TRAINED + ["--prompt", "a", "-n", "0"], "-n 0"),
    ("sample", TRAINED + ["--prompt", "a", "--batch-size", "0"], "--batch-size 0"),
    ("sample", TRAINED + ["--prompt", "a", "-n", "2", "--keep", "4"], "--keep 4"),
    ("sample", TRAINED + ["--prompt", "a", "--top-p", "0"], "--top-p 0"),
    ("sample", TRAINED + ["--prompt", "a", "--temperature", "0"], "--temperature 0"),
    ("evaluate", TRAINED + ["--tokens", "t", "-n", "0"], "-n 0"),
    ("evaluate", TRAINED + ["--tokens", "t", "--captions", "0"], "--captions 0"),
    ("decode", STAGE_IN + ["--dvae", "d", "--limit", "0"], "--limit 0"),
    ("train-bpe", STAGE_IN + ["--vocab-size", "10"], "--vocab-size 10"),
    ("demo", ["--samples", "0"], "--samples 0"),
    ("demo", ["--workers", "-2"], "--workers -2"),
    ("run", ["--config", "c.toml", "--stop-after", "nothing"], "--stop-after"),
    ("download", STAGE_IN + ["--timeout", "inf"], "--timeout inf: expected a finite number"),
    ("train", STAGE_IN + ["--lr", "inf"], "--lr inf: expected a finite number"),
    ("train", STAGE_IN + ["--device", "garbage"], "--device 'garbage'"),
    ("filter", STAGE_IN + ["--clip-pretrained", ""], "--clip-pretrained '': expected a non-empty value"),
    ("download", STAGE_IN + ["--user-agent-token", "bot\r\nX-Evil: 1"], "--user-agent-token"),
    ("sample", TRAINED + ["--prompt", "a", "-n", "100000000000000000000", "--keep", "1"], "-n 100000000000000000000"),
    ("sample", TRAINED + ["--prompt", "a", "--temperature", "1e-300"], "--temperature 1e-300"),
    ("encode", STAGE_IN + ["--dvae", "d", "--keep-columns", "uid"], "--keep-columns 'uid'"),
    ("encode", STAGE_IN + ["--dvae", "d", "--keep-columns", "width", "width"], "--keep-columns 'width'"),
    ("clean", STAGE_IN + ["--host", "::1"], "--host '::1'"),
]


@pytest.mark.parametrize("command, args, needle", BAD_OPTIONS, ids=[f"{c}{a[-2]}{a[-1]}" for c, a, _ in BAD_OPTIONS])
def test_bad_option_is_one_line_and_exit_2(capsys, command, args, needle):
    with pytest.raises(SystemExit) as exit_info:
        main([command, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err


@pytest.mark.parametrize(
    "toml, needle",
    [
        ("[download]\nthreads = 0\n", "[download]: threads = 0"),
        ("[download]\nthreads = 4.5\n", "threads = 4.5: expected int"),
        ("[download]\nretries = true\n", "retries = True: expected int"),
        ("[download]\ndisallowed_header_directives = [1, 2]\n", "expected a list of str"),
        ("[downlaod]\nthreads = 4\n", "unknown section [downlaod]"),
        ("download = 3\n", "download must be a [download] table"),
        ("[cluster]\nworkers = -2\n", "[cluster]: workers = -2"),
        ("[filter]\nlanguages = \"klingon\"\n", "[filter]: languages = 'klingon'"),
        ("[filter]\nlanguages = []\n", "[filter]: languages = []: expected at least one value"),
    ],
)
def test_bad_toml_is_one_line_and_exit_2(tmp_path, capsys, toml, needle):
    (tmp_path / "c.toml").write_text(toml)
    command = "filter" if "filter" in toml else "download"
    code, err = run_cli(capsys, command, tmp_path, "--out", tmp_path / "out", "--config", tmp_path / "c.toml")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err and "c.toml" in err, err


def test_a_lone_string_for_a_list_option_is_a_one_element_list(tmp_path):
    (tmp_path / "c.toml").write_text('[download]\ndisallowed_header_directives = "noai"\n[filter]\nlanguages = "en"\n'
                                     '[run]\ninputs = "/data/urls.tsv"\n')
    toml = load_toml(str(tmp_path / "c.toml"))
    args = build_parser().parse_args(["download", "in", "--out", "o"])
    assert build_config(DownloadConfig, args, toml["download"]).disallowed_header_directives == ["noai"]  # not ['n', 'o', 'a', 'i']
    assert build_config(FilterConfig, args, toml["filter"]).languages == ["en"]
    assert build_config(RunConfig, args, toml["run"]).inputs == ["/data/urls.tsv"]


def test_prompts_file_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "prompts.txt").write_bytes(b"a red circle\n\xff\xfe a square\n")
    code, err = run_cli(capsys, "sample", *TRAINED, "--prompts", tmp_path / "prompts.txt")
    assert code == 2 and err.count("\n") == 1 and "prompts.txt: not UTF-8" in err, err


def test_corrupt_weights_are_one_line_errors(tmp_path, capsys):
    from dallekit.models.dvae import DVAE, DVAEConfig, config_dict
    from dallekit.models.weights import save_model
    from dallekit.tokenize.image import ImageTokenizer

    config = DVAEConfig(image_size=16, codebook_size=16, n_groups=2, n_hid=8, n_blk_per_group=1, n_init=8)
    folder = tmp_path / "dvae"
    save_model(folder, DVAE(config), config_dict(config))
    ImageTokenizer.load(str(folder), "cpu")  # a good folder loads
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage}" + bytes(100))
    with pytest.raises(BadInputError, match="model.safetensors: not a readable safetensors file"):
        ImageTokenizer.load(str(folder), "cpu")
    (folder / "config.json").write_text('{"model": "dallekit-dalle"')  # truncated
    code, err = run_cli(capsys, "sample", "--model", folder, "--dvae", folder, "--prompt", "a", "--out", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "config.json: not valid JSON" in err, err


def test_unreachable_scheduler_address_is_one_line(tmp_path, capsys):
    from tests.stage_data import downloaded_row, shape_jpeg, write_stage

    write_stage(tmp_path / "download", [[downloaded_row("00000000000000aa", "a red circle", shape_jpeg(1, size=32))]])
    code, err = run_cli(capsys, "clean", tmp_path / "download", "--out", tmp_path / "c", "--scheduler", "garbage")
    assert code == 2 and err.count("\n") == 1 and "--scheduler garbage" in err, err
