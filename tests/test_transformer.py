"""The DALL-E transformer and its trainer: loss weighting, padding, KV cache, overfitting, exact resume, loader."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

import dallekit.training.transformer as train_module
from dallekit.config import TrainConfig
from dallekit.errors import BadInputError
from dallekit.models.transformer import DalleTransformer, attention_masks, dalle_config
from dallekit.tokenize.tokens import TokenBatches, token_metadata, token_table
from dallekit.training.loop import read_metrics
from dallekit.training.transformer import train_transformer

TEXT_VOCAB, CODES, GRID = 100, 32, 4
META = token_metadata({"kind": "test", "codebook_size": CODES, "grid": GRID, "image_size": 16, "sha256": "x"}, {"kind": "test", "vocab_size": TEXT_VOCAB})


def token_shards(folder, n_shards: int, rows: int, seed: int = 0, metadata=META):
    """Token shards of random captions and images."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        texts = [list(rng.integers(0, TEXT_VOCAB, rng.integers(1, 12))) for _ in range(rows)]
        images = rng.integers(0, metadata["image_tokenizer"]["codebook_size"], (rows, metadata["image_tokenizer"]["grid"] ** 2))
        table = token_table([f"{s}-{i}" for i in range(rows)], ["c"] * rows, texts, images, metadata)
        pq.write_table(table, folder / f"part-{s:05d}.parquet")
    return folder


def tiny(**overrides):
    return dalle_config("tiny", text_vocab=TEXT_VOCAB, image_vocab=CODES, grid=GRID, text_len=8, **overrides)


def test_padding_is_per_position_and_loss_weights_are_separate_means():
    torch.manual_seed(0)
    model = DalleTransformer(tiny(p_uncond=0.0))
    text = model.pad_text([[5, 6, 7], list(range(20))])
    assert text[0].tolist() == [5, 6, 7] + [TEXT_VOCAB + i for i in range(3, 8)]  # a distinct pad per position
    assert text[1].tolist() == list(range(8))  # truncated to text_len
    image = torch.randint(0, CODES, (2, GRID * GRID))
    text_logits, image_logits = model(text, image)
    assert text_logits.shape == (2, 8, TEXT_VOCAB + 8) and image_logits.shape == (2, 16, CODES)
    text_ce = -torch.log_softmax(text_logits, -1).gather(-1, text[..., None]).mean()
    image_ce = -torch.log_softmax(image_logits, -1).gather(-1, image[..., None]).mean()
    out = model(text, image, return_loss=True)
    assert torch.allclose(out["text_loss"], text_ce, atol=1e-5) and torch.allclose(out["image_loss"], image_ce, atol=1e-5)
    assert torch.allclose(out["loss"], text_ce / 8 + 7 * image_ce / 8, atol=1e-5)
    # the first image token is predicted from the last text position only (causality)
    other = image.clone()
    other[:, 1:] = (other[:, 1:] + 1) % CODES
    assert torch.allclose(model(text, other)[1][:, 0], image_logits[:, 0], atol=1e-5)


def test_caption_dropout_gives_all_padding():
    model = DalleTransformer(tiny(p_uncond=1.0))
    text = model.pad_text([[1, 2]])
    assert model.drop_captions(text).tolist() == [[TEXT_VOCAB + i for i in range(8)]]


@pytest.mark.parametrize("attention", [{}, {"sparse_attention": True}, {"attention_window": 1}])
def test_kv_cache_gives_the_same_tokens(attention):
    torch.manual_seed(0)
    model = DalleTransformer(tiny(**attention)).eval()
    text = model.pad_text([[1, 2, 3], [4]])
    tokens = [model.generate(text, top_k=10, generator=torch.Generator().manual_seed(3), use_cache=cache) for cache in (True, False)]
    assert torch.equal(tokens[0], tokens[1]) and tokens[0].shape == (2, 16)
    guided = model.generate(text, cond_scale=3.0, generator=torch.Generator().manual_seed(3))
    assert guided.shape == (2, 16) and guided.max() < CODES


