"""The two-phase QLoRA fine-tuning driver behind ``slimrate qlora train`` (the seed paper's recipe,
docs/qlora.md §10): a 4-bit NF4 base with LoRA adapters, phase 1 then phase 2 from phase 1's adapter.

Each phase runs the shared training loop (``slimrate.train.train``: progress bar, ``metrics.jsonl``,
TensorBoard, optional offline wandb) with AdamW and the UBA schedule, saves its adapter with peft's
``save_pretrained`` and is then measured:
- train_loss_before / train_loss_after and their reduction in %: mean loss per assistant token on
  (up to ``loss_examples`` of) the phase's own training chats, before and after the phase;
- heldout_loss: the same on the held-out chats;
- markdown_share: share of greedy answers to held-out prompts whose reference answer is well-formed
  markdown that are well-formed too (rules in ``slimrate.qlora.evaluate``); None when no reference is;
- exact_accuracy: share of held-out questions answered exactly (``normalize_answer``); None without
  a question set;
- median_samples_per_s: the median over the phase's log records (each the mean over ``log_every``
  steps), the first record (warm-up) left out when there are three or more;
- adapter_bytes / slim_adapter_bytes: the sizes of peft's adapter_model.safetensors and of adapter.slim
  (the same tensors quantized with step ``slim_step`` and entropy-coded, ``slimrate.qlora.adapter``).
With ``rate_lam`` > 0 a BackSlash RateConstraint on the LoRA A/B matrices runs in each phase (docs/qlora.md §11).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimrate.checkpoints import local_model_folder
from slimrate.data.advising import advising_heldout, advising_phase1, advising_phase2, advising_questions
from slimrate.files import write_text_atomic
from slimrate.qlora.adapter import (
    DEFAULT_ADAPTER_STEP,
    PEFT_ADAPTER_FILE,
    SLIM_ADAPTER_FILE,
    lora_rate_constraint,
    save_adapter_slim,
)
from slimrate.qlora.chat import ChatBatches, prompt_of, read_chat_jsonl, reference_of, write_chat_jsonl
from slimrate.qlora.evaluate import (
    exact_accuracy,
    examples_table,
    generate_answers,
    is_wellformed_markdown,
    markdown_share,
    mean_token_loss,
)
from slimrate.qlora.loading import DTYPES, load_4bit, save_merged
from slimrate.qlora.peft_patch import patch_peft
from slimrate.qlora.tiny import TINY_NOTE, save_tiny_base
from slimrate.schedules import UBA
from slimrate.train import TrainConfig, read_jsonl, train

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # the paper's targets
HELDOUT_SHARE = 0.1  # of each phase file, when no held-out file is given
TINY_MODULES_TO_SAVE = ("lm_head",)  # see FinetuneConfig.modules_to_save
REAL_LR, TINY_LR = 2e-4, 1e-2  # QLoRA's usual LoRA lr; the random tiny model needs far more to move at all
SUMMARY_VERSION = 1
RATE_MODES = ("loss", "decoupled")


@dataclass
class FinetuneConfig:
    """Settings of ``finetune``.  model None: the tiny random model (``slimrate.qlora.tiny``).
    phase1 None: the generated advising data set for both phases, held-out chats and questions.
    eval_data / questions: held-out chat JSONL / question JSONL (records with "answer"); without
    eval_data, ``HELDOUT_SHARE`` of each phase file is held out.  steps: optimizer steps per phase.
    lr None: 2e-4 for a real model, 1e-2 for the tiny one.  dtype: bitsandbytes' compute dtype
    (None: float32 for the tiny model, bfloat16 otherwise).  fused: run the LoRA layers through
    ``nf4_lora_linear`` (``patch_peft``) with ``backend``.  merge: also write out_dir/merged.
    eval_limit: use only the first N held-out chats and the first N questions (None: all).
    device: where the model trains (None: "cuda" when available, else "cpu").
    modules_to_save: modules trained in full beside the LoRA adapters (peft's option); None: ("lm_head",)
    for the tiny model, () otherwise.  The tiny model's random frozen head makes LoRA alone nearly
    useless: measured on phase 1, lr 1e-2, 120 steps, the training loss went 4.63 → 4.15 nats/char
    with LoRA only and 4.63 → 0.61 with the head trained too.
    rate_lam: λ of a BackSlash RateConstraint on the LoRA A/B matrices in each phase (0: none);
    rate_mode: its mode, "loss" (λR through AdamW) or "decoupled".  slim_step: the quantization step Δ of
    each phase's adapter.slim."""

    out_dir: str
    model: str | None = None
    phase1: str | None = None
    phase2: str | None = None
    eval_data: str | None = None
    questions: str | None = None
    steps: int = 120
    batch: int = 8
    lr: float | None = None
    phi: float = 2.0
    warmup_share: float = 0.1
    rank: int = 16  # r = 16, alpha = 32, dropout 0: the paper's v4 adapter (docs/qlora.md §1)
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_LINEAR
    modules_to_save: tuple[str, ...] | None = None
    max_length: int = 512
    max_new_tokens: int = 200
    answer_tokens: int = 24
    loss_examples: int = 64
    eval_limit: int | None = None
    fused: bool = True
    backend: str | None = None
    merge: bool = False
    dtype: str | None = None
    seed: int = 0
    device: str | None = None
    log_every: int | None = None
    wandb: bool = False
    progress: bool = True
    rate_lam: float = 0.0
    rate_mode: str = "loss"
    slim_step: float = DEFAULT_ADAPTER_STEP

    def __post_init__(self) -> None:
        if self.phase2 is not None and self.phase1 is None:
            raise ValueError("phase2: given without phase1; phase 2 starts from phase 1's adapter, so pass "
                             "--phase1 too")
        for name in ("steps", "batch", "rank", "max_length", "max_new_tokens", "answer_tokens", "loss_examples",
                     "eval_limit"):
            value = getattr(self, name)
            if name == "eval_limit" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: expected a number in [0, 1), got {self.dropout!r}")
        for name in ("rate_lam", "slim_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (name == "slim_step" and value == 0):
                raise ValueError(f"{name}: expected a finite number {'> 0' if name == 'slim_step' else '>= 0'}, "
                                 f"got {value!r}")
        if self.rate_mode not in RATE_MODES:
            raise ValueError(f"rate_mode: expected one of {RATE_MODES}, got {self.rate_mode!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(DTYPES)} or None, got {self.dtype!r}")


@dataclass
class _Data:
    phases: list[tuple[str, list[dict]]]
    heldout: list[dict]
    questions: list[dict] = field(default_factory=list)


def _load_data(config: FinetuneConfig, out: Path) -> _Data:
    """The phases' chats, held-out chats and questions: the user's files, or the generated set
    (written to out/data/*.jsonl and read back, so both go through the same reader)."""
    if config.phase1 is None:
        files = {name: out / "data" / f"{name}.jsonl" for name in ("phase1", "phase2", "heldout", "questions")}
        for name, records in (("phase1", advising_phase1()), ("phase2", advising_phase2()),
                              ("heldout", advising_heldout()), ("questions", advising_questions())):
            write_chat_jsonl(files[name], records)
        paths = {"phase1": files["phase1"], "phase2": files["phase2"]}
        eval_data, questions = files["heldout"], files["questions"]
    else:
        paths = {"phase1": Path(config.phase1)} | ({"phase2": Path(config.phase2)} if config.phase2 else {})
        eval_data = Path(config.eval_data) if config.eval_data else None
        questions = Path(config.questions) if config.questions else None
    phases = [(name, read_chat_jsonl(path)) for name, path in paths.items()]
    if eval_data is not None:
        heldout = read_chat_jsonl(eval_data)
    else:  # a seeded shuffle of each phase file, HELDOUT_SHARE (at least one chat) held out
        heldout, kept = [], []
        for name, records in phases:
            order = torch.randperm(len(records), generator=torch.Generator().manual_seed(config.seed)).tolist()
            cut = max(1, round(HELDOUT_SHARE * len(records)))
            if cut >= len(records):
                raise ValueError(f"{name}: {len(records)} chat(s) is too few to hold some out; pass --eval-data")
            heldout += [records[i] for i in order[:cut]]
            kept.append((name, [records[i] for i in sorted(order[cut:])]))
        phases = kept
    questions = read_chat_jsonl(questions, need_answer=True) if questions else []
    return _Data(phases, heldout[:config.eval_limit], questions[:config.eval_limit])


def _save_dir(out: Path, write) -> Path:
    """Call ``write(tmp_folder)``, then move the folder to ``out`` (replacing an older one), so an
    interrupted save never leaves a half-written adapter or model under ``out``."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


class _Evaluator:
    """Held-out loss, markdown share and exact accuracy of the current model (the loop's ``evaluate``)."""

    def __init__(self, config: FinetuneConfig, tokenizer, data: _Data) -> None:
        self.config, self.tokenizer = config, tokenizer
        self.heldout = ChatBatches.from_records(tokenizer, data.heldout, config.max_length)
        markdown = [r for r in data.heldout if is_wellformed_markdown(reference_of(r) or "")]
        self.markdown_prompts = [prompt_of(r) for r in markdown]
        self.questions = [r["messages"] for r in data.questions]
        self.answers = [r["answer"] for r in data.questions]
        self.examples: list[dict[str, Any]] = []

    def __call__(self, model) -> dict[str, float]:
        metrics = {"heldout_loss": mean_token_loss(model, self.heldout, self.config.batch)}
        self.examples = []
        if self.markdown_prompts:
            answers = generate_answers(model, self.tokenizer, self.markdown_prompts, self.config.max_new_tokens)
            metrics["markdown_share"] = markdown_share(answers)
            self.examples += examples_table(self.markdown_prompts, answers)
        if self.questions:
            answers = generate_answers(model, self.tokenizer, self.questions, self.config.answer_tokens)
            metrics["exact_accuracy"] = exact_accuracy(answers, self.answers)
            self.examples += [{**row, "expected": e} for row, e in
                              zip(examples_table(self.questions, answers), self.answers, strict=False)]
        return metrics


def _run_phase(config: FinetuneConfig, index: int, name: str, records: list[dict], model, tokenizer,
               evaluator: _Evaluator, out: Path) -> dict[str, Any]:
    """Train one phase, save its adapter, measure it; returns its summary row."""
    batches = ChatBatches.from_records(tokenizer, records, config.max_length)
    probe = ChatBatches(batches.examples[:config.loss_examples], batches.pad_id)
    model.eval()
    before = mean_token_loss(model, probe, config.batch)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = config.lr if config.lr is not None else (REAL_LR if config.model else TINY_LR)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = UBA(optimizer, config.steps, phi=config.phi, warmup_steps=int(config.warmup_share * config.steps))
    seed = config.seed * 1_000_003 + index
    device = next(model.parameters()).device

    def get_batch(step: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed + 7919 * step)  # the batch is a function of the step
        draw = torch.randint(0, len(batches), (config.batch,), generator=generator)
        return {k: v.to(device) for k, v in batches.batch(draw.tensor_split(world_size)[rank]).items()}

    def loss_fn(net, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return net(**batch).loss  # mean over assistant tokens (labels elsewhere are IGNORE_INDEX)

    phase_dir = out / name
    log_every = config.log_every or max(1, config.steps // 20)
    train_config = TrainConfig(steps=config.steps, out_dir=str(phase_dir), log_every=log_every,
                               seed=config.seed + index, wandb=config.wandb, progress=config.progress, desc=name)
    hooks = [lora_rate_constraint(model, config.rate_lam, config.rate_mode)] if config.rate_lam > 0 else []
    start = time.perf_counter()
    result = train(model, optimizer, loss_fn, get_batch, train_config, scheduler=scheduler, evaluate=evaluator,
                   hooks=hooks)
    seconds = time.perf_counter() - start
    model.eval()
    after = mean_token_loss(model, probe, config.batch)
    model.train()
    rates = [r["samples_per_s"] for r in read_jsonl(phase_dir / "metrics.jsonl") if "samples_per_s" in r]
    def save_adapter(folder: Path) -> None:
        model.save_pretrained(folder)
        save_adapter_slim(model, folder / SLIM_ADAPTER_FILE, config.slim_step)

    adapter = _save_dir(phase_dir / "adapter", save_adapter)
    return {"phase": name, "train_chats": len(batches), "steps": config.steps, "batch": config.batch, "lr": lr,
            "train_loss_before": before, "train_loss_after": after,
            "train_loss_reduction_pct": 100.0 * (before - after) / before,
            "heldout_loss": result.eval["heldout_loss"], "markdown_share": result.eval.get("markdown_share"),
            "exact_accuracy": result.eval.get("exact_accuracy"),
            "median_samples_per_s": statistics.median(rates[1:] if len(rates) >= 3 else rates),
            "seconds": seconds, "adapter": str(adapter), "adapter_bytes": (adapter / PEFT_ADAPTER_FILE).stat().st_size,
            "slim_adapter_bytes": (adapter / SLIM_ADAPTER_FILE).stat().st_size, "examples": evaluator.examples}


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Run the phases, write ``summary.json`` and ``summary.md`` to ``config.out_dir``; returns the summary."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = _load_data(config, out)
    tiny = config.model is None
    model_path = save_tiny_base(out / "tiny-base", config.seed) if tiny else local_model_folder(config.model, "model")
    dtype = DTYPES[config.dtype or ("float32" if tiny else "bfloat16")]
    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if tokenizer.chat_template is None:
        raise ValueError(f"model: the tokenizer in {model_path} has no chat template; set tokenizer.chat_template "
                         "and save it there (the driver renders chats with it)")
    modules_to_save = config.modules_to_save if config.modules_to_save is not None else \
        (TINY_MODULES_TO_SAVE if tiny else ())
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                      target_modules=list(config.target_modules), modules_to_save=list(modules_to_save) or None,
                      bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(config.seed)  # LoRA A's initialisation
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_4bit(model_path, lora, compute_dtype=dtype, device_map={"": device})
    patched = patch_peft(model, backend=config.backend) if config.fused else 0
    if config.fused and patched == 0:
        raise ValueError("fused: no LoRA layer over an NF4 Linear4bit could be patched; run with --no-fused")
    evaluator = _Evaluator(config, tokenizer, data)
    phases = [_run_phase(config, i, name, records, model, tokenizer, evaluator, out)
              for i, (name, records) in enumerate(data.phases)]
    merged = str(_save_dir(out / "merged", lambda d: save_merged(model, d, tokenizer, dtype))) \
        if config.merge else None
    summary = {"version": SUMMARY_VERSION, "tiny_model": tiny, "note": TINY_NOTE if tiny else None,
               "model": str(model_path), "device": device, "fused_layers": patched,
               "compute_dtype": str(dtype).removeprefix("torch."),
               "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               "modules_to_save": list(modules_to_save),
               "heldout_chats": len(data.heldout), "questions": len(data.questions),
               "config": dataclasses.asdict(config), "phases": phases, "merged": merged}
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "summary.md", format_summary(summary))
    return summary


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as markdown: the tiny-model note, one table row per phase, sample answers."""
    lines = ["# QLoRA fine-tuning summary", ""]
    if summary["note"]:
        lines += [f"**{summary['note']}**", ""]
    lines += [f"Base: `{summary['model']}` (4-bit NF4, compute {summary['compute_dtype']}); "
              f"{summary['trainable_params']:,} trainable parameters (LoRA"
              + (f" + {', '.join(summary['modules_to_save'])} in full" if summary["modules_to_save"] else "") + "); "
              + (f"{summary['fused_layers']} layers fused (slimrate nf4_lora_linear)." if summary["fused_layers"]
                 else "bitsandbytes + peft layers (not fused)."), "",
              "| phase | chats | steps | train loss before → after | reduction | held-out loss | markdown ok "
              "| exact answers | median samples/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for p in summary["phases"]:
        lines.append(f"| {p['phase']} | {p['train_chats']} | {p['steps']} | {p['train_loss_before']:.3f} → "
                     f"{p['train_loss_after']:.3f} | {p['train_loss_reduction_pct']:.1f}% | {p['heldout_loss']:.3f} "
                     f"| {_pct(p['markdown_share'])} | {_pct(p['exact_accuracy'])} | {p['median_samples_per_s']:.1f} |")
    config = summary["config"]
    rate = f"BackSlash λ = {config['rate_lam']:g} ({config['rate_mode']} mode) on LoRA A/B" if config["rate_lam"] \
        else "no rate constraint"
    sizes = ", ".join(f"{p['phase']} {p['adapter_bytes']:,} / {p['slim_adapter_bytes']:,}" for p in summary["phases"])
    lines += ["", f"Adapter bytes, adapter_model.safetensors / adapter.slim (Δ = {config['slim_step']:g}, {rate}): "
              f"{sizes}."]
    lines += ["", f"{summary['heldout_chats']} held-out chats, {summary['questions']} held-out questions. Losses are "
              "nats per assistant token; markdown ok and exact answers are defined in slimrate.qlora.evaluate.", ""]
    for p in summary["phases"]:
        lines += [f"## Sample answers after {p['phase']}", ""]
        for row in p["examples"]:
            verdict = "well-formed" if not row["markdown_problems"] else "; ".join(row["markdown_problems"][:2])
            expected = f" (expected: {row['expected']!r})" if "expected" in row else ""
            lines += [f"- Q: {row['question']!r}{expected}", f"  A: {row['answer'][:300]!r} — {verdict}"]
        lines.append("")
    if summary["merged"]:
        lines += [f"Merged model (dequantized base + LoRA, safetensors): `{summary['merged']}`", ""]
    return "\n".join(lines)
