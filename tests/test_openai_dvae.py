"""convert-openai-dvae: random dall_e modules saved as the package does give the same codes and images."""

from __future__ import annotations

import pytest
import torch

dall_e = pytest.importorskip("dall_e", reason="the optional dall-e package is part of the dev extra")

from dall_e.decoder import Decoder  # noqa: E402
from dall_e.encoder import Encoder  # noqa: E402
from dall_e.utils import map_pixels, unmap_pixels  # noqa: E402

from dallekit.cli import main  # noqa: E402
from dallekit.tokenize.image import ImageTokenizer  # noqa: E402


def test_converted_model_matches_dall_e(tmp_path, capsys):
    torch.manual_seed(0)
    encoder, decoder = Encoder(n_hid=64, vocab_size=512), Decoder(n_init=32, n_hid=64, vocab_size=512)
    for module in (encoder, decoder):  # random but non-zero biases, so a dropped bias would show
        for p in module.parameters():
            p.data.add_(torch.randn_like(p) * 0.01)
    torch.save(encoder, tmp_path / "encoder.pkl")  # the package's own format: whole pickled modules
    torch.save(decoder, tmp_path / "decoder.pkl")
    with pytest.raises(SystemExit) as done:
        main(["convert-openai-dvae", "--encoder", str(tmp_path / "encoder.pkl"), "--decoder", str(tmp_path / "decoder.pkl"), "--out", str(tmp_path / "dvae")])
    assert done.value.code == 0 and "512 codes, 32x32 grid" in capsys.readouterr().out
    converted = ImageTokenizer.load(str(tmp_path / "dvae"), device="cpu").model

    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        codes = encoder(map_pixels(x)).argmax(dim=1)
        assert torch.equal(converted.encode(x), codes)
        one_hot = torch.nn.functional.one_hot(codes, 512).permute(0, 3, 1, 2).float()
        image = unmap_pixels(torch.sigmoid(decoder(one_hot)[:, :3]))
        assert torch.allclose(converted.decode(codes), image, atol=1e-5)


def test_other_pickles_are_refused(tmp_path, capsys):
    torch.save({"not": "a module", "fn": print}, tmp_path / "evil.pkl")
    with pytest.raises(SystemExit) as done:
        main(["convert-openai-dvae", "--encoder", str(tmp_path / "evil.pkl"), "--decoder", str(tmp_path / "evil.pkl"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "not a dall_e encoder module that loads safely" in err and err.count("\n") == 1