def test_attention_window_masks_far_image_tokens_in_all_layers_but_the_last():
    config = train_module.model_config_for(META, TrainConfig(preset="tiny", attention_window=1, text_len=8))
    assert config.attention_window == 1 and DalleTransformer(tiny()).masks is None
    masks = attention_masks(config)
    T = config.text_len + 1  # input position of image token 0
    at = lambda r, c: T + r * GRID + c  # noqa: E731 - input position of the image token at row r, column c
    for layer in masks[:-1]:
        assert layer[at(2, 2), : T].all()  # all text
        assert layer[at(2, 2), at(1, 1)] and layer[at(2, 2), at(2, 1)] and layer[at(2, 2), at(1, 3)]  # the 3x3 neighbourhood
        assert not layer[at(2, 2), at(0, 2)] and not layer[at(2, 2), at(1, 0)]  # two rows or columns away
        assert not layer[at(2, 2), at(2, 3)]  # still causal
    assert torch.equal(masks[-1], torch.ones_like(masks[-1]).tril())  # the last layer sees everything before it
    with pytest.raises(ValueError, match="alternatives"):
        attention_masks(tiny(sparse_attention=True, attention_window=1))
    with pytest.raises(BadInputError, match="--attention-window and --sparse-attention"):
        train_module.model_config_for(META, TrainConfig(attention_window=1, sparse_attention=True))
    with pytest.raises(BadInputError, match="--attention-window -1: expected 0"):
        train_module.model_config_for(META, TrainConfig(attention_window=-1))


@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_samples(tmp_path):
    data = token_shards(tmp_path / "tokens", 1, 4)
    options = TrainConfig(max_steps=150, batch_size=4, lr=3e-3, warmup_steps=10, p_uncond=0.0, text_len=8, val_fraction=0,
                          num_workers=0, log_every=10, checkpoint_every=150, shuffle_buffer=4)
    metrics = train_transformer(str(data), str(tmp_path / "run"), options)
    assert metrics["image_loss"] < 0.1, metrics


def test_dropout_option_reaches_the_model_and_acts_only_in_training():
    config = train_module.model_config_for(META, TrainConfig(preset="tiny", dropout=0.2, text_len=8))
    assert config.dropout == 0.2 and train_module.model_config_for(META, TrainConfig(preset="tiny")).dropout == 0.0
    torch.manual_seed(0)
    model = DalleTransformer(config)
    text = model.pad_text([[1, 2, 3]])
    image = torch.randint(0, CODES, (1, GRID * GRID))
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(text, image)[0], model(text, image)[0])
        model.train()
        assert not torch.equal(model(text, image)[0], model(text, image)[0])


def test_cpu_dropout_drops_p_of_the_elements_and_rescales_the_rest():
    from dallekit.models.transformer import DROP_LEVELS, dropout

    torch.manual_seed(0)
    x = torch.ones(300_001, requires_grad=True)
    y = dropout(x, 0.1, True)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.003, dropped  # 0.1 is 6554 / 65536 here
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, DROP_LEVELS / (DROP_LEVELS - 6554)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient goes through the kept elements, scaled alike
    assert not torch.equal(dropout(x, 0.1, True), y) and dropout(x, 0.1, False) is x


@pytest.mark.parametrize("window", [0, 1])
def test_attention_with_dropout_on_the_cpu_is_sdpa_when_nothing_is_dropped(window):
    torch.manual_seed(0)
    config = dalle_config("tiny", text_vocab=TEXT_VOCAB, image_vocab=CODES, grid=GRID, text_len=8, attention_window=window,
                          dropout=1e-9)  # the manual path (p > 0) with no element dropped (p rounds to 0 of 65536)
    model = DalleTransformer(config).train()
    text, image = model.pad_text([[1, 2, 3], [4]]), torch.randint(0, CODES, (2, GRID * GRID))
    with torch.no_grad():
        manual = model(text, image)
        for block in model.blocks:
            block.attn.dropout = 0.0  # scaled_dot_product_attention itself
        sdpa = model(text, image)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(manual, sdpa))


def test_autocast_dtype_follows_the_option_and_the_device(monkeypatch):
    import dallekit.models.weights as weights

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert weights.autocast_dtype(cuda, "bf16") == torch.bfloat16 and weights.autocast_dtype(cuda, "fp16") == torch.float16
    assert weights.autocast_dtype(cuda, "fp32") is None
    monkeypatch.setattr(weights, "cpu_has_native_bf16", lambda: True)
    assert weights.autocast_dtype(cpu, "bf16") == torch.bfloat16
    assert weights.autocast_dtype(cpu, "fp16") is None and weights.autocast_dtype(cpu, "fp32") is None
    monkeypatch.setattr(weights, "cpu_has_native_bf16", lambda: False)  # emulated bf16 is slower than fp32
    assert weights.autocast_dtype(cpu, "bf16") is None


