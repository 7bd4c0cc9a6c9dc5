"""The FSQ image tokenizer: the quantizer against the paper's definition, training, its losses, one interface with the dVAE, bad input."""

from __future__ import annotations

import itertools
import json
import math
import re
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

import dallekit.training.tokenizer as train_module
from dallekit.config import EncodeConfig, TrainTokenizerConfig
from dallekit.models.discriminator import DiscriminatorConfig, PatchDiscriminator
from dallekit.models.dvae import DVAE, dvae_config, save_dvae_config
from dallekit.models.fsq import FSQ, FSQ_PRESETS, FSQAutoencoder, fsq_config, save_fsq_config
from dallekit.models.perceptual import load_perceptual_loss, vgg16_features
from dallekit.models.weights import save_model
from dallekit.pipeline.encode import encode_shard, plan_encode
from dallekit.tokenize.image import ImageTokenizer
from dallekit.tokenize.tokens import token_metadata, token_table
from dallekit.training.loop import read_metrics
from dallekit.training.tokenizer import train_tokenizer
from tests.helpers import run_cli
from tests.stage_data import downloaded_row, shape_jpeg, write_stage


def shapes_stage(folder, n: int = 40):
    rows = [downloaded_row(f"{i:016x}", f"shape {i}", shape_jpeg(i, size=48)) for i in range(n)]
    write_stage(folder, [rows[: n // 2], rows[n // 2 :]])
    return folder


def small_options(**overrides) -> TrainTokenizerConfig:
    """fsq-tiny made small: a few steps of 4 images, the discriminator on from step 4."""
    return TrainTokenizerConfig(**{"preset": "fsq-tiny", "max_steps": 12, "batch_size": 4, "checkpoint_every": 4, "log_every": 1,
                                   "val_percent": 20, "shuffle_buffer": 16, "disc_start": 4, "dtype": "fp32"} | overrides)


# ------------------------------------------------------------------ the quantizer


@pytest.mark.parametrize("levels", [[8, 6, 5], [8, 5, 5, 5], [7, 5, 5, 5, 5]])
def test_quantizer_follows_the_papers_definition(levels):
    """Mentzer et al. 2023: bound with a shifted tanh, round to L values, code id = mixed-radix number of (value + L//2)."""
    fsq = FSQ(levels)
    z = torch.linspace(-20, 20, 4001).view(1, 1, -1, 1).expand(1, len(levels), -1, 1).contiguous()
    values, codes = fsq(z)
    for i, level in enumerate(levels):
        rounded = sorted(set((values[0, i] * (level // 2)).round().long().flatten().tolist()))
        assert rounded == list(range(-(level // 2), level - level // 2))  # exactly L integers, from -floor(L/2)
        half_l = (level - 1) * (1 - 1e-3) / 2
        offset = 0.5 if level % 2 == 0 else 0.0
        expected = torch.tanh(z[0, i] + math.atanh(offset / half_l)) * half_l - offset
        assert torch.allclose(values[0, i] * (level // 2), expected.round(), atol=1e-5)
    basis = np.cumprod([1] + levels[:-1])
    digits = torch.stack([(values[0, i] * (levels[i] // 2)).round().long() + levels[i] // 2 for i in range(len(levels))])
    assert torch.equal(codes[0], (digits * torch.tensor(basis).view(-1, 1, 1)).sum(0))


@pytest.mark.parametrize("levels", [[8, 6, 5], [5, 3]])
def test_every_code_id_round_trips_through_its_values(levels):
    fsq = FSQ(levels)
    every = torch.arange(math.prod(levels)).view(1, -1, 1)
    values = fsq.codes_to_values(every)
    assert values.abs().max() <= 1
    half = torch.tensor([lv // 2 for lv in levels]).view(1, -1, 1, 1)
    z = torch.atanh(((values * half + torch.tensor([0.5 if lv % 2 == 0 else 0 for lv in levels]).view(1, -1, 1, 1))
                     / torch.tensor([(lv - 1) * (1 - 1e-3) / 2 for lv in levels]).view(1, -1, 1, 1)).clamp(-0.999, 0.999))
    shift = torch.tensor([math.atanh((0.5 if lv % 2 == 0 else 0) / ((lv - 1) * (1 - 1e-3) / 2)) for lv in levels]).view(1, -1, 1, 1)
    _, codes = fsq(z - shift)  # latents that bound to exactly those values
    assert torch.equal(codes, every)


def test_a_level_of_two_gives_two_values_and_no_nan_codes():
    """At L = 2 the paper's h = (L-1)(1-eps)/2 is below the 1/2 offset: atanh(offset/h) was NaN and so were the codes."""
    fsq = FSQ([2, 3])
    torch.manual_seed(0)
    values, codes = fsq(torch.randn(1, 2, 64, 64) * 6)
    assert not values.isnan().any()
    assert sorted(set((values[0, 0]).round().long().flatten().tolist())) == [-1, 0]
    assert sorted(set(codes.flatten().tolist())) == list(range(6))
    assert torch.equal(fsq.codes_to_values(codes), values)


def test_straight_through_gradient_is_the_bounds():
    fsq = FSQ([8, 5, 5, 5])
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    values, _ = fsq(z)
    values.sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (fsq.bound(z2) / torch.tensor([4, 2, 2, 2]).view(1, -1, 1, 1)).sum().backward()
    assert torch.allclose(z.grad, z2.grad)


def test_presets_cover_the_issues_grids_and_code_counts():
    grids = {name: (fsq_config(name).image_size, fsq_config(name).grid, fsq_config(name).codebook_size) for name in FSQ_PRESETS}
    assert grids["fsq-tiny"] == (32, 8, 1000) and grids["fsq-tiny-240"] == (32, 8, 240)
    assert grids["fsq-small"] == (64, 16, 1000) and grids["fsq-base"] == (64, 16, 4375)
    model = FSQAutoencoder(fsq_config("fsq-tiny")).eval()
    x = torch.rand(2, 3, 32, 32)
    codes = model.encode(x)
    assert codes.shape == (2, 8, 8) and codes.max() < 1000
    recon, train_codes = model(x)
    assert torch.equal(codes, train_codes) and torch.allclose(model.decode(codes), recon.clamp(0, 1), atol=1e-5)


# ------------------------------------------------------------------ training


@pytest.mark.slow
def test_training_resumes_exactly_after_a_kill(tmp_path, monkeypatch):
    data = shapes_stage(tmp_path / "filtered")
    train_tokenizer(str(data), str(tmp_path / "straight"), small_options(hflip=True))
    real_save = train_module.save_checkpoint

    def save_then_die(out, model, optimizer, step, extra, ema=None):
        real_save(out, model, optimizer, step, extra, ema)
        if step == 8:
            raise KeyboardInterrupt  # killed right after the step-8 checkpoint, the discriminator already training

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_tokenizer(str(data), str(tmp_path / "resumed"), small_options(hflip=True))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    train_tokenizer(str(data), str(tmp_path / "resumed"), small_options(hflip=True, resume=True))
    straight, resumed = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 13))
    assert "d_loss" in straight[-1] and "d_loss" not in straight[2]  # the discriminator starts at disc_start
    for a, b in zip(straight[8:], resumed[8:]):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    a, b = (ImageTokenizer.load(str(tmp_path / name), "cpu").model.state_dict() for name in ("straight", "resumed"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the published (EMA) weights too


def test_resume_with_other_options_or_kind_is_one_line_naming_them(tmp_path, capsys):
    """Weights of another architecture were loaded before the settings were compared: a RuntimeError traceback."""
    data = shapes_stage(tmp_path / "filtered", 8)
    train_tokenizer(str(data), str(tmp_path / "tok"), small_options(max_steps=1, batch_size=2, val_percent=30))
    capsys.readouterr()  # the progress bar's last line
    base = ["train-tokenizer", data, "--out", tmp_path / "tok", "--resume", "--max-steps", "1", "--batch-size", "2", "--val-percent", "30",
            "--dtype", "fp32"]
    cases = [
        (["--preset", "fsq-tiny", "--disc-start", "4", "--levels", "8", "6", "5"], "another preset or options (levels [8, 5, 5, 5] -> [8, 6, 5])"),
        (["--preset", "fsq-tiny-240", "--disc-start", "4"], "another preset or options (levels [8, 5, 5, 5] -> [8, 6, 5])"),
        (["--preset", "fsq-tiny", "--disc-start", "4", "--hflip"], "another preset or options (hflip False -> True)"),
        (["--preset", "tiny"], "a checkpoint of another kind of model (no 'dvae' settings in it)"),
    ]
    for options, needle in cases:
        code, err = run_cli(capsys, *base, *options)
        assert code == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err, (options, err)


def raw_weights(folder, options: TrainTokenizerConfig) -> dict:
    """The tokenizer's own (not averaged) weights, from the run's checkpoint."""
    model = train_module.FSQTraining(train_module.build_fsq_config(options))
    train_module.load_checkpoint(folder, model, torch.optim.AdamW(model.parameters()))
    return model.tokenizer.state_dict()


@pytest.mark.slow
def test_published_weights_are_the_moving_average(tmp_path):
    data = shapes_stage(tmp_path / "filtered")
    for name, decay in (("ema", 0.9), ("plain", 0.0)):
        options = small_options(max_steps=4, ema_decay=decay)
        train_tokenizer(str(data), str(tmp_path / name), options)
        published, raw = ImageTokenizer.load(str(tmp_path / name), "cpu").model.state_dict(), raw_weights(tmp_path / name, options)
        same = all(torch.equal(published[k], raw[k]) for k in published)
        assert same == (decay == 0), name
    config = json.loads((tmp_path / "ema" / "config.json").read_text())
    assert config["model"] == "dallekit-fsq" and config["codebook_size"] == 1000 and config["levels"] == [8, 5, 5, 5]


def test_moving_average_arithmetic():
    from dallekit.training.loop import EMA

    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.0)
    ema = EMA(layer, decay=0.5)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 4.0], start=1):
        with torch.no_grad():
            layer.weight.fill_(value)
        ema.update(layer)
        rate = 1 - min(0.5, (1 + n) / (10 + n))
        expected += rate * (value - expected)
        assert ema.shadow["weight"].item() == pytest.approx(expected)
    with ema.applied(layer):
        assert layer.weight.item() == pytest.approx(expected)
    assert layer.weight.item() == 4.0


def test_perceptual_loss_from_a_local_weights_file(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "vgg16.safetensors"
    save_file({f"features.{k}": v for k, v in vgg16_features().state_dict().items()}, str(weights))
    loss = load_perceptual_loss(weights)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).item() == pytest.approx(0, abs=1e-6) and loss(x, y).item() > 0
    data = shapes_stage(tmp_path / "filtered")
    train_tokenizer(str(data), str(tmp_path / "tok"), small_options(max_steps=2, perceptual_weights=str(weights)))
    assert all("perceptual" in r for r in read_metrics(tmp_path / "tok" / "metrics.jsonl"))


# ------------------------------------------------------------------ one interface


def fsq_folder(path, preset: str = "fsq-tiny"):
    torch.manual_seed(0)
    config = fsq_config(preset)
    save_model(path, FSQAutoencoder(config), save_fsq_config(config))
    return path


def dvae_folder(path):
    torch.manual_seed(0)
    config = dvae_config("tiny")
    save_model(path, DVAE(config), save_dvae_config(config))
    return path


def test_encode_writes_fsq_codes_and_names_the_tokenizer(tmp_path):
    write_stage(tmp_path / "filtered", [[downloaded_row(f"u{i}", f"a shape {i}", shape_jpeg(i, size=64)) for i in range(5)]])
    folder = fsq_folder(tmp_path / "fsq")
    (task,) = plan_encode(str(tmp_path / "filtered"), str(folder), EncodeConfig(device="cpu")).tasks(None, str(tmp_path / "tokens"))
    kept = encode_shard(task.payload).kept
    codes = np.array(kept.column("image_tokens").to_pylist())
    assert codes.shape == (5, 64) and codes.max() < 1000
    meta = json.loads(kept.schema.metadata[b"dallekit"])["image_tokenizer"]
    assert meta["kind"] == "dallekit-fsq" and meta["levels"] == [8, 5, 5, 5] and meta["codebook_size"] == 1000 and meta["grid"] == 8


def test_tokens_of_one_tokenizer_refused_by_another(tmp_path, capsys):
    dvae = ImageTokenizer.load(str(dvae_folder(tmp_path / "dvae")))
    fsq_folder(tmp_path / "fsq")
    (tmp_path / "tokens").mkdir()
    metadata = token_metadata(dvae.metadata(), {"kind": "clip-bpe", "vocab_size": 49408})
    pq.write_table(token_table(["u"], ["c"], [[1]], np.zeros((1, 64)), metadata), tmp_path / "tokens" / "part-00000.parquet")
    code, err = run_cli(capsys, "decode", tmp_path / "tokens", "--tokenizer", tmp_path / "fsq", "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "dallekit-dvae" in err and "dallekit-fsq" in err, err
    from dallekit.models.transformer import DalleTransformer, config_dict, dalle_config

    model = DalleTransformer(dalle_config("tiny", text_vocab=49408, image_vocab=128, grid=8))
    save_model(tmp_path / "model", model, config_dict(model.config) | {"tokens": metadata})
    code, err = run_cli(capsys, "sample", "--model", tmp_path / "model", "--tokenizer", tmp_path / "fsq", "--prompt", "a cat", "--out", tmp_path / "s")
    assert code == 2 and err.count("\n") == 1 and "levels [8, 5, 5, 5]" in err and "dallekit-dvae (128 codes" in err, err
    assert "fsq: is the image tokenizer dallekit-fsq" in err, err  # the folder is a tokenizer, not tokens "made by" one
    code, err = run_cli(capsys, "decode", tmp_path / "tokens", "--dvae", tmp_path / "dvae", "--out", tmp_path / "out")
    assert code == 0, err  # the dVAE that made them, by its old option name


def test_decode_refuses_codes_the_tokenizer_does_not_have(tmp_path, capsys):
    """A hand-made token file: FSQ wrapped codes >= its code count silently, the dVAE's one_hot and a wrong row length raised tracebacks."""
    for name, folder in (("fsq", fsq_folder(tmp_path / "fsq")), ("dvae", dvae_folder(tmp_path / "dvae"))):
        entry = ImageTokenizer.load(str(folder), "cpu").metadata()
        metadata = token_metadata(entry, {"kind": "clip-bpe", "vocab_size": 49408})
        for codes, needle in ((np.full((2, 64), 65535), f"image token 65535 in row 0, expected codes below {entry['codebook_size']}"),
                              (np.zeros((1, 16)), "image_tokens rows of 16 codes, expected 64 (8x8 grid)")):
            made_as = dict(metadata, image_tokenizer=entry | {"grid": int(codes.shape[1] ** 0.5)})  # the written rows' own length
            table = token_table(["u"] * len(codes), ["c"] * len(codes), [[1]] * len(codes), codes, made_as)
            (tmp_path / "tokens").mkdir(exist_ok=True)
            pq.write_table(table.replace_schema_metadata({b"dallekit": json.dumps(metadata).encode()}), tmp_path / "tokens" / "part-00000.parquet")
            code, err = run_cli(capsys, "decode", tmp_path / "tokens", "--tokenizer", folder, "--out", tmp_path / f"out-{name}")
            assert code == 2 and err.count("\n") == 1 and f"part-00000.parquet: {needle}" in err, (name, err)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize("options, needle", [
    (["--levels", "8", "1", "5"], "--levels [8, 1, 5]: expected whole numbers of at least 2"),
    (["--levels", "64", "64", "64"], "--levels [64, 64, 64]: expected at most 65535 codes"),
    (["--image-size", "30"], "--image-size 30: expected a multiple of 4"),
    (["--preset", "tiny", "--levels", "8", "5", "5", "5"], "--levels [8, 5, 5, 5]: expected an FSQ preset"),
    (["--recon-loss", "mse"], "--recon-loss 'mse': expected a dVAE preset"),
    (["--image-size", "8"], "--image-size 8: expected a number >= 12"),  # the discriminator's convolutions need 12 px
    (["--image-size", "100000"], "--image-size 100000: expected a number >= 12 and <= 1024"),  # 30 GB a decoded image
    (["--preset", "tiny", "--hflip"], "--hflip True: expected an FSQ preset"),  # the dVAE trainer ignored it
    (["--preset", "tiny", "--disc-weight", "0"], "--disc-weight 0.0: expected an FSQ preset"),
])
def test_bad_levels_and_sizes_are_one_line_at_the_option(tmp_path, capsys, options, needle):
    shapes_stage(tmp_path / "filtered", 4)
    code, err = run_cli(capsys, "train-tokenizer", tmp_path / "filtered", "--out", tmp_path / "tok", "--preset", "fsq-tiny", *options)
    assert code == 2 and err.count("\n") == 1 and needle in err and not (tmp_path / "tok" / "model.safetensors").exists(), err


def test_bad_weights_files_are_one_line(tmp_path, capsys, monkeypatch):
    shapes_stage(tmp_path / "filtered", 4)
    pickled = tmp_path / "vgg.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, pickled)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load reached"))
    wrong = tmp_path / "wrong.safetensors"
    state = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()} | {"features.0.weight": torch.zeros(64, 3, 5, 5)}
    save_file(state, str(wrong))
    as_ints = tmp_path / "vgg_int.safetensors"  # loaded into the float tower silently
    save_file({f"features.{k}": v.to(torch.int8) for k, v in vgg16_features().state_dict().items()}, str(as_ints))
    disc = tmp_path / "disc.safetensors"
    save_file({"layers.0.weight": torch.zeros(1, 1, 1, 1)}, str(disc))
    narrow = tmp_path / "disc32.safetensors"  # a discriminator of another width
    save_file(PatchDiscriminator(DiscriminatorConfig(32, 2)).state_dict(), str(narrow))
    disc_ints = tmp_path / "disc_int.safetensors"
    save_file({k: v.to(torch.int32) for k, v in PatchDiscriminator(DiscriminatorConfig(64, 2)).state_dict().items()}, str(disc_ints))
    (tmp_path / "folder.safetensors").mkdir()
    cases = [
        (["--perceptual-weights", tmp_path / "missing.safetensors"], "no such file"),
        (["--perceptual-weights", pickled], "a pickle (torch.save) file"),
        (["--perceptual-weights", wrong], "features.0.weight has shape (64, 3, 5, 5), VGG16 expects (64, 3, 3, 3)"),
        (["--discriminator-init", pickled], "a pickle (torch.save) file"),
        (["--discriminator-init", disc], "weights do not fit"),
        (["--discriminator-init", narrow], "weights do not fit the PatchDiscriminator ('layers.0.weight' has shape (32, 3, 4, 4), expected (64, 3, 4, 4))"),
        (["--discriminator-init", disc_ints], "'layers.0.weight' holds int32 values, expected floating-point weights"),  # trained on silently
        (["--perceptual-weights", as_ints], "vgg_int.safetensors: not usable VGG16 feature weights ('features.0.weight' holds int8 values"),
        (["--perceptual-weights", tmp_path / "folder.safetensors"], "folder.safetensors: a folder (expected VGG16"),
    ]
    for options, needle in cases:
        code, err = run_cli(capsys, "train-tokenizer", tmp_path / "filtered", "--out", tmp_path / "tok", "--preset", "fsq-tiny",
                            "--max-steps", "1", *options)
        assert code == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err, (options, err)
        assert not (tmp_path / "tok" / "model.safetensors").exists(), options


def test_old_section_and_command_names_still_work(tmp_path, capsys):
    shapes_stage(tmp_path / "filtered", 8)
    (tmp_path / "old.toml").write_text("[train-dvae]\npreset = 'tiny'\nmax_steps = 2\nbatch_size = 2\ncheckpoint_every = 2\nval_percent = 30\n")
    code, err = run_cli(capsys, "train-dvae", tmp_path / "filtered", "--out", tmp_path / "tok", "--config", tmp_path / "old.toml")
    assert code == 0, err
    assert json.loads((tmp_path / "tok" / "config.json").read_text())["model"] == "dallekit-dvae"
    (tmp_path / "both.toml").write_text("[train-dvae]\nmax_steps = 2\n[train-tokenizer]\nmax_steps = 2\n")
    code, err = run_cli(capsys, "train-tokenizer", tmp_path / "filtered", "--out", tmp_path / "t2", "--config", tmp_path / "both.toml")
    assert code == 2 and "same section" in err


@pytest.mark.parametrize("edit, needle", [
    ({"model": ["dallekit-fsq"]}, "config.json says model ['dallekit-fsq'], expected an image tokenizer"),  # was a TypeError traceback
    ({"channel_mult": []}, "channel_mult []: expected a list of whole numbers"),  # was an IndexError traceback
    ({"width": 0}, "width 0: expected a whole number of at least 1"),  # was a torch warning line before the error
    ({"image_size": "32"}, "image_size '32': expected a whole number"),  # was "not all arguments converted during string formatting"
    ({"levels": [8, 6, 5]}, "weights do not fit the FSQAutoencoder ('encoder.conv_out.weight' has shape (4, 128, 1, 1), expected (3, 128, 1, 1))"),
])
def test_hand_edited_tokenizer_config_is_one_line_naming_the_setting(tmp_path, capsys, edit, needle):
    folder = fsq_folder(tmp_path / "fsq")
    (tmp_path / "tokens").mkdir()
    metadata = token_metadata(ImageTokenizer.load(str(folder), "cpu").metadata(), {"kind": "clip-bpe", "vocab_size": 49408})
    pq.write_table(token_table(["u"], ["c"], [[1]], np.zeros((1, 64)), metadata), tmp_path / "tokens" / "part-00000.parquet")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | edit))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning is a second line on stderr
        code, err = run_cli(capsys, "decode", tmp_path / "tokens", "--tokenizer", folder, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_tokenizer_weights_that_do_not_fit_are_named(tmp_path):
    """Integer or non-finite tensors loaded silently (copied into the float weights); a missing or extra one was named only by its class."""
    from safetensors.torch import load_file

    from dallekit.errors import BadInputError

    folder = fsq_folder(tmp_path / "fsq")
    good = load_file(str(folder / "model.safetensors"))
    cases = [
        ({k: v.to(torch.int16) for k, v in good.items()}, "'encoder.conv_in.weight' holds int16 values, expected floating-point weights"),
        (good | {"encoder.conv_in.bias": torch.full_like(good["encoder.conv_in.bias"], float("nan"))}, "'encoder.conv_in.bias' holds NaN or infinite values"),
        (good | {"extra.weight": torch.zeros(1)}, "a tensor 'extra.weight' the model does not have"),
        ({k: v for k, v in good.items() if k != "decoder.conv_out.bias"}, "no tensor 'decoder.conv_out.bias'"),
    ]
    for state, needle in cases:
        save_file(state, str(folder / "model.safetensors"))
        with pytest.raises(BadInputError, match=re.escape(needle)):
            ImageTokenizer.load(str(folder), "cpu")


def test_a_run_checks_its_tokenizer_folder_and_weights_files_before_any_stage(tmp_path):
    """A transformer folder as [run] dvae, or a pickle as [train-tokenizer] perceptual_weights, failed only after ingest, download, clean and filter."""
    from dallekit.errors import BadInputError
    from dallekit.jobs.steps import check_run_models, load_pipeline
    from dallekit.models.transformer import DalleTransformer, config_dict, dalle_config

    model = DalleTransformer(dalle_config("tiny", text_vocab=49408, image_vocab=128, grid=8))
    save_model(tmp_path / "model", model, config_dict(model.config))
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "vgg.pth")
    run = {"out": str(tmp_path / "run"), "inputs": ["urls.csv"]}
    cases = [
        ({"run": run | {"dvae": str(tmp_path / "model")}}, "model: config.json says model 'dallekit-dalle', expected an image tokenizer"),
        ({"run": run, "train-tokenizer": {"preset": "fsq-tiny", "perceptual_weights": str(tmp_path / "vgg.pth")}}, "vgg.pth: a pickle"),
        ({"run": run, "train-dvae": {"preset": "fsq-tiny", "discriminator_init": str(tmp_path)}}, f"{tmp_path}: a folder"),
    ]
    for toml, needle in cases:
        with pytest.raises(BadInputError, match=re.escape(needle)):
            check_run_models(load_pipeline(toml, "p.toml"))
    check_run_models(load_pipeline({"run": run | {"dvae": str(fsq_folder(tmp_path / "fsq"))}}, "p.toml"))


def test_every_level_combination_of_the_paper_fits_uint16():
    for levels in ([8, 6, 5], [8, 5, 5, 5], [7, 5, 5, 5, 5], [8, 8, 8, 6, 5]):
        assert math.prod(levels) <= 65535
        fsq = FSQ(levels)
        corners = torch.tensor(list(itertools.product(*[[-9.0, 9.0]] * len(levels)))).T.reshape(1, len(levels), -1, 1)
        assert fsq(corners)[1].max() == math.prod(levels) - 1


def test_run_folders_keep_the_dvae_folder_of_an_older_run(tmp_path):
    from dallekit.jobs.steps import run_folders

    assert run_folders(str(tmp_path / "new"))["tokenizer"] == f"{tmp_path}/new/tokenizer"
    dvae_folder(tmp_path / "old" / "dvae")  # a run folder from before the FSQ tokenizer: it resumes with its dVAE
    assert run_folders(str(tmp_path / "old"))["tokenizer"] == f"{tmp_path}/old/dvae"


def test_small_real_recipe_is_a_valid_pipeline_that_keeps_short_captions():
    from pathlib import Path

    from dallekit.config import load_toml
    from dallekit.jobs.steps import load_pipeline

    recipe = Path(__file__).parent.parent / "dallekit" / "configs" / "small-real.toml"
    toml = load_toml(str(recipe))
    toml["run"] |= {"inputs": ["pictures/"]}
    p = load_pipeline(toml, str(recipe))
    assert p.train_tokenizer.preset.startswith("fsq-") and p.ingest.format == "folder" and p.run.train_clip
    assert p.filter.min_caption_words == 1 and p.filter.min_caption_chars <= 2 and p.filter.min_side <= 32  # "ox", "rabbit face" at 64 px
