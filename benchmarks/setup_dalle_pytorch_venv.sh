#!/usr/bin/env bash
# Builds the peer's own venv for benchmarks/train_vs_dalle_pytorch.py at .bench/dalle-pytorch.
# A plain `pip install dalle-pytorch` fails building youtokentome; this recipe imports and trains
# on Python 3.11 with torch 2.14.1.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.bench/dalle-pytorch
PYTHON=$(command -v python3.11 || command -v python3)
test -x $VENV/bin/python || $PYTHON -m venv $VENV
$VENV/bin/pip install -q torch==2.14.1 torchvision==0.29.1
$VENV/bin/pip install -q --no-deps dalle-pytorch taming-transformers-rom1504
$VENV/bin/pip install -q axial-positional-embedding DALL-E einops rotary-embedding-torch omegaconf transformers tokenizers \
    webdataset "pytorch-lightning==1.9.5" "setuptools<70" pyarrow numpy
$VENV/bin/python -c "import dalle_pytorch; print('dalle_pytorch', dalle_pytorch.__file__)"
