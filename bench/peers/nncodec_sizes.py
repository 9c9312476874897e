"""Sizes of weight matrices under nncodec (DeepCABAC; Fraunhofer HHI's NNC, ISO/IEC 15938-17).

Runs in the peers venv (`make peers` creates bench/.venv-peers), never in slimrate's .venv: nncodec pins
its own torch. The BackSlash study (slimrate.studies.backslash) calls it through a subprocess.

    nncodec_sizes.py WEIGHTS.safetensors --step 0.01 [--dq-out RECON.safetensors]

WEIGHTS holds float32 tensors with ≥ 2 dims. Each is encoded as its own bitstream, as .slim codes each
tensor separately; the bytes are whole bitstreams, NNR unit headers included (37 bytes for a 1 × 1
tensor). nncodec.nnc.compress runs at qp_density = 7 with the qp whose step
Δ' = (k + (qp mod k))·2^(⌊qp/k⌋ − 7), k = 2^7 (nnc_core.common.get_stepsize_from_qp) is nearest to
--step: 7 is the finest density the 3-bit field allows, so Δ' is within 0.4% of Δ
(Δ = 0.01 → 0.0100098, 0.005 → 0.0050049). Two modes:
- "uniform": use_dq=False, lambda_scale=0: nearest-integer quantization with step Δ', so the symbols
  are those of round(w/Δ') and |error| ≤ Δ'/2; against .slim's coders this compares entropy coders only;
- "dq": use_dq=True, nncodec's default dependent (trellis-coded) quantization at the same qp: a
  different rate–distortion point (larger error; the study measures the model's quality after it).
Other settings are nncodec.tensor's defaults: row_skipping=True (all-zero rows flagged), param_opt=True,
cabac_unary_length_minus1=10, uniform approximation (no codebook), opt_qp=False.

Prints one JSON line: {"nncodec": version, "qp": …, "qp_density": 7, "step": Δ', "modes": {"uniform"|"dq":
{"bytes": {name: bytes}, "total_bytes": …, "max_abs_error": …}}}. --dq-out writes the "dq" mode's decoded
tensors (float32, same names) as safetensors.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import sys

import numpy as np
from nncodec import nnc
from nncodec.nnc_core.common import get_qp_from_stepsize, get_stepsize_from_qp
from safetensors.numpy import load_file, save_file

QP_DENSITY = 7  # largest value of the bitstream's 3-bit qp_density field: the finest step grid
MODES = {"uniform": False, "dq": True}  # mode → use_dq


def nearest_qp(step: float) -> int:
    return int(np.round(get_qp_from_stepsize(step, QP_DENSITY)))


def encode_decode(weights: np.ndarray, qp: int, use_dq: bool) -> tuple[bytes, np.ndarray]:
    """One tensor's bitstream and its decoded float32 tensor. The bitstream names the tensor "w": the
    name is stored in it, and the sizes should not depend on how the caller names tensors."""
    with contextlib.redirect_stdout(sys.stderr):  # nncodec prints INFO lines; stdout carries only the JSON
        bitstream = nnc.compress({"w": weights}, bitstream_path=None, qp=qp, qp_density=QP_DENSITY,
                                 use_dq=use_dq, lambda_scale=0, row_skipping=True, param_opt=True,
                                 return_bitstream=True, verbose=False)
        decoded = nnc.decompress(bitstream)["w"]
    return bitstream, decoded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", help="safetensors file of float32 tensors with ≥ 2 dims")
    parser.add_argument("--step", type=float, required=True, help="the quantization step Δ to match")
    parser.add_argument("--dq-out", help="write the dq mode's decoded tensors to this safetensors file")
    args = parser.parse_args(argv)
    tensors = {name: np.ascontiguousarray(t, dtype=np.float32) for name, t in load_file(args.weights).items()}
    bad = [name for name, t in tensors.items() if t.ndim < 2]
    if bad:
        parser.error(f"{args.weights}: expected tensors with ≥ 2 dims, got 1-D or scalar {bad}")
    qp = nearest_qp(args.step)
    result = {"nncodec": importlib.metadata.version("nncodec"), "qp": qp, "qp_density": QP_DENSITY,
              "step": float(get_stepsize_from_qp(np.int32(qp), QP_DENSITY)), "modes": {}}
    for mode, use_dq in MODES.items():
        sizes, decoded = {}, {}
        for name, weights in tensors.items():
            bitstream, decoded[name] = encode_decode(weights, qp, use_dq)
            sizes[name] = len(bitstream)
        result["modes"][mode] = {
            "bytes": sizes, "total_bytes": sum(sizes.values()),
            "max_abs_error": max((float(np.abs(decoded[n] - t).max()) for n, t in tensors.items() if t.size),
                                 default=0.0)}
        if mode == "dq" and args.dq_out:
            save_file({n: np.ascontiguousarray(d, dtype=np.float32) for n, d in decoded.items()}, args.dq_out)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
