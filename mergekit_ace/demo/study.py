"""``mergekit-ace study``: the demo pipeline over several seeds, every merge variant, and the
covariance claim tested against the experts' real input covariances.

Per seed (the configuration with ``seed`` replaced, so the tokenizer, base, experts and held-out
examples all change with it; trained models are cached under the configuration's hash):

1. train (or reuse) the base and the experts, print ``||D_t|| / ||W_0||`` per expert;
2. measure every linear layer's real input second moments ``G_t = X_t^T X_t / n_t`` on each task's
   data: the first ``--gram-batches`` batches of the expert's own training stream (the very
   examples it was fine-tuned on first), through forward hooks on **the expert t** (the inputs
   RegMean's objective is about; see :mod:`mergekit_ace.analysis.covariance`), and once more through the
   base for a second cosine column;
3. merge with every variant of :data:`VARIANTS` (mergekit's ``run_merge`` in this process, on the
   same YAML ``mergekit-yaml`` would read, in the configuration's ``merge_dtype``); a variant
   whose method is not installed, or whose parameter the installed method does not declare, is
   skipped and the skip is logged and reported;
4. per merged linear layer: the cosine between the proxies (``D_t^T D_t``, ACE's centred
   ``C_t^T C_t``, the identity) and ``G_t``; every merge's RegMean objective relative to the
   average's; the RegMean solution with the real covariances, its objective and each merge's
   distance to it. The RegMean solution is also written as a model (``regmean-data``: it uses
   the data, so it is a reference, not a data-free competitor) and scored with the rest;
5. score base, experts, merges and the reference with lm-eval, exactly as the demo does.

Then mean and spread (sample standard deviation, and min-max) over seeds of the raw per-skill
scores, the normalised average, the cosines and the objectives: ``study.json``, ``report.md``
and PNG plots in ``--output``. A seed whose ``seed-<n>/summary.json`` matches the configuration
hash and the variant list is reused (``--force`` redoes it).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_ace.demo.skills import SKILL_NAMES
from mergekit_ace.rules.ace import DEFAULTS as ACE_RULE_DEFAULTS

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------------- variants
#: ACE's paper defaults, which every ACE variant below starts from.
ACE_DEFAULTS = {key: ACE_RULE_DEFAULTS[key] for key in ("epsilon", "tau", "k_frac", "scale")}


def ace(label: str, **overrides) -> tuple[str, str, dict[str, object], dict[str, object]]:
    """An ACE variant: the paper's defaults with ``overrides`` (one line per variant)."""
    return (label, "ace", {**ACE_DEFAULTS, **overrides}, {})


#: ACE's code scope as mergekit filters (examples/ace-llama-3.2-3b-paper-scope.yml).
PAPER_SCOPE_ACE = [{"filter": "embed_tokens", "value": "base"}, {"filter": "lm_head", "value": "base"},
                   {"value": "default"}]


def _variants():
    from mergekit_ace.demo.merges import METHODS

    return [
        # the demo's: linear, task_arithmetic, ties, ace, actmat, tsv_m, iso_c, iso_cts,
        # ace-refine-none (the recommended setting), wudi (closed form)
        *METHODS,
        ("wudi-adam", "wudi", {"solver": "adam"}, {}),  # WUDI's gradient solver
        # the scope of each paper's code (docs/methods.md, "Scope"): ACE keeps the base's embeddings
        # and lm_head; ACTMat averages every 2-D weight with a dimension >= 20000 -- here the
        # vocabulary's 512, the one dimension that plays the real vocabulary's part
        ace("ace-paper-scope", scope=PAPER_SCOPE_ACE),
        ("actmat-paper-scope", "actmat", {"scale": 1.0, "average_from_dim": 512}, {}),
        # ours before the study (actmat: the papers' truncation)
        ("actmat-exact", "actmat", {"scale": 1.0, "solve": "exact"}, {}),
        ace("ace-homogeneous", tau=1e9),  # never the heterogeneous branch (no trace normalisation, no refinement)
        ace("ace-no-refinement", k_frac=0.0),  # heterogeneous branch without the spectral refinement
        ace("ace-eps1e-6", epsilon=1e-6),
        ace("ace-eps1e-4", epsilon=1e-4),
        ace("ace-eps1e-3", epsilon=1e-3),
        ace("ace-eps1e-2", epsilon=1e-2),  # the authors' code default ridge
        ace("ace-refine-add", refinement="add"),  # Eq. 19 as published (= ace)
        ace("ace-refine-rescale", refinement="rescale"),
    ]


