"""A small character-level causal transformer LM (nanoGPT-style), with batching and evaluation helpers.

Layout follows karpathy/nanoGPT ``model.py``: token + learned position embeddings, pre-LayerNorm
blocks (causal self-attention, GELU MLP), final LayerNorm, and a head tied to the token embedding
(as GPT-2/nanoGPT; at 27 symbols tying saves only 27·d parameters, it is kept for the familiar
layout). Attention is ``F.scaled_dot_product_attention(is_causal=True)``.

Speed and size: see ``CharLMConfig``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimrate.data.text import VOCAB_SIZE


@dataclass
class CharLMConfig:
    """Sizes of ``CharLM``; the default (53,888 parameters) is sized for CPU schedule studies.

    Measured training speed, batch 32, ``torch.optim.AdamW`` defaults, 2-core AMD EPYC VM shared with
    other jobs, torch 2.13 CPU, default 2 threads (1 thread in brackets), steps/s:
    default (T=32, d=64, 1 layer) 155–194 (100–120); T=32, d=48, 3 heads, 2 layers ~120 (~90);
    T=64, d=64, 2 layers ~50 (~30), which is matmul-bound: 1.2 GFLOP per step. After 2,500 steps
    (one-cycle LR, peak 3e-3) the default reaches 1.99 bits/char on the pydoc validation split, the
    2-layer d=48 model 1.97, so the default trades little quality for 1.5× speed.
    """

    vocab_size: int = VOCAB_SIZE  # text8 alphabet: 27
    context: int = 32  # T: the longest sequence (position embeddings)
    d_model: int = 64
    n_heads: int = 4  # head size 16: CPU flash attention is faster at 16 than at 12 (measured)
    n_layers: int = 1
    mlp_ratio: int = 4
    dropout: float = 0.0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: CharLMConfig):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model: expected a multiple of n_heads={cfg.n_heads}, got {cfg.d_model}")
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_heads
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 × (B, T, C)
        q, k, v = (t.view(B, T, self.n_heads, hs).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class Block(nn.Module):
    def __init__(self, cfg: CharLMConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model),  # (B, T, 4C)
            nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model),  # (B, T, C)
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CharLM(nn.Module):
    """Causal transformer over character ids: ``forward(idx (B, T) int64) -> logits (B, T, V)``."""

    def __init__(self, cfg: CharLMConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or CharLMConfig()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # tied (module docstring)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2·n_layers) (nanoGPT model.py, c_proj init).
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx (B, T) int64 ids in [0, V), T ≤ context → logits (B, T, V) float32 (unnormalised)."""
        T = idx.shape[1]
        if T > self.cfg.context:
            raise ValueError(f"idx: expected at most context={self.cfg.context} positions, got {T}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, T, V)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-character cross-entropy in nats over all B·T positions; targets (B, T) int64."""
        logits = self(idx)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def bits_per_char(nats: float | torch.Tensor) -> float | torch.Tensor:
    """Cross-entropy in bits per character from nats: nats / ln 2."""
    return nats / math.log(2)


def get_lm_batch(ids: torch.Tensor, batch_size: int, context: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random training windows: x (B, T) int64 = ids[s : s+T], y (B, T) int64 = ids[s+1 : s+T+1].

    ids (n,) any integer dtype (uint8 from ``encode``); starts s uniform in [0, n - T - 1], drawn
    from ``generator`` so a seeded generator gives the same batches.
    """
    if ids.dim() != 1 or len(ids) < context + 1:
        raise ValueError(f"ids: expected a 1-D tensor of at least context + 1 = {context + 1} ids, "
                         f"got shape {tuple(ids.shape)}")
    starts = torch.randint(0, len(ids) - context, (batch_size,), generator=generator)  # (B,)
    offsets = starts[:, None] + torch.arange(context + 1)  # (B, T + 1)
    window = ids[offsets].long()  # (B, T + 1)
    return window[:, :-1], window[:, 1:]


@torch.no_grad()
def evaluate_lm(model: CharLM, val_ids: torch.Tensor, context: int, batch_size: int = 64,
                max_batches: int | None = None) -> float:
    """Mean validation cross-entropy in nats per character over fixed, deterministic windows.

    Windows are non-overlapping, start at 0, T, 2T, … (T = context), so each character after the
    first is predicted exactly once, from 0 … T−1 characters of its own window (the usual
    nanoGPT-style window loss, a little above the loss with full context everywhere). With
    ``max_batches``, only ``max_batches · batch_size`` windows are used, evenly spaced over the split
    (a fixed strided subset, the same at every call). The model is put in eval mode for the call and
    its previous mode restored.
    """
    if val_ids.dim() != 1 or len(val_ids) < context + 1:
        raise ValueError(f"val_ids: expected a 1-D tensor of at least context + 1 = {context + 1} ids, "
                         f"got shape {tuple(val_ids.shape)}")
    starts = torch.arange(0, len(val_ids) - context, context)  # (n_windows,)
    if max_batches is not None and len(starts) > max_batches * batch_size:
        keep = torch.linspace(0, len(starts) - 1, max_batches * batch_size).round().long()
        starts = starts[keep]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in starts.split(batch_size):
        window = val_ids[chunk[:, None] + torch.arange(context + 1)].long().to(device)  # (b, T + 1)
        x, y = window[:, :-1], window[:, 1:]
        total += float(model.loss(x, y)) * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count
