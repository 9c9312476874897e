"""The DMB study's report: a table over seeds per arm, verdicts paired by seed, the plot and the samples.

Spread over seeds is the min–max range (3 seeds make a sample SD a rough number).  A paired comparison of
arm A against arm B takes, per seed, d = BPC(A) − BPC(B) on the same windows; its Monte Carlo error is
√(Σ_seeds (SE_A² + SE_B²)) / n, the standard error of the mean of d that comes from the evaluation's time
sampling alone.  "No significant difference" when the seeds' d range crosses 0 or |mean d| < 2 × that error.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

from slimrate.files import figure_png
from slimrate.studies.protocol import StudyResults

STUDY_STEPS = 10_000  # score steps of every run of the full study (the default output name's)


def study_stem(cfg) -> str:
    """Output name: dmb for the default `small` net at the default steps (and the quick version), dmb_<model> for
    a larger net, with _<N>steps when the runs take another number of steps."""
    if cfg.train.model == "tiny":
        return "dmb"
    model = "" if cfg.train.model == "small" else f"_{cfg.train.model}"
    steps = "" if cfg.train.steps == STUDY_STEPS else f"_{cfg.train.steps}steps"
    return f"dmb{model}{steps}"


def by_arm(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by arm label, in the study's arm order, each group in seed order."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["arm"], []).append(r)
    return {label: sorted(group, key=lambda r: r["seed"]) for label, group in groups.items()}


def spread(group: list[dict], value: Callable[[dict], float], digits: int = 3) -> str:
    """mean (min–max) of ``value`` over the group's seeds."""
    values = [value(r) for r in group]
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def paired(a: list[dict], b: list[dict]) -> str:
    """A against B paired by seed (module docstring), over the seeds both have, in words."""
    b_by_seed = {r["seed"]: r for r in b}
    pairs = [(r, b_by_seed[r["seed"]]) for r in a if r["seed"] in b_by_seed]
    if not pairs:
        return f"{a[0]['arm']} − {b[0]['arm']}: no seed in common."
    diffs = [x["bpc"] - y["bpc"] for x, y in pairs]
    mean, n = statistics.fmean(diffs), len(pairs)
    mc = math.sqrt(sum(x["se"] ** 2 + y["se"] ** 2 for x, y in pairs)) / n
    if min(diffs) < 0 < max(diffs) or abs(mean) < 2 * mc:
        words = "no significant difference"
    else:
        words = "lower (better)" if mean < 0 else "higher (worse)"
    per_seed = ", ".join(f"s{x['seed']} {d:+.3f}" for (x, _), d in zip(pairs, diffs, strict=True))
    return (f"{a[0]['arm']} − {b[0]['arm']}: {mean:+.3f} bits/char over {n} seed{'s' * (n > 1)} ({per_seed}; "
            f"Monte Carlo error {mc:.3f}): {words}.")


def verdicts(groups: dict[str, list[dict]]) -> list[str]:
    """Learned Q against Q frozen at init for every learning DMB arm, then every DMB arm against each baseline."""
    dmb = {label: g for label, g in groups.items() if g[0]["method"] == "dmb"}
    baselines = {label: g for label, g in groups.items() if g[0]["method"] != "dmb"}
    frozen = next((g for g in dmb.values() if not g[0]["learn_q"]), None)
    lines = ["Does the learned Q help? Each DMB arm that learns Q against 'dmb frozen at init', paired by seed:", ""]
    learned = [g for g in dmb.values() if g[0]["learn_q"]]
    lines += ([f"- {paired(g, frozen)}" for g in learned] if frozen and learned
              else ["- not measured: the study has no learned-Q and frozen-Q pair"])
    lines += ["", "Each DMB arm against each baseline, paired by seed:", ""]
    lines += [f"- {paired(g, b)}" for g in dmb.values() for b in baselines.values()] or ["- no pair was run"]
    return lines


def rates_cell(group: list[dict]) -> str:
    """Mean over seeds of the trained rates: into the absorbing rank / mean (max) of the others."""
    if group[0]["rates"] is None:
        return "—"
    mean = {k: statistics.fmean(r["rates"][k] for r in group) for k in group[0]["rates"]}
    return f"{mean['absorbing_rate']:.3g} / {mean['other_rate_mean']:.3g} ({mean['other_rate_max']:.3g})"


