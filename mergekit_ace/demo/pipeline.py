"""``mergekit-ace demo``: train tiny experts, merge them every way, score them, write a report.

One command shows what ACE and ACTMat do next to the merges people already know and to their
data-free peers (TSV-M, Iso-C, Iso-CTS), on real (tiny) language models, on any machine and offline:

1. train a tokenizer, a tiny Llama base (briefly, on a mixture of three synthetic skills) and one
   expert per skill (``mergekit_ace.demo.train``; cached under a hash of the configuration);
2. merge the experts with linear, task_arithmetic, ties, ace (the paper's defaults and the study's
   recommended ``refinement: none``), actmat, tsv_m, iso_c, iso_cts and wudi through
   ``mergekit-yaml`` (``mergekit_ace.demo.merges``; a method not installed is skipped and reported);
3. score base, experts and merges with lm-eval on three local tasks (``mergekit_ace.demo.scoring``);
4. write ``<output>/report.md`` (raw scores and scores normalised to each task's expert, as in the
   ACE paper's Table 9), ``<output>/chart.png`` and ``<output>/summary.json``; print the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergekit_ace.demo.skills import SKILL_NAMES

SKILL_TITLES = {
    "arithmetic": "arithmetic (exact match)",
    "rpn": "rpn code (checker pass)",
    "translate": "translate (exact match)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mergekit_ace.demo.train import CONFIGS

    parser.add_argument("--output", default="demo-output", help="output directory (default: demo-output)")
    parser.add_argument(
        "--cache",
        default=None,
        help="where trained models are cached, keyed by a hash of the configuration (default: <output>/cache)",
    )
    parser.add_argument(
        "--config",
        default="realistic",
        choices=sorted(CONFIGS),
        help="training configuration: 'realistic' (the default: task vectors of a few per cent of the base, "
        "as in real fine-tunes, stored in bf16 and merged with dtype bfloat16), 'realistic-float32' (the same "
        "models in float32), 'default' (the toy regime: task vectors of 20-50 %% of the base) or 'small' "
        "(seconds; for tests)",
    )
    parser.add_argument("--force-retrain", action="store_true", help="retrain even if the cache has the models")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated subset of merge methods to run (default: all of "
        "linear,task_arithmetic,ties,ace,actmat,tsv_m,iso_c,iso_cts,ace-refine-none,wudi)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size (default: 16)")


#: What each configuration stands for: (one line for the console, the report's paragraph).
REGIMES = {
    "realistic": (
        "realistic (task vectors of a few per cent of the base, base and experts stored in bf16 and "
        "merged with dtype bfloat16, as real checkpoints are)",
        "**Regime: realistic.** Task vectors are a few per cent of the base's norm, as real LLM fine-tunes "
        "have (table below), base and experts are stored in bf16 and merged with `dtype: bfloat16`, and the "
        "MLP has the real models' width ratio. This is one seed: the ranking of close methods moves from seed "
        "to seed. The multi-seed study of this regime, and what it recommends, is "
        "`studies/realistic/RESULTS.md` in the mergekit-ace repository (rerun it with `make study`). "
        "The toy regime is `mergekit-ace demo --config default`.",
    ),
    "realistic-float32": (
        "realistic, float32 (the realistic models before their rounding to bf16, merged in float32)",
        "**Regime: realistic, float32.** The `realistic` configuration's models before their rounding to "
        "bf16, merged in float32 (the comparison for the bf16 run). Multi-seed study: "
        "`studies/realistic-float32/RESULTS.md` in the mergekit-ace repository.",
    ),
    "default": (
        "toy (task vectors of 20-50 % of the base, far larger than real fine-tunes; the default "
        "`--config realistic` is the representative one)",
        "**Regime: toy.** Task vectors are 20-50 % of the base's norm, far larger and more unequal than in "
        "real fine-tunes; methods rank differently here (ACE with the published refinement does worst). "
        "The realistic regime is the demo's default (`mergekit-ace demo`); the multi-seed studies of both "
        "are `studies/realistic/RESULTS.md` and `studies/toy/RESULTS.md` in the "
        "mergekit-ace repository.",
    ),
    "small": (
        "small (a seconds-scale configuration for the tests; not a regime to draw conclusions from)",
        "**Regime: small**, the test suite's seconds-scale configuration: no conclusion about the methods "
        "should be drawn from it. See `studies/realistic/RESULTS.md` in the mergekit-ace repository.",
    ),
}


def _log(message: str) -> None:
    print(message, flush=True)


def offline_quiet_environment() -> None:
    """The demo and the study need nothing from the network, and log each stage themselves:
    Hub and datasets offline, no tokenizer thread pools, no progress bars (unless set otherwise)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and transformers' bars


