"""``mergekit-ace sweep``: grid parsing and application, the checks made before any merge, and the
whole sweep end to end on the demo's ``small`` models (merge with mergekit-yaml, score with lm-eval,
table, chart, best.yml that mergekit-yaml merges, a rerun that redoes nothing)."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from mergekit_ace.errors import UserError
from mergekit_ace.sweep import runner as sweep
from mergekit_ace.sweep.grid import apply_point, check_grid, grid_points, method_spec, parse_grid
from tests.mergekit_run import BIN


# --------------------------------------------------------------------------- grid
def test_grid_values_are_yaml_scalars():
    assert parse_grid(["epsilon=1e-5,1e-3,4.0e-2", "k_frac=0,1", "merge_embeddings=true,false",
                             "refinement=add,none"]) == {
        "epsilon": [1e-5, 1e-3, 4e-2],
        "k_frac": [0, 1],
        "merge_embeddings": [True, False],
        "refinement": ["add", "none"],
    }
    assert isinstance(parse_grid(["tau=1e9"])["tau"][0], float)
    assert parse_grid(["mode=off,on,no,null2"]) == {"mode": ["off", "on", "no", "null2"]}  # YAML 1.2
    assert yaml.safe_load(yaml.safe_dump({"mode": "off", "eps": 1e-5})) == {"mode": "off", "eps": 1e-5}
    assert grid_points({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
    for bad, message in [("epsilon", "NAME=VALUE"), ("epsilon=", "NAME=VALUE"),
                         ("epsilon={a: 1}", "number, string or boolean"), ("epsilon=[1", "not a YAML scalar"),
                         ("epsilon=1e-5,1.0e-5", "given twice"), ("epsilon=.inf", "not finite")]:
        with pytest.raises(UserError, match=message.replace("[", r"\[")):
            parse_grid([bad])
    with pytest.raises(UserError, match="given twice"):
        parse_grid(["tau=0.3", "tau=0.5"])


def test_grid_keys_and_values_are_checked_against_the_method():
    spec = method_spec("ace")
    check_grid({"epsilon": [1e-5], "tau": [0.3, 1e9], "k_frac": [0.0]}, spec)
    with pytest.raises(UserError, match=r"'epsilonn' is not a parameter of merge method 'ace'.*epsilon"):
        check_grid({"epsilonn": [1e-5]}, spec)
    with pytest.raises(UserError, match=r"epsilon=abc: not a valid value"):
        check_grid({"epsilon": ["abc"]}, spec)
    check_grid({"density": [0.5], "weight": [0.3]}, method_spec("ties"))  # mergekit's own
    wudi = method_spec("wudi")
    check_grid({"scale": [0.5, 1.0], "solver": ["closed_form", "adam"], "solve": ["exact", "truncated"],
                      "iterations": [300, 400]}, wudi)
    with pytest.raises(UserError, match=r"'k_frac' is not a parameter of merge method 'wudi'.*iterations, lr"):
        check_grid({"k_frac": [0.3]}, wudi)
    check_grid({"solve": ["truncated"]}, method_spec("actmat"))
    with pytest.raises(UserError, match="unknown merge_method 'nope'"):
        method_spec("nope")


def test_grid_values_replace_global_and_per_model_settings():
    config = {
        "merge_method": "ace",
        "base_model": "/m/base",
        "models": [{"model": "/m/a", "parameters": {"epsilon": 0.5, "scale": 2.0}},
                   {"model": "/m/b", "parameters": {"epsilon": 0.1}}],
        "parameters": {"epsilon": [{"filter": "mlp", "value": 1e-4}, {"value": 1e-5}], "tau": 0.3},
    }
    applied, removed = apply_point(config, {"epsilon": 1e-2})
    assert applied["parameters"] == {"epsilon": 1e-2, "tau": 0.3}
    assert applied["models"] == [{"model": "/m/a", "parameters": {"scale": 2.0}}, {"model": "/m/b"}]
    assert removed == ["models[0].parameters.epsilon", "models[1].parameters.epsilon"]
    assert config["models"][0]["parameters"]["epsilon"] == 0.5  # the input is not modified
    slices = {"merge_method": "ace", "base_model": "/m/base",
              "slices": [{"sources": [{"model": "/m/a", "layer_range": [0, 2], "parameters": {"tau": 1}}]}]}
    applied, removed = apply_point(slices, {"tau": 0.5})
    assert removed == ["slices[0].sources[0].parameters.tau"] and applied["parameters"] == {"tau": 0.5}


# --------------------------------------------------------------------------- end to end
TASKS = ["ace_demo_arithmetic", "ace_demo_translate"]


@pytest.fixture(scope="module")
def demo_setup(small_demo_cache, tmp_path_factory):
    """The demo's small models, its local tasks and an ACE config over them (one expert sets
    epsilon itself, which the grid overrides)."""
    from mergekit_ace.demo import scoring, train
    from mergekit_ace.demo.skills import build_skills

    config = train.CONFIGS["small"]
    trained = train.ensure_trained(config, small_demo_cache, log=lambda m: None)
    root = tmp_path_factory.mktemp("sweep")
    tasks_dir = scoring.prepare_tasks(train.eval_sets(config, build_skills(config.skill_kwargs())), root)
    merge_config = {
        "merge_method": "ace",
        "base_model": str(trained.base),
        "models": [{"model": str(trained.experts["arithmetic"]), "parameters": {"epsilon": 0.5}},
                   {"model": str(trained.experts["translate"])}],
        "parameters": {"epsilon": 1e-5, "tau": 0.3},
        "dtype": "float32",
    }
    config_file = root / "ace.yml"
    config_file.write_text(yaml.safe_dump(merge_config, sort_keys=False))
    owners = root / "owners.yml"
    owners.write_text(yaml.safe_dump({"ace_demo_arithmetic": "expert-arithmetic",
                                      "ace_demo_translate": str(trained.experts["translate"])}))
    return {"root": root, "config": config_file, "tasks_dir": tasks_dir, "owners": owners}


@pytest.fixture
def counted(monkeypatch):
    """Count mergekit-yaml runs and the scoring of merges (the real functions still run)."""
    from mergekit_ace.evaluation import runner

    calls = {"merge": 0, "score": 0}
    real_merge, real_eval = sweep.merge_with_mergekit_yaml, runner.evaluate_models

    def merge(*args, **kwargs):
        calls["merge"] += 1
        return real_merge(*args, **kwargs)

    def evaluate(models, *args, **kwargs):
        if sweep.MERGE_MODEL_NAME in models:
            calls["score"] += 1
        return real_eval(models, *args, **kwargs)

    monkeypatch.setattr(sweep, "merge_with_mergekit_yaml", merge)
    monkeypatch.setattr(runner, "evaluate_models", evaluate)
    return calls


def _argv(setup, out, *extra):
    return ["sweep", str(setup["config"]), "--grid", "epsilon=1e-5,1e-2", "--tasks", ",".join(TASKS),
            "--include-path", str(setup["tasks_dir"]), "--limit", "6", "--device", "cpu",
            "--batch-size", "8", "--bootstrap-iters", "0",
            "--primary-metric", "ace_demo_arithmetic=exact_match,none",
            "--primary-metric", "ace_demo_translate=exact_match,none", "--output", str(out), *extra]


@pytest.mark.slow
def test_sweep_end_to_end_and_rerun_redoes_nothing(demo_setup, counted, capsys, tmp_path):
    import subprocess

    from mergekit_ace.cli import main

    out = demo_setup["root"] / "out"
    assert main(_argv(demo_setup, out, "--owners", str(demo_setup["owners"]))) == 0
    first = capsys.readouterr()
    assert counted == {"merge": 2, "score": 2}
    assert "replace the per-model settings at models[0].parameters.epsilon" in first.err

    content = json.loads((out / "sweep.json").read_text())
    assert content["metric"] == "normalised" and content["run"]["merged"] == 2
    rows = content["points"]
    assert [r["parameters"] for r in rows] == [{"epsilon": 1e-5}, {"epsilon": 1e-2}]
    assert all(r["status"] == "ok" for r in rows)
    refs = content["references"]
    assert set(refs) == {"base", "expert-arithmetic", "expert-translate"}
    for row in rows:  # normalised to the owner, averaged over the tasks
        for task, owner in [("ace_demo_arithmetic", "expert-arithmetic"),
                            ("ace_demo_translate", "expert-translate")]:
            if refs[owner]["raw"][task]:
                assert row["normalised"][task] == pytest.approx(100 * row["raw"][task] / refs[owner]["raw"][task])
        assert row["metric"] == row["average_normalised"]
    best = max(rows, key=lambda r: r["metric"])
    assert best["best"] and content["best"]["parameters"] == best["parameters"]
    assert sum(r["best"] for r in rows) == 1

    # the table, printed and on disk; the CSV; the chart
    table = (out / "table.md").read_text()
    assert table in first.out
    assert "| epsilon |" in table.splitlines()[4] and "1e-05" in table and "0.01" in table
    assert f"**{best['point']}** (best)" in table
    with open(out / "table.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["epsilon"] for r in csv_rows] == ["1e-05", "0.01"]
    assert [r["best"] for r in csv_rows] == [str(r["best"]) for r in rows]
    assert float(csv_rows[0]["metric"]) == pytest.approx(rows[0]["metric"])
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # best.yml: the original config with the winning value, which mergekit-yaml merges
    best_config = yaml.safe_load((out / "best.yml").read_text())
    original = yaml.safe_load(demo_setup["config"].read_text())
    assert best_config["parameters"] == {"epsilon": best["parameters"]["epsilon"], "tau": 0.3}
    assert "parameters" not in best_config["models"][0]
    assert [m["model"] for m in best_config["models"]] == [m["model"] for m in original["models"]]
    assert not list((out / "points").glob("*/merge"))  # one merge at a time, none left
    proc = subprocess.run([str(BIN / "mergekit-yaml"), str(out / "best.yml"), str(tmp_path / "best")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "best" / "config.json").is_file()

    # the same command again: nothing is merged or scored
    assert main(_argv(demo_setup, out, "--owners", str(demo_setup["owners"]))) == 0
    second = capsys.readouterr()
    assert counted == {"merge": 2, "score": 2}
    assert second.err.count("with the same config and settings; skipped") == 2
    assert "--resume: 6 of 6 cells are already done and are kept" in second.err
    again = json.loads((out / "sweep.json").read_text())
    assert again["run"] == {**again["run"], "merged": 0, "scored": 0, "reused": 2}
    assert again["best"] == content["best"]

    # without owners the same points are reused (the raw mean picks the best); a changed
    # scoring setting recomputes them: here the merges fail at once, which is recorded per point
    assert main(_argv(demo_setup, out)) == 0
    assert counted == {"merge": 2, "score": 2}
    assert json.loads((out / "sweep.json").read_text())["metric"] == "raw"

    # Ctrl-C in the middle of a new point's merge: the partial merge goes, the finished points
    # stay, the tables are rebuilt with the new point "not run", exit code 130
    def interrupted(config_file, out_path, log_file, **kwargs):
        Path(out_path).mkdir()
        (Path(out_path) / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    sweep.merge_with_mergekit_yaml = interrupted  # (monkeypatch restores the real one)
    argv = _argv(demo_setup, out)
    argv[argv.index("epsilon=1e-5,1e-2")] = "epsilon=1e-5,1e-2,1e-3"
    assert main(argv) == 130
    assert "interrupted: the finished points are in" in capsys.readouterr().err
    stopped = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in stopped["points"]] == ["ok", "ok", "not run"]
    assert stopped["best"]["parameters"] in [{"epsilon": 1e-5}, {"epsilon": 1e-2}]
    assert not list((out / "points").glob("*/.merge.tmp-*")) and not list((out / "points").glob("*/merge"))
    assert counted == {"merge": 2, "score": 2}

    def failing(config_file, out_path, log_file, **kwargs):
        counted["merge"] += 1
        raise sweep.MergeFailed("mergekit-yaml exited with 1: no")

    sweep.merge_with_mergekit_yaml = failing
    assert main(_argv(demo_setup, out, "--limit", "5")) == 1
    capsys.readouterr()
    assert counted == {"merge": 4, "score": 2}
    changed = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in changed["points"]] == ["failed", "failed"]
    assert changed["points"][0]["error"]["stage"] == "merge"
    assert changed["best"] is None and not (out / "best.yml").exists()
    assert {r["key"] for r in changed["points"]}.isdisjoint(r["key"] for r in rows)
    assert len(list((out / "points").glob("*/point.json"))) == 4  # the finished points stay
    assert [r["status"] for r in json.loads((out / "sweep.json").read_text())["points"]] == ["failed", "failed"]


@pytest.mark.slow
def test_bad_grid_key_or_task_stops_before_any_merge(demo_setup, counted, tmp_path):
    from mergekit_ace.cli import main

    argv = _argv(demo_setup, tmp_path / "a")
    argv[argv.index("epsilon=1e-5,1e-2")] = "epsilom=1e-5"
    assert main(argv) == 2
    argv = _argv(demo_setup, tmp_path / "b")
    argv[argv.index(",".join(TASKS))] = "ace_demo_arithmetik"
    assert main(argv) == 2
    with pytest.raises(UserError, match="unknown task 'ace_demo_arithmetik'"):
        sweep.run_sweep(demo_setup["config"], ["epsilon=1e-5"], ["ace_demo_arithmetik"], tmp_path / "c",
                        include_path=str(demo_setup["tasks_dir"]))
    with pytest.raises(UserError, match="--metric normalised needs --owners"):
        sweep.run_sweep(demo_setup["config"], ["epsilon=1e-5"], TASKS, tmp_path / "d",
                        include_path=str(demo_setup["tasks_dir"]), metric="normalised")
    assert counted == {"merge": 0, "score": 0}
    assert not any((tmp_path / n).exists() for n in "abcd")
