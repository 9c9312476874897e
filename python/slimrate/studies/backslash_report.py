"""Tables, targets and plot of the BackSlash study (``slimrate.studies.backslash``) over its seeds.

Every cell is the mean over the seeds with the spread as (min–max).  Comparisons with plain training are
paired by seed: BackSlash run s against the plain run s.  A λ is "within the quality budget" when its mean
paired quality loss after .slim (``quality_loss``) is ≤ ``QUALITY_BUDGET`` (docs/backslash.md §10).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from slimrate.files import figure_png
from slimrate.studies.protocol import StudyResults
from slimrate.studies.tasks import PRIMARY

SIZE_TARGET = 0.85  # the target: ≥ 85% smaller than fp32 ...
QUALITY_BUDGET = 0.005  # ... at ≤ 0.5 pt quality loss (quality_loss's units)
PRUNING_BUDGET, PRUNING_RATE = 0.01, 0.8  # at 80% pruned BackSlash loses ≤ 1 pt, plain training more
FP32_BITS = 32


def quality_loss(task_name: str, reference: float, value: float) -> float:
    """Quality lost from ``reference`` to ``value``, in the targets' units: accuracy in points as a
    fraction (0.005 = 0.5 pt); bits/char, where no points exist, as the relative increase (0.005 =
    +0.5%, 2.13 → 2.14 bits/char)."""
    _, lower_is_better = PRIMARY[task_name]
    return (value - reference) / reference if lower_is_better else reference - value


def loss_units(task_name: str) -> str:
    """How ``quality_loss`` reads: "%" (relative, bits/char) or " pt" (accuracy points)."""
    return "%" if PRIMARY[task_name][1] else " pt"


def by_lam(rows: list[dict], task: str) -> dict[float, list[dict]]:
    """The task's rows grouped by λ (config order), each group sorted by seed."""
    groups: dict[float, list[dict]] = {}
    for r in rows:
        if r["task"] == task:
            groups.setdefault(r["lam"], []).append(r)
    return {lam: sorted(group, key=lambda r: r["seed"]) for lam, group in groups.items()}


def spread(values: list[float], fmt: str = ".3f", scale: float = 1.0) -> str:
    """"mean (min–max)" of ``values`` × ``scale``; the mean alone for one value."""
    v = [x * scale for x in values]
    mean = statistics.fmean(v)
    return format(mean, fmt) if len(v) == 1 else f"{mean:{fmt}} ({min(v):{fmt}}–{max(v):{fmt}})"


def column(group: list[dict], key: str, fmt: str = ".3f") -> str:
    """``spread`` of ``key`` over a λ's runs, or — where it was not measured (nncodec not run)."""
    return spread([r[key] for r in group], fmt) if key in group[0] else "—"


def percent(changes: list[float]) -> str:
    """Relative size changes (−0.5 = half the size) as "mean% (min–max)", signed."""
    return f"{spread(changes, '+.1f', 100)}%"


def paired(group: list[dict], plain: list[dict], fn: Callable[[dict, dict], float]) -> list[float]:
    """``fn(run, plain run of the same seed)`` for each run of ``group``."""
    plain_by_seed = {p["seed"]: p for p in plain}
    return [fn(r, plain_by_seed[r["seed"]]) for r in group]


def mean_loss_after_slim(task: str, group: list[dict], plain: list[dict]) -> list[float]:
    """Per seed, the quality lost after .slim against the plain run (unquantized) of that seed."""
    metric, _ = PRIMARY[task]
    return paired(group, plain, lambda r, p: quality_loss(task, p[metric], r[metric + "_slim"]))


def comparison_lines(task: str, groups: dict[float, list[dict]]) -> list[str]:
    """The paper's comparison: BackSlash + eg against plain training coded fixed-length, eg and (rANS vs
    rANS), and against fp32, per λ, paired by seed; then the headline."""
    plain = groups[0.0]
    units = loss_units(task)
    lines = [f"| λ | loss after .slim vs plain{units and ' (' + units.strip() + ')'} | BackSlash + eg (bits/w) | "
             "vs plain + fixed-length | vs plain + eg | BackSlash + rANS vs plain + rANS | vs fp32 | within budget |",
             "|---|" + "---|" * 7]
    within = []
    for lam, group in groups.items():
        if lam == 0:
            continue
        losses = mean_loss_after_slim(task, group, plain)
        ok = statistics.fmean(losses) <= QUALITY_BUDGET
        changes = {name: paired(group, plain, fn) for name, fn in (
            ("fixed", lambda r, p: r["eg_bits"] / p["fixed_bits"] - 1),
            ("eg", lambda r, p: r["eg_bits"] / p["eg_bits"] - 1),
            ("rans", lambda r, p: r["rans_bits"] / p["rans_bits"] - 1),
            ("fp32", lambda r, p: r["eg_bits"] / FP32_BITS - 1))}
        if ok:
            within.append((-statistics.fmean(changes["eg"]), lam, changes))
        lines.append(f"| {lam:g} | {spread(losses, '+.2f', 100)} | {column(group, 'eg_bits')} | "
                     + " | ".join(percent(v) for v in changes.values()) + f" | {'yes' if ok else 'no'} |")
    head = (f"**Headline** (BackSlash + eg against plain training at the same Δ, the largest saving within the "
            f"quality budget, ≤ {100 * QUALITY_BUDGET:g}{units} mean loss):")
    if within:
        _, lam, change = max(within)
        lines += ["", f"{head} λ = {lam:g}: {percent(change['fixed'])} vs plain + fixed-length, "
                      f"{percent(change['eg'])} vs plain + eg ({percent(change['fp32'])} vs fp32)."]
    else:
        lines += ["", f"{head} no λ > 0 stays within the budget."]
    return lines