#: (label, merge_method, global parameters, per-model parameters), as mergekit YAML takes them.
VARIANTS = _variants()

#: label of the RegMean solution with the real covariances, scored as a reference model
REFERENCE = "regmean-data"

#: Paired comparisons (same seed, same experts, same held-out examples): ``(merge, against)``.
#: Every merge is also compared with ``linear`` (the experts' plain average).
PAIRS = [
    ("ace", "actmat"),
    ("ace-refine-add", "ace-refine-none"),  # does Eq. 19's refinement help?
    ("ace-refine-rescale", "ace-refine-none"),
    ("ace-refine-add", "ace-refine-rescale"),
    ("ace", "ace-eps1e-2"),
    ("ace-paper-scope", "ace"),  # does leaving embeddings and lm_head at the base help?
    ("actmat-paper-scope", "actmat"),
    ("actmat", "actmat-exact"),  # the papers' truncation (the default) against the exact solve
    ("wudi", "actmat"),
    ("wudi", "ace"),
    ("wudi-adam", "wudi"),
]


def declared_parameters(merge_method: str) -> set | None:
    """The parameter names the installed ``merge_method`` declares (None: unknown method)."""
    from mergekit.merge_methods import get

    import mergekit_ace

    mergekit_ace.register_methods()
    try:
        method = get(merge_method)
    except RuntimeError:
        return None
    return {p.name for p in method.spec.parameters}


def available_variants(variants: Sequence, log=print) -> tuple[list, list[tuple[str, str]]]:
    """The variants the installed methods can run, and ``(label, why)`` for those skipped: an
    unknown method, or a parameter the method does not declare (mergekit would ignore it
    silently and merge with the default, so the row would be a mislabelled copy)."""
    keep, skipped = [], []
    for variant in variants:
        label, merge_method, params, model_params = variant
        declared = declared_parameters(merge_method)
        if declared is None:
            why = f"merge method {merge_method!r} is not installed"
        else:
            missing = sorted((set(params) | set(model_params)) - declared)
            why = f"{merge_method} does not declare {', '.join(missing)}" if missing else ""
        if why:
            skipped.append((label, why))
            log(f"  skipping variant {label}: {why}")
        else:
            keep.append(variant)
    return keep, skipped


# ---------------------------------------------------------------------------- real covariances
def task_batches(config, tokenizer, skill: str, batches: int):
    """The first ``batches`` batches of ``skill``'s expert's training stream (same generator
    seed as :func:`mergekit_ace.demo.train._train_expert`), as ``(input_ids, attention_mask)``."""
    from mergekit_ace.demo import train
    from mergekit_ace.demo.skills import build_skills

    skills = build_skills(config.skill_kwargs())
    exclude = {p for examples in train.eval_sets(config, skills).values() for p, _ in examples}
    index = [name for name, _ in config.experts].index(skill)
    batcher = train.Batcher(tokenizer, [skills[skill]], exclude, config.seed + 100 + index, config.max_seq_len)
    out = []
    for _ in range(batches):
        input_ids, mask, _labels = batcher.batch(config.batch_size)
        out.append((input_ids, mask))
    return out


