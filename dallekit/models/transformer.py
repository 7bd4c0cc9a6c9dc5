"""A compact DALL-E: one decoder-only stream of text tokens, then image tokens (Ramesh et al. 2021).

The input is [BOS, text_0 .. text_{T-1}, image_0 .. image_{N-2}] and the targets are
[text_0 .. text_{T-1}, image_0 .. image_{N-1}]: every position predicts the next token. Text
shorter than T is filled with a distinct padding token per position, as DALL-E does, so an
empty caption (used for caption dropout and classifier-free guidance) is simply all padding.
Text and image have their own embeddings and output heads; image positions get row + column
embeddings. The loss is text and image cross-entropy, each averaged over its own tokens,
weighted 1/8 and 7/8. Attention is PyTorch's scaled_dot_product_attention, causal, optionally
with DALL-E's sparse row / column / convolutional masks on the image part, or with a local window
on the image part in every layer but the last (the shape is drawn from local context, so a
colour and a shape never seen together still compose). In training on the CPU, dropout draws
its masks 16 bits at a time (`dropout`) and attention with dropout is computed as SDPA's own
math path would, with that dropout on the attention weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class DalleConfig:
    """Transformer size and vocabularies; presets live in DALLE_PRESETS."""

    text_vocab: int = 49408  # text tokenizer ids (CLIP BPE by default)
    text_len: int = 64  # text positions; captions are truncated or padded to this
    image_vocab: int = 8192  # dVAE codebook size
    grid: int = 32  # image tokens per side (N = grid**2)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads
    n_embd: int = 768  # model width
    dropout: float = 0.0  # dropout in attention and MLP outputs
    bias: bool = False  # biases in Linear and LayerNorm layers
    text_loss_weight: float = 1 / 8  # the image loss gets 1 - this
    p_uncond: float = 0.1  # probability of dropping the caption in training (for guidance)
    sparse_attention: bool = False  # DALL-E's row/column/conv masks on image tokens instead of full causal
    attention_window: int = 0  # > 0: image tokens see earlier ones at most this many rows/columns away (text always), last layer full

    @property
    def image_len(self) -> int:
        """Image tokens per sample."""
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        """Positions in the stream: BOS + text + all image tokens but the last."""
        return self.text_len + self.image_len

    @property
    def pad_base(self) -> int:
        """Id of the padding token of text position 0; position i pads with pad_base + i."""
        return self.text_vocab

    @property
    def bos(self) -> int:
        """Id of the start token."""
        return self.text_vocab + self.text_len

    @classmethod
    def from_dict(cls, values: dict) -> DalleConfig:
        """Build from a JSON dict, ignoring keys this version does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


DALLE_PRESETS: dict[str, dict] = {
    "tiny": dict(text_len=16, n_layer=4, n_head=4, n_embd=128),  # CPU tests and the demo
    "small": dict(text_len=32, n_layer=8, n_head=8, n_embd=512),  # ~30M parameters
    "base": dict(text_len=64, n_layer=12, n_head=12, n_embd=768),  # ~110M+ parameters: one GPU
}


def dalle_config(preset: str, **overrides) -> DalleConfig:
    """The config of a named preset, with overrides (vocabularies and grid come from the token files)."""
    if preset not in DALLE_PRESETS:
        raise KeyError(f"unknown transformer preset {preset!r} (expected one of {', '.join(DALLE_PRESETS)})")
    return DalleConfig(**(DALLE_PRESETS[preset] | overrides))


