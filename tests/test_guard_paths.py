"""Guards on paths and sockets: folder ingest stays inside its folder, decode writes only inside --out,
CLIP loads no pickle whatever --clip-pretrained says, and local servers listen on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dallekit.config import ClusterConfig, IngestConfig
from dallekit.demo.synthetic import encode, random_spec, render
from dallekit.errors import BadInputError
from dallekit.pipeline.ingest import (
    FILE_ROOTS,
    OUTSIDE_FOLDER,
    ingest,
    ingest_blocks,
    scan_block,
)
from tests.helpers import check_accounting, run_cli

SECRET = "the secret caption outside the folder"


def shape(seed: int) -> bytes:
    return encode(render(random_spec(random.Random(seed), width=48, height=48)))


# ---------------------------------------------------------------- folder ingest


def test_folder_ingest_reads_nothing_through_links_out_of_the_folder(tmp_path, client):
    outside = tmp_path / "outside"
    (outside / "tree").mkdir(parents=True)
    (outside / "secret.txt").write_text(SECRET)
    (outside / "secret.jpg").write_bytes(shape(9))
    (outside / "tree" / "e.jpg").write_bytes(shape(8))
    (outside / "tree" / "e.txt").write_text("an image in a linked folder")
    folder = tmp_path / "images"
    (folder / "store").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(shape(1))
    (folder / "a.txt").write_text("a plain image")
    (folder / "b.jpg").write_bytes(shape(2))
    (folder / "b.txt").symlink_to(outside / "secret.txt")  # caption linked out of the folder
    (folder / "c.jpg").symlink_to(outside / "secret.jpg")  # image linked out of the folder
    (folder / "c.txt").write_text("a linked image")
    (folder / "store" / "photo.data").write_bytes(shape(3))
    (folder / "d.jpg").symlink_to(folder / "store" / "photo.data")  # a link that stays inside: accepted
    (folder / "d.txt").write_text("a link inside the folder")
    (folder / "linked").symlink_to(outside / "tree", target_is_directory=True)  # never walked
    ingest([str(folder)], str(tmp_path / "out"), IngestConfig(format="folder"), client)
    kept, rejects = check_accounting(tmp_path / "out", 4)  # a, b, c, d: nothing from linked/
    real = os.path.realpath(folder)
    assert SECRET not in kept["caption"].tolist() + list(rejects.get("caption", []))
    assert all(u.startswith(Path(real).as_uri() + "/") for u in kept["url"]), kept["url"].tolist()
    assert sorted(kept["caption"]) == ["a link inside the folder", "a plain image"]
    reasons = dict(zip(rejects["url"].map(os.path.basename), rejects["reason"]))
    assert reasons == {"b.jpg": OUTSIDE_FOLDER, "c.jpg": OUTSIDE_FOLDER}
    assert json.loads((tmp_path / "out" / FILE_ROOTS).read_text()) == {"roots": [real]}


def test_percent_encoded_dot_dot_in_a_file_name_reads_that_file(tmp_path, client):
    from img2dataset.downloader import download_image

    (tmp_path / "secret.jpg").write_bytes(shape(7))  # what `..%2F..%2Fsecret.jpg` unquoted would reach
    folder = tmp_path / "a" / "images"
    folder.mkdir(parents=True)
    inside = shape(4)
    (folder / "..%2F..%2Fsecret.jpg").write_bytes(inside)
    (folder / "..%2F..%2Fsecret.txt").write_text("a name with an encoded parent")
    ingest([str(tmp_path / "a")], str(tmp_path / "out"), IngestConfig(), client)  # auto-detected image folder
    kept, _ = check_accounting(tmp_path / "out", 1)
    _, stream, error = download_image((0, kept["url"].iloc[0]), 5, None, None)  # img2dataset's own fetch
    assert error is None and stream.getvalue() == inside


def test_tabular_ingest_records_no_file_roots_and_remote_folders_still_list(tmp_path, client):
    (tmp_path / "in.tsv").write_text("a cat\thttp://example.com/1.jpg\n")
    ingest([str(tmp_path / "in.tsv")], str(tmp_path / "out"), IngestConfig(), client)
    assert json.loads((tmp_path / "out" / FILE_ROOTS).read_text()) == {"roots": []}
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe({"/guard-imgs/x.jpg": shape(5), "/guard-imgs/x.txt": b"a remote caption"})
    blocks = ingest_blocks(["memory://guard-imgs"], IngestConfig(format="folder"))
    assert blocks[0].file.root is None and scan_block(blocks[0], "memory://guard-work", 1, False)["rows"] == 1
    rows = pq.read_table(memory.open("/guard-work/blocks/b-000000.parquet", "rb")).to_pylist()
    assert [(r["url"], r["caption"]) for r in rows] == [(memory.unstrip_protocol("/guard-imgs/x.jpg"), "a remote caption")]
    memory.rm(["/guard-imgs", "/guard-work"], recursive=True)


# ---------------------------------------------------------------- decode


def test_decode_writes_only_inside_out_whatever_the_uid(tmp_path):
    from dallekit.generation.decode import SAFE_STEM, decode_tokens, safe_stem
    from dallekit.models.dvae import DVAE, dvae_config, save_dvae_config
    from dallekit.models.weights import save_model
    from dallekit.tokenize.image import ImageTokenizer
    from dallekit.tokenize.tokens import token_metadata, token_table

    torch.manual_seed(0)
    config = dvae_config("tiny")
    save_model(tmp_path / "dvae", DVAE(config), save_dvae_config(config))
    tokenizer = ImageTokenizer.load(str(tmp_path / "dvae"))
    uids = ["good_uid-1", "../../escape", str(tmp_path / "absolute"), "x" * 65, "uid.0", "y" * 64]
    codes = np.random.default_rng(0).integers(0, config.codebook_size, (len(uids), config.grid**2))
    metadata = token_metadata(tokenizer.metadata(), {"kind": "clip-bpe"})
    (tmp_path / "tokens").mkdir()
    pq.write_table(token_table(uids, ["c"] * len(uids), [[1]] * len(uids), codes, metadata), tmp_path / "tokens" / "part-00000.parquet")
    out = tmp_path / "deep" / "out"
    written = decode_tokens(str(tmp_path / "tokens"), str(tmp_path / "dvae"), str(out), limit=len(uids))
    assert len(written) == len(uids) and all(p.parent == out for p in written)
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in written] + ["grid.png"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "dvae", "tokens"]  # no escape.png, absolute.png
    assert written[0].name == "good_uid-1.png" and written[-1].name == "y" * 64 + ".png"
    hashed = [p.stem for p in written[1:-1]]
    assert len(set(hashed)) == len(hashed) and not any(SAFE_STEM.fullmatch(s) for s in hashed)
    assert safe_stem("") != "" and safe_stem(safe_stem("../x")) != safe_stem("../x")  # a hashed name is no safe uid


# ---------------------------------------------------------------- CLIP weights


class _Unpickled:
    """Unpickling this creates the marker folder: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def pickle_trap(tmp_path, monkeypatch):
    """A torch.save'd weights file that would create `marker` if unpickled, and a torch.load that fails the test."""
    marker = tmp_path / "UNPICKLED"
    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": _Unpickled(marker)}, weights)
    calls = []

    def no_torch_load(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load reached")

    monkeypatch.setattr(torch, "load", no_torch_load)
    yield weights
    assert not calls and not marker.exists()


def test_pickled_clip_pretrained_file_is_refused(tmp_path, pickle_trap):
    from dallekit.models.clip import load_clip

    renamed = tmp_path / "weights"  # an existing file with no suffix is still a file, not a tag
    renamed.write_bytes(pickle_trap.read_bytes())
    for value in (str(pickle_trap), str(renamed), "weights.pt", "sub/any.bin", str(tmp_path / "w.SAFETENSORS")):
        with pytest.raises(BadInputError, match=r"--clip-pretrained .*: expected a \.safetensors file \(pickled weights are not loaded\)"):
            load_clip("dallekit-tiny-clip", value)
    with pytest.raises(BadInputError, match="no such file"):
        load_clip("dallekit-tiny-clip", str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("command", ["filter", "sample", "evaluate"])
def test_every_command_refuses_a_pickled_clip_pretrained(tmp_path, capsys, pickle_trap, command):
    from tests.stage_data import downloaded_row, shape_jpeg, write_stage

    for name in ("model", "dvae", "tokens"):
        (tmp_path / name).mkdir()
    clip = ["--clip-model", "dallekit-tiny-clip", "--clip-pretrained", str(pickle_trap)]
    if command == "filter":
        write_stage(tmp_path / "clean", [[downloaded_row("a", "a red circle on blue", shape_jpeg(1))]])
        args = ["filter", str(tmp_path / "clean"), "--out", str(tmp_path / "f"), *clip]
    elif command == "sample":
        args = ["sample", "--model", str(tmp_path / "model"), "--dvae", str(tmp_path / "dvae"), "--prompt", "a cat", "--out", str(tmp_path / "s"), *clip]
    else:
        args = ["evaluate", "--model", str(tmp_path / "model"), "--dvae", str(tmp_path / "dvae"), "--tokens", str(tmp_path / "tokens"),
                "--out", str(tmp_path / "e"), *clip]
    code, err = run_cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert str(pickle_trap) in err and "pickled weights are not loaded" in err


def test_local_safetensors_clip_pretrained_loads(tmp_path, pickle_trap):
    from PIL import Image

    from dallekit.models.clip import load_clip, save_clip

    scorer = load_clip("dallekit-tiny-clip", None)
    weights = save_clip(scorer, "dallekit-tiny-clip", tmp_path / "clip") / "open_clip_model.safetensors"
    images, captions = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")], ["a red square", "a blue square"]
    loaded = load_clip("dallekit-tiny-clip", str(weights))
    np.testing.assert_allclose(loaded.score(images, captions), scorer.score(images, captions), atol=1e-5)


@pytest.fixture
def fake_hub(monkeypatch):
    """open_clip's hub download, replaced: `files` maps a requested file name to a local path; others are missing."""
    import open_clip.pretrained
    from huggingface_hub.errors import EntryNotFoundError

    requested, files = [], {}

    def download(repo_id, filename, **kwargs):
        requested.append(filename)
        if filename not in files:
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(files[filename])

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", download)
    return requested, files


@pytest.mark.parametrize(
    "model, tag, safe, pickle_name",
    [("ViT-B-32", "laion2b_s34b_b79k", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
     ("ViTamin-S", "datacomp1b", "pytorch_model.safetensors", "pytorch_model.bin")],
)
def test_hub_tag_with_only_pickled_weights_is_refused(fake_hub, pickle_trap, model, tag, safe, pickle_name):
    from dallekit.models.clip import load_clip

    requested, files = fake_hub
    files[pickle_name] = pickle_trap  # the hub has only the pickle: open_clip itself would torch.load it
    with pytest.raises(BadInputError, match=rf"--clip-pretrained {tag}: .* has no {safe}; open_clip would load {pickle_name}.*pickled weights are not loaded"):
        load_clip(model, tag)
    assert requested == [safe]  # the pickle is not even downloaded


def test_hub_tag_loads_its_safetensors_with_its_preprocessing(tmp_path, monkeypatch, fake_hub, pickle_trap):
    import open_clip.pretrained
    from PIL import Image

    from dallekit.models.clip import load_clip, save_clip

    requested, files = fake_hub
    scorer = load_clip("dallekit-tiny-clip", None)
    files["open_clip_model.safetensors"] = save_clip(scorer, "dallekit-tiny-clip", tmp_path / "clip") / "open_clip_model.safetensors"
    files["open_clip_pytorch_model.bin"] = pickle_trap
    tag = open_clip.pretrained._pcfg(hf_hub="example/tiny-clip/", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "dallekit-tiny-clip", {"guard_test": tag})
    loaded = load_clip("dallekit-tiny-clip", "guard_test")
    assert requested == ["open_clip_model.safetensors"]
    normalize = loaded.preprocess.transforms[-1]
    assert tuple(normalize.mean) == (0.5, 0.5, 0.5) and tuple(normalize.std) == (0.25, 0.25, 0.25)
    images, captions = [Image.new("RGB", (64, 64), "red")], ["a red square"]
    assert loaded.model.state_dict().keys() == scorer.model.state_dict().keys()
    for key, value in scorer.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key].cpu(), value.cpu()), key
    assert loaded.score(images, captions).shape == (1,)


# ---------------------------------------------------------------- servers


def _listening(pid: int) -> list[tuple[int, str, int]]:
    """(pid, ip, port) of every listening TCP socket of `pid` and its child processes."""
    import psutil

    me = psutil.Process(pid)
    found = []
    for proc in [me, *me.children(recursive=True)]:
        try:
            found += [(proc.pid, c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.parametrize("processes", [False, True])
def test_local_cluster_listens_on_loopback_only(processes):
    from dallekit.pipeline.cluster import dask_client

    with dask_client(ClusterConfig(workers=1, processes=processes), quiet=True) as client:
        assert client.submit(sum, [1, 2]).result() == 3
        sockets = _listening(os.getpid())
    assert sockets and all(ip == "127.0.0.1" for _, ip, _ in sockets), sockets


def test_shapes_server_listens_on_loopback_only():
    from dallekit.demo.synthetic import ShapesServer

    with ShapesServer({}, max_seconds=60) as server:
        mine = [s for s in _listening(os.getpid()) if s[2] == server.port]
    assert mine and all(ip == "127.0.0.1" for _, ip, _ in mine), mine