def measure_grams(config, trained, batches: int, log=print):
    """``(expert_grams, base_grams, tokens)``: ``{skill: {weight: G}}`` through each expert on its
    own task's data, and through the base on the same data; ``tokens[skill]`` = n_t."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ace.analysis.covariance import input_grams

    torch.set_num_threads(1)  # small products; on a shared machine a second thread mostly waits
    tokenizer = AutoTokenizer.from_pretrained(trained.base)
    base = AutoModelForCausalLM.from_pretrained(trained.base, dtype=torch.float32)
    expert_grams, base_grams, tokens = {}, {}, {}
    for skill in SKILL_NAMES:
        data = task_batches(config, tokenizer, skill, batches)
        expert = AutoModelForCausalLM.from_pretrained(trained.experts[skill], dtype=torch.float32)
        measured = input_grams(expert, data)
        expert_grams[skill] = {k: g for k, (g, n) in measured.items()}
        tokens[skill] = next(iter(measured.values()))[1]
        base_grams[skill] = {k: g for k, (g, n) in input_grams(base, data).items()}
        del expert
    log("  input second moments measured on " + ", ".join(f"{s} {n} tokens" for s, n in tokens.items()))
    return expert_grams, base_grams, tokens


def analyse_merges(trained, merged: Mapping[str, Path], expert_grams, base_grams):
    """Per merged linear layer, :func:`mergekit_ace.analysis.covariance.analyse_layer` for every merge;
    returns ``(rows, {weight: W*})``."""
    from mergekit_ace.analysis.covariance import analyse_layer, layer_index, weight_kind
    from mergekit_ace.demo.train import load_weights
    from mergekit_ace.rules.scope import is_input_embedding

    base = load_weights(trained.base)
    experts = {s: load_weights(trained.experts[s]) for s in SKILL_NAMES}
    merges = {label: load_weights(path) for label, path in merged.items()}
    rows, solutions = [], {}
    for name in sorted(base, key=lambda n: (layer_index(n) if layer_index(n) >= 0 else 10**6, n)):
        W0 = base[name]
        if W0.ndim != 2 or is_input_embedding(name) or name not in expert_grams[SKILL_NAMES[0]]:
            continue
        row, W_star = analyse_layer(
            name,
            W0,
            [experts[s][name] for s in SKILL_NAMES],
            [expert_grams[s][name] for s in SKILL_NAMES],
            {label: sd[name] for label, sd in merges.items()},
            list(SKILL_NAMES),
            base_grams=[base_grams[s][name] for s in SKILL_NAMES],
        )
        row["layer"] = layer_index(name)
        row["kind"] = weight_kind(name)
        rows.append(row)
        solutions[name] = W_star
    return rows, solutions


def write_reference_model(trained, solutions: Mapping[str, torch.Tensor], target: Path) -> Path:
    """The RegMean solution as a model: ``W*`` on every analysed linear weight, the experts'
    average on everything else (norms, input embeddings: what the covariance rules do there)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ace.demo.train import load_weights
    from mergekit_ace.fixtures import toymodels

    base = load_weights(trained.base)
    experts = [load_weights(trained.experts[s]) for s in SKILL_NAMES]
    state = {}
    for name, w0 in base.items():
        if name in solutions:
            state[name] = solutions[name].to(w0.dtype)
        else:
            state[name] = (sum(e[name].double() for e in experts) / len(experts)).to(w0.dtype)
    model = AutoModelForCausalLM.from_pretrained(trained.base, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if m in base]:
        raise RuntimeError(f"reference model: missing {missing}, unexpected {unexpected}")
    if target.exists():
        shutil.rmtree(target)
    toymodels.save_pretrained(model, AutoTokenizer.from_pretrained(trained.base), target)
    return target


# ------------------------------------------------------------------------------------ one seed
def _finite(x):
    return None if isinstance(x, float) and (math.isnan(x) or math.isinf(x)) else x


