"""Model folders: weights in safetensors plus a JSON config, written atomically, never pickled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dallekit.errors import BadInputError
from dallekit.io import write_json_atomic


def save_model(out_dir: str | Path, model: torch.nn.Module, config: dict) -> None:
    """Write `model.safetensors` and `config.json`, each atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    write_json_atomic(config, str(out / "config.json"))


def load_model_state(model_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config dict, state dict) of a saved model folder; bad input if it is not one."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise BadInputError(f"{model_dir}: expected a model folder with config.json and model.safetensors")
    return read_json(folder / "config.json"), read_safetensors(folder / "model.safetensors")


def read_json(path: Path) -> dict:
    """A JSON object from a file; bad input naming the file if it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise BadInputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise BadInputError(f"{path}: expected a JSON object")
    return value


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; bad input naming the file if it is corrupt or truncated."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise BadInputError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0][:160]})") from None


PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # a pickle's protocol opcode, and torch.save's zip container


def check_weights_file(path: str | Path, what: str) -> None:
    """Bad input naming a user-given weights file that is missing, a folder or a pickle, or whose safetensors header does not parse (no tensor is read)."""
    file = Path(path)
    if not file.is_file():
        found = "a folder" if file.is_dir() else "no such file"
        raise BadInputError(f"{path}: {found} (expected {what} as a .safetensors file)")
    with file.open("rb") as f:
        head = f.read(4)
    if head.startswith(PICKLE_MAGIC):
        raise BadInputError(f"{path}: a pickle (torch.save) file, which dallekit never loads; expected {what} as a .safetensors file "
                            "(convert it once: safetensors.torch.save_file(torch.load(f, weights_only=True), 'out.safetensors'))")
    try:
        with safe_open(str(file), "pt"):
            pass
    except (SafetensorError, OSError, ValueError) as err:
        raise BadInputError(f"{path}: not a readable safetensors file ({str(err).splitlines()[0][:160]})") from None


def read_weights_file(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a user-given safetensors file; bad input naming it when it is missing, a pickle or not safetensors."""
    check_weights_file(path, what)
    return read_safetensors(Path(path))


def weights_problem(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """What keeps `state` from being `model`'s weights (the first missing, extra, misshapen, non-float or non-finite tensor), or None."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        return f"no tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
    extra = [k for k in state if k not in expected]
    if extra:
        return f"a tensor '{extra[0]}' the model does not have" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
    for key, value in expected.items():
        got = state[key]
        if tuple(got.shape) != tuple(value.shape):
            return f"'{key}' has shape {tuple(got.shape)}, expected {tuple(value.shape)}"
        if value.is_floating_point() and not got.is_floating_point():
            return f"'{key}' holds {str(got.dtype).removeprefix('torch.')} values, expected floating-point weights"
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            return f"'{key}' holds NaN or infinite values"
    return None


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load a state dict; bad input naming `where` and the first tensor that does not fit the model (its class named)."""
    problem = weights_problem(model, state)
    if problem is not None:
        raise BadInputError(f"{where}: weights do not fit the {type(model).__name__} ({problem})")
    model.load_state_dict(state)


def pick_device(device: str = "auto") -> torch.device:
    """'auto' means CUDA when there is a GPU; a device this machine lacks is bad input (torch's RuntimeError comes later, as a traceback)."""
    chosen = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if chosen.type == "cuda" and (chosen.index or 0) >= (torch.cuda.device_count() if torch.cuda.is_available() else 0):
        raise BadInputError(f"--device {device}: this machine has {torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA device(s); "
                            "expected cpu, auto or one of them")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise BadInputError(f"--device {device}: Apple's MPS is not available here; expected cpu or auto")
    return chosen


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slower than fp32."""
    return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(device: torch.device, dtype: str = "bf16") -> torch.dtype | None:
    """The training autocast dtype for an option value, or None for plain fp32.

    bf16 and fp16 on a GPU; on a CPU only bf16, and only where it is native (training steps of
    the demo's models run 1.6-1.8x faster there); fp16 on a CPU falls back to fp32.
    """
    if dtype == "fp32":
        return None
    if device.type == "cuda":
        return torch.float16 if dtype == "fp16" else torch.bfloat16
    return torch.bfloat16 if device.type == "cpu" and dtype == "bf16" and cpu_has_native_bf16() else None


def adamw(params, device: torch.device, **options) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on the CPU and CUDA (the trainers' one optimizer).

    The default per-tensor (foreach) update costs the demo's CLIP 108 CPU ms a step against 22
    fused: its 49408-token embedding alone is 3.2M parameters. Same update rule and state, so
    checkpoints resume across both.
    """
    return torch.optim.AdamW(params, fused=device.type in ("cpu", "cuda"), **options)


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """The autocast context for autocast_dtype's answer: a disabled one for None (fp32)."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)


def build_model(model_class: type, config_class: type, values: dict, where: str):
    """A model built from its config.json dict; bad input naming the file when a value has the wrong type or size."""
    try:
        return model_class(config_class.from_dict(values))
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, AssertionError) as err:
        raise BadInputError(f"{where}/config.json: not a valid {config_class.__name__} ({str(err).splitlines()[0][:160]})") from None
