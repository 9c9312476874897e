"""NF4 4-bit weights bit-compatible with bitsandbytes, and the fused NF4 + LoRA linear layer (docs/qlora.md).

- ``nf4_quantize`` / ``nf4_dequantize``: the bytes and absmax of ``bitsandbytes.functional.quantize_4bit(w,
  quant_type="nf4")`` and the values of ``dequantize_4bit``, incl. the double-quantized absmax
  (``compress_statistics=True``); bitsandbytes ``QuantState`` objects are accepted and returned.
- ``nf4_lora_linear``: y = x·deq(W)ᵀ + b + s·(lora_x·Aᵀ)·Bᵀ, differentiable in x, lora_x, A, B and b, W frozen.

Bit-compatibility is with bitsandbytes 0.50 on the CPU (tests/test_nf4.py checks it against the installed
package): the NF4 bytes follow its portable quantize_4bit kernel, the double-quant absmax its CPU 8-bit
blockwise quantizer (a 65536-entry lookup table over [-1, 1]).  bitsandbytes itself is only imported to build
a QuantState (``compress_statistics=True``); everything else works without it.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

from slimrate.ops import reference
from slimrate.ops.backend import extension_available, pick_backend, resolve_backend
from slimrate.ops.checks import check_bias, check_tensor, finite_number, int_arg

NF4_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# bitsandbytes accepts these block sizes (functional.quantize_4bit); slimrate's kernels need an even size.
BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Double quantization: absmax − mean(absmax) in 8-bit blocks of 256 with bitsandbytes' "dynamic" code.
NESTED_BLOCKSIZE = 256
# bitsandbytes' CPU 8-bit quantizer maps a scaled value v ∈ [-1, 1] to LUT[⌊(v+1)·½·65535 + ½⌋].
_LUT_SIZE = 65536


# ---- double quantization of the absmax (bitsandbytes functional.quantize_blockwise, CPU) ----

@functools.cache
def _dynamic_code() -> torch.Tensor:
    """bitsandbytes.functional.create_dynamic_map() (signed, 7 exponent bits, 8 bits): float32 [256], sorted."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """Code index of each of the 65536 grid points -1 + 2i/65535 (float32 arithmetic): the nearest code,
    ties to the lower one (bitsandbytes csrc/cpu_ops.cpp build_quantize_lut)."""
    code = _dynamic_code().numpy()
    mids = np.float32(0.5) * (code[:-1] + code[1:])
    grid = np.float32(-1.0) + (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)) / np.float32(_LUT_SIZE - 1)
    return torch.from_numpy(np.searchsorted(mids, grid, side="left").astype(np.int64))


def _quantize_blockwise8(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU quantize_blockwise(a, blocksize=256): uint8 indices into the dynamic code and float32
    absmax per block.  A block with absmax 0 gets index 0 throughout, like bitsandbytes."""
    n = a.numel()
    pad = -n % NESTED_BLOCKSIZE
    blocks = torch.nn.functional.pad(a.float(), (0, pad)).view(-1, NESTED_BLOCKSIZE)
    am = blocks.abs().amax(dim=1)
    inv = 1.0 / am  # float32 reciprocal, then one product per element, as bitsandbytes does
    v = torch.clamp(blocks * inv.unsqueeze(1), -1.0, 1.0)
    t = ((v + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5  # separate float32 roundings, no FMA
    idx = _dynamic_lut().to(a.device)[t.nan_to_num(0.0).to(torch.int64).clamp(0, _LUT_SIZE - 1)]
    idx = torch.where(am.unsqueeze(1) == 0, 0, idx)
    return idx.reshape(-1)[:n].to(torch.uint8), am


# ---- argument checks ----

def _blocksize_arg(blocksize: int) -> int:
    if int_arg("blocksize", blocksize, 1) not in BNB_BLOCKSIZES:
        raise ValueError(f"blocksize: expected one of bitsandbytes' {BNB_BLOCKSIZES}, got {blocksize}")
    return blocksize


def _is_quant_state(obj) -> bool:
    """Duck-typed bitsandbytes QuantState (absmax, blocksize, quant_type, shape, dtype, offset, state2)."""
    return not isinstance(obj, torch.Tensor) and hasattr(obj, "absmax") and hasattr(obj, "blocksize") \
        and hasattr(obj, "quant_type")


def _unpack_state(state, name: str, shape, blocksize: int | None, backend: str | None):
    """(absmax float32 [nblocks], shape or None, blocksize, stored dtype or None) from a QuantState or absmax."""
    if _is_quant_state(state):
        if state.quant_type != "nf4":
            raise ValueError(f"{name}: expected an NF4 QuantState, got quant_type={state.quant_type!r}; "
                             "quantize with quant_type='nf4'")
        if blocksize is not None and blocksize != state.blocksize:
            raise ValueError(f"blocksize: {blocksize} does not match the QuantState's blocksize "
                             f"{state.blocksize}; leave blocksize=None")
        if shape is not None and state.shape is not None and tuple(shape) != tuple(state.shape):
            raise ValueError(f"shape: {tuple(shape)} does not match the QuantState's shape {tuple(state.shape)}")
        absmax = state.absmax
        if getattr(state, "state2", None) is not None:  # nested: absmax = code[qabsmax]·absmax2 + offset
            absmax = pick_backend("nf4_absmax_dequantize", backend, absmax.device)(*_nested_absmax(state, name))
        return absmax.float(), (shape if shape is not None else state.shape), \
            _blocksize_arg(state.blocksize), state.dtype
    if not isinstance(state, torch.Tensor):
        raise TypeError(f"{name}: expected a float32 absmax tensor or a bitsandbytes QuantState, "
                        f"got {type(state).__name__}")
    if not state.is_floating_point():
        raise TypeError(f"{name}: expected a float absmax tensor, got {state.dtype}")
    return state.reshape(-1).float(), shape, _blocksize_arg(64 if blocksize is None else blocksize), None


def _nested_absmax(state, name: str) -> tuple:
    """nf4_absmax_dequantize's arguments (qabsmax, code, absmax2, offset, blocksize) from a nested QuantState,
    checked against each other: the code indexed by qabsmax, absmax2 read per block of qabsmax."""
    s2 = state.state2
    qabsmax = check_tensor(f"{name}.absmax", state.absmax, dtypes=(torch.uint8,))
    device = qabsmax.device
    code = check_tensor(f"{name}.state2.code", s2.code, dtypes=(torch.float32,), device=device, shape=(256,))
    offset = check_tensor(f"{name}.offset", state.offset, dtypes=(torch.float32,), device=device)
    if offset.numel() != 1:
        raise ValueError(f"{name}.offset: expected one value, got shape {tuple(offset.shape)}")
    blocksize = int_arg(f"{name}.state2.blocksize", s2.blocksize, 1)
    absmax2 = check_tensor(f"{name}.state2.absmax", s2.absmax, dtypes=(torch.float32,), device=device,
                           shape=(-(-qabsmax.numel() // blocksize),))
    return qabsmax, code, absmax2, offset, blocksize


def _check_packed(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """packed as a flat uint8 tensor, checked against n weights and the absmax count."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed: expected a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype == torch.bool or packed.is_complex():
        raise TypeError(f"packed: expected uint8 NF4 bytes (or bitsandbytes' quant_storage dtype), got {packed.dtype}")
    if packed.dtype != torch.uint8:  # bitsandbytes' quant_storage (e.g. bfloat16 for FSDP): the same bytes
        packed = packed.contiguous().view(torch.uint8)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed: expected (n + 1) // 2 = {(n + 1) // 2} bytes for {n} weights, got "
                         f"{packed.numel()}; the packed weight does not match the shape")
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(f"absmax: expected ceil(n / blocksize) = {-(-n // blocksize)} values for {n} weights "
                         f"in blocks of {blocksize}, got {absmax.numel()}; check blocksize")
    if absmax.device != packed.device:
        raise ValueError(f"absmax: on {absmax.device} but packed is on {packed.device}")
    return packed.reshape(-1)


def _shape_arg(shape) -> list[int]:
    if isinstance(shape, int) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise TypeError(f"shape: expected a sequence of ints >= 0, got {shape!r}")
    return [int(s) for s in shape]


# ---- public faces ----

def nf4_quantize(w: torch.Tensor, blocksize: int = 64, *, compress_statistics: bool = False,
                 backend: str | None = None):
    """Blockwise NF4 quantization of ``w`` (any shape, float32/bfloat16/float16), bitsandbytes' layout.

    Returns ``(packed, absmax)``: packed uint8 [(n+1)//2, 1] (element 2j in the high nibble of byte j, an odd n
    padded with code 7 = 0.0), absmax float32 [ceil(n/blocksize)] — the bytes and absmax of
    ``bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4")``.
    With ``compress_statistics=True`` returns ``(packed, QuantState)``, a bitsandbytes
    ``functional.QuantState`` with the double-quantized absmax (absmax − mean in 8-bit blocks of 256, QLoRA
    §2), identical to bitsandbytes' (needs bitsandbytes installed).
    """
    check_tensor("w", w, dtypes=NF4_DTYPES)
    blocksize = _blocksize_arg(blocksize)
    packed, absmax = pick_backend("nf4_quantize", backend, w.device)(w.contiguous(), blocksize)
    if not compress_statistics:
        return packed, absmax
    from bitsandbytes.functional import QuantState  # only here: the return type is bitsandbytes' own class

    offset = absmax.mean()
    qabsmax, absmax2 = _quantize_blockwise8(absmax - offset)
    state2 = QuantState(absmax=absmax2, code=_dynamic_code().to(w.device), blocksize=NESTED_BLOCKSIZE,
                        dtype=torch.float32)
    return packed, QuantState(absmax=qabsmax, shape=w.shape, code=reference.nf4_code(w.device), blocksize=blocksize,
                              quant_type="nf4", dtype=w.dtype, offset=offset, state2=state2)


def nf4_dequantize(packed: torch.Tensor, absmax_or_quant_state, shape=None, blocksize: int | None = None,
                   dtype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
    """W from NF4 bytes: code[index]·absmax computed in float32, then cast to ``dtype`` — bitsandbytes'
    ``dequantize_4bit`` bit for bit.

    absmax_or_quant_state: float32 absmax [ceil(n/blocksize)] or a bitsandbytes QuantState (nested too).
    shape: the weight's shape; default the QuantState's, or (2·len(packed),) for a bare absmax (pass it for
    an odd n).  blocksize: default the QuantState's, else 64.  dtype: default the QuantState's dtype (as
    bitsandbytes), else float32.  Unlike bitsandbytes, a 1-D shape comes back 1-D.
    """
    absmax, shape, blocksize, state_dtype = _unpack_state(absmax_or_quant_state, "absmax_or_quant_state", shape,
                                                          blocksize, backend)
    if isinstance(packed, torch.Tensor) and shape is None:
        shape = [2 * packed.numel()]
    shape = _shape_arg(shape)
    dtype = dtype or state_dtype or torch.float32
    if dtype not in NF4_DTYPES:
        raise TypeError(f"dtype: expected float32, bfloat16 or float16, got {dtype}")
    flat = _check_packed(packed, absmax, math.prod(shape), blocksize)
    return pick_backend("nf4_dequantize", backend, flat.device)(flat, absmax.contiguous(), shape, blocksize, dtype)


def _lora_args(x, lora_x, lora_A, lora_B, bias, out_features: int, in_features: int, backend: str):
    # float64 is the reference's truth (tests); the kernels take the training dtypes
    dtypes = NF4_DTYPES + ((torch.float64,) if backend == "reference" else ())
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        check_tensor(name, t, dtypes=dtypes, device=x.device)
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A: expected shape [r, {in_features}] (in_features of x), got {tuple(lora_A.shape)}")
    if lora_B.dim() != 2 or lora_B.shape != (out_features, lora_A.shape[0]):
        raise ValueError(f"lora_B: expected shape [{out_features}, {lora_A.shape[0]}] = [out_features, r of "
                         f"lora_A], got {tuple(lora_B.shape)}; rank mismatch between lora_A and lora_B")
    if lora_x is not None:
        if not isinstance(lora_x, torch.Tensor):
            raise TypeError(f"lora_x: expected a torch.Tensor or None, got {type(lora_x).__name__}")
        if lora_x.shape != x.shape or lora_x.dtype != x.dtype or lora_x.device != x.device:
            raise ValueError(f"lora_x: expected shape {tuple(x.shape)}, {x.dtype} on {x.device} like x, got "
                             f"{tuple(lora_x.shape)}, {lora_x.dtype} on {lora_x.device}")
    check_bias(bias, out_features, x.device)


def nf4_lora_linear(x: torch.Tensor, packed: torch.Tensor, quant_state_or_absmax, lora_A: torch.Tensor,
                    lora_B: torch.Tensor, scaling: float, bias: torch.Tensor | None = None, *, shape=None,
                    blocksize: int | None = None, lora_x: torch.Tensor | None = None,
                    backend: str | None = None) -> torch.Tensor:
    """y = x·deq(W)ᵀ + b + scaling·(lora_x·Aᵀ)·Bᵀ: a bitsandbytes Linear4bit with a peft LoRA adapter, one op.

    x [..., in] float32/bfloat16/float16; W [out, in] NF4 (``packed`` + absmax or a bitsandbytes QuantState,
    nested too; shape defaults to the QuantState's or [lora_B.shape[0], in]); lora_A [r, in], lora_B [out, r]
    float32/bfloat16/float16 (may differ from x's dtype, as peft's float32 adapters on a bfloat16 model);
    scaling = lora_alpha / r; bias [out] or None; lora_x: the LoRA branch's input (peft applies dropout there
    only), default x.  Returns y [..., out] in x's dtype.

    Autograd: x, lora_x, lora_A, lora_B and bias (W is frozen).  The native and Triton kernels accumulate
    everything in float32 and round once to x's dtype (gradients to each input's dtype); peft + bitsandbytes
    round the base product and the LoRA branch separately, so low-precision outputs are at least as accurate.
    ``backend="reference"`` is that peft + bitsandbytes arithmetic in plain PyTorch (ops/reference.py).
    W is decoded tile by tile inside the kernels, never materialised whole (docs/qlora.md §6).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x: expected shape [..., in_features], got a 0-d tensor")
    absmax, wshape, blocksize, _ = _unpack_state(quant_state_or_absmax, "quant_state_or_absmax", shape, blocksize,
                                                 backend)
    in_features = x.shape[-1]
    if wshape is None:
        if not isinstance(lora_B, torch.Tensor) or lora_B.dim() != 2:
            raise ValueError("shape: pass the weight's shape [out, in] (or lora_B [out, r] to infer it)")
        wshape = [lora_B.shape[0], in_features]
    wshape = _shape_arg(wshape)
    if len(wshape) != 2 or wshape[1] != in_features:
        raise ValueError(f"x: expected shape [..., {wshape[-1]}] to match the weight's shape {tuple(wshape)}, "
                         f"got {tuple(x.shape)}")
    out_features = wshape[0]
    _lora_args(x, lora_x, lora_A, lora_B, bias, out_features, in_features,
               resolve_backend("nf4_lora_linear", backend))
    scaling = finite_number("scaling", scaling)
    flat = _check_packed(packed, absmax, out_features * in_features, blocksize)
    if flat.device != x.device:
        raise ValueError(f"packed: on {flat.device} but x is on {x.device}")
    x2 = x.reshape(-1, in_features)
    lx2 = None if lora_x is None else lora_x.reshape(-1, in_features)
    y = pick_backend("nf4_lora_linear", backend, x.device)(x2, flat, absmax.contiguous(), out_features, blocksize,
                                                          lx2, lora_A, lora_B, scaling, bias)
    return y.reshape(*x.shape[:-1], out_features)


# ---- autograd: one backward for the native op and the Triton kernels ----

def _save_for_backward(ctx, inputs, output) -> None:
    x, packed, absmax, _, blocksize, lora_x, lora_A, lora_B, scaling, bias = inputs
    ctx.save_for_backward(x, packed, absmax, lora_x, lora_A, lora_B)  # W stays packed: it is decoded again
    ctx.blocksize, ctx.scaling = blocksize, scaling
    ctx.bias_dtype = None if bias is None else bias.dtype


def _lora_linear_backward(ctx, grad_y: torch.Tensor, grad_input) -> tuple:
    """Gradients of y = x·Wᵀ + s·(lx·Aᵀ)·Bᵀ + b (docs/qlora.md §6), float32 products, each rounded once:
    gh = s·g·B; dx = g·W (+ gh·A when lora_x is x, in the same kernel); d lora_x = gh·A; dA = ghᵀ·lx;
    dB = s·gᵀ·(lx·Aᵀ); db = Σ g.  ``grad_input`` is the backend's nf4_linear_grad_input."""
    x, packed, absmax, lora_x, lora_A, lora_B = ctx.saved_tensors
    need = ctx.needs_input_grad
    lx = x if lora_x is None else lora_x
    g = grad_y.float()
    gh = ctx.scaling * (g @ lora_B.float())  # [M, r]
    dx = dlx = da = db = dbias = None
    if need[0]:
        shared = lora_x is None
        dx = grad_input(grad_y, packed, absmax, x.shape[1], ctx.blocksize, gh if shared else None,
                        lora_A if shared else None)
    if lora_x is not None and need[5]:
        dlx = (gh @ lora_A.float()).to(lora_x.dtype)
    if need[6]:
        da = (gh.t() @ lx.float()).to(lora_A.dtype)
    if need[7]:
        db = (ctx.scaling * (g.t() @ (lx.float() @ lora_A.float().t()))).to(lora_B.dtype)
    if need[9]:
        dbias = g.sum(0).to(ctx.bias_dtype)
    return dx, None, None, None, None, dlx, da, db, None, dbias


class TritonLoRALinear(torch.autograd.Function):
    """nf4_lora_linear's Triton backend: the Triton kernels with the shared backward."""

    @staticmethod
    def forward(*args):
        from slimrate.triton_kernels import nf4_lora_linear_triton

        return nf4_lora_linear_triton(*args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_for_backward(ctx, inputs, output)

    @staticmethod
    def backward(ctx, grad_y):
        from slimrate.triton_kernels import nf4_linear_grad_input_triton

        return _lora_linear_backward(ctx, grad_y, nf4_linear_grad_input_triton)


if extension_available():
    @torch.library.register_fake("slimrate::nf4_quantize")
    def _nf4_quantize_fake(w, blocksize):
        n = w.numel()
        return (w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
                w.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32))

    @torch.library.register_fake("slimrate::nf4_dequantize")
    def _nf4_dequantize_fake(packed, absmax, shape, blocksize, dtype):
        return packed.new_empty(shape, dtype=dtype)

    @torch.library.register_fake("slimrate::nf4_absmax_dequantize")
    def _nf4_absmax_dequantize_fake(qabsmax, code, absmax2, offset, blocksize):
        return qabsmax.new_empty((qabsmax.numel(),), dtype=torch.float32)

    @torch.library.register_fake("slimrate::nf4_lora_linear")
    def _nf4_lora_linear_fake(x, packed, absmax, out_features, blocksize, lora_x, lora_A, lora_B, scaling, bias):
        return x.new_empty((x.shape[0], out_features))

    @torch.library.register_fake("slimrate::nf4_linear_grad_input")
    def _nf4_linear_grad_input_fake(grad_y, packed, absmax, in_features, blocksize, lora_grad_h, lora_A):
        return grad_y.new_empty((grad_y.shape[0], in_features))

    torch.library.register_autograd(
        "slimrate::nf4_lora_linear",
        lambda ctx, grad_y: _lora_linear_backward(ctx, grad_y, torch.ops.slimrate.nf4_linear_grad_input),
        setup_context=_save_for_backward)