def run_seed(config, seed: int, output: Path, cache: Path, variants: Sequence, *, batch_size: int = 16,
             gram_batches: int = 4, force: bool = False, force_retrain: bool = False, log=print) -> dict:
    """The whole pipeline for one seed into ``output / f"seed-{seed}"``; returns its summary."""
    from mergekit_ace.analysis.covariance import aggregate
    from mergekit_ace.demo import merges, pipeline, scoring, train
    from mergekit_ace.demo.skills import build_skills

    cfg = dataclasses.replace(config, seed=seed)
    out = Path(output) / f"seed-{seed}"
    summary_path = out / "summary.json"
    labels = [v[0] for v in variants]
    if summary_path.exists() and not force and not force_retrain:
        previous = json.loads(summary_path.read_text())
        if previous.get("config_hash") == cfg.digest() and previous.get("variants") == labels:
            log(f"== seed {seed}: reusing {summary_path} (configuration hash {cfg.digest()})")
            return previous
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.time()

    log(f"== seed {seed}: training (config '{cfg.name}', hash {cfg.digest()})")
    t0 = time.time()
    trained = train.ensure_trained(cfg, cache, force=force_retrain, log=log)
    timings["train"] = time.time() - t0
    relative = pipeline.log_relative_norms(trained, log)

    log(f"== seed {seed}: real input covariances")
    t0 = time.time()
    expert_grams, base_grams, tokens = measure_grams(cfg, trained, gram_batches, log)
    timings["covariances"] = time.time() - t0

    log(f"== seed {seed}: merging ({len(variants)} variants, mergekit's run_merge in this process)")
    t0 = time.time()
    merged = merges.run_all_merges(trained.base, trained.experts, out / "merges", variants, log=log, in_process=True,
                                  dtype=cfg.merge_dtype)
    timings["merge"] = time.time() - t0

    log(f"== seed {seed}: covariance analysis and the RegMean reference")
    t0 = time.time()
    paths = {label: info["path"] for label, info in merged.items()}
    rows, solutions = analyse_merges(trained, paths, expert_grams, base_grams)
    write_reference_model(trained, solutions, out / "merges" / REFERENCE)
    covariance = aggregate(rows, labels, list(SKILL_NAMES))
    _write_rows(rows, out / "covariance_layers.csv")
    timings["analysis"] = time.time() - t0

    log(f"== seed {seed}: scoring")
    t0 = time.time()
    skills = build_skills(cfg.skill_kwargs())
    tasks_dir = scoring.prepare_tasks(train.eval_sets(cfg, skills), out)
    models: dict[str, Path] = {"base": trained.base}
    models.update({f"expert-{s}": trained.experts[s] for s in SKILL_NAMES})
    models.update(paths)
    models[REFERENCE] = out / "merges" / REFERENCE
    owners = {scoring.task_name(s): f"expert-{s}" for s in SKILL_NAMES}
    results = scoring.score_models(models, tasks_dir, out / "eval", owners, base="base", batch_size=batch_size, log=log)
    timings["score"] = time.time() - t0
    raw = {m: {s: scoring.primary_score(results, m, s) for s in SKILL_NAMES} for m in models}
    timings["total"] = time.time() - started

    summary = {
        "seed": seed,
        "config": cfg.to_dict(),
        "config_hash": cfg.digest(),
        "cache": str(trained.root),
        "variants": labels,
        "methods": [{"label": v[0], "merge_method": v[1], "parameters": v[2], "model_parameters": v[3]}
                    for v in variants],
        "eval_examples_per_task": cfg.eval_examples,
        "scores": raw,
        "normalised": pipeline.normalise(raw, [*labels, REFERENCE]),
        "relative_norms": relative,
        "heterogeneity": {k: v for k, v in pipeline.heterogeneity(trained.manifest).items() if k != "per_matrix"},
        "gram_tokens": tokens,
        "covariance": covariance,
        "covariance_layers": [{k: _finite(v) for k, v in r.items()} for r in rows],
        "merge_seconds": {label: info["seconds"] for label, info in merged.items()},
        "training_timings_s": trained.manifest.get("timings_s", {}),
        "timings_s": timings,
    }
    summary_path.write_text(json.dumps(summary, indent=1))
    log(pipeline.render_tables(raw, summary["normalised"], cfg.eval_examples))
    stages = ", ".join(f"{k} {v:.0f}s" for k, v in timings.items() if k != "total")
    log(f"== seed {seed}: done in {timings['total']:.0f}s (" + stages + ")")
    return summary


def _write_rows(rows, path: Path) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------- over seeds
def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Mean, sample standard deviation, min and max of the values that are not None."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(vals), "max": max(vals), "n": len(vals)}


def aggregate_seeds(summaries: Sequence[Mapping]) -> dict:
    """Mean and spread over seeds of every number the tables show."""
    models = list(summaries[0]["scores"])
    normalised_models = list(summaries[0]["normalised"])
    out = {"seeds": [s["seed"] for s in summaries], "raw": {}, "normalised": {}, "relative_norms": {},
           "cosine": {}, "objective": {}, "distance_to_regmean": {}, "heterogeneous_share": None}
    for m in models:
        out["raw"][m] = {s: spread([100 * x["scores"][m][s] for x in summaries]) for s in SKILL_NAMES}
        out["raw"][m]["avg"] = spread([100 * sum(x["scores"][m][s] for s in SKILL_NAMES) / len(SKILL_NAMES)
                                       for x in summaries])
    for m in normalised_models:
        out["normalised"][m] = {c: spread([x["normalised"][m][c] for x in summaries]) for c in [*SKILL_NAMES, "avg"]}
    for e in SKILL_NAMES:
        out["relative_norms"][e] = {k: spread([100 * x["relative_norms"][e][k] for x in summaries])
                                    for k in ("global", "median_matrix")}
    for proxy in summaries[0]["covariance"]["cosine"]:
        out["cosine"][proxy] = {
            t: spread([x["covariance"]["cosine"][proxy]["per_task"][t]["mean"] for x in summaries]) for t in SKILL_NAMES
        }
        out["cosine"][proxy]["all"] = spread([x["covariance"]["cosine"][proxy]["all"]["mean"] for x in summaries])
    for label in summaries[0]["covariance"]["objective"]:
        out["objective"][label] = {
            k: spread([x["covariance"]["objective"][label][k] for x in summaries])
            for k in ("sum_ratio", "median_ratio")
        }
    for label in summaries[0]["covariance"]["distance_to_regmean"]:
        out["distance_to_regmean"][label] = spread([x["covariance"]["distance_to_regmean"][label] for x in summaries])
    out["paired"] = paired_differences(summaries)
    het = [x["heterogeneity"] for x in summaries if x.get("heterogeneity")]
    if het:
        out["heterogeneous_share"] = spread([h["heterogeneous"] / h["matrices"] for h in het])
    return out