@pytest.mark.slow
def test_killed_run_resumes_exactly(tmp_path, monkeypatch):
    data = token_shards(tmp_path / "tokens", 6, 24)
    base = dict(max_steps=12, batch_size=8, warmup_steps=3, text_len=8, val_fraction=0.2, val_batches=2,
                num_workers=2, log_every=1, checkpoint_every=4, shuffle_buffer=16, deterministic=True)
    train_transformer(str(data), str(tmp_path / "straight"), TrainConfig(**base))
    real_save = train_module.save_checkpoint

    def save_then_die(out, model, optimizer, step, extra, **kwargs):
        real_save(out, model, optimizer, step, extra, **kwargs)
        if step == 8:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_transformer(str(data), str(tmp_path / "resumed"), TrainConfig(**base))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    train_transformer(str(data), str(tmp_path / "resumed"), TrainConfig(**base, resume=True))
    a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13))
    for x, y in zip(a[8:], b[8:]):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) < 1e-5
    # the EMA resumes too: the averages at the end, and the published (best, averaged) weights, are the straight run's
    from safetensors.torch import load_file

    ema = [{k: v for k, v in load_file(str(tmp_path / run / "checkpoint" / "state.safetensors")).items() if k.startswith("ema.")}
           for run in ("straight", "resumed")]
    assert ema[0].keys() == ema[1].keys() and len(ema[0]) > 10
    for key in ema[0]:
        torch.testing.assert_close(ema[0][key], ema[1][key], rtol=1e-5, atol=1e-6)
    published = [published_weights(tmp_path / run) for run in ("straight", "resumed")]
    for key in published[0]:
        torch.testing.assert_close(published[0][key], published[1][key], rtol=1e-5, atol=1e-6)


def test_mismatched_metadata_is_refused(tmp_path):
    token_shards(tmp_path / "tokens", 2, 8)
    other = token_metadata({"kind": "test", "codebook_size": 64, "grid": GRID, "image_size": 16, "sha256": "y"}, META["text_tokenizer"])
    token_shards(tmp_path / "other", 1, 8, metadata=other)
    (tmp_path / "other" / "part-00000.parquet").rename(tmp_path / "tokens" / "part-00002.parquet")
    with pytest.raises(BadInputError, match="part-00002.parquet: image_tokenizer codebook_size=64"):
        train_transformer(str(tmp_path / "tokens"), str(tmp_path / "run"), TrainConfig(max_steps=1, num_workers=0))


def loader_peak(folder: str) -> int:
    """Peak Python allocation while streaming every row of a folder of token shards once."""
    from pathlib import Path

    paths = sorted(str(p) for p in Path(folder).glob("part-*.parquet"))
    source = TokenBatches(paths, 8, TEXT_VOCAB, 16, shuffle_buffer=64, loop=False)
    sum(1 for _ in TokenBatches(paths[:1], 8, TEXT_VOCAB, 16, loop=False).batches())  # lazy imports happen here, untraced
    tracemalloc.start()
    rows = sum(len(text) for _, text, _ in source.batches())
    _, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert rows == len(paths) * 20
    return top


