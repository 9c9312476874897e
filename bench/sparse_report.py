"""Turn bench_sparse.py's pytest-benchmark JSON into the crossover tables of bench/results/sparse.md.

    python bench/sparse_report.py bench/results/sparse.json bench/results/sparse.md

Per device and shape: the median time of slimrate's CSR kernel, dense F.linear and torch.sparse CSR for each
batch × sparsity, the speed-ups (baseline median / slimrate median; > 1 is faster), the crossover (lowest
measured sparsity where CSR beats dense, and where the speed-up crosses 1 by linear interpolation), weight
memory, and the block-sparse rows.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from summarize import header


def rows_by_cell(benchmarks: list[dict]) -> dict:
    """{(device, block, out, in, batch, sparsity): {row name: (median s, weight bytes)}}."""
    cells: dict = defaultdict(dict)
    for b in benchmarks:
        e = b["extra_info"]
        key = (e["device"], tuple(e["block"]), e["out"], e["inp"], e["batch"], e["sparsity"])
        cells[key][b["name"]] = (b["stats"]["median"], e["weight_bytes"])
    return cells


def crossover(sparsities: list[float], speedups: list[float | None]) -> str:
    """Where the speed-up over dense first reaches 1, interpolated linearly between grid points."""
    points = [(s, x) for s, x in zip(sparsities, speedups, strict=True) if x is not None]
    for (s0, x0), (s1, x1) in zip(points, points[1:], strict=False):
        if x0 < 1 <= x1:
            return f"{100 * (s0 + (1 - x0) * (s1 - s0) / (x1 - x0)):.0f}%"
    if points and points[0][1] >= 1:
        return f"≤ {100 * points[0][0]:.0f}%"
    return "not reached"


def unstructured_tables(cells: dict) -> list[str]:
    lines = []
    keys = sorted({(d, o, i) for d, blk, o, i, _, _ in cells if blk == (1, 1)})
    for device, out, inp in keys:
        batches = sorted({k[4] for k in cells if k[0] == device and k[1] == (1, 1) and k[2:4] == (out, inp)})
        sparsities = sorted({k[5] for k in cells if k[0] == device and k[1] == (1, 1) and k[2:4] == (out, inp)})
        head = "| batch | " + " | ".join(f"{100 * s:.0f}%" for s in sparsities) + " |"
        rule = "|---|" + "---|" * len(sparsities)
        lines += [f"### {out}×{inp} fp32 on {device}: CSR median (speed-up over dense F.linear / over "
                  "torch.sparse CSR)", "", head, rule]
        cross = []
        for batch in batches:
            row, over_dense = [], []
            for s in sparsities:
                cell = cells.get((device, (1, 1), out, inp, batch, s), {})
                if "csr" not in cell:
                    row.append("—")
                    over_dense.append(None)
                    continue
                t = cell["csr"][0]
                dense = cell["dense"][0] / t if "dense" in cell else None
                torch_csr = cell["torch-csr"][0] / t if "torch-csr" in cell else None
                over_dense.append(dense)
                row.append(f"{1e3 * t:.3f} ms ({dense:.2f}× / {torch_csr:.2f}×)" if dense and torch_csr
                           else f"{1e3 * t:.3f} ms")
            lines.append(f"| {batch} | " + " | ".join(row) + " |")
            cross.append(f"batch {batch}: {crossover(sparsities, over_dense)}")
        lines += ["", "Sparsity where CSR starts to beat dense: " + "; ".join(cross) + ".", ""]
        mem = ["| weight memory | " + " | ".join(f"{100 * s:.0f}%" for s in sparsities) + " |", rule]
        for name in ("dense", "torch-csr", "csr"):
            vals = [cells.get((device, (1, 1), out, inp, batches[0], s), {}).get(name) for s in sparsities]
            mem.append(f"| {name} | " + " | ".join(f"{v[1] / 2**20:.1f} MiB" if v else "—" for v in vals) + " |")
        lines += mem + [""]
    return lines


def block_table(cells: dict) -> list[str]:
    keys = sorted(k for k in cells if k[1] != (1, 1))
    if not keys:
        return []
    lines = ["### Block-sparse weights (whole r×c blocks zeroed), 4096×4096 fp32, 90%", "",
             "| device | block | batch | bsr median | dense | ×dense | torch BSR | ×torch BSR | weight memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in keys:
        device, (r, c), _, _, batch, _ = key
        cell = cells[key]
        name = f"bsr-{r}x{c}"
        if name not in cell:
            continue
        t, nbytes = cell[name]
        dense = cell.get("dense", (None,))[0]
        tb = cell.get("torch-bsr", (None,))[0]
        lines.append(f"| {device} | {r}×{c} | {batch} | {1e3 * t:.3f} ms | "
                     + (f"{1e3 * dense:.3f} ms | {dense / t:.2f}× | " if dense else "— | — | ")
                     + (f"{1e3 * tb:.3f} ms | {tb / t:.2f}× | " if tb else "not supported | — | ")
                     + f"{nbytes / 2**20:.1f} MiB |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("md")
    args = parser.parse_args()
    data = json.loads(Path(args.json).read_text())
    cells = rows_by_cell(data["benchmarks"])
    title = "# Sparse × dense: slimrate.ops.sparse_linear beside dense F.linear and torch.sparse"
    lines = [title, ""] + header(data)[2:]
    lines += unstructured_tables(cells) + block_table(cells)
    tmp = Path(args.md + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(args.md)  # atomic
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()