def target_lines(task: str, groups: dict[float, list[dict]]) -> list[str]:
    """The study's two targets on one task, on the seeds' means: size at the quality budget, and pruning
    robustness (if 80% is among the pruning rates)."""
    metric, _ = PRIMARY[task]
    units = loss_units(task)
    plain = groups[0.0]
    within = [(lam, group) for lam, group in groups.items()
              if statistics.fmean(mean_loss_after_slim(task, group, plain)) <= QUALITY_BUDGET]
    head = (f"Size target (≥ {SIZE_TARGET:.0%} smaller than fp32 after .slim, mean loss ≤ {100 * QUALITY_BUDGET:g}"
            f"{units} of {metric} vs plain training)")
    if within:
        bits, lam = min((statistics.fmean(min(r["eg_bits"], r["rans_bits"]) for r in group), lam)
                        for lam, group in within)
        verdict = "**met**" if 1 - bits / FP32_BITS >= SIZE_TARGET else "**missed**"
        lines = [f"{head}: {verdict}; within the budget the smallest (better of eg and rANS, mean) is "
                 f"−{1 - bits / FP32_BITS:.1%} vs fp32 ({bits:.2f} bits/w, λ = {lam:g})."]
    else:
        lines = [f"{head}: **missed**; no run stays within the quality budget."]
    key = str(PRUNING_RATE)
    if key in plain[0]["pruning"] and "0.0" in plain[0]["pruning"]:
        def loss(group: list[dict]) -> float:
            return statistics.fmean(quality_loss(task, r["pruning"]["0.0"], r["pruning"][key]) for r in group)
        kept = [f"{lam:g}" for lam, group in groups.items() if lam and loss(group) <= PRUNING_BUDGET < loss(plain)]
        lines.append(f"Pruning target (at {PRUNING_RATE:.0%} pruned, BackSlash loses ≤ {100 * PRUNING_BUDGET:g}"
                     f"{units} of its unpruned {metric}, plain training more; plain loses {100 * loss(plain):.1f}"
                     f"{units}, mean): " + (f"**met** at λ = {', '.join(kept)}." if kept else "**missed** at every λ."))
    return lines


def size_table(task: str, groups: dict[float, list[dict]]) -> list[str]:
    metric, _ = PRIMARY[task]
    keys = [(metric, ".4f"), (metric + "_slim", ".4f"), ("entropy_bits", ".3f"), ("fixed_bits", ".3f"),
            ("eg_bits", ".3f"), ("rans_bits", ".3f"), ("zstd19", ".3f"), ("lzma", ".3f"), ("nncodec_bits", ".3f"),
            ("nncodec_dq_bits", ".3f"), (metric + "_nncodec_dq", ".4f")]
    lines = [f"| λ | {metric} | after .slim | H | fixed-length | eg | rans | zstd-19 | lzma | nncodec | nncodec DQ | "
             f"{metric} after DQ |", "|---|" + "---|" * len(keys)]
    for lam, group in groups.items():
        lines.append(f"| {lam:g} | " + " | ".join(column(group, key, fmt) for key, fmt in keys) + " |")
    return lines


def pruning_table(cfg, task: str, groups: dict[float, list[dict]]) -> list[str]:
    lines = ["| λ | " + " | ".join(f"{p:.0%}" for p in cfg.prune_rates) + " |", "|---|" + "---|" * len(cfg.prune_rates)]
    for lam, group in groups.items():
        lines.append(f"| {lam:g} | " + " | ".join(spread([r["pruning"][str(p)] for r in group], ".4f")
                                                  for p in cfg.prune_rates) + " |")
    return lines


