"""Turn bench_nf4.py's pytest-benchmark JSON into the tables of bench/results/nf4.md.

    python bench/nf4_report.py bench/results/nf4.json bench/results/nf4.md

One QLoRA layer (forward + backward): per shape, dtype and token count the median time of bitsandbytes +
peft, of bitsandbytes' dequantize + F.linear (unsloth's approach) and of slimrate's fused op, the speed-ups
(baseline median / slimrate median; > 1 is faster) and issue 6's targets (≥ 3× over bnb-peft at 1 and 16
tokens, ≥ 1.2× at 512; faster than bnb-dequant everywhere).  Then nf4_dequantize beside dequantize_4bit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from summarize import fmt_time, header

TARGET_VS_PEFT = {1: 3.0, 16: 3.0, 512: 1.2}


def layer_table(benchmarks: list[dict]) -> list[str]:
    cells: dict = {}
    for b in benchmarks:
        e = b["extra_info"]
        if "tokens" in e:
            cells.setdefault((e["dtype"], e["out"], e["inp"], e["tokens"]), {})[e["backend"]] = b["stats"]
    lines = ["## One layer, forward + backward (x, lora_A, lora_B gradients), r = 16, double-quantized W", "",
             "| dtype | W | tokens | bnb-peft | bnb-dequant | slimrate | vs bnb-peft (target) | vs bnb-dequant |",
             "|---|---|---|---|---|---|---|---|"]
    for (dtype, out, inp, tokens), rows in sorted(cells.items()):
        med = {k: v["median"] for k, v in rows.items()}
        ours = med.get("slimrate")
        cells_ = [dtype, f"{out}×{inp}", str(tokens)]
        cells_ += [fmt_time(med[k]) if k in med else "—" for k in ("bnb-peft", "bnb-dequant", "slimrate")]
        for base in ("bnb-peft", "bnb-dequant"):
            if ours is None or base not in med:
                cells_.append("—")
                continue
            ratio = med[base] / ours
            target = TARGET_VS_PEFT.get(tokens) if base == "bnb-peft" else 1.0
            mark = "" if target is None else (" ✓" if ratio >= target else f" ✗ (< {target:g}×)")
            cells_.append(f"{ratio:.2f}×{mark}")
        lines.append("| " + " | ".join(cells_) + " |")
    return lines + [""]


def dequant_table(benchmarks: list[dict]) -> list[str]:
    cells: dict = {}
    for b in benchmarks:
        e = b["extra_info"]
        if "tokens" not in e:
            cells.setdefault((e["dtype"], e["out"], e["inp"]), {})[e["backend"]] = (b["stats"]["median"], e["bytes"])
    lines = ["## nf4_dequantize vs bitsandbytes dequantize_4bit (fresh output tensor per call)", "",
             "| dtype | W | bnb | slimrate | speed-up | slimrate GB/s |", "|---|---|---|---|---|---|"]
    for (dtype, out, inp), rows in sorted(cells.items()):
        if "bnb" not in rows or "slimrate" not in rows:
            continue
        (tb, _), (ts, nbytes) = rows["bnb"], rows["slimrate"]
        lines.append(f"| {dtype} | {out}×{inp} | {fmt_time(tb)} | {fmt_time(ts)} | {tb / ts:.2f}× | "
                     f"{nbytes / ts / 1e9:.1f} |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", type=Path)
    parser.add_argument("md_path", type=Path)
    args = parser.parse_args()
    data = json.loads(args.json_path.read_text())
    text = "\n".join(header(data) + layer_table(data["benchmarks"]) + dequant_table(data["benchmarks"]))
    tmp = args.md_path.with_suffix(args.md_path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.md_path)
    print(text)


if __name__ == "__main__":
    main()