@pytest.mark.slow
def test_loader_memory_is_bounded_by_buffer_not_shard_count(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    def peak(n_shards: int) -> int:  # in a fresh process: the test session's Dask threads would be traced too
        data = token_shards(tmp_path / f"t{n_shards}", n_shards, 20)
        # os._exit skips the interpreter's teardown, which once died of SIGSEGV after the result was printed
        code = f"import os; from tests.test_transformer import loader_peak; print(loader_peak({str(data)!r}), flush=True); os._exit(0)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.split()[-1])

    few, many = peak(10), peak(150)
    all_rows = 150 * 20 * (8 + GRID * GRID) * 8  # what holding every row of the 150 shards would take
    print(f"loader peak: {few} bytes over 10 shards, {many} over 150 (all rows: {all_rows})")
    assert many < 2 * few and many < all_rows / 4, (few, many, all_rows)  # only paths grow with the shard count


def test_tensorboard_logging_or_a_clear_error(tmp_path):
    import importlib.util

    data = token_shards(tmp_path / "tokens", 1, 8)
    options = TrainConfig(max_steps=2, batch_size=4, text_len=8, val_fraction=0, num_workers=0, log_every=1, checkpoint_every=2, tensorboard=True)
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(BadInputError, match="pip install tensorboard"):
            train_transformer(str(data), str(tmp_path / "run"), options)
    else:
        train_transformer(str(data), str(tmp_path / "run"), options)
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def published_weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def test_published_weights_are_the_warmed_up_average_of_each_steps_weights(tmp_path, monkeypatch):
    import json

    from safetensors.torch import load_file

    seen: list[dict[str, torch.Tensor]] = []  # the weights the EMA starts from, then those after each optimizer step

    class RecordingEMA(train_module.EMA):
        def __init__(self, model, decay):
            super().__init__(model, decay)
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})

        def update(self, model):
            super().update(model)
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    monkeypatch.setattr(train_module, "EMA", RecordingEMA)
    data = token_shards(tmp_path / "tokens", 1, 8)
    base = dict(max_steps=3, batch_size=4, text_len=8, val_fraction=0, num_workers=0, log_every=1, checkpoint_every=3, lr=1e-2, warmup_steps=0)
    train_transformer(str(data), str(tmp_path / "ema"), TrainConfig(**base, ema_decay=0.5))
    expected = {k: v.float().clone() for k, v in seen[0].items()}
    for n, weights in enumerate(seen[1:], start=1):  # the decay warms up as min(decay, (1 + n) / (10 + n))
        rate = 1 - min(0.5, (1 + n) / (10 + n))
        expected = {k: e + rate * (weights[k].float() - e) for k, e in expected.items()}
    published = published_weights(tmp_path / "ema")
    assert len(seen) == 4
    for key, value in expected.items():
        torch.testing.assert_close(published[key], value, rtol=0, atol=1e-6)
    latest = load_file(str(tmp_path / "ema" / "checkpoint" / "model.safetensors"))
    assert any(not torch.equal(latest[k], published[k]) for k in latest)  # checkpoint/ keeps the trained weights
    assert json.loads((tmp_path / "ema" / "config.json").read_text())["ema_decay"] == 0.5

    train_transformer(str(data), str(tmp_path / "plain"), TrainConfig(**base, ema_decay=0))
    plain = published_weights(tmp_path / "plain")
    assert all(torch.equal(plain[k], seen[-1][k]) for k in plain)  # the same run: without the average, the last step's weights
    assert any(not torch.equal(plain[k], published[k]) for k in plain)


