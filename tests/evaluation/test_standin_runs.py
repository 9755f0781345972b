"""The real lm-eval pipeline (stock tasks, --data-dir fixtures, stock filters and metrics) with a
stand-in model whose answers are known, so every score is known exactly."""

import json
import time

import pytest

from mergekit_ace.errors import UserError
from mergekit_ace.evaluation import evaluate_models

BACKEND = "mergekit-ace-standin"
FOUR = ["xquad_zh", "gsm8k_cot", "humaneval", "ifeval"]


def run(models, tasks, out, data_dir, **kw):
    kw.setdefault("allow_code_execution", True)
    kw.setdefault("bootstrap_iters", 0)
    return evaluate_models(models, tasks, out, backend=BACKEND, data_dir=data_dir, **kw)


@pytest.mark.slow
def test_humaneval_canonical_passes_wrong_fails_loop_times_out(standins, data_dir, tmp_path):
    models = {m: standins[m] for m in ("oracle", "wrong", "loop")}
    start = time.monotonic()
    out = run(models, ["humaneval"], tmp_path / "out", data_dir, code_timeout=1.0, log_samples=True)
    elapsed = time.monotonic() - start
    assert out["scores"]["oracle"]["humaneval"]["pass@1,create_test"] == 1.0
    assert out["scores"]["wrong"]["humaneval"]["pass@1,create_test"] == 0.0
    assert out["scores"]["loop"]["humaneval"]["pass@1,create_test"] == 0.0
    assert out["lm_eval"]["oracle"]["results"]["humaneval"]["sample_len"] == 3  # all 3 fixture items
    assert elapsed < 90  # three looping programs cost ~1 s each, not a hang
    samples = list((tmp_path / "out/cells/loop/humaneval/lm_eval").glob("samples_humaneval_*.jsonl"))
    rows = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert [r["pass@1"] for r in rows] == [0.0, 0.0, 0.0]
    assert all("while True" in r["filtered_resps"][0][0] for r in rows)


@pytest.mark.slow
def test_four_tasks_scores_normalised_table_and_files(standins, data_dir, tmp_path):
    models = {"base": standins["wrong"], "expert": standins["oracle"], "merge": standins["even"]}
    owners = {t: "expert" for t in FOUR}
    out_dir = tmp_path / "out"
    content = run(models, FOUR, out_dir, data_dir, owners=owners, base="base", limit=3,
                  log_samples=True)
    # each fixture task has 3 items; "even" answers items 0 and 2 right
    for task in FOUR:
        assert content["raw"]["expert"][task] == 1.0
        assert content["raw"]["base"][task] == 0.0
        assert content["raw"]["merge"][task] == pytest.approx(2 / 3)
        assert content["normalised"]["merge"][task] == pytest.approx(200 / 3)
    assert content["averages"]["merge"]["normalised"] == pytest.approx(200 / 3)
    assert content["averages"]["expert"]["normalised"] == pytest.approx(100.0)
    assert content["averages"]["base"]["normalised"] == 0.0
    assert content["roles"] == {"base": "base", "expert": "expert", "merge": "merge"}
    assert content["primary_metrics"] == {
        "xquad_zh": "f1,none",
        "gsm8k_cot": "exact_match,strict-match",
        "humaneval": "pass@1,create_test",
        "ifeval": "prompt_level_strict_acc,none",
    }
    on_disk = json.loads((out_dir / "results.json").read_text())
    assert on_disk["scores"] == content["scores"]
    assert on_disk["scores"]["merge"]["gsm8k_cot"]["exact_match,strict-match"] == pytest.approx(2 / 3)
    assert set(on_disk["lm_eval"]["merge"]["results"]) == set(FOUR)
    report = (out_dir / "report.md").read_text()
    assert "| merge | merge | 66.67 | 66.67 | 66.67 | 66.67 | 66.67 |" in report
    assert (out_dir / "scores_normalised.png").stat().st_size > 1000
    for model in models:
        for task in FOUR:
            (log,) = (out_dir / "cells" / model / task / "lm_eval").glob(f"samples_{task}_*.jsonl")
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            assert sorted({r["doc_id"] for r in rows}) == [0, 1, 2]  # one row per item and filter
    assert not list(tmp_path.glob(".out.tmp-*"))  # the staging directory was renamed