def results_table(cfg, results: StudyResults) -> str:
    """Markdown: the settings, per arm the bound over seeds (both protocols), the verdicts, the plot, samples."""
    groups, t = by_arm(results.rows), cfg.train
    trained = sum(r["trained"] for r in results.rows)
    lines = [f"Data: {t.data} (held-out windows of {t.seq_len} characters); model preset `{t.model}`; "
             f"{t.steps} score steps of batch {t.batch}, AdamW lr {t.lr:g} with the UBA schedule (φ = {t.phi:g}); "
             f"seeds {', '.join(map(str, cfg.run_seeds))}; {trained} runs trained here, "
             f"{len(results.rows) - trained} reused from their folders (same settings, verified manifest); "
             f"{results.facts['jobs']} at a time, each in its own process with one thread when more than one. "
             "Each arm's settings are its DMBConfig overrides (docs/dmb.md §9); 'dmb frozen at init' keeps Q at "
             f"the {t.init} init with p̂_0 = μ̂.", "",
             f"Final EMA model of every run on {cfg.final_sequences} held-out windows. **ours**: the bound with "
             f"{cfg.final_samples} Monte Carlo times per window, stratified in total noise (slimrate.dmb.elbo; "
             "every run gets the same times, so part of a run's Monte Carlo error is shared with the others); its "
             "per-run Monte Carlo SE is averaged over seeds. **official**: the DMB authors' protocol, "
             f"{cfg.official_repeats} passes of one uniform t per window (docs/dmb.md §7); no model is selected on "
             "these windows. Values are mean (min–max) over seeds, bits/char. Rates: mean rate into the absorbing "
             "rank / mean (max) of the others, after training.", "",
             "| arm | seeds | BPC, ours | MC SE per run | BPC, official | official SE per run | score term "
             "| prior term | train steps/s | rates |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, g in groups.items():
        lines.append(f"| {label} | {len(g)} | {spread(g, lambda r: r['bpc'])} | "
                     f"{statistics.fmean(r['se'] for r in g):.3f} | {spread(g, lambda r: r['official_bpc'])} | "
                     f"{statistics.fmean(r['official_se'] for r in g):.3f} | {spread(g, lambda r: r['score_bpc'])} | "
                     f"{spread(g, lambda r: r['prior_bpc'], 4)} | {spread(g, lambda r: r['steps_per_s'], 1)} | "
                     f"{rates_cell(g)} |")
    not_run = results.facts["arms_not_run"]
    if not_run:
        lines += ["", "Arms not run (this slimrate's DMBConfig cannot express them):", "",
                  *(f"- {label}: {reason}" for label, reason in not_run.items())]
    runs_not_run = results.facts.get("runs_not_run")
    if runs_not_run:
        lines += ["", f"Runs not trained (reported without training, and their folders were not finished): "
                  f"{'; '.join(runs_not_run)}."]
    lines += ["", *verdicts(groups), "",
              "A difference is significant when every seed has the same sign and |mean| ≥ 2 × the Monte Carlo "
              "error √(Σ_seeds (SE_A² + SE_B²)) / n.", "",
              "Paper scale for context (text8, 92M-parameter net, 8 GPUs): DMB ≤ 1.38, SEDD-absorb ≤ 1.39, "
              "SEDD-uniform ≤ 1.47 (arXiv:2505.19752; docs/dmb.md §12).", "",
              f"![BPC vs steps]({study_stem(cfg)}.png)", "",
              f"Samples ({cfg.sample_steps} Euler steps from the prior, EMA weights, the first seed's run; the "
              "baselines end with SEDD's denoising step, so no [MASK] is left):", ""]
    for label, g in groups.items():
        lines += [f"- {label}:", *(f"  - `{text}`" for text in g[0]["samples"])]
    return "\n".join(lines + [""])


def results_plot(cfg, results: StudyResults) -> bytes:
    """PNG: the bound against the score-learning steps per arm, mean over seeds with the min–max band."""
    from matplotlib.figure import Figure  # Agg rendering, no display

    fig = Figure(figsize=(6.8, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    for label, g in by_arm(results.rows).items():
        steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in g)))
        values = [[next(p["bpc"] for p in r["curve"] if p["step"] == s) for r in g] for s in steps]
        line, = ax.plot(steps, [statistics.fmean(v) for v in values], marker="o", markersize=3, label=label)
        ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=line.get_color(),
                        alpha=0.2)
    ax.set_xlabel("score-learning steps")
    ax.set_ylabel("bound (bits/char), mean and min–max over seeds")
    ax.set_title(f"DMB vs SEDD on the embedded corpus (`{cfg.train.model}` net)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return figure_png(fig)
