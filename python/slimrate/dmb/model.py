"""The score network: SEDD's DDiT (diffusion transformer) at CPU sizes (docs/dmb.md §5, SEDD ``model/``).

``ScoreNet(x_t (B, L) int64, h (B,) = σ̄(t)) -> logscore (B, L, V)``, an estimate of log p_t(y)/p_t(x_t)
for every single-token change at every position.  Layout, as in SEDD's ``transformer.py``:
- token embedding (kaiming-uniform), σ̄ through a sinusoidal embedding + MLP, then SiLU → c;
- blocks: weight-only LayerNorm, adaLN-zero modulation from c (shift, scale, gate for attention and
  MLP; zero-initialised so each block starts as the identity), rotary position embedding on q and k,
  bidirectional attention, GELU(tanh) MLP;
- final layer: adaLN-modulated LayerNorm and a zero-initialised linear map to V log-scores;
- ``scale_by_sigma`` (SEDD-absorb): subtract log(e^σ̄ − 1) + log(V − 1), so the initial output is
  about the absorbing chain's true log-ratio scale;
- the score scatter: logscore[..., x_t] := 0 (the ratio of x_t to itself).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Presets: "tiny" for tests (seconds), "small" for CPU studies, "medium" for the study's larger-network check
# (twice small's width and depth: 1.03M parameters vs 0.14M on text8 windows of 64), "sedd-small" = the
# paper's text8 net (768 hidden, 12 blocks, 12 heads, cond 128, ≈92M parameters; docs/dmb.md §12).
MODEL_PRESETS = {
    "tiny": {"d_model": 32, "n_heads": 2, "n_blocks": 1, "cond_dim": 16},
    "small": {"d_model": 64, "n_heads": 4, "n_blocks": 2, "cond_dim": 32},
    "medium": {"d_model": 128, "n_heads": 4, "n_blocks": 4, "cond_dim": 64},
    "sedd-small": {"d_model": 768, "n_heads": 12, "n_blocks": 12, "cond_dim": 128},
}
FREQ_EMBED_DIM = 256  # SEDD TimestepEmbedder.frequency_embedding_size
MAX_PERIOD = 10_000  # sinusoidal embeddings and rotary base, as SEDD


@dataclass
class ScoreNetConfig:
    """Sizes of ``ScoreNet``; vocab_size counts every state (data tokens + [MASK] for absorb)."""

    vocab_size: int
    seq_len: int
    d_model: int = 64
    n_heads: int = 4
    n_blocks: int = 2
    cond_dim: int = 32
    mlp_ratio: int = 4
    dropout: float = 0.0
    scale_by_sigma: bool = False

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_model: expected a multiple of 2·n_heads (rotary needs even head sizes), got "
                             f"d_model={self.d_model}, n_heads={self.n_heads}")
        for name in ("vocab_size", "seq_len", "n_blocks", "cond_dim", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")

    @classmethod
    def preset(cls, name: str, vocab_size: int, seq_len: int, **overrides) -> ScoreNetConfig:
        if name not in MODEL_PRESETS:
            raise ValueError(f"model: expected one of {sorted(MODEL_PRESETS)}, got {name!r}")
        return cls(vocab_size=vocab_size, seq_len=seq_len, **{**MODEL_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(h: torch.Tensor, dim: int = FREQ_EMBED_DIM) -> torch.Tensor:
    """Sinusoidal embedding of σ̄: (B,) → (B, dim) = [cos(h·f), sin(h·f)], f = MAX_PERIOD^{−i/half}."""
    half = dim // 2
    freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32, device=h.device) / half)
    args = h.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotary_tables(seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (L, head_dim) for rotary embeddings with the two halves rotated together (SEDD rotary.py)."""
    inv_freq = 1.0 / (MAX_PERIOD ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (L, head_dim/2)
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, L, hs) rotated: x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class LayerNorm(nn.Module):
    """LayerNorm with a weight and no bias (SEDD), computed in float32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), [x.shape[-1]]).to(x.dtype) * self.weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def _zero_linear(n_in: int, n_out: int) -> nn.Linear:
    layer = nn.Linear(n_in, n_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class DDiTBlock(nn.Module):
    def __init__(self, cfg: ScoreNetConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.norm1, self.norm2 = LayerNorm(d), LayerNorm(d)
        self.attn_qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.mlp_ratio * d), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_ratio * d, d))
        self.adaLN_modulation = _zero_linear(cfg.cond_dim, 6 * d)  # adaLN-zero

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.adaLN_modulation(c)[:, None].chunk(6, dim=2)  # 6 × (B, 1, C)
        qkv = self.attn_qkv(modulate(self.norm1(x), shift_msa, scale_msa))  # (B, L, 3C)
        q, k, v = (t.view(B, L, self.n_heads, C // self.n_heads).transpose(1, 2) for t in qkv.split(C, dim=2))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, L, C)
        x = x + gate_msa * F.dropout(self.attn_out(y), self.dropout, self.training)
        mlp = self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x + gate_mlp * F.dropout(mlp, self.dropout, self.training)


class ScoreNet(nn.Module):
    """SEDD's DDiT: ``forward(x_t (B, L) int64, h (B,) float) -> logscore (B, L, V) float32``."""

    def __init__(self, cfg: ScoreNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        nn.init.kaiming_uniform_(self.vocab_embed, a=math.sqrt(5))  # SEDD EmbeddingLayer
        self.sigma_map = nn.Sequential(nn.Linear(FREQ_EMBED_DIM, cfg.cond_dim), nn.SiLU(),
                                       nn.Linear(cfg.cond_dim, cfg.cond_dim))
        self.blocks = nn.ModuleList(DDiTBlock(cfg) for _ in range(cfg.n_blocks))
        self.norm_final = LayerNorm(cfg.d_model)
        self.final_modulation = _zero_linear(cfg.cond_dim, 2 * cfg.d_model)
        self.output = _zero_linear(cfg.d_model, cfg.vocab_size)
        cos, sin = rotary_tables(cfg.seq_len, cfg.d_model // cfg.n_heads)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    def forward(self, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if x_t.dim() != 2 or x_t.shape[1] != self.cfg.seq_len:
            raise ValueError(f"x_t: expected shape (batch, {self.cfg.seq_len}), got {tuple(x_t.shape)}")
        if h.shape != (x_t.shape[0],):
            raise ValueError(f"h: expected shape ({x_t.shape[0]},) (one σ̄ per sequence), got {tuple(h.shape)}")
        x = self.vocab_embed[x_t]  # (B, L, C)
        c = F.silu(self.sigma_map(timestep_embedding(h)))  # (B, cond)
        for block in self.blocks:
            x = block(x, self.rotary_cos, self.rotary_sin, c)
        shift, scale = self.final_modulation(c)[:, None].chunk(2, dim=2)
        logscore = self.output(modulate(self.norm_final(x), shift, scale)).float()  # (B, L, V)
        if self.cfg.scale_by_sigma:
            logscore = logscore - log_esigm1(h.float())[:, None, None] - math.log(self.cfg.vocab_size - 1)
        return logscore.scatter(-1, x_t.unsqueeze(-1), 0.0)


def log_esigm1(h: torch.Tensor) -> torch.Tensor:
    """log(e^h − 1) without overflow: expm1 below 0.5 (SEDD), h + log1p(−e^{−h}) above."""
    small = torch.log(torch.expm1(h.clamp_max(0.5)))
    return torch.where(h < 0.5, small, h + torch.log1p(-torch.exp(-h.clamp_min(0.5))))
