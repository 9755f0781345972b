"""Tests for the ``mergekit-ace demo`` pipeline: the skills and their checkers, the training cache,
and the whole pipeline end to end on the seconds-scale ``small`` configuration."""

import argparse
import json
import math
import random
import time
from pathlib import Path

import pytest

from mergekit_ace.demo import skills as S

# ---------------------------------------------------------------------------------------------
# skills


def test_infix_to_rpn_matches_python_evaluation():
    rng = random.Random(0)
    for _ in range(300):
        expression = S._random_expression(rng, rng.randint(0, 4))
        program = S.infix_to_rpn(expression)
        assert S.run_stack_program(program) == eval(expression)  # noqa: S307 (digits and + - * only)
        assert S.check_rpn(expression, " ".join(program))


def test_rpn_checker_accepts_any_correct_program_and_nothing_else():
    assert S.check_rpn("(3+4)*2", "3 4 + 2 *")
    assert S.check_rpn("(3+4)*2", "4 3 + 2 *")  # a different, equally correct program
    assert S.check_rpn("(3+4)*2", "2 3 4 + *")
    assert not S.check_rpn("(3+4)*2", "14")  # precomputed value, not a compilation
    assert not S.check_rpn("(3+4)*2", "3 4 2 * +")  # wrong precedence: 11
    assert not S.check_rpn("(3+4)*2", "3 4 + 2")  # two values left on the stack
    assert not S.check_rpn("(3+4)*2", "3 + 4 2 *")  # stack underflow
    assert not S.check_rpn("(3+4)*2", "")
    assert not S.check_rpn("(3+4)*2", "3 4 + 2 * x")


def test_generators_are_seeded_and_answers_correct():
    skills = S.build_skills()
    for skill in skills.values():
        a = [skill.generate(random.Random(3)) for _ in range(5)]
        b = [skill.generate(random.Random(3)) for _ in range(5)]
        assert a == b
    rng = random.Random(1)
    for _ in range(100):
        prompt, answer = skills["arithmetic"].generate(rng)
        x, y = prompt[len("add ") : -1].split("+")
        assert int(answer) == int(x) + int(y)
        assert skills["arithmetic"].check(prompt, answer, answer)
    for _ in range(50):
        prompt, answer = skills["translate"].generate(rng)
        words = prompt[len("tr ") : -1].split()
        # SOV: the made-up verb comes last; articles are dropped
        lexicon = S.make_lexicon(7)
        verb = next(w for w in words if w in S.ENGLISH_VERBS)
        assert answer.split()[-1] == lexicon[verb]
        assert len(answer.split()) == len([w for w in words if w not in ("the", "a")])


def test_lm_eval_hooks_score_completions():
    doc = {"prompt": "rpn (3+4)*2=", "answer": "3 4 + 2 *"}
    assert S.process_results_rpn(doc, ["4 3 + 2 *"]) == {"pass": 1.0}
    assert S.process_results_rpn(doc, ["14"]) == {"pass": 0.0}
    doc = {"prompt": "add 1+2=", "answer": "3"}
    assert S.process_results_exact(doc, ["3\nadd 5+5=10"]) == {"exact_match": 1.0}
    assert S.process_results_exact(doc, ["4"]) == {"exact_match": 0.0}


def test_task_templates_are_filled(tmp_path):
    from mergekit_ace.demo import scoring

    sets = {name: [("p=", "a")] for name in S.SKILL_NAMES}
    tasks_dir = scoring.prepare_tasks(sets, tmp_path)
    for name in S.SKILL_NAMES:
        text = (tasks_dir / f"ace_demo_{name}.yaml").read_text()
        assert "@DATA_DIR@" not in text and str(tmp_path / "data") in text
        assert (tmp_path / "data" / f"{name}.jsonl").read_text().strip() == json.dumps({"prompt": "p=", "answer": "a"})
    assert (tasks_dir / "ace_demo_metrics.py").exists()