DROP_LEVELS = 1 << 16  # dropout's probability is a multiple of 1/65536 on the CPU


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout; on the CPU its mask comes from the four 16-bit fields of 64-bit random draws.

    torch's CPU bernoulli_ draws one number per element, in one thread, on non-Intel CPUs (its
    MKL path is Intel-only): it took 30% of the demo transformer's step, which fell from 0.30-0.32
    to 0.18-0.20 CPU s with this mask.
    """
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    n, dropped = x.numel(), round(p * DROP_LEVELS)
    # all 64 bits of each draw (ATen's full-range case) as four uniform int16 fields: a quarter of the draws, and a view, not a copy
    draws = torch.empty(-(-n // 4), dtype=torch.int64, device=x.device).random_(-(2**63), None)
    fields16 = draws.view(torch.int16)[:n].view(x.shape)
    keep = fields16 >= dropped - DROP_LEVELS // 2  # int16 spans [-32768, 32767]: P(drop) = dropped / 65536
    return x * (keep.to(x.dtype) * (DROP_LEVELS / (DROP_LEVELS - dropped)))


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout` (the same module state, a cheaper CPU mask)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention, with an optional KV cache."""

    def __init__(self, c: DalleConfig):
        super().__init__()
        self.n_head, self.dropout, self.max_len = c.n_head, c.dropout, c.seq_len
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.resid_dropout = Dropout(c.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: dict | None = None) -> torch.Tensor:
        B, L, C = x.shape  # (batch, new positions, width)
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, L, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
        if cache is not None:
            k, v = append_to_cache(cache, k, v, self.max_len)
        p = self.dropout if self.training else 0.0
        if p and x.device.type == "cpu" and cache is None:  # SDPA's math path, with `dropout`'s mask on the attention weights
            allowed = mask if mask is not None else torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, L, L)
            y = dropout(att.masked_fill(~allowed, float("-inf")).softmax(dim=-1), p, True) @ v
        elif mask is None:
            # with a cache, the L new queries are the last L positions, so plain causal only fits L == total
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=L > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, L, C)))


