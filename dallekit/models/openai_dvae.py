"""Convert OpenAI's released dVAE (the `dall-e` package's encoder.pkl / decoder.pkl) to a dVAE folder.

Those files are whole pickled modules. They are loaded with `torch.load(weights_only=True)` and
only the `dall_e` module classes (and the torch layers they contain) allowlisted, so no other
code can run; this happens only inside `dallekit convert-openai-dvae`, once, and the result is
safetensors + JSON like every other dallekit model. The `dall-e` package is the optional extra
`openai-dvae` (it needs `attrs` and `requests`).
"""

from __future__ import annotations

import collections

import torch

from dallekit.errors import BadInputError
from dallekit.models.dvae import DVAE, DVAEConfig, dvae_config
from dallekit.models.weights import save_model


def _load_module(path: str, kind: str):
    try:
        from dall_e.decoder import Decoder, DecoderBlock
        from dall_e.encoder import Encoder, EncoderBlock
        from dall_e.utils import Conv2d
    except ImportError:
        raise BadInputError("convert-openai-dvae needs the dall-e package: pip install 'dallekit[openai-dvae]'") from None
    allowed = [Encoder, EncoderBlock, Decoder, DecoderBlock, Conv2d, collections.OrderedDict,
               torch.nn.Sequential, torch.nn.ReLU, torch.nn.MaxPool2d, torch.nn.Upsample, torch.nn.Identity]
    try:
        with torch.serialization.safe_globals(allowed):
            module = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except Exception as err:  # noqa: BLE001 - anything the restricted unpickler refuses
        raise BadInputError(f"{path}: not a dall_e {kind} module that loads safely ({str(err).splitlines()[0][:200]})") from None
    expected = Encoder if kind == "encoder" else Decoder
    if not isinstance(module, expected):
        raise BadInputError(f"{path}: holds a {type(module).__name__}, expected dall_e's {expected.__name__}")
    return module


def _renamed(state: dict, prefix: str) -> dict:
    """dall_e's Conv2d keeps `w` and `b`; ours are nn.Conv2d `weight` and `bias`."""
    out = {}
    for key, value in state.items():
        head, _, leaf = key.rpartition(".")
        out[f"{prefix}.{head}.{ {'w': 'weight', 'b': 'bias'}[leaf] }"] = value.float()
    return out


def convert_openai_dvae(encoder_path: str, decoder_path: str, out_dir: str, image_size: int = 256) -> DVAEConfig:
    """Load the two pickled modules safely and save them as one dallekit dVAE folder."""
    from dallekit.models.dvae import save_dvae_config

    encoder, decoder = _load_module(encoder_path, "encoder"), _load_module(decoder_path, "decoder")
    if encoder.vocab_size != decoder.vocab_size or encoder.n_hid != decoder.n_hid:
        raise BadInputError(f"{encoder_path} and {decoder_path} do not belong together (vocab or width differ)")
    config = dvae_config(
        "dalle", image_size=image_size, codebook_size=encoder.vocab_size, n_groups=encoder.group_count,
        n_hid=encoder.n_hid, n_blk_per_group=encoder.n_blk_per_group, n_init=decoder.n_init, channels=encoder.input_channels,
    )
    model = DVAE(config)
    state = _renamed(encoder.state_dict(), "encoder") | _renamed(decoder.state_dict(), "decoder")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BadInputError(f"the dall_e modules do not match the dVAE layout (missing {missing[:3]}, unexpected {unexpected[:3]})")
    save_model(out_dir, model, save_dvae_config(config) | {"source": "openai dall_e"})
    return config