def test_merge_configs_use_absolute_paths(tmp_path):
    from mergekit_ace.demo import merges

    labels = [m[0] for m in merges.METHODS]
    assert labels == ["linear", "task_arithmetic", "ties", "ace", "actmat", "tsv_m", "iso_c", "iso_cts",
                      "ace-refine-none", "wudi"]
    for method in merges.METHODS:
        cfg = merges.merge_config(method, Path("base"), [Path("e1"), Path("e2")])
        paths = [m["model"] for m in cfg["models"]] + ([cfg["base_model"]] if "base_model" in cfg else [])
        assert all(Path(p).is_absolute() for p in paths)
        assert cfg["merge_method"] == method[1] and cfg["dtype"] == "float32"
    assert "base_model" not in merges.merge_config(merges.METHODS[0], Path("b"), [Path("e")])
    assert merges.merge_config(merges.METHODS[3], Path("b"), [Path("e")], dtype="bfloat16")["dtype"] == "bfloat16"
    # ACE both at the paper's defaults and at the study's recommendation
    ace, recommended = (next(m for m in merges.METHODS if m[0] == label) for label in ("ace", "ace-refine-none"))
    assert recommended[2] == {**ace[2], "refinement": "none"} and "refinement" not in ace[2]


def test_config_digest_tracks_the_configuration():
    import dataclasses

    from mergekit_ace.demo.train import CONFIGS

    small = CONFIGS["small"]
    assert small.digest() == CONFIGS["small"].digest()
    assert small.digest() != dataclasses.replace(small, base_steps=small.base_steps + 1).digest()
    assert small.digest() != CONFIGS["default"].digest()
    # the storage fields enter the hash only when set, so older caches keep their hash
    assert small.digest() == dataclasses.replace(small, storage_dtype="float32", merge_dtype="float32").digest()
    assert small.digest() != dataclasses.replace(small, storage_dtype="bfloat16").digest()
    assert small.digest() != dataclasses.replace(small, merge_dtype="bfloat16").digest()
    realistic = CONFIGS["realistic"]
    assert (realistic.storage_dtype, realistic.merge_dtype) == ("bfloat16", "bfloat16")
    assert realistic.float32_twin() == CONFIGS["realistic-float32"]
    assert realistic.float32_twin().digest() != realistic.digest()
    assert dataclasses.replace(realistic, storage_dtype="float32", merge_dtype="float32", name="realistic-float32") \
        == CONFIGS["realistic-float32"]
    # down_proj of the real models: T d_out / d_in = 3 * 3072 / 8192 (Llama-3.2-3B), 3 * 4096 / 11008 (OLMo-3-7B)
    assert 1.10 < 3 * realistic.hidden_size / realistic.intermediate_size < 1.13


