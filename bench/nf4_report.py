"""Turn bench_nf4.py's pytest-benchmark JSON into the tables of bench/results/nf4.md.

    python bench/nf4_report.py bench/results/nf4.json bench/results/nf4.md

One QLoRA layer (forward + backward): per shape, dtype and token count the median time of bitsandbytes +
peft, of bitsandbytes' dequantize + F.linear (unsloth's approach) and of slimrate's fused op, the speed-ups
(baseline median / slimrate median; > 1 is faster) and the QLoRA targets (≥ 3× over bnb-peft at 1 and 16
tokens, ≥ 1.2× at 512; faster than bnb-dequant everywhere).  Then nf4_dequantize beside dequantize_4bit.
"""

from __future__ import annotations

from summarize import fmt_time, header, write_report

TARGET_VS_PEFT = {1: 3.0, 16: 3.0, 512: 1.2}

NOTES = """How to read this.  Regenerate with
`OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench/bench_nf4.py --benchmark-only --benchmark-json
bench/results/nf4.json`, then `.venv/bin/python bench/nf4_report.py bench/results/nf4.json bench/results/nf4.md`.

- One thread for every row.  The development machine's 2 cores are shared with other jobs (load average
  above); with 2 threads, every OpenMP barrier waits on whichever thread the scheduler has parked, and medians
  moved by 2-5× from run to run.  One thread compares the kernels, not the scheduler.
- bnb-peft is what a QLoRA user runs on a CPU today (peft LoRA around bitsandbytes Linear4bit, train mode),
  bnb-dequant is unsloth's approach (dequantize W once, keep it for the backward), slimrate the fused op.
  All three compute the same layer: each row's output is checked against bnb-peft before timing.
- Few tokens are bound by reading W: slimrate reads the 0.5 byte per weight of packed W and decodes it in
  registers/L1, the others write and read a float copy of W (and bnb-peft dequantizes it twice).  At 512
  tokens both sides run the same two GEMMs (x·Wᵀ and g·W); slimrate saves the dequantized copies and their
  page faults, and multiplies bfloat16 activations in bfloat16 (as bitsandbytes does) with float32
  accumulation.  In float32 at 512 tokens the margin is the dequantization alone, so that cell moves most
  between runs (11008×4096: 1.13× and 1.28× over bnb-peft in two runs of this code).
- nf4_dequantize rows allocate a fresh output per call, as both APIs do: for W of 32-180 MB the page faults
  of that allocation dominate (about 0.7 ms per MB here).  With warm memory (1024×4096, repeated runs):
  float32 0.4-0.7 ms against bitsandbytes' 0.6-1.5 ms, float16 0.4 against 0.55 ms, bfloat16 0.65 against
  0.57 ms (slimrate rounds to bfloat16 with integer AVX-512 instructions, not AVX512-BF16's conversion).
"""


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
    print(write_report(__doc__.splitlines()[0], lambda data: "\n".join(
        header(data) + [NOTES] + layer_table(data["benchmarks"]) + dequant_table(data["benchmarks"]))))


if __name__ == "__main__":
    main()
