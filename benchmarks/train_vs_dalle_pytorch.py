"""Training steps/s of dallekit's transformer vs dalle_pytorch.DALLE, side by side in one process.

Both models get the same depth, width, heads, text length, image grid and vocabularies, the
same pre-encoded token batches (random ids of the right shapes; dalle_pytorch is given image
codes, so its VAE never runs), AdamW, batch size and torch threads. Run it in the peer's own
venv (benchmarks/setup_dalle_pytorch_venv.sh builds .bench/dalle-pytorch); dallekit's model
file needs only torch and is imported from this checkout.

    .bench/dalle-pytorch/bin/python benchmarks/train_vs_dalle_pytorch.py [--steps 30] [--batch-size 16] [--rounds 3]

Feature differences that affect the comparison: dalle_pytorch by default adds token shifting
and rotary embeddings and uses GEGLU feed-forwards (its defaults are kept); dallekit uses
learned text positions, row + column image embeddings, GELU MLPs and scaled_dot_product_attention.
The two alternate in rounds (ABAB...: dalle_pytorch, then dallekit; each run with its own
warm-up steps). Prints steps/s of both per round and, as its last line, ratio=<median over
rounds of dallekit steps/s / dalle_pytorch steps/s>. Target >= 1.5 on CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from common import alternate, print_rounds  # noqa: E402

from dallekit.models.transformer import DalleTransformer, dalle_config  # noqa: E402


def steps_per_second(step, steps: int, warmup: int = 3) -> float:
    """Run `step` warmup times untimed, then `steps` times; returns steps per second."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--grid", type=int, default=8)
    parser.add_argument("--text-vocab", type=int, default=49408)
    parser.add_argument("--image-vocab", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of dalle_pytorch then dallekit")
    args = parser.parse_args()
    from dalle_pytorch import DALLE, DiscreteVAE

    torch.manual_seed(0)
    B, T, N = args.batch_size, args.text_len, args.grid**2
    text = torch.randint(1, args.text_vocab, (B, T))
    image = torch.randint(0, args.image_vocab, (B, N))

    ours = DalleTransformer(dalle_config("tiny", text_vocab=args.text_vocab, text_len=T, image_vocab=args.image_vocab, grid=args.grid,
                                         n_layer=args.depth, n_head=args.heads, n_embd=args.dim, p_uncond=0.0))
    ours_opt = torch.optim.AdamW(ours.parameters(), lr=1e-4)

    def ours_step():
        loss = ours(text, image, return_loss=True)["loss"]
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()

    vae = DiscreteVAE(image_size=args.grid * 4, num_layers=2, num_tokens=args.image_vocab, codebook_dim=64, hidden_dim=16)
    peer = DALLE(dim=args.dim, vae=vae, num_text_tokens=args.text_vocab, text_seq_len=T, depth=args.depth, heads=args.heads,
                 dim_head=args.dim // args.heads, loss_img_weight=7)
    peer_opt = torch.optim.AdamW([p for n, p in peer.named_parameters() if not n.startswith("vae.")], lr=1e-4)

    def peer_step():
        loss = peer(text, image, return_loss=True)
        peer_opt.zero_grad(set_to_none=True)
        loss.backward()
        peer_opt.step()

    results = alternate(args.rounds, lambda: steps_per_second(peer_step, args.steps), lambda: steps_per_second(ours_step, args.steps))
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if not n.startswith("vae."))  # noqa: E731
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"depth {args.depth}, dim {args.dim}, heads {args.heads}, text {T} of {args.text_vocab}, image {args.grid}x{args.grid} of {args.image_vocab}, batch {B}")
    print(f"parameters: dallekit {count(ours)}, dalle_pytorch {count(peer)}")
    print_rounds(results, "dalle_pytorch", "dallekit", "steps/s")


if __name__ == "__main__":
    main()