@pytest.mark.slow
def test_bfloat16_storage_rounds_the_float32_twin(tmp_path):
    """A bf16 configuration stores its float32 twin's weights rounded to bf16 (trained once,
    reused), records the rounded task vectors, and its merges run with dtype bfloat16."""
    import dataclasses

    import torch

    from mergekit_ace.demo import merges
    from mergekit_ace.demo.train import CONFIGS, ensure_trained, load_weights

    tiny = dataclasses.replace(
        CONFIGS["small"], name="tiny", hidden_size=32, intermediate_size=64, tokenizer_corpus_per_skill=200,
        base_steps=4, experts=tuple((n, dataclasses.replace(e, steps=3)) for n, e in CONFIGS["small"].experts),
        batch_size=8, eval_examples=4, storage_dtype="bfloat16", merge_dtype="bfloat16",
    )
    messages = []
    trained = ensure_trained(tiny, tmp_path, log=messages.append)
    twin = ensure_trained(tiny.float32_twin(), tmp_path, log=messages.append)
    assert any("Using cached models" in m and twin.root.name in m for m in messages)  # trained once
    assert trained.root.name == f"tiny-{tiny.digest()}" and twin.root.name == f"tiny-float32-{twin.manifest['digest']}"
    assert not list(tmp_path.glob("*.partial"))
    for stored, source in [(trained.base, twin.base), *((trained.experts[s], twin.experts[s]) for s in S.SKILL_NAMES)]:
        got, full = load_weights(stored), load_weights(source)
        assert set(got) == set(full)
        for name, w in full.items():
            assert w.dtype == torch.float32 and got[name].dtype == torch.bfloat16
            assert torch.equal(got[name], w.to(torch.bfloat16)), name
    base = load_weights(trained.base)
    expert = load_weights(trained.experts["rpn"])
    name = "model.layers.0.mlp.down_proj.weight"
    energy = float((expert[name].double() - base[name].double()).square().sum())
    assert trained.manifest["experts"]["rpn"]["task_vector_sq_norms"][name] == pytest.approx(energy, rel=1e-12)
    assert trained.manifest["digest"] == tiny.digest() and trained.manifest["stored_from"]["dtype"] == "bfloat16"
    # a second call reuses the stored copy
    again = []
    ensure_trained(tiny, tmp_path, log=again.append)
    assert any("Using cached models" in m and trained.root.name in m for m in again)
    # merged with dtype bfloat16, as real checkpoints are
    ace = next(m for m in merges.METHODS if m[0] == "ace")
    out = merges.run_all_merges(trained.base, trained.experts, tmp_path / "merges", [ace], log=lambda m: None,
                                in_process=True, dtype=tiny.merge_dtype)
    merged = load_weights(out["ace"]["path"])
    assert all(t.dtype == torch.bfloat16 for t in merged.values())


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory, small_demo_cache):
    from mergekit_ace.demo import pipeline

    out = tmp_path_factory.mktemp("demo")
    parser = argparse.ArgumentParser()
    pipeline.add_arguments(parser)
    args = parser.parse_args(["--output", str(out), "--config", "small", "--cache", str(small_demo_cache)])
    start = time.time()
    assert pipeline.run(args) == 0
    return out, time.time() - start


@pytest.mark.slow
def test_small_demo_runs_end_to_end(small_demo):
    out, seconds = small_demo
    summary = json.loads((out / "summary.json").read_text())
    scores = summary["scores"]
    merges = ("linear", "task_arithmetic", "ties", "ace", "actmat", "tsv_m", "iso_c", "iso_cts", "ace-refine-none")
    run = [m["label"] for m in summary["methods"]]
    skipped = [label for label, _why in summary["skipped"]]
    assert set(run) >= set(merges) and sorted(run + skipped) == sorted([*merges, "wudi"])
    assert skipped in ([], ["wudi"])  # wudi runs where the method is installed, else is reported
    expected_models = {"base", *(f"expert-{s}" for s in S.SKILL_NAMES), *run}
    assert set(scores) == expected_models
    # every expert clearly beats the base on its own skill
    for skill in S.SKILL_NAMES:
        assert scores[f"expert-{skill}"][skill] >= scores["base"][skill] + 0.2, (skill, scores)
    # normalised table: merges as a percentage of each task's expert
    for label in merges:
        row = summary["normalised"][label]
        for skill in S.SKILL_NAMES:
            assert row[skill] == pytest.approx(100 * scores[label][skill] / scores[f"expert-{skill}"][skill])
    report = (out / "report.md").read_text()
    assert "Normalised to each task's expert" in report
    assert "**Regime: small**" in report and "studies/realistic/RESULTS.md" in report
    assert ("`wudi` (merge method 'wudi' is not installed)" in report) == (skipped == ["wudi"])
    for label in ("ace", "actmat", "tsv_m", "iso_c", "iso_cts"):
        assert f"| {label} |" in report and f"`{label}`" in report
    assert (out / "chart.png").stat().st_size > 0
    assert summary["heterogeneity"]["matrices"] > 0


