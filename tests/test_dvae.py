"""The dVAE: its losses, that the tiny preset learns the shapes, and exact resume of train-dvae."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dallekit.training.dvae as train_module
from dallekit.config import TrainDVAEConfig
from dallekit.errors import BadInputError
from dallekit.models.dvae import DVAE, BottleneckBlock, dvae_config, gumbel_softmax, logit_laplace_nll, map_pixels
from dallekit.training.dvae import train_dvae
from dallekit.training.loop import read_metrics
from tests.stage_data import HUGE_IMAGES, downloaded_row, forbid_large_decodes, png_header_only, shape_jpeg, write_stage


def shapes_stage(folder, n: int, shard_rows: int = 500):
    rows = [downloaded_row(f"{i:016x}", "shape", shape_jpeg(i, size=96)) for i in range(n)]
    write_stage(folder, [rows[i : i + shard_rows] for i in range(0, n, shard_rows)])
    return folder


@pytest.mark.slow
def test_presets_shapes_and_hard_codes():
    for preset, grid in (("tiny", 8), ("small", 16), ("dalle", 32)):
        assert dvae_config(preset).grid == grid
    model = DVAE(dvae_config("tiny")).eval()
    x = torch.rand(2, 3, 32, 32)
    codes = model.encode(x)
    assert codes.shape == (2, 8, 8) and codes.max() < 128
    assert model.decode(codes).shape == (2, 3, 32, 32)
    out = model(x, temperature=1.0, kl_weight=6.6)
    assert out["kl"] >= 0 and torch.isfinite(out["loss"])
    with pytest.raises(KeyError):
        dvae_config("huge")


def test_logit_laplace_matches_its_density():
    x = map_pixels(torch.tensor([[[[0.0, 0.3], [0.7, 1.0]]]]))
    mu, log_b = torch.full_like(x, 0.2), torch.full_like(x, -0.5)
    b = math.exp(-0.5)
    logit = torch.log(x / (1 - x))
    density = torch.exp(-(logit - 0.2).abs() / b) / (2 * b * x * (1 - x))
    assert torch.allclose(logit_laplace_nll(x, mu, log_b), -density.log().mean(), atol=1e-5)


def test_bottleneck_block_adds_its_residual_scaled_by_post_gain():
    torch.manual_seed(0)
    block = BottleneckBlock(8, 16, n_layers=6, kernels=(3, 3, 3, 1))
    x = torch.randn(2, 8, 5, 5)
    x_before, residual = x.clone(), x
    for layer in block.res_path:  # the residual path unscaled, relu_1 out of place so that x survives
        residual = torch.relu(residual) if isinstance(layer, torch.nn.ReLU) else layer(residual)
    assert torch.allclose(block(x), block.id_path(x) + residual / 36, atol=1e-6)
    assert torch.equal(x, x_before)  # the in-place ReLUs left the block's input alone


def test_gumbel_softmax_samples_the_softmax_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0]).log_softmax(0)
    samples = gumbel_softmax(logits.view(1, 4, 1, 1).expand(20_000, 4, 1, 1), temperature=0.01)  # near one-hot
    assert torch.allclose(samples.sum(1), torch.ones(20_000, 1, 1))
    frequencies = torch.bincount(samples.argmax(1).flatten(), minlength=4) / 20_000
    assert torch.allclose(frequencies, logits.exp(), atol=0.015)


@pytest.mark.slow
def test_exact_resume_after_a_kill(tmp_path, monkeypatch):
    data = shapes_stage(tmp_path / "filtered", 300, shard_rows=100)
    options = dict(preset="tiny", max_steps=24, batch_size=8, checkpoint_every=8, log_every=1, shuffle_buffer=64, val_percent=10)
    train_dvae(str(data), str(tmp_path / "straight"), TrainDVAEConfig(**options))

    real_save = train_module.save_checkpoint

    def save_then_die(out, model, optimizer, step, extra, **kwargs):
        real_save(out, model, optimizer, step, extra, **kwargs)
        if step == 16:
            raise KeyboardInterrupt  # killed right after the step-16 checkpoint

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_dvae(str(data), str(tmp_path / "resumed"), TrainDVAEConfig(**options))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    train_dvae(str(data), str(tmp_path / "resumed"), TrainDVAEConfig(**options, resume=True))
    straight = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    resumed = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, 25))
    for a, b in zip(straight[16:], resumed[16:]):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
    assert abs(straight[-1]["val_psnr"] - resumed[-1]["val_psnr"]) < 1e-4
    with pytest.raises(BadInputError, match="another preset or options"):
        train_dvae(str(data), str(tmp_path / "resumed"), TrainDVAEConfig(**(options | {"batch_size": 4}), resume=True))


@pytest.mark.slow
def test_tiny_dvae_learns_the_shapes(trained_dvae):
    """On held-out synthetic shapes: >= 22 dB PSNR and >= 30% of codes in use after ~3 minutes on 2 cores."""
    out, metrics = trained_dvae
    print(f"tiny dVAE after 1300 steps: {metrics}")
    assert metrics["val_psnr"] >= 22.0
    assert metrics["codes_used"] >= 0.30
    assert (out / "model.safetensors").exists() and json.loads((out / "config.json").read_text())["grid"] == 8
    assert (out / "recon_step000650.png").exists() and (out / "recon_step001300.png").exists()
    lines = read_metrics(out / "metrics.jsonl")
    assert lines[-1]["step"] == 1300 and {"loss", "recon", "kl", "val_psnr", "perplexity", "codes_used"} <= set(lines[-1])


def test_fewer_steps_keep_the_schedule_shares():
    from dallekit.config import TrainDVAEConfig
    from dallekit.training.dvae import build_config

    preset = build_config(TrainDVAEConfig(preset="tiny"))
    short = build_config(TrainDVAEConfig(preset="tiny", max_steps=preset.max_steps // 2))
    assert short.max_steps == preset.max_steps // 2
    assert short.temp_anneal_steps == round(preset.temp_anneal_steps / 2) and short.kl_warmup_steps == round(preset.kl_warmup_steps / 2)


def test_training_images_over_64_mpx_are_skipped_and_counted_without_a_decode(tmp_path, monkeypatch):
    attempts = forbid_large_decodes(monkeypatch)  # the loader runs in this process: a decode of a huge row fails the test
    rows = [downloaded_row(f"{i:016x}", "a shape", shape_jpeg(i, size=48)) for i in range(6)]
    rows += [downloaded_row(f"{uid:0>16}", "a huge picture", png_header_only(*size), size=size, original=size) for uid, size in HUGE_IMAGES.items()]
    write_stage(tmp_path / "filtered", [rows])
    paths = [str(tmp_path / "filtered" / "part-00000.parquet")]
    stream = train_module.ImageStream(paths, 32, seed=0, buffer=4, val_percent=0)
    batches = stream.batches(6)
    first, second = next(batches), next(batches)  # one epoch of 6 images each: the first epoch was read to its end
    assert first[0].shape == second[0].shape == (6, 32, 32, 3) and first[1] == 0 and second[1] == 1
    assert set(stream.skipped) == {"image_too_large"} and stream.skipped["image_too_large"] >= 2
    assert len(train_module.held_out_images(paths, 32, percent=100)) == 6
    assert attempts == []
