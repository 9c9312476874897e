"""The writer of the case files that csrc/tests/case_file.h reads (tools/core_cases.py writes them), and the
tolerances the cases state."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import torch

MAGIC = b"SLRCASE1"
# csrc/tests/case_file.h's DType codes.
DTYPE_CODES = {torch.uint8: 0, torch.int8: 1, torch.uint16: 2, torch.int16: 3, torch.uint32: 4, torch.int32: 5,
               torch.uint64: 6, torch.int64: 7, torch.float16: 8, torch.bfloat16: 9, torch.float32: 10,
               torch.float64: 11}
# csrc/core/status.h's Status codes that cases expect.
STATUS = {"ok": 0.0, "bad_index": 2.0, "bad_value": 4.0, "corrupt_stream": 5.0}
FLOAT_DTYPES = {"f32": torch.float32, "f64": torch.float64, "bf16": torch.bfloat16, "f16": torch.float16}


def write_case(path: Path, op: str, arrays: dict[str, torch.Tensor | float]) -> None:
    """One case file: the op whose checker runs it and its named arrays (a float is a 0-d float64 array)."""
    if sys.byteorder != "little":
        raise RuntimeError("case files hold little-endian data; write them on a little-endian machine")

    def text(s: str) -> bytes:
        data = s.encode("ascii")
        return struct.pack("<H", len(data)) + data

    out = [MAGIC, text(op), struct.pack("<I", len(arrays))]
    for name, value in arrays.items():
        t = torch.as_tensor(value, dtype=torch.float64) if isinstance(value, float) else value
        t = t.detach().cpu().contiguous()
        out += [text(name), struct.pack("<BB", DTYPE_CODES[t.dtype], t.dim()), struct.pack(f"<{t.dim()}q", *t.shape),
                t.reshape(-1).view(torch.uint8).numpy().tobytes()]
    path.write_bytes(b"".join(out))


def rel_err(out: torch.Tensor, ref64: torch.Tensor) -> float:
    """‖out − ref64‖ / ‖ref64‖ in float64."""
    return ((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def flash_tol(ref_same: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype, ulps: float = 4) -> float:
    """flash-attention's rule, as the tests apply it: 2·err(reference run in the same dtype) + a few ulps."""
    return 2 * rel_err(ref_same, ref64) + ulps * torch.finfo(dtype).eps


def listed(argument: str, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A list argument as case arrays "<argument>.0", "<argument>.1", …"""
    return {f"{argument}.{i}": t for i, t in enumerate(tensors)}