def scripted_validation(monkeypatch, losses: list[float]) -> list[tuple[int, dict]]:
    """Make validation return `losses` in turn; returns (call index, weights validated) as they happen."""
    calls: list[tuple[int, dict]] = []

    def validate(model, paths, options, config, device):
        loss = losses[len(calls)]
        calls.append((len(calls), {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return {"val_loss": loss, "val_text_loss": 1.0, "val_image_loss": loss, "val_bits_per_image_token": loss}

    monkeypatch.setattr(train_module, "validation_loss", validate)
    return calls


@pytest.mark.slow
def test_best_validation_step_is_published_and_checkpoint_holds_the_latest(tmp_path, monkeypatch):
    import json

    from safetensors.torch import load_file

    calls = scripted_validation(monkeypatch, [3.0, 2.0, 2.5, 2.8])
    data = token_shards(tmp_path / "tokens", 2, 8)
    options = TrainConfig(max_steps=8, batch_size=4, text_len=8, val_fraction=0.5, num_workers=0, log_every=2, checkpoint_every=2)
    metrics = train_transformer(str(data), str(tmp_path / "run"), options)
    assert len(calls) == 4 and metrics["best_step"] == 4 and metrics["best_val_image_loss"] == 2.0 and metrics["step"] == 8
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["best_step"], config["best_val_image_loss"], config["step"]) == (4, 2.0, 4)
    published = published_weights(tmp_path / "run")
    step4, step8 = calls[1][1], calls[3][1]  # what validation saw: the EMA weights
    assert all(torch.equal(published[k], step4[k].float()) for k in published)
    assert any(not torch.equal(published[k], step8[k].float()) for k in published)
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 8
    latest = load_file(str(tmp_path / "run" / "checkpoint" / "model.safetensors"))
    assert any(not torch.equal(latest[k], published[k]) for k in latest)


@pytest.mark.slow
def test_early_stop_ends_when_patience_runs_out_and_resume_keeps_the_best(tmp_path, monkeypatch):
    import json

    calls = scripted_validation(monkeypatch, [3.0, 2.0, 2.5, 2.6, 2.7, 1.0])
    data = token_shards(tmp_path / "tokens", 2, 8)
    base = dict(max_steps=20, batch_size=4, text_len=8, val_fraction=0.5, num_workers=0, log_every=1, checkpoint_every=2)
    metrics = train_transformer(str(data), str(tmp_path / "run"), TrainConfig(**base, early_stop=2))
    # evaluations at steps 2, 4 (best), 6, 8: two without improvement
    assert metrics["early_stopped"] is True and metrics["step"] == 8 and metrics["best_step"] == 4 and len(calls) == 4
    lines = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert lines[-1]["step"] == 8 and lines[-1]["early_stopped"] is True and not any(l.get("early_stopped") for l in lines[:-1])
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 8

    again = train_transformer(str(data), str(tmp_path / "run"), TrainConfig(**base, early_stop=2, resume=True))
    assert again["early_stopped"] is True and again["step"] == 8 and len(calls) == 4  # nothing to do: no step, no evaluation

    # with more patience it goes on from the restored best (step 4) and count: step 10 is the third evaluation without improvement
    more = train_transformer(str(data), str(tmp_path / "run"), TrainConfig(**base, early_stop=3, resume=True))
    assert more["step"] == 10 and more["early_stopped"] is True and more["best_step"] == 4 and len(calls) == 5
    assert json.loads((tmp_path / "run" / "config.json").read_text())["best_step"] == 4


def test_early_stop_without_validation_shards_is_bad_input(tmp_path):
    data = token_shards(tmp_path / "tokens", 1, 8)
    with pytest.raises(BadInputError, match="--early-stop 2: needs validation shards"):
        train_transformer(str(data), str(tmp_path / "run"), TrainConfig(max_steps=2, num_workers=0, early_stop=2))


def hflip_shards(folder, rows: int = 40):
    """One token shard whose mirrored codes are the codes + CODES // 2 (codes themselves below CODES // 2): each row says which it gave."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, CODES // 2, (rows, GRID * GRID))
    texts = [[i % TEXT_VOCAB] for i in range(rows)]
    table = token_table([str(i) for i in range(rows)], ["c"] * rows, texts, images, META, image_tokens_hflip=images + CODES // 2)
    pq.write_table(table, folder / "part-00000.parquet")
    return folder, images


def test_hflip_gives_the_mirrored_codes_for_about_half_the_rows_and_replays_on_resume(tmp_path):
    folder, images = hflip_shards(tmp_path / "tokens")
    paths = [str(folder / "part-00000.parquet")]

    def stream(hflip: bool, skip: int = 0, count: int = 10):
        source = TokenBatches(paths, 8, TEXT_VOCAB, 8, seed=3, shuffle_buffer=8, hflip=hflip)
        out = []
        for _, text, image in source.batches(skip=skip):
            out.append((text[:, 0].copy(), image.copy()))
            if len(out) == count:
                return out

    flipped = stream(True)
    rows = np.concatenate([t for t, _ in flipped]), np.concatenate([i for _, i in flipped])
    mirrored = rows[1][:, 0] >= CODES // 2
    np.testing.assert_array_equal(rows[1] - np.where(mirrored, CODES // 2, 0)[:, None], images[rows[0]])  # whole rows, one or the other
    assert 0.3 < mirrored.mean() < 0.7, mirrored.mean()
    assert not any((i >= CODES // 2).any() for _, i in stream(False))
    resumed = stream(True, skip=4, count=6)
    for (t1, i1), (t2, i2) in zip(flipped[4:], resumed):
        np.testing.assert_array_equal(t1, t2)
        np.testing.assert_array_equal(i1, i2)


def test_train_hflip_without_the_column_is_one_line_and_exit_2(tmp_path, capsys):
    from dallekit.cli import main

    data = token_shards(tmp_path / "tokens", 1, 8)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(data), "--out", str(tmp_path / "run"), "--hflip", "--max-steps", "1", "--num-workers", "0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(data) in err and "image_tokens_hflip" in err and "encode` with --hflip" in err, err


def test_hflip_training_runs_on_shards_with_the_column(tmp_path):
    folder, _ = hflip_shards(tmp_path / "tokens", rows=16)
    options = TrainConfig(max_steps=2, batch_size=4, text_len=8, val_fraction=0, num_workers=0, log_every=1, checkpoint_every=2, hflip=True)
    assert train_transformer(str(folder), str(tmp_path / "run"), options)["step"] == 2