def test_code_tasks_need_permission(standins, data_dir, tmp_path):
    with pytest.raises(UserError, match="humaneval.*--allow-code-execution"):
        run({"m": standins["oracle"]}, ["humaneval"], tmp_path / "out", data_dir,
            allow_code_execution=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_existing_results_are_kept_unless_overwrite(standins, data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run({"m": standins["wrong"]}, ["xquad_zh"], out, data_dir, limit=1)
    first = (out / "results.json").read_text()
    with pytest.raises(UserError, match="already holds results; pass --resume .* or --overwrite"):
        run({"m": standins["oracle"]}, ["xquad_zh"], out, data_dir, limit=1)
    assert (out / "results.json").read_text() == first
    # an --overwrite run interrupted before its first cell leaves the old results as they were
    import lm_eval

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(lm_eval, "simple_evaluate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run({"m": standins["oracle"]}, ["xquad_zh"], out, data_dir, limit=1, overwrite=True)
        with pytest.raises(KeyboardInterrupt):  # a new directory that got nothing is not left
            run({"m": standins["oracle"]}, ["xquad_zh"], tmp_path / "new", data_dir, limit=1)
    assert (out / "results.json").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    new = run({"m": standins["oracle"]}, ["xquad_zh"], out, data_dir, limit=1, overwrite=True)
    assert new["scores"]["m"]["xquad_zh"]["f1,none"] == 1.0
    assert json.loads((out / "results.json").read_text())["scores"]["m"]["xquad_zh"]["f1,none"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(UserError, match="--resume and --overwrite contradict"):
        run({"m": standins["oracle"]}, ["xquad_zh"], out, data_dir, resume=True, overwrite=True)


def test_user_errors(standins, data_dir, tmp_path):
    m = {"m": standins["oracle"]}
    with pytest.raises(UserError, match="unknown task 'gsm8k_cott'.*did you mean.*gsm8k_cot"):
        run(m, ["gsm8k_cott"], tmp_path / "a", data_dir)
    with pytest.raises(UserError, match="task 'xquad_vi' has no owner"):
        run(m, ["xquad_zh", "xquad_vi"], tmp_path / "b", data_dir, owners={"xquad_zh": "m"})
    empty = tmp_path / "empty_data"
    empty.mkdir()
    with pytest.raises(UserError, match=r"google/IFEval/default/train\.jsonl"):
        run(m, ["ifeval"], tmp_path / "c", empty)
    assert not any(p.name.startswith(("a", "b", "c", ".")) for p in tmp_path.iterdir())


LOCAL_TASK = """\
task: local_capitals
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Q: What is the capital of {{{{country}}}}?\\nA:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  version: 1.0
"""


def test_include_path_task_with_local_data(standins, data_dir, tmp_path):
    """A task of the caller's own (lm-eval YAML under include_path, local JSON data) runs, is
    not redirected by --data-dir, and normalises like a stock task."""
    rows = [{"country": "France", "answer": "Paris"}, {"country": "Peru", "answer": "Lima"},
            {"country": "Japan", "answer": "Tokyo"}, {"country": "Chile", "answer": "Santiago"}]
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    (tasks_dir / "local_capitals.yaml").write_text(LOCAL_TASK.format(data=data))
    out = run({"expert": standins["oracle"], "merge": standins["even"]}, ["local_capitals"],
              tmp_path / "out", data_dir, include_path=tasks_dir, owners={"local_capitals": "expert"})
    assert out["primary_metrics"] == {"local_capitals": "exact_match,none"}
    assert out["raw"]["expert"]["local_capitals"] == 1.0
    assert out["raw"]["merge"]["local_capitals"] == 0.5  # items 0 and 2 of 4
    assert out["normalised"]["merge"]["local_capitals"] == 50.0