def append_to_cache(cache: dict, k: torch.Tensor, v: torch.Tensor, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Write new keys and values (B, H, L, D) into the cache's preallocated (B, H, max_len, D) buffers; views of all so far.

    Concatenating each step instead would copy the whole cache every token: 46% of the demo's
    generation time.
    """
    if "k" not in cache:
        B, H, _, D = k.shape
        cache["k"], cache["v"], cache["n"] = k.new_empty(B, H, max_len, D), v.new_empty(B, H, max_len, D), 0
    n, L = cache["n"], k.shape[2]
    cache["k"][:, :, n : n + L], cache["v"][:, :, n : n + L] = k, v
    cache["n"] = n + L
    return cache["k"][:, :, : n + L], cache["v"][:, :, : n + L]


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, c: DalleConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = nn.Sequential(
            nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias), nn.GELU(), nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias), Dropout(c.dropout)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cache: dict | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        return x + self.mlp(self.ln_2(x))


def attention_masks(c: DalleConfig) -> list[torch.Tensor] | None:
    """Per-layer boolean (L, L) masks (True = may attend), or None for plain causal attention.

    sparse_attention: DALL-E's row attention, column attention where (i - 2) % 4 == 0, and a conv
    mask (11x11 neighbourhood) last. attention_window w: every layer but the last sees, among
    earlier image positions, those at most w rows and w columns away; the last layer is full causal.
    Text positions attend causally and image positions always see all text.
    """
    if c.sparse_attention and c.attention_window:
        raise ValueError("sparse_attention and attention_window are alternatives: set one")
    if not c.sparse_attention and not c.attention_window:
        return None
    L, T, G = c.seq_len, c.text_len + 1, c.grid
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    idx = torch.arange(L)
    img = (idx - T).clamp(min=0)  # image index of input position (position T is image token 0)
    row, col = img // G, img % G
    is_img = idx >= T
    both = is_img[:, None] & is_img[None, :]
    d_row, d_col = (row[:, None] - row[None, :]).abs(), (col[:, None] - col[None, :]).abs()
    if c.attention_window:
        near = (d_row <= c.attention_window) & (d_col <= c.attention_window)
        return [causal & (~both | near) for _ in range(c.n_layer - 1)] + [causal]
    rules = {"row": d_row == 0, "column": d_col == 0, "conv": (d_row <= 5) & (d_col <= 5)}
    masks = []
    for i in range(c.n_layer):
        kind = "conv" if i == c.n_layer - 1 else ("column" if (i - 2) % 4 == 0 else "row")
        masks.append(causal & (~both | rules[kind]))
    return masks


class DalleTransformer(nn.Module):
    """The transformer over text then image tokens."""

    def __init__(self, config: DalleConfig):
        super().__init__()
        c = self.config = config
        self.text_emb = nn.Embedding(c.text_vocab + c.text_len + 1, c.n_embd)  # ids, per-position pads, BOS
        self.text_pos = nn.Embedding(c.text_len + 1, c.n_embd)  # BOS + text positions
        self.image_emb = nn.Embedding(c.image_vocab, c.n_embd)
        self.row_emb = nn.Embedding(c.grid, c.n_embd)
        self.col_emb = nn.Embedding(c.grid, c.n_embd)
        self.drop = Dropout(c.dropout)
        self.blocks = nn.ModuleList([Block(c) for _ in range(c.n_layer)])
        self.ln_f = nn.LayerNorm(c.n_embd, bias=c.bias)
        self.text_head = nn.Linear(c.n_embd, c.text_vocab + c.text_len, bias=False)  # text ids and pads
        self.image_head = nn.Linear(c.n_embd, c.image_vocab, bias=False)
        self.masks = attention_masks(c)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """Parameters, embeddings included."""
        return sum(p.numel() for p in self.parameters())

    def pad_text(self, tokens: list[list[int]]) -> torch.Tensor:
        """Captions' BPE ids -> (B, T) with per-position padding, truncated to text_len."""
        c = self.config
        out = torch.arange(c.text_len).repeat(len(tokens), 1) + c.pad_base  # (B, T) all padding
        for i, ids in enumerate(tokens):
            ids = list(ids)[: c.text_len]
            out[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        return out

    def embed(self, text: torch.Tensor, image: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Embeddings (B, L, C) of stream positions start .. start+L-1 given text (B, T) and image inputs."""
        c = self.config
        B = text.shape[0] if text is not None else image.shape[0]
        parts = []
        n_text = c.text_len + 1
        if start < n_text:
            bos = torch.full((B, 1), c.bos, dtype=torch.long, device=(text if text is not None else image).device)
            stream = torch.cat([bos, text], dim=1)[:, start:]  # (B, T+1-start)
            pos = torch.arange(start, n_text, device=stream.device)
            parts.append(self.text_emb(stream) + self.text_pos(pos))
        if image is not None and image.shape[1]:
            first = max(start - n_text, 0)
            pos = torch.arange(first, first + image.shape[1], device=image.device)
            parts.append(self.image_emb(image) + self.row_emb(pos // c.grid) + self.col_emb(pos % c.grid))
        return torch.cat(parts, dim=1)

    def forward(self, text: torch.Tensor, image: torch.Tensor, return_loss: bool = False):
        """Logits for text (B, T, V_text + T) and image (B, N, V_image) targets, given full text and image tokens.

        With `return_loss` (training, as nanoGPT's forward with targets): the weighted text +
        image cross-entropy and its two terms instead, each averaged over its own tokens. The
        loss lives here so that DDP's hooks fire through one call.
        """
        c = self.config
        x = self.drop(self.embed(text, image[:, :-1]))  # (B, T + N, C)
        for i, block in enumerate(self.blocks):
            mask = self.masks[i].to(x.device) if self.masks is not None else None
            x = block(x, mask)
        x = self.ln_f(x)
        text_logits, image_logits = self.text_head(x[:, : c.text_len]), self.image_head(x[:, c.text_len :])
        if not return_loss:
            return text_logits, image_logits
        text_loss = F.cross_entropy(text_logits.float().flatten(0, 1), text.flatten())
        image_loss = F.cross_entropy(image_logits.float().flatten(0, 1), image.flatten())
        w = self.config.text_loss_weight
        return {"loss": w * text_loss + (1 - w) * image_loss, "text_loss": text_loss, "image_loss": image_loss}

    def configure_optimizers(self, weight_decay: float, lr: float, betas: tuple[float, float], device_type: str) -> torch.optim.AdamW:
        """AdamW with weight decay on the matrices but not on embeddings, biases and norms (as nanoGPT)."""
        decayed = [p for n, p in self.named_parameters() if p.dim() >= 2 and "emb" not in n]
        other = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
        groups = [{"params": decayed, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
        from dallekit.models.weights import adamw  # here: the model file itself needs only torch

        return adamw(groups, torch.device(device_type), lr=lr, betas=betas)

    def drop_captions(self, text: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each caption by all padding with probability p_uncond (training only)."""
        c = self.config
        if c.p_uncond <= 0:
            return text
        drop = torch.rand(text.shape[0], generator=generator, device="cpu").to(text.device) < c.p_uncond
        pads = torch.arange(c.text_len, device=text.device) + c.pad_base
        return torch.where(drop[:, None], pads.expand_as(text), text)

    def flops_per_token(self) -> float:
        """Training FLOPs per token, as nanoGPT counts them: 6N + 12 * L * H * Q * T."""
        c = self.config
        n = self.num_params() - self.text_emb.weight.numel() - self.image_emb.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.seq_len

    @torch.no_grad()
    def generate(
        self, text: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
        cond_scale: float = 1.0, generator: torch.Generator | list[torch.Generator] | None = None, use_cache: bool = True,
    ) -> torch.Tensor:
        """Sample image tokens (B, N) for padded text (B, T); cond_scale > 1 adds classifier-free guidance.

        A list of generators splits the rows into that many equal groups, each drawn from its
        own generator: several prompts share the forward passes, yet each gets the draws it
        would get alone.
        """
        c = self.config
        guided = cond_scale != 1.0
        if guided:  # the unconditional half is the same batch with empty captions
            empty = (torch.arange(c.text_len, device=text.device) + c.pad_base).expand_as(text)
            text = torch.cat([text, empty])
        B = text.shape[0]
        image = torch.zeros(B, 0, dtype=torch.long, device=text.device)
        caches = [dict() for _ in self.blocks] if use_cache else None
        fed = 0  # positions already in the caches
        for _ in range(c.image_len):
            if use_cache:
                x = self.embed(text, image[:, fed - c.text_len - 1 :] if fed > c.text_len else image, start=fed)
                fed += x.shape[1]
            else:
                x = self.embed(text, image)
            masks = None
            if self.masks is not None:
                L = x.shape[1] if not use_cache else fed
                masks = [m[L - x.shape[1] : L, :L].to(x.device) for m in self.masks]
            for i, block in enumerate(self.blocks):
                x = block(x, masks[i] if masks is not None else None, caches[i] if caches is not None else None)
            logits = self.image_head(self.ln_f(x[:, -1])).float()  # (B, V_image)
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + cond_scale * (cond - uncond)
            next_token = sample_logits(logits, temperature, top_k, top_p, generator)  # (B or B/2,)
            if guided:
                next_token = next_token.repeat(2)
            image = torch.cat([image, next_token[:, None]], dim=1)
        return image[: B // 2] if guided else image


def sample_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator) -> torch.Tensor:
    """One token per row from logits (B, V) with temperature, top-k and nucleus (top-p) filtering.

    `generator` is one generator, or a list of them for equal groups of rows (see `generate`).
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1).cpu()
    if isinstance(generator, list):
        if len(probs) % len(generator):
            raise ValueError(f"{len(probs)} rows do not split into {len(generator)} equal groups, one per generator")
        groups = probs.split(len(probs) // len(generator))
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(groups, generator)]).squeeze(1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(logits.device)


def config_dict(config: DalleConfig) -> dict:
    """JSON-ready config."""
    return asdict(config) | {"model": "dallekit-dalle"}
