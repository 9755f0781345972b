"""``mergekit-ace plan``: per-weight plan from safetensors headers, totals and the fit verdict."""

import json

import pytest

from mergekit_ace import toymodels
from mergekit_ace.cli import main


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    tok = toymodels.train_tokenizer()
    base = toymodels.make_model(toymodels.tiny_config("llama"), seed=0)
    paths = [toymodels.save_pretrained(base, tok, root / "base")]
    for i in (1, 2):
        paths.append(toymodels.save_pretrained(toymodels.perturbed_copy(base, seed=i), tok, root / f"e{i}"))
    cfg = root / "ace.yml"
    cfg.write_text(
        f"merge_method: ace\nbase_model: {paths[0]}\nmodels:\n"
        + "".join(f"  - model: {p}\n" for p in paths[1:])
        + "parameters:\n  k_frac: 0.3\ndtype: float32\n"
    )
    return cfg


def test_plan_lists_every_weight_with_rule_strategy_and_totals(config, capsys):
    assert main(["plan", str(config), "--gpu-memory", "24GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    weights = {w["name"]: w for w in plan["weights"]}
    assert plan["experts"] == 2
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert q["shape"] == [32, 32] and q["rule"] == "ace" and q["strategy"] in ("row_chunked", "expert_streamed")
    assert q["peak_bytes"] > 0 and q["matmul_flops"] > 0
    assert weights["model.embed_tokens.weight"]["rule"] == "average"  # input embeddings are averaged
    assert weights["lm_head.weight"]["rule"] == "ace"
    assert weights["model.norm.weight"]["rule"] == "average"
    assert plan["summary"]["fits"] is True
    assert all(s > 0 for s in plan["summary"]["seconds"].values())


def test_plan_text_output_and_tiny_gpu(config, capsys, monkeypatch):
    from mergekit_ace.execution import plan_cli

    monkeypatch.setattr(plan_cli, "measure_throughput", lambda device="cpu": (1e10, 1e9))  # already tested
    assert main(["plan", str(config), "--gpu-memory", "64KiB", "--all"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj.weight" in out and "does NOT fit" in out and "measured now" in out


def test_plan_user_errors(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing.yml")]) == 2
    bad = tmp_path / "bad.yml"
    bad.write_text(f"merge_method: ace\nbase_model: {tmp_path}/nope\nmodels:\n  - model: {tmp_path}/nope2\n")
    assert main(["plan", str(bad)]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_plan_covers_the_svd_methods(method, config, capsys, tmp_path, monkeypatch):
    from mergekit_ace.execution import plan_cli

    monkeypatch.setattr(plan_cli, "measure_throughput", lambda device="cpu": (1e10, 1e9))
    cfg = tmp_path / f"{method}.yml"
    cfg.write_text(config.read_text().replace("merge_method: ace", f"merge_method: {method}")
                   .replace("  k_frac: 0.3\n", "  alpha: 1.0\n"))
    assert main(["plan", str(cfg), "--gpu-memory", "24GiB", "--json"]) == 0
    weights = {w["name"]: w for w in json.loads(capsys.readouterr().out)["weights"]}
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert q["rule"] == method and q["strategy"] == "whole_matrix" and q["eigh_flops"] > 0
    assert weights["model.embed_tokens.weight"]["rule"] == "average"
    assert weights["lm_head.weight"]["rule"] == method
    assert main(["plan", str(cfg), "--gpu-memory", "24GiB"]) == 0
    assert "full-SVD route, an upper bound" in capsys.readouterr().out


def test_one_slow_call_does_not_set_the_measured_time():
    """The time estimate's throughput comes from a median of many calls: one stalled call (a page
    fault, another process's burst) must not make it 10x too slow, as a single timed call did."""
    import time

    from mergekit_ace.execution import plan_cli

    calls = []

    def op():
        calls.append(None)
        if len(calls) == 2:  # the call the old single-shot timing measured (after one warm-up)
            time.sleep(0.3)

    median = plan_cli.median_seconds(op, min_run_time=0.05)
    assert len(calls) > 10
    assert median < 0.03  # the stall is 0.3 s; the call itself takes microseconds


def test_measured_throughput_is_positive_and_finite():
    import math

    from mergekit_ace.execution import plan_cli

    mm, eig = plan_cli.measure_throughput("cpu")
    assert math.isfinite(mm) and math.isfinite(eig) and mm > 0 and eig > 0


def test_plan_covers_wudi_and_its_adam_solver(config, capsys, tmp_path, monkeypatch):
    from mergekit_ace.execution import plan_cli
    from mergekit_ace.execution.memory import estimate

    monkeypatch.setattr(plan_cli, "measure_throughput", lambda device="cpu": (1e10, 1e9))
    plans = {}
    for solver in ("closed_form", "adam"):
        cfg = tmp_path / f"wudi-{solver}.yml"
        cfg.write_text(config.read_text().replace("merge_method: ace", "merge_method: wudi")
                       .replace("  k_frac: 0.3\n", f"  solver: {solver}\n  iterations: 100\n"))
        assert main(["plan", str(cfg), "--gpu-memory", "24GiB", "--json"]) == 0
        plans[solver] = {w["name"]: w for w in json.loads(capsys.readouterr().out)["weights"]}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert plans["closed_form"][q]["rule"] == "wudi"
    assert plans["closed_form"][q]["strategy"] in ("row_chunked", "expert_streamed", "output_gram")
    adam = plans["adam"][q]
    assert adam["rule"] == "wudi_adam" and adam["strategy"] == "whole_matrix"
    # the configured iteration count reaches the estimate: 100 x 4 T m^2 n (+ Adam's elementwise work)
    assert adam["matmul_flops"] == estimate("wudi_adam", "whole_matrix", 32, 32, 2, iterations=100).matmul_flops
    assert adam["matmul_flops"] >= 100 * 4 * 2 * 32 ** 3
    for solver in plans:
        assert plans[solver]["model.embed_tokens.weight"]["rule"] == "average"
        assert plans[solver]["lm_head.weight"]["rule"] in ("wudi", "wudi_adam")
    assert main(["plan", str(tmp_path / "wudi-adam.yml"), "--gpu-memory", "24GiB"]) == 0
    assert "solver: adam" in capsys.readouterr().out