def paired_differences(summaries: Sequence[Mapping], pairs: Sequence[tuple[str, str]] = None) -> list[dict]:
    """Per pair ``(a, b)``: the per-seed differences ``a - b`` of the raw average score (points of
    %, the mean over skills) and of the normalised average, their mean and spread, and on how many
    seeds a scored higher / lower. Pairs are every merge against ``linear`` plus :data:`PAIRS`,
    where both labels were scored."""
    models = list(summaries[0]["scores"])
    merges = [m for m in summaries[0]["normalised"] if m not in ("base", "linear") and not m.startswith("expert-")]
    wanted = [(m, "linear") for m in merges] + list(PAIRS if pairs is None else pairs)
    out = []
    for a, b in wanted:
        if a not in models or b not in models:
            continue
        raw = [100 * sum(x["scores"][a][s] - x["scores"][b][s] for s in SKILL_NAMES) / len(SKILL_NAMES)
               for x in summaries]
        norm = [x["normalised"][a]["avg"] - x["normalised"][b]["avg"] for x in summaries
                if x["normalised"].get(a, {}).get("avg") is not None
                and x["normalised"].get(b, {}).get("avg") is not None]
        out.append({"a": a, "b": b, "raw_avg": spread(raw), "normalised_avg": spread(norm),
                    "wins": sum(d > 0 for d in raw), "losses": sum(d < 0 for d in raw), "seeds": len(raw)})
    return out


def _ms(s: Mapping, digits: int = 1) -> str:
    if s is None or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _mm(s: Mapping, digits: int = 1) -> str:
    if s is None or s.get("min") is None:
        return "n/a"
    return f"{s['min']:.{digits}f}-{s['max']:.{digits}f}"