def results_table(cfg, results: StudyResults) -> str:
    """Markdown: how nncodec ran, then per task the paper's comparison with its headline, the size/quality
    table, the pruning table and the targets."""
    seeds = ", ".join(map(str, cfg.seeds))
    lines = [f"Decoupled mode, ε = {cfg.eps:g}; seeds {seeds}: every cell is the mean over the seeds with "
             "(min–max). " + nncodec_note(cfg, results.facts["nncodec"]), ""]
    for task in cfg.tasks:
        metric, lower = PRIMARY[task]
        groups = by_lam(results.rows, task)
        lines += [f"### {task}: Δ = {cfg.quant_step[task]:g}, {cfg.steps[task]} steps "
                  f"({metric}: {'lower' if lower else 'higher'} is better)", "",
                  "The paper's comparison, BackSlash (+ eg) against plain training (λ = 0) of the same seed coded "
                  "the usual ways at the same Δ: the change of size, paired by seed (−75% = a quarter of the size):",
                  "",
                  *comparison_lines(task, groups), "",
                  "Sizes in bits per weight and quality:", "", *size_table(task, groups), "",
                  f"Pruning ({metric} after global magnitude pruning of the weight matrices):", "",
                  *pruning_table(cfg, task, groups), "", *target_lines(task, groups), ""]
    lines.append("Sizes in bits per weight of the quantized weight matrices: fixed-length is ⌈log2 K⌉ bits per "
                 "weight for a tensor's K distinct symbols plus its table (docs/backslash.md §7); eg and rANS "
                 "are .slim payloads, tables included; nncodec: whole bitstreams, one per tensor. vs fp32: "
                 "1 − eg/32.")
    return "\n".join(lines)


def nncodec_note(cfg, nncodec: dict) -> str:
    """The header line saying how nncodec ran, or that it did not and how to make it run."""
    if not nncodec:
        why = f"no Python at {cfg.peers_python}" if cfg.peers_python else "peers_python=None"
        return (f"nncodec (DeepCABAC) was not run ({why}): `make peers` creates bench/.venv-peers, "
                "SLIMRATE_PEERS_PYTHON names another Python that has nncodec.")
    parts = [f"{task}: qp {v['qp']}, Δ' = {v['step']:.7g}, max |error| {v['max_abs_error']['uniform']:.4g} uniform, "
             f"{v['max_abs_error']['dq']:.4g} DQ" for task, v in nncodec.items()]
    version = next(iter(nncodec.values()))["version"]
    return (f"nncodec {version} (DeepCABAC, bench/peers/nncodec_sizes.py) on the same float weights, each tensor "
            f"its own bitstream, qp_density 7 and the qp whose step Δ' is nearest Δ ({'; '.join(parts)}). "
            "nncodec: uniform nearest-step quantization (use_dq=False), the same symbols as .slim up to Δ'/Δ, so "
            "a comparison of entropy coders; nncodec DQ: its default dependent quantization at the same qp, "
            "a coarser reconstruction (its quality in the last column).")


def error_bars(groups: list[list[dict]], key: str) -> tuple[list[float], list[list[float]]]:
    """Means of ``key`` per group and matplotlib's [[below], [above]] min–max offsets."""
    means = [statistics.fmean(r[key] for r in g) for g in groups]
    lows = [m - min(r[key] for r in g) for m, g in zip(means, groups, strict=True)]
    highs = [max(r[key] for r in g) - m for m, g in zip(means, groups, strict=True)]
    return means, [lows, highs]


def results_plot(cfg, results: StudyResults) -> bytes:
    """PNG: per task, rate–quality (bits/weight vs metric after decoding, each coder; means with min–max
    bars over the seeds) and the mean pruning curves."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4 * len(cfg.tasks)), layout="constrained")
    axes = figure.subplots(len(cfg.tasks), 2, squeeze=False)
    for (rate_ax, prune_ax), task in zip(axes, cfg.tasks, strict=True):
        metric, _ = PRIMARY[task]
        groups = by_lam(results.rows, task)
        curves = [("fixed_bits", metric + "_slim", "d-.", "fixed-length"), ("eg_bits", metric + "_slim", "o-", "eg"),
                  ("rans_bits", metric + "_slim", "s--", "rans"), ("nncodec_bits", metric + "_slim", "^:", "nncodec"),
                  ("nncodec_dq_bits", metric + "_nncodec_dq", "v:", "nncodec DQ")]
        for x, y, style, label in curves:
            if x in results.rows[0]:
                xs, xerr = error_bars(list(groups.values()), x)
                ys, yerr = error_bars(list(groups.values()), y)
                rate_ax.errorbar(xs, ys, xerr=xerr, yerr=yerr, fmt=style, label=label, capsize=2)
        for lam, group in groups.items():
            rate_ax.annotate(f"λ={lam:g}", (statistics.fmean(r["eg_bits"] for r in group),
                                            statistics.fmean(r[metric + "_slim"] for r in group)), fontsize=7)
        rate_ax.set(xlabel="bits per weight", ylabel=f"{metric} after decoding",
                    title=f"{task}: rate vs quality (mean, min–max over {len(cfg.seeds)} seeds)")
        rate_ax.legend(fontsize=7)
        for lam, group in groups.items():
            prune_ax.plot([100 * p for p in cfg.prune_rates],
                          [statistics.fmean(r["pruning"][str(p)] for r in group) for p in cfg.prune_rates],
                          "o-" if lam else "k--", label=f"λ={lam:g}")
        prune_ax.set(xlabel="weights pruned (%)", ylabel=f"{metric} (mean)", title=f"{task}: magnitude pruning")
        prune_ax.legend(fontsize=7)
    return figure_png(figure)
