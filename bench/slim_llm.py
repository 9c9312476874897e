"""The .slim path at LLM scale: a synthetic Llama-2-7B-shaped bf16 checkpoint, sharded as transformers writes
it, through `slimrate compress` (eg, rans), `slimrate decompress`, and lazy loading into a meta-device model,
beside zstd -3 / -19 of the same shards and transformers' own loading of the originals.

    python bench/slim_llm.py --layers 1  -o bench/results/slim_llm_1layer   # ≈ 0.9 GB, in `make bench`
    python bench/slim_llm.py --layers 32 -o bench/results/slim_llm_7b       # 6.74B parameters, 13.5 GB: make bench-7b

The checkpoint is generated on demand in --work (deleted afterwards unless --keep) and never committed:
Llama-2-7B's shapes (vocab 32000, hidden 4096, MLP 11008, --layers decoder layers), weights ~ N(0, 0.02²)
drawn per tensor from a generator seeded by (seed, tensor name), RMSNorm weights 1, bf16. Each tool runs as
a child process under GNU time (/usr/bin/time), which gives its peak RSS. The page cache is dropped before each run
where the system allows it (the table says whether it did). zstd -19 is timed on the first --zstd19-bytes
bytes of the shards only (it runs at a few MB/s) and its time extrapolated linearly; the table says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

STD = 0.02
STEP = 0.002  # Δ: |θ − θ̂| ≤ 0.001, 5% of the weights' σ
SHARD_SIZE = "5GB"


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       tie_word_embeddings=False, torch_dtype="bfloat16")


def tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of LlamaForCausalLM(config), in transformers' order."""
    h, m, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes += [(p + f"self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (m, h)), (p + "mlp.up_proj.weight", (m, h)),
                   (p + "mlp.down_proj.weight", (h, m)), (p + "input_layernorm.weight", (h,)),
                   (p + "post_attention_layernorm.weight", (h,))]
    return shapes + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def synthetic_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The tensor `name` of the synthetic checkpoint: deterministic from (seed, name)."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    out = torch.empty(shape, dtype=torch.bfloat16)
    for rows in torch.split(torch.arange(shape[0]), 1024):  # float32 draws a block at a time: bounded memory
        out[rows[0]:rows[-1] + 1] = (torch.randn(len(rows), shape[1], generator=generator) * STD).to(torch.bfloat16)
    return out


def write_checkpoint_folder(folder: Path, config, seed: int) -> list[Path]:
    """config.json + sharded safetensors (transformers' layout), one tensor in memory at a time."""
    from slimrate.checkpoints import write_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    items = [(name, shape, torch.bfloat16, lambda name=name, shape=shape: synthetic_tensor(name, shape, seed))
             for name, shape in tensor_shapes(config)]
    return write_checkpoint(items, folder, max_shard_size=SHARD_SIZE, metadata={"format": "pt"})


def drop_page_cache() -> bool:
    """Drop clean pages so every tool reads from disk; False where the system does not allow it."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def timed(argv: list[str], stdout=None) -> dict:
    """Run argv as a child under GNU time: wall seconds, and the child's own peak RSS (MiB). (os.wait4's rusage
    would count the pages a forked child shares with this process before its exec.)"""
    with tempfile.NamedTemporaryFile("r") as report:
        start = time.perf_counter()
        child = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *argv], stdout=stdout or
                               subprocess.DEVNULL, stderr=subprocess.PIPE)
        seconds = time.perf_counter() - start
        if child.returncode != 0:
            raise RuntimeError(f"{argv[:3]} failed (status {child.returncode}): {child.stderr.decode()[-2000:]}")
        return {"seconds": seconds, "peak_rss_mib": int(report.read().split()[-1]) / 1024}


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


LOAD_SLIM = """
import sys, torch, transformers
from slimrate import load_slim_into
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
load_slim_into(model, sys.argv[2])
"""
LOAD_SAFETENSORS = """
import sys, torch, transformers
transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16)
"""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def run(args: argparse.Namespace) -> dict:
    slimrate = [sys.executable, "-m", "slimrate.cli"]
    config = llama_config(args.layers)
    params = sum(torch.Size(shape).numel() for _, shape in tensor_shapes(config))
    work = Path(args.work)
    source, restored = work / "checkpoint", work / "restored"
    started = time.perf_counter()
    shards = [p for p in write_checkpoint_folder(source, config, args.seed) if p.suffix == ".safetensors"]
    generate_s = time.perf_counter() - started
    input_bytes = sum(p.stat().st_size for p in shards)
    rows, dropped = [], []

    def measure(tool: str, argv: list[str], output: Path | None, bytes_moved: int, **extra) -> None:
        dropped.append(drop_page_cache())
        with open(output, "wb") if output and output.suffix == ".zst" else open(os.devnull, "wb") as sink:
            result = timed(argv, stdout=sink)
        size = None if output is None else (sum(f.stat().st_size for f in output.rglob("*") if f.is_file())
                                            if output.is_dir() else output.stat().st_size)
        rows.append({"tool": tool, **result, "mb_per_s": bytes_moved / 1e6 / result["seconds"], "output_bytes": size,
                     # of the parameters in the bytes this tool read (a part of the input for zstd -19)
                     "bits_per_param": None if size is None or output.is_dir()
                     else 8 * size / (params * bytes_moved / input_bytes), **extra})
        print(f"{tool}: {rows[-1]['seconds']:.1f} s, {rows[-1]['mb_per_s']:.0f} MB/s, "
              f"peak RSS {rows[-1]['peak_rss_mib']:.0f} MiB", flush=True)

    for coder in ("eg", "rans"):
        slim = work / f"model-{coder}.slim"
        measure(f"slimrate compress --coder {coder}", slimrate + ["compress", str(source), "-o", str(slim), "--step",
                                                                 str(STEP), "--coder", coder], slim, input_bytes)
    measure("slimrate decompress (eg)", slimrate + ["decompress", str(work / "model-eg.slim"), "-o", str(restored)],
            restored, input_bytes)
    shutil.rmtree(restored)
    measure("SlimFile + load_slim_into (meta model, eg)",
            python(LOAD_SLIM) + [str(source), str(work / "model-eg.slim")], None, input_bytes)
    measure("transformers from_pretrained (safetensors)", python(LOAD_SAFETENSORS) + [str(source)], None, input_bytes)
    measure("zstd -3 -T0", ["zstd", "-3", "-T0", "-q", "-c", *map(str, shards)], work / "zstd3.zst", input_bytes)
    head = min(args.zstd19_bytes, input_bytes)
    sample = work / "head.bin"
    with open(shards[0], "rb") as f:
        sample.write_bytes(f.read(head))
    measure("zstd -19 -T0", ["zstd", "-19", "-T0", "-q", "-c", str(sample)], work / "zstd19.zst", head,
            measured_bytes=head)
    return {"config": {"layers": args.layers, "params": params, "input_bytes": input_bytes, "shards": len(shards),
                       "step": STEP, "seed": args.seed, "std": STD},
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
                        "python": platform.python_version(), "date": str(datetime.date.today()),
                        "page_cache_dropped": all(dropped)},
            "generate_seconds": generate_s, "rows": rows}


def table(result: dict) -> str:
    c, m = result["config"], result["machine"]
    lines = [f"# .slim at LLM scale: {c['params'] / 1e9:.2f}B parameters ({c['layers']} Llama-2-7B layers), bf16",
             "", f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}; input "
             f"{c['input_bytes'] / 1e9:.2f} GB in {c['shards']} shard(s); Δ = {c['step']}; page cache dropped before "
             f"each run: {'yes' if m['page_cache_dropped'] else 'no'}.", "",
             "| tool | seconds | MB/s of bf16 | peak RSS (MiB) | output bytes | bits/param |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        seconds = f"{r['seconds']:.1f}"
        bits = "—" if r["bits_per_param"] is None else f"{r['bits_per_param']:.3f}"
        if "measured_bytes" in r:  # zstd -19 ran on the first bytes only: its time scaled to the whole input
            whole = r["seconds"] * c["input_bytes"] / r["measured_bytes"]
            seconds += f" for {r['measured_bytes'] / 1e9:.2f} GB (≈ {whole:.0f} for all)"
        size = "—" if r["output_bytes"] is None else f"{r['output_bytes']:,}"
        lines.append(f"| {r['tool']} | {seconds} | {r['mb_per_s']:.0f} | {r['peak_rss_mib']:.0f} | {size} | {bits} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=1, help="decoder layers (32 = Llama-2-7B)")
    parser.add_argument("-o", "--out", required=True, help="results stem: writes OUT.md and OUT.json")
    parser.add_argument("--work", default="bench/.slim-llm-work", help="scratch folder (needs ~2.5× the checkpoint)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--zstd19-bytes", type=int, default=1 << 28, help="bytes zstd -19 is timed on")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = parser.parse_args()
    for tool in ("zstd", "/usr/bin/time"):
        if shutil.which(tool) is None:
            sys.exit(f"slim_llm.py: {tool} is not installed (apt-get install zstd time)")
    try:
        result = run(args)
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    from slimrate.files import write_text_atomic

    print(write_text_atomic(f"{args.out}.md", table(result)))
    print(write_text_atomic(f"{args.out}.json", json.dumps(result, indent=1) + "\n"))


if __name__ == "__main__":
    main()