def render_report(study: Mapping) -> str:
    agg = study["aggregate"]
    seeds = agg["seeds"]
    first = study["seeds"][0]
    cfg = first["config"]
    lines = [
        "# mergekit-ace study",
        "",
        f"Command: `{study['command']}`",
        "",
        f"Configuration `{cfg['name']}`, seeds {', '.join(map(str, seeds))} (hashes "
        + ", ".join(f"`{s['config_hash']}`" for s in study["seeds"])
        + f"); {first['eval_examples_per_task']} held-out examples per task and seed. Mean ± sample standard "
        "deviation over seeds, then min-max.",
    ]
    if study.get("skipped"):
        lines += ["", "Skipped variants (a method that is not installed, or a parameter it does not take): "
                  + "; ".join(f"`{label}` ({why})" for label, why in study["skipped"]) + "."]
    lines += ["", "## Experts", "",
              "| expert | own skill | base on it | ||D_t|| / ||W_0|| (%) | median over weights (%) |",
              "|---|---:|---:|---:|---:|"]
    for e in SKILL_NAMES:
        lines.append(f"| {e} | {_ms(agg['raw'][f'expert-{e}'][e])} | {_ms(agg['raw']['base'][e])} | "
                     f"{_ms(agg['relative_norms'][e]['global'], 2)} | "
                     f"{_ms(agg['relative_norms'][e]['median_matrix'], 2)} |")
    if agg.get("heterogeneous_share"):
        share = {k: (v * 100 if isinstance(v, float) else v) for k, v in agg["heterogeneous_share"].items()}
        lines += ["", f"Share of merged weights on ACE's heterogeneous branch (gamma > 0.3): "
                      f"{_ms(share)} %."]
    lines += ["", "## Scores", "", "Raw scores (% of held-out examples), mean ± std over seeds", "",
              "| model | " + " | ".join(SKILL_NAMES) + " | avg | avg min-max |",
              "|---|" + "---:|" * (len(SKILL_NAMES) + 2)]
    for m, row in agg["raw"].items():
        lines.append(f"| {m} | " + " | ".join(_ms(row[s]) for s in SKILL_NAMES)
                     + f" | {_ms(row['avg'])} | {_mm(row['avg'])} |")
    lines += ["", "Normalised to each task's expert (% of the expert's score), mean ± std over seeds", "",
              "| model | " + " | ".join(SKILL_NAMES) + " | avg | avg min-max |",
              "|---|" + "---:|" * (len(SKILL_NAMES) + 2)]
    order = sorted(agg["normalised"], key=lambda m: -(agg["normalised"][m]["avg"]["mean"] or -1e9))
    for m in order:
        row = agg["normalised"][m]
        lines.append(f"| {m} | " + " | ".join(_ms(row[s]) for s in SKILL_NAMES)
                     + f" | **{_ms(row['avg'])}** | {_mm(row['avg'])} |")
    lines += ["", f"`{REFERENCE}` is RegMean with the real input covariances (it uses the experts' data; a reference, "
              "not a data-free method)."]
    if agg.get("paired"):
        lines += ["", "Paired differences (same seed: same experts and held-out examples): a minus b, in points of the "
                  "raw average and of the normalised average, mean ± std over seeds; wins-losses = seeds on which a "
                  "scored higher / lower on the raw average.", "",
                  "| a | b | raw avg, a - b | normalised avg, a - b | wins-losses |", "|---|---|---:|---:|---:|"]
        for p in agg["paired"]:
            lines.append(f"| {p['a']} | {p['b']} | {_ms(p['raw_avg'])} | {_ms(p['normalised_avg'])} | "
                         f"{p['wins']}-{p['losses']} of {p['seeds']} |")
    lines += ["", "## The covariance claim", "",
              "Real per-task input second moments `G_t = X_t^T X_t / n_t` through the expert t's own forward pass "
              "on the first batches of its training data, for every merged linear layer "
              f"({first['covariance']['layers']} per model). Cosine (Frobenius) with the data-free proxies, "
              "the layers' mean, then mean ± std over seeds:", "",
              "| proxy | " + " | ".join(SKILL_NAMES) + " | all tasks |", "|---|" + "---:|" * (len(SKILL_NAMES) + 1)]
    names = {"DtD": "D_t^T D_t (ACTMat)", "CtC": "C_t^T C_t (ACE, rows centred)", "I": "identity (no proxy)",
             "DtD_base_inputs": "D_t^T D_t vs the base's inputs"}
    for proxy, row in agg["cosine"].items():
        lines.append(f"| {names.get(proxy, proxy)} | " + " | ".join(_ms(row[t], 3) for t in SKILL_NAMES)
                     + f" | {_ms(row['all'], 3)} |")
    lines += ["", "RegMean objective `sum_t ||(W - W_t) X_t^T||_F^2 / n_t` relative to the experts' average "
              "(`linear`): ratio of the sums over layers, the median of the per-layer ratios, and the median "
              "per-layer distance to the RegMean solution `||W - W*||_F / ||W* - W_0||_F` (mean ± std over seeds). "
              "Below 1 is better than averaging.", "",
              "| merge | objective / average's (sum) | (median layer) | distance to W* |", "|---|---:|---:|---:|"]
    objective = agg["objective"]
    for label in sorted(objective, key=lambda l: objective[l]["sum_ratio"]["mean"] or 1e9):
        dist = agg["distance_to_regmean"].get(label)
        lines.append(f"| {'RegMean, real covariances (W*)' if label == 'regmean' else label} | "
                     f"{_ms(objective[label]['sum_ratio'], 3)} | {_ms(objective[label]['median_ratio'], 3)} | "
                     f"{_ms(dist, 3) if dist else '0'} |")
    lines += ["", "Per-layer numbers: `seed-<n>/covariance_layers.csv`.", "", "## Plots", ""]
    for png in study.get("plots", []):
        lines.append(f"![{png}]({png})")
    lines += ["", "## Run", ""]
    for s in study["seeds"]:
        t = s["timings_s"]
        lines.append(f"- seed {s['seed']}: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items()))
    lines.append(f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores; this invocation's wall time "
                 f"{study['wall_s']:.0f}s (a seed reused from an earlier run costs none here; training reused from "
                 "the cache shows as train 0s)")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ plots
def _weight_tick_labels(weights: Sequence[str]) -> list[str]:
    """Short x tick labels: ``model.layers.3.self_attn.q_proj.weight`` -> ``L3.q_proj``."""
    return [w.replace("model.layers.", "L").replace(".weight", "").replace("self_attn.", "").replace("mlp.", "")
            for w in weights]


def _mean_over_seeds(rows_by_seed: Sequence[Sequence[Mapping]], key: str, count: int) -> list[float]:
    """Per layer i < count: the mean of ``rows[i][key]`` over the seeds that have it (NaN if none)."""
    ys = []
    for i in range(count):
        vals = [rows[i][key] for rows in rows_by_seed if rows[i].get(key) is not None]
        ys.append(sum(vals) / len(vals) if vals else float("nan"))
    return ys


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scores(study: Mapping, path: Path) -> None:
    """Normalised average per model, bars mean ± std over seeds, each seed a dot."""
    import matplotlib.pyplot as plt

    agg = study["aggregate"]
    order = sorted(agg["normalised"], key=lambda m: -(agg["normalised"][m]["avg"]["mean"] or -1e9))
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(order)), 4.5))
    means = [agg["normalised"][m]["avg"]["mean"] or 0 for m in order]
    stds = [agg["normalised"][m]["avg"]["std"] or 0 for m in order]
    colours = ["grey" if m in ("base", REFERENCE) else ("C3" if m.startswith("ace") else "C0") for m in order]
    ax.bar(range(len(order)), means, yerr=stds, color=colours, capsize=3)
    for i, m in enumerate(order):
        pts = [s["normalised"][m]["avg"] for s in study["seeds"] if s["normalised"][m]["avg"] is not None]
        ax.scatter([i] * len(pts), pts, color="k", s=8, zorder=3)
    ax.set_xticks(range(len(order)), order, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("normalised average (% of experts)")
    ax.set_title(f"Scores over seeds {agg['seeds']} (bars: mean ± std; dots: seeds)")
    _save(fig, path)


def plot_covariance_cosine(study: Mapping, path: Path) -> None:
    """Per layer, the Frobenius cosine of each proxy (D^T D, ACE's C^T C, the identity, D^T D against
    the base's inputs) with the real X^T X, mean over seeds; one panel per task."""
    import matplotlib.pyplot as plt

    rows_by_seed = [s["covariance_layers"] for s in study["seeds"]]
    weights = [r["weight"] for r in rows_by_seed[0]]
    names = {"DtD": "D^T D", "CtC": "C^T C (ACE)", "I": "identity", "DtD_base_inputs": "D^T D vs base inputs"}
    fig, axes = plt.subplots(1, len(SKILL_NAMES), figsize=(15, 4.2), sharey=True)
    for ax, task in zip(axes, SKILL_NAMES):
        for proxy, style in (("DtD", "-o"), ("CtC", "-s"), ("I", "--"), ("DtD_base_inputs", ":")):
            ys = _mean_over_seeds(rows_by_seed, f"cos_{proxy}_{task}", len(weights))
            ax.plot(range(len(weights)), ys, style, ms=3, lw=1, label=names[proxy])
        ax.set_title(f"{task}: cosine with the real X^T X")
        ax.set_xticks(range(len(weights)), _weight_tick_labels(weights), rotation=90, fontsize=6)
        ax.set_ylim(0, 1.02)
    axes[0].set_ylabel("Frobenius cosine")
    axes[0].legend(fontsize=7)
    _save(fig, path)


def plot_regmean_objective(study: Mapping, path: Path) -> None:
    """Each merge's RegMean objective summed over layers, relative to the experts' average
    (mean ± std over seeds, log scale)."""
    import matplotlib.pyplot as plt

    objective = study["aggregate"]["objective"]
    labels = sorted(objective, key=lambda l: objective[l]["sum_ratio"]["mean"] or 1e9)
    fig, ax = plt.subplots(figsize=(max(7, 0.55 * len(labels)), 4.5))
    means = [objective[l]["sum_ratio"]["mean"] for l in labels]
    stds = [objective[l]["sum_ratio"]["std"] for l in labels]
    colours = ["grey" if l == "regmean" else ("C3" if l.startswith("ace") else "C0") for l in labels]
    ax.bar(range(len(labels)), means, yerr=stds, color=colours, capsize=3)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), ["RegMean W* (data)" if l == "regmean" else l for l in labels], rotation=60,
                  ha="right", fontsize=8)
    ax.set_ylabel("RegMean objective / average's (log)")
    ax.set_title("Layer-wise RegMean objective, sum over layers (mean ± std over seeds)")
    _save(fig, path)