def run(args: argparse.Namespace) -> int:
    from mergekit_ace.demo import merges, scoring, study, train
    from mergekit_ace.demo.skills import build_skills
    from mergekit_ace.errors import UserError

    offline_quiet_environment()

    if args.config not in train.CONFIGS:
        raise UserError(f"unknown --config {args.config!r}; choose from {', '.join(sorted(train.CONFIGS))}")
    config = train.CONFIGS[args.config]
    methods = merges.METHODS
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        known = {m[0] for m in merges.METHODS}
        unknown = [m for m in wanted if m not in known]
        if unknown:
            raise UserError(f"unknown merge method(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        methods = [m for m in merges.METHODS if m[0] in wanted]
    if args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    methods, skipped = study.available_variants(methods, log=_log)
    if not methods:
        raise UserError("none of the chosen merge methods is available: "
                        + "; ".join(f"{label} ({why})" for label, why in skipped))

    output = Path(args.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).expanduser().resolve() if args.cache else output / "cache"
    started = time.time()
    timings: dict[str, float] = {}

    _log(f"Regime: {REGIMES.get(config.name, REGIMES['small'])[0]}")
    _log(f"== 1/4 Training (config '{config.name}', hash {config.digest()})")
    t0 = time.time()
    trained = train.ensure_trained(config, cache, force=args.force_retrain, log=_log)
    timings["train"] = time.time() - t0
    relative = log_relative_norms(trained, _log)

    _log("== 2/4 Merging with mergekit-yaml: " + ", ".join(m[0] for m in methods))
    t0 = time.time()
    merged = merges.run_all_merges(trained.base, trained.experts, output / "merges", methods, log=_log,
                                   dtype=config.merge_dtype)
    timings["merge"] = time.time() - t0

    _log(f"== 3/4 Scoring {len(merged) + 1 + len(SKILL_NAMES)} models with lm-eval on 3 tasks x "
         f"{config.eval_examples} held-out examples (greedy generation)")
    t0 = time.time()
    skills = build_skills(config.skill_kwargs())
    tasks_dir = scoring.prepare_tasks(train.eval_sets(config, skills), output)
    models: dict[str, Path] = {"base": trained.base}
    models.update({f"expert-{s}": trained.experts[s] for s in SKILL_NAMES})
    models.update({label: info["path"] for label, info in merged.items()})
    owners = {scoring.task_name(s): f"expert-{s}" for s in SKILL_NAMES}
    results = scoring.score_models(models, tasks_dir, output / "eval", owners, base="base",
                                   batch_size=args.batch_size, log=_log)
    timings["score"] = time.time() - t0

    _log("== 4/4 Report")
    raw = {m: {s: scoring.primary_score(results, m, s) for s in SKILL_NAMES} for m in models}
    diagnostics = heterogeneity(trained.manifest)
    timings["total"] = time.time() - started
    summary = {
        "config": config.to_dict(),
        "config_hash": config.digest(),
        "cache": str(trained.root),
        "eval_examples_per_task": config.eval_examples,
        "scores": raw,
        "normalised": normalise(raw, [m[0] for m in methods]),
        "merge_configs": {label: str(info["config"]) for label, info in merged.items()},
        "merge_seconds": {label: info["seconds"] for label, info in merged.items()},
        "methods": [{"label": m[0], "merge_method": m[1], "parameters": m[2], "model_parameters": m[3]}
                    for m in methods],
        "skipped": skipped,
        "regime": REGIMES.get(config.name, REGIMES["small"])[0],
        "training": {k: v for k, v in trained.manifest.items() if k != "experts"},
        "experts": {
            name: {**{k: v for k, v in info.items() if k != "task_vector_sq_norms"},
                   "relative_norm": relative[name]["global"],
                   "relative_norm_median_matrix": relative[name]["median_matrix"]}
            for name, info in trained.manifest.get("experts", {}).items()
        },
        "heterogeneity": diagnostics,
        "timings_s": timings,
    }
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    chart = write_chart(raw, summary["normalised"], output / "chart.png")
    report = render_report(summary, chart)
    (output / "report.md").write_text(report)
    _log("")
    _log(render_tables(raw, summary["normalised"], config.eval_examples))
    _log(f"Report: {output / 'report.md'}   chart: {chart or '(matplotlib unavailable)'}")
    _log(f"Total {timings['total']:.0f}s (train {timings['train']:.0f}s, merge {timings['merge']:.0f}s, "
         f"score {timings['score']:.0f}s)")
    losers = [s for s in SKILL_NAMES if raw[f"expert-{s}"][s] <= raw["base"][s]]
    if losers:
        _log("WARNING: these experts do not beat the base on their own skill: " + ", ".join(losers))
    return 0


def log_relative_norms(trained, log=_log) -> dict[str, dict[str, float]]:
    """Print and return ``||D_t|| / ||W_0||`` per expert (see ``train.relative_task_vector_norms``)."""
    from mergekit_ace.demo import train

    relative = train.relative_task_vector_norms(trained.base, trained.experts)
    log("Task vectors relative to the base, ||D_t|| / ||W_0||: " + ", ".join(
        f"{name} {100 * r['global']:.2f}% (median weight {100 * r['median_matrix']:.2f}%)"
        for name, r in relative.items()))
    return relative


# --------------------------------------------------------------------------------------------
# numbers


def normalise(
    raw: Mapping[str, Mapping[str, float]], merge_labels: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """Each model's score on a task as a percentage of that task's own expert (ACE Table 9); the
    average is over tasks whose expert scored above zero. Base and merges are normalised."""
    out: dict[str, dict[str, float | None]] = {}
    for model in ["base", *merge_labels]:
        row: dict[str, float | None] = {}
        for s in SKILL_NAMES:
            reference = raw[f"expert-{s}"][s]
            row[s] = 100.0 * raw[model][s] / reference if reference > 0 else None
        valid = [v for v in row.values() if v is not None]
        row["avg"] = sum(valid) / len(valid) if valid else None
        out[model] = row
    return out


def heterogeneity(manifest: Mapping, tau: float = 0.3) -> dict[str, object]:
    """ACE's heterogeneity statistic per weight matrix, from the experts' task-vector energies
    ``tr_t = ||W_t - W_0||_F^2`` recorded at training time: ``gamma = var(log tr) / mean(log tr)^2``
    (unbiased variance), ``gamma > tau`` sends a matrix down ACE's heterogeneous branch. Computed
    over the 2-D weights ACE merges (all but the input embeddings)."""
    experts = manifest.get("experts", {})
    names = list(experts)
    if len(names) < 2:
        return {}
    energies = {n: experts[n]["task_vector_sq_norms"] for n in names}
    per_matrix = {}
    for param in energies[names[0]]:
        if "embed_tokens" in param or "norm" in param or param.endswith("bias"):
            continue
        logs = [math.log(energies[n][param] + 1e-12) for n in names]
        mean = sum(logs) / len(logs)
        var = sum((x - mean) ** 2 for x in logs) / (len(logs) - 1)
        per_matrix[param] = var / (mean * mean + 1e-12)
    gammas = sorted(per_matrix.values())
    return {
        "tau": tau,
        "matrices": len(gammas),
        "heterogeneous": sum(g > tau for g in gammas),
        "gamma_min": gammas[0] if gammas else None,
        "gamma_median": gammas[len(gammas) // 2] if gammas else None,
        "gamma_max": gammas[-1] if gammas else None,
        "per_matrix": per_matrix,
    }


# --------------------------------------------------------------------------------------------
# output


def _pct(value: float | None, scale: float = 1.0) -> str:
    return "n/a" if value is None else f"{value * scale:.1f}"


def render_tables(raw: Mapping[str, Mapping[str, float]], normalised: Mapping[str, Mapping[str, float | None]],
                  n_examples: int) -> str:
    header = "| model | " + " | ".join(SKILL_TITLES[s] for s in SKILL_NAMES) + " | avg |"
    rule = "|---|" + "---:|" * (len(SKILL_NAMES) + 1)
    lines = [f"Raw scores (% of {n_examples} held-out examples per task)", "", header, rule]
    for model, row in raw.items():
        avg = sum(row[s] for s in SKILL_NAMES) / len(SKILL_NAMES)
        cells = [_pct(row[s], 100) for s in SKILL_NAMES] + [_pct(avg, 100)]
        name = f"**{model}**" if model in normalised and model != "base" else model
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Normalised to each task's expert (% of the expert's score; ACE paper Table 9)", "",
              "| model | " + " | ".join(SKILL_NAMES) + " | avg |", rule]
    for model, row in normalised.items():
        cells = [_pct(row[s]) for s in SKILL_NAMES] + [_pct(row["avg"])]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_chart(raw, normalised, path: Path) -> Path | None:
    """Two panels: raw scores of every model per task, and merges normalised to the experts."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    models = list(raw)
    colours = {model: f"C{i % 10}" for i, model in enumerate(models)}  # same colour in both panels
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(SKILL_NAMES))]
        axes[0].bar(xs, [100 * raw[model][s] for s in SKILL_NAMES], width, label=model, color=colours[model])
    axes[0].set_xticks(range(len(SKILL_NAMES)), SKILL_NAMES)
    axes[0].set_ylabel("score (%)")
    axes[0].set_title("Raw scores")
    axes[0].legend(fontsize=7, ncol=2)
    cols = list(SKILL_NAMES) + ["avg"]
    rows = list(normalised)
    width = 0.8 / len(rows)
    for i, model in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(cols))]
        axes[1].bar(xs, [normalised[model][c] or 0.0 for c in cols], width, label=model, color=colours[model])
    axes[1].axhline(100, color="grey", lw=0.8, ls="--")
    axes[1].set_xticks(range(len(cols)), cols)
    axes[1].set_ylabel("% of the task's expert")
    axes[1].set_title("Normalised to each task's expert")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def render_report(summary: Mapping, chart: Path | None) -> str:
    raw, normalised = summary["scores"], summary["normalised"]
    cfg = summary["config"]
    training = summary["training"]
    het = summary["heterogeneity"]
    merge_labels = [m["label"] for m in summary["methods"]]
    best = max(merge_labels, key=lambda m: normalised[m]["avg"] if normalised[m]["avg"] is not None else -1)
    lines = [
        "# mergekit-ace demo report",
        "",
        f"Configuration `{cfg['name']}` (hash `{summary['config_hash']}`): a tiny Llama "
        f"({cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
        f"{training.get('parameters', 0) / 1e6:.2f}M parameters, "
        f"tokenizer of {training.get('tokenizer_size', '?')} tokens) trained for {cfg['base_steps']} steps "
        "on a mixture of "
        "three synthetic skills, then one expert per skill fine-tuned on that skill only. "
        f"All scores are lm-eval greedy generations on {summary['eval_examples_per_task']} held-out examples per task.",
        "",
        REGIMES.get(cfg["name"], REGIMES["small"])[1],
        "",
        "Skills: **arithmetic** (two-digit addition, `add 48+79=` -> `127`, exact match); "
        "**rpn**, a code-like task (compile "
        "`rpn (3+4)*2=` into a stack program such as `3 4 + 2 *`; a checker runs the program and accepts any "
        "program that uses exactly the expression's digits and computes its value); **translate** (English into a "
        "made-up language with subject-object-verb order and adjectives after nouns, exact match).",
        "",
        render_tables(raw, normalised, summary["eval_examples_per_task"]),
        "",
        f"Best normalised average among the merges: **{best}**"
        + (f" ({normalised[best]['avg']:.1f}%)." if normalised[best]["avg"] is not None else "."),
        "",
        "## Experts",
        "",
        "| expert | steps | lr | score on own skill | base on that skill | task vector norm | "
        "relative to the base (all parameters) | relative, median over merged weights |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, info in summary["experts"].items():
        lines.append(
            f"| {name} | {info['steps']} | {info['lr']:g} | {100 * raw[f'expert-{name}'][name]:.1f} | "
            f"{100 * raw['base'][name]:.1f} | {info['task_vector_norm']:.2f} | "
            f"{100 * info['relative_norm']:.2f}% | {100 * info['relative_norm_median_matrix']:.2f}% |"
        )
    if het:
        lines += [
            "",
            f"ACE heterogeneity statistic gamma over the {het['matrices']} merged weight matrices: min "
            f"{het['gamma_min']:.3f}, median {het['gamma_median']:.3f}, max {het['gamma_max']:.3f}; "
            f"{het['heterogeneous']} of {het['matrices']} exceed tau = {het['tau']} and take ACE's heterogeneous "
            "(trace-normalised, spectrally refined) branch.",
        ]
    lines += ["", "## Merges", "",
              "`ace` and `actmat` estimate each task's input covariance from its weight update (this package's "
              "rules); `tsv_m`, `iso_c` and `iso_cts` are the data-free SVD merges both papers compare against "
              "(Task Singular Vectors, isotropic merging), with the authors' defaults and alpha = 1 (the "
              "authors' code selects alpha on validation data); linear, task_arithmetic and ties are mergekit's own. "
              "`ace` runs at the paper's defaults (`refinement: add`), `ace-refine-none` at the setting the "
              "multi-seed study recommends (`refinement: none`); `wudi` is WUDI-Merging (closed form).", "",
              "| method | mergekit `merge_method` | parameters | per-model parameters | seconds |",
              "|---|---|---|---|---:|"]
    for m in summary["methods"]:
        lines.append(
            f"| {m['label']} | `{m['merge_method']}` | `{json.dumps(m['parameters'])}` | "
            f"`{json.dumps(m['model_parameters'])}` | {summary['merge_seconds'][m['label']]:.1f} |"
        )
    if summary.get("skipped"):
        lines += ["", "Skipped (not available in this installation): "
                  + "; ".join(f"`{label}` ({why})" for label, why in summary["skipped"]) + "."]
    lines += [
        "",
        "The mergekit YAML of every merge is in `merges/<method>.yaml`; rerun one with "
        "`mergekit-yaml merges/ace.yaml out/`.",
    ]
    if chart:
        lines += ["", f"![scores]({Path(chart).name})"]
    t = summary["timings_s"]
    lines += [
        "",
        "## Run",
        "",
        f"Wall time {t['total']:.0f}s (training {t['train']:.0f}s"
        + (" — cached models reused" if t["train"] < 5 else "")
        + f", merging {t['merge']:.0f}s, scoring {t['score']:.0f}s) on {platform.machine()} with "
        f"{os.cpu_count()} CPU cores, torch {training.get('torch_version', '?')}. Models are cached in "
        f"`{summary['cache']}`; a rerun with the same configuration reuses them and reproduces these numbers.",
        "",
    ]
    return "\n".join(lines)