@pytest.mark.slow
def test_small_demo_merged_models_load(small_demo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = small_demo
    for label in ("linear", "task_arithmetic", "ties", "ace", "actmat", "tsv_m", "iso_c", "iso_cts", "ace-refine-none"):
        path = out / "merges" / label
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = torch.tensor([tokenizer("add 1+2=")["input_ids"]])
        logits = model(input_ids=ids).logits
        assert torch.isfinite(logits).all()
        assert (out / "merges" / f"{label}.yaml").exists()


@pytest.mark.slow
def test_small_demo_cache_is_reused(small_demo, small_demo_cache):
    from mergekit_ace.demo.train import CONFIGS, ensure_trained

    messages = []
    start = time.time()
    trained = ensure_trained(CONFIGS["small"], small_demo_cache, log=messages.append)
    assert time.time() - start < 5
    assert any("Using cached models" in m for m in messages)
    assert trained.root.name == f"small-{CONFIGS['small'].digest()}"


# ---------------------------------------------------------------------------------------------
# the multi-seed study (mergekit_ace.demo.study)


def test_study_variants_are_guarded():
    from mergekit_ace.demo import study

    variants = [
        ("ace-homogeneous", "ace", {"tau": 1e9}, {}),
        ("ace-bogus", "ace", {"no_such_parameter": 1}, {}),
        ("nothing", "no_such_method", {}, {}),
        ("ties", "ties", {"normalize": True}, {"density": 0.5, "weight": 1.0}),
    ]
    logged = []
    keep, skipped = study.available_variants(variants, log=logged.append)
    assert [v[0] for v in keep] == ["ace-homogeneous", "ties"]
    assert [s[0] for s in skipped] == ["ace-bogus", "nothing"]
    assert "no_such_parameter" in skipped[0][1] and len(logged) == 2
    # the shipped list: every ACE variant is the paper's defaults plus one override
    labels = [v[0] for v in study.VARIANTS]
    assert labels[:10] == ["linear", "task_arithmetic", "ties", "ace", "actmat", "tsv_m", "iso_c", "iso_cts",
                           "ace-refine-none", "wudi"]
    assert len(set(labels)) == len(labels)
    for label in ("wudi-adam", "ace-paper-scope", "actmat-paper-scope", "actmat-exact"):
        assert label in labels
    # the paper scopes: ACE's code keeps embeddings and lm_head at the base, ACTMat's averages the
    # weights with a vocabulary-sized dimension (every other dimension of the demo's models is smaller)
    paper_ace = next(v for v in study.VARIANTS if v[0] == "ace-paper-scope")
    assert paper_ace[2]["scope"][:2] == [{"filter": "embed_tokens", "value": "base"},
                                         {"filter": "lm_head", "value": "base"}]
    from mergekit_ace.demo.train import CONFIGS

    paper_actmat = next(v for v in study.VARIANTS if v[0] == "actmat-paper-scope")
    for config in CONFIGS.values():
        assert paper_actmat[2]["average_from_dim"] == config.vocab_size
        assert max(config.hidden_size, config.intermediate_size) < config.vocab_size
    for label, override in (("ace-homogeneous", {"tau": 1e9}), ("ace-no-refinement", {"k_frac": 0.0}),
                            ("ace-eps1e-2", {"epsilon": 1e-2}), ("ace-refine-rescale", {"refinement": "rescale"})):
        variant = next(v for v in study.VARIANTS if v[0] == label)
        assert variant[1] == "ace" and variant[2] == {**study.ACE_DEFAULTS, **override}


def test_study_spread_over_seeds():
    from mergekit_ace.demo import study

    s = study.spread([1.0, 2.0, 6.0])
    assert s["mean"] == pytest.approx(3.0) and s["std"] == pytest.approx(math.sqrt(7.0))
    assert (s["min"], s["max"], s["n"]) == (1.0, 6.0, 3)
    assert study.spread([None, 4.0])["std"] == 0.0 and study.spread([])["mean"] is None


def test_study_paired_differences():
    from mergekit_ace.demo import study

    def seed(ace, lin, none):
        scores = {"base": dict.fromkeys(S.SKILL_NAMES, 0.1)}
        for label, value in (("ace-refine-add", ace), ("linear", lin), ("ace-refine-none", none)):
            scores[label] = dict.fromkeys(S.SKILL_NAMES, value)
        normalised = {m: {"avg": 100 * v[S.SKILL_NAMES[0]]} for m, v in scores.items()}
        return {"scores": scores, "normalised": normalised}

    seeds = [seed(0.5, 0.4, 0.45), seed(0.3, 0.35, 0.3), seed(0.6, 0.4, 0.5)]
    pairs = {(p["a"], p["b"]): p for p in study.paired_differences(seeds, [("ace-refine-add", "ace-refine-none"),
                                                                          ("missing", "linear")])}
    assert set(pairs) == {("ace-refine-add", "linear"), ("ace-refine-none", "linear"),
                          ("ace-refine-add", "ace-refine-none")}
    vs_linear = pairs[("ace-refine-add", "linear")]
    assert vs_linear["raw_avg"]["mean"] == pytest.approx((10 - 5 + 20) / 3)
    assert (vs_linear["wins"], vs_linear["losses"], vs_linear["seeds"]) == (2, 1, 3)
    refinement = pairs[("ace-refine-add", "ace-refine-none")]
    assert refinement["normalised_avg"]["mean"] == pytest.approx((5 + 0 + 10) / 3)
    assert (refinement["wins"], refinement["losses"]) == (2, 0)


@pytest.mark.slow
def test_small_study_end_to_end(small_demo):
    """One seed of the study on the cached small models: the RegMean solution with the real
    covariances has the smallest objective in every layer, averaging's ratio is 1, cosines lie in
    [0, 1], and the tables, JSON and plots are written."""
    from mergekit_ace.demo import study
    from mergekit_ace.demo.train import CONFIGS

    out, _ = small_demo
    target = out / "study"
    parser = argparse.ArgumentParser()
    study.add_arguments(parser)
    args = parser.parse_args(["--config", "small", "--seeds", str(CONFIGS["small"].seed), "--output", str(target),
                              "--cache", str(out / "cache"), "--variants", "ace,actmat,ace-refine-none",
                              "--gram-batches", "2"])
    assert study.run(args) == 0
    result = json.loads((target / "study.json").read_text())
    seed = json.loads((target / f"seed-{CONFIGS['small'].seed}" / "summary.json").read_text())
    declared = study.declared_parameters("ace")
    expected = (["ace", "actmat", "ace-refine-none", "linear"] if "refinement" in declared
                else ["ace", "actmat", "linear"])
    assert sorted(seed["variants"]) == sorted(expected)
    assert ("refinement" in declared) == (not result["skipped"])
    assert set(seed["scores"]) >= {"base", study.REFERENCE, *expected}
    rows = seed["covariance_layers"]
    assert len(rows) == 2 * 7 + 1  # two layers of q, k, v, o, gate, up, down, and lm_head
    for row in rows:
        assert row["rel_objective_linear"] == pytest.approx(1.0, rel=1e-5)  # the merge is float32
        for label in expected:
            assert row[f"objective_{label}"] >= row["objective_regmean"] * (1 - 1e-6), (row["weight"], label)
        for task in S.SKILL_NAMES:
            for proxy in ("DtD", "CtC", "I", "DtD_base_inputs"):
                assert 0.0 <= row[f"cos_{proxy}_{task}"] <= 1.0 + 1e-12
    agg = result["aggregate"]
    assert agg["objective"]["regmean"]["sum_ratio"]["mean"] < 1.0
    assert agg["objective"]["linear"]["sum_ratio"]["mean"] == pytest.approx(1.0, rel=1e-5)
    assert agg["normalised"]["ace"]["avg"]["mean"] == pytest.approx(seed["normalised"]["ace"]["avg"])
    assert agg["normalised"]["ace"]["avg"]["std"] == 0.0
    for name in S.SKILL_NAMES:
        assert 0 < seed["relative_norms"][name]["global"] < 10
    for png in ("scores.png", "covariance_cosine.png", "regmean_objective.png", "regmean_objective_layers.png"):
        assert (target / png).stat().st_size > 0
    report = (target / "report.md").read_text()
    assert "The covariance claim" in report and "| ace | linear |" in report
    assert {(p["a"], p["b"]) for p in agg["paired"]} >= {("ace", "linear"), ("ace", "actmat")}