PER_LAYER_OBJECTIVE_LABELS = ("regmean", "ace", "ace-no-refinement", "ace-homogeneous", "actmat", "iso_c", "tsv_m",
                              "task_arithmetic")


def plot_regmean_objective_layers(study: Mapping, path: Path) -> None:
    """Per layer, the RegMean objective of a few merges relative to the experts' average (mean over seeds)."""
    import matplotlib.pyplot as plt

    objective = study["aggregate"]["objective"]
    rows_by_seed = [s["covariance_layers"] for s in study["seeds"]]
    weights = [r["weight"] for r in rows_by_seed[0]]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    for label in (l for l in PER_LAYER_OBJECTIVE_LABELS if l in objective):
        ys = _mean_over_seeds(rows_by_seed, f"rel_objective_{label}", len(weights))
        ax.plot(range(len(weights)), ys, "-o", ms=3, lw=1, label="RegMean W* (data)" if label == "regmean" else label)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xticks(range(len(weights)), _weight_tick_labels(weights), rotation=90, fontsize=6)
    ax.set_ylabel("objective / average's (log)")
    ax.set_title("RegMean objective per layer, relative to the experts' average (mean over seeds)")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)


PLOTS = (("scores.png", plot_scores), ("covariance_cosine.png", plot_covariance_cosine),
         ("regmean_objective.png", plot_regmean_objective),
         ("regmean_objective_layers.png", plot_regmean_objective_layers))


def write_plots(study: Mapping, output: Path) -> list[str]:
    """Write the study's four PNGs into ``output``; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for name, plot in PLOTS:
        plot(study, output / name)
        written.append(name)
    return written


# ------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mergekit_ace.demo.train import CONFIGS

    parser.add_argument("--config", default="realistic", choices=sorted(CONFIGS),
                        help="training configuration (default: realistic)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--output", default="study-output", help="output directory (default: study-output)")
    parser.add_argument("--cache", default=None, help="trained-model cache (default: <output>/cache)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated subset of the variant labels (default: all of "
                        + ", ".join(v[0] for v in VARIANTS) + ")")
    parser.add_argument("--gram-batches", type=int, default=4,
                        help="batches of each expert's training stream for the real covariances (default: 4)")
    parser.add_argument("--batch-size", type=int, default=16, help="lm-eval batch size (default: 16)")
    parser.add_argument("--force", action="store_true",
                        help="redo seeds whose summary.json exists (training stays cached)")
    parser.add_argument("--force-retrain", action="store_true", help="retrain even if the cache has the models")


def run(args: argparse.Namespace) -> int:
    import sys

    from mergekit_ace.demo import train
    from mergekit_ace.demo.pipeline import _log, offline_quiet_environment
    from mergekit_ace.errors import UserError

    offline_quiet_environment()
    if args.config not in train.CONFIGS:
        raise UserError(f"unknown --config {args.config!r}")
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError("--seeds must be distinct")
    if args.gram_batches < 1:
        raise UserError("--gram-batches must be at least 1")
    variants = list(VARIANTS)
    if args.variants:
        wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
        known = {v[0] for v in VARIANTS}
        unknown = [v for v in wanted if v not in known]
        if unknown:
            raise UserError(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(v[0] for v in VARIANTS)}")
        if "linear" not in wanted:
            wanted.append("linear")  # the objective's reference
        variants = [v for v in VARIANTS if v[0] in wanted]
    variants, skipped = available_variants(variants, _log)

    output = Path(args.output).expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).expanduser().resolve() if args.cache else output / "cache"
    config = train.CONFIGS[args.config]
    started = time.time()
    summaries = [
        run_seed(config, seed, output, cache, variants, batch_size=args.batch_size, gram_batches=args.gram_batches,
                 force=args.force, force_retrain=args.force_retrain, log=_log)
        for seed in args.seeds
    ]
    study = {
        "command": "mergekit-ace study "
        + " ".join(sys.argv[2:] if len(sys.argv) > 1 and sys.argv[1] == "study" else []),
        "config": args.config,
        "seeds": summaries,
        "skipped": skipped,
        "aggregate": aggregate_seeds(summaries),
        "wall_s": time.time() - started,
    }
    study["plots"] = write_plots(study, output)
    (output / "study.json").write_text(json.dumps({k: v for k, v in study.items() if k != "seeds"}
                                                  | {"seeds": [{k: v for k, v in s.items() if k != "covariance_layers"}
                                                               for s in summaries]}, indent=1))
    report = render_report(study)
    (output / "report.md").write_text(report)
    _log(report)
    return 0
