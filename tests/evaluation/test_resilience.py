"""Evaluation that never loses work: cells written as they finish, --resume, failures isolated,
interrupts, generation fitted to the model's context, the reproducibility record."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_standin_runs import LOCAL_TASK

from mergekit_ace.cli import main
from mergekit_ace.evaluation import evaluate_models
from mergekit_ace.evaluation.lm_calls import GenerationDoesNotFit, fit_max_gen_toks
from mergekit_ace.evaluation.store import OutputStore, write_json_atomic

HERE = Path(__file__).resolve().parent
BACKEND = "mergekit-ace-standin"


def run(models, tasks, out, data_dir, **kw):
    kw.setdefault("allow_code_execution", True)
    kw.setdefault("bootstrap_iters", 0)
    return evaluate_models(models, tasks, out, backend=BACKEND, data_dir=data_dir, **kw)


def leftovers(root):
    """Temporary files or directories anywhere under ``root``."""
    return [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


# --------------------------------------------------------------------------- failures isolated
@pytest.mark.slow
def test_unreadable_weights_fail_that_model_only(tiny_model, data_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    (bad / "model.safetensors").write_bytes(b"this is not a safetensors file")
    out = tmp_path / "out"
    rc = main(["eval", "--model", f"good={tiny_model}", "--model", f"bad={bad}", "--tasks",
               "xquad_zh,ifeval", "--limit", "1", "--data-dir", str(data_dir), "--device", "cpu",
               "--gen-kwargs", "max_gen_toks=4", "--bootstrap-iters", "0", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    summary = err[err.index("2 of 4 (model, task) cells failed"):].splitlines()[1:]
    assert summary == [
        f"mergekit-ace eval: failed: model 'bad' on task '{task}' at load model: "
        "SafetensorError: Error while deserializing header: header too large"
        for task in ("xquad_zh", "ifeval")]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == {"good": {"xquad_zh": "ok", "ifeval": "ok"},
                                 "bad": {"xquad_zh": "failed", "ifeval": "failed"}}
    assert 0.0 <= results["raw"]["good"]["xquad_zh"] <= 1.0 and results["raw"]["bad"]["ifeval"] is None
    assert {(f["model"], f["task"], f["stage"]) for f in results["failures"]} == {
        ("bad", "xquad_zh", "load model"), ("bad", "ifeval", "load model")}
    assert all(f["type"] and f["message"] for f in results["failures"])
    report = (out / "report.md").read_text()
    assert "| bad | merge | failed | failed |" in report and "## Failed" in report
    assert not leftovers(out)


@pytest.mark.slow
def test_failing_cell_is_recorded_with_its_stage_and_the_rest_go_on(standins, data_dir, tmp_path):
    models = {"ok": standins["oracle"], "bad": standins["crash"]}
    content = run(models, ["xquad_zh", "gsm8k_cot"], tmp_path / "out", data_dir, limit=2,
                  owners={"xquad_zh": "ok", "gsm8k_cot": "ok"})
    assert content["raw"]["ok"] == {"xquad_zh": 1.0, "gsm8k_cot": 1.0}
    assert content["status"]["bad"] == {"xquad_zh": "failed", "gsm8k_cot": "failed"}
    failure = content["failures"][0]
    assert failure == {"model": "bad", "task": "xquad_zh", "stage": "generate_until",
                       "type": "RuntimeError", "message": "stand-in model crashed on purpose"}
    cell = json.loads((tmp_path / "out/cells/bad/xquad_zh/cell.json").read_text())
    assert "crashed on purpose" in cell["error"]["traceback"]
    assert content["normalised"]["bad"] == {"xquad_zh": None, "gsm8k_cot": None}


# --------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_keeps_same_settings_and_recomputes_changed_ones(standins, data_dir, tmp_path, caplog):
    out = tmp_path / "out"
    models = {"a": shutil.copytree(standins["oracle"], tmp_path / "a"),
              "b": shutil.copytree(standins["wrong"], tmp_path / "b")}
    run(models, ["xquad_zh"], out, data_dir, limit=1)
    kept = (out / "cells/a/xquad_zh/cell.json").read_text()
    caplog.set_level(logging.INFO, logger="mergekit_ace.evaluation")
    # the same settings and one more task, but model b's files changed: only a/xquad_zh is kept
    (models["b"] / "weights.bin").write_bytes(b"new weights")
    content = run(models, ["xquad_zh", "gsm8k_cot"], out, data_dir, limit=1, resume=True)
    assert "skipping a on xquad_zh: done" in caplog.text
    assert "recomputing b on xquad_zh: settings changed (model.files_fingerprint" in caplog.text
    assert "scoring a on xquad_zh" not in caplog.text and "scoring a on gsm8k_cot" in caplog.text
    assert (out / "cells/a/xquad_zh/cell.json").read_text() == kept
    assert content["cells"]["a"]["xquad_zh"]["reused"] and not content["cells"]["b"]["xquad_zh"]["reused"]
    assert content["raw"]["a"] == {"xquad_zh": 1.0, "gsm8k_cot": 1.0}
    assert content["raw"]["b"] == {"xquad_zh": 0.0, "gsm8k_cot": 0.0}
    # other settings: recomputed, never mixed in
    caplog.clear()
    content = run({"a": models["a"]}, ["xquad_zh"], out, data_dir, limit=2, resume=True)
    assert "recomputing a on xquad_zh: settings changed (limit: 1 -> 2)" in caplog.text
    assert "skipping" not in caplog.text and not content["cells"]["a"]["xquad_zh"]["reused"]
    assert content["lm_eval"]["a"]["results"]["xquad_zh"]["sample_len"] == 2


def test_resume_refuses_a_directory_that_is_not_eval_output(standins, data_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    from mergekit_ace.errors import UserError

    with pytest.raises(UserError, match="not `mergekit-ace eval` results"):
        run({"m": standins["oracle"]}, ["xquad_zh"], tmp_path, data_dir, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _cli(argv, env):
    """`mergekit-ace eval ARGV` in a new process, with the stand-in model as the backend."""
    code = ("import argparse, sys, standin; from mergekit_ace.evaluation import cli; "
            "parser = argparse.ArgumentParser(); cli.add_arguments(parser); "
            "args = parser.parse_args(sys.argv[1:]); args.backend = standin.BACKEND; "
            "sys.exit(cli.run(args))")
    return subprocess.Popen([sys.executable, "-c", code, *argv], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def _local_tasks(tmp_path, names):
    """lm-eval task YAMLs of the caller's own (one per name) over one local JSON-lines file."""
    rows = [{"country": "France", "answer": "Paris"}, {"country": "Peru", "answer": "Lima"}]
    data = tmp_path / "capitals.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks_dir = tmp_path / "tasks"
    tasks_dir.mkdir()
    for name in names:
        (tasks_dir / f"{name}.yaml").write_text(LOCAL_TASK.format(data=data).replace(
            "task: local_capitals", f"task: {name}"))
    return tasks_dir


@pytest.mark.slow
def test_killed_run_resumes_without_recomputing_finished_cells(standins, tmp_path, subprocess_env,
                                                              monkeypatch, caplog):
    """Killed (SIGKILL) in its second cell, then stopped (SIGTERM) in its third: each time the
    finished cells stay on disk, whole, and the next --resume run does not ask the model again."""
    tasks = ["local_one", "local_two", "local_three"]
    include = _local_tasks(tmp_path, tasks)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    argv = ["--model", f"m={standins['oracle']}", "--tasks", ",".join(tasks), "--include-path",
            str(include), "--bootstrap-iters", "0", "--output", str(out)]
    env = dict(subprocess_env, MERGEKIT_ACE_STANDIN_CALLS=str(calls))
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env["PYTHONPATH"]])

    first = _cli(argv, dict(env, MERGEKIT_ACE_STANDIN_HANG="local_two"))
    _wait_for(out / "cells/m/local_one/cell.json", first)
    while "local_two" not in (calls.read_text() if calls.exists() else ""):
        assert first.poll() is None
        time.sleep(0.2)
    first.kill()  # SIGKILL: no chance to tidy up
    first.communicate()
    assert sorted(p.name for p in (out / "cells/m").iterdir() if not p.name.startswith(".")) == ["local_one"]
    assert json.loads((out / "cells/m/local_one/cell.json").read_text())["status"] == "ok"
    finished = (out / "cells/m/local_one/cell.json").read_text()
    calls.write_text("")

    second = _cli(argv + ["--resume"], dict(env, MERGEKIT_ACE_STANDIN_HANG="local_three"))
    _wait_for(out / "cells/m/local_two/cell.json", second)
    while "local_three" not in calls.read_text():
        assert second.poll() is None
        time.sleep(0.2)
    second.send_signal(signal.SIGTERM)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "skipping m on local_one: done" in err and "scoring m on local_one" not in err
    assert "rerun the same command with --resume" in err
    assert calls.read_text().splitlines() == ["oracle local_two 2", "oracle local_three 2"]
    assert (out / "cells/m/local_one/cell.json").read_text() == finished
    results = json.loads((out / "results.json").read_text())  # rebuilt on the way out
    assert results["status"]["m"] == {"local_one": "ok", "local_two": "ok", "local_three": "not run"}
    assert "Not run (interrupted): m/local_three" in (out / "report.md").read_text()
    assert not leftovers(out)  # the first run's half cell is gone
    calls.write_text("")

    # the same command once more, here: only the last cell is computed
    monkeypatch.setenv("MERGEKIT_ACE_STANDIN_CALLS", str(calls))
    caplog.set_level(logging.INFO, logger="mergekit_ace.evaluation")
    content = evaluate_models({"m": standins["oracle"]}, tasks, out, backend=BACKEND,
                              include_path=include, bootstrap_iters=0, resume=True)
    assert calls.read_text().splitlines() == ["oracle local_three 2"]
    assert "skipping m on local_one" in caplog.text and "skipping m on local_two" in caplog.text
    assert content["raw"]["m"] == {t: 1.0 for t in tasks}
    assert [content["cells"]["m"][t]["reused"] for t in tasks] == [True, True, False]
    (served,) = content["record"]["data_files"]["local_one"]
    assert served["files"][0]["path"] == str(tmp_path / "capitals.jsonl")


# --------------------------------------------------------------------------- atomic files
def test_results_files_are_never_half_written(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    write_json_atomic(target, {"good": 1})

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError, match="No space left"):
            write_json_atomic(target, {"new": "x" * 100000})
    assert json.loads(target.read_text()) == {"good": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]

    # a cell is replaced whole: the old one stays until the new one is complete
    store = OutputStore(tmp_path / "out", resume=False, overwrite=False)
    store.open()
    store.commit_cell(store.begin_cell("m", "t"), {"model": "m", "task": "t", "status": "ok", "v": 1})
    staging = store.begin_cell("m", "t")
    (staging / "partial.txt").write_text("half")
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError):
            store.commit_cell(staging, {"model": "m", "task": "t", "status": "ok", "v": 2})
    assert store.read_cell("m", "t")["v"] == 1
    assert not (tmp_path / "out/cells/m/t/partial.txt").exists()
    OutputStore(tmp_path / "out", resume=True, overwrite=False).open()  # a later run tidies up
    assert not leftovers(tmp_path / "out")


# --------------------------------------------------------------------------- generation fitted
def test_fit_max_gen_toks():
    assert fit_max_gen_toks(256, 2048, 300) == 256  # fits: unchanged
    assert fit_max_gen_toks(1024, 512, 163) == 349  # the prompt keeps its 163 tokens
    assert fit_max_gen_toks(1024, 512, 2000) == 256  # a long prompt keeps half the context
    assert fit_max_gen_toks(256, 512, 2000) == 256  # as lm-eval would run it (prompt cut)
    assert fit_max_gen_toks(1024, 512, None) == 256
    assert fit_max_gen_toks(64, 2, 10) == 1
    with pytest.raises(GenerationDoesNotFit, match="context length .1 tokens. leaves no room"):
        fit_max_gen_toks(64, 1, 10)


@pytest.fixture(scope="module")
def tiny_model_512(tmp_path_factory):
    """A tiny random Llama whose context is 512 tokens."""
    from mergekit_ace.fixtures import toymodels

    config = toymodels.tiny_config("llama", max_position_embeddings=512)
    return toymodels.save_pretrained(toymodels.make_model(config, seed=0), toymodels.train_tokenizer(),
                                     tmp_path_factory.mktemp("tiny512") / "model")


@pytest.mark.slow
def test_512_context_model_scores_humaneval_and_ifeval_with_the_cap(tiny_model_512, data_dir,
                                                                    tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["eval", "--model", f"tiny={tiny_model_512}", "--tasks", "humaneval,ifeval",
               "--limit", "1", "--data-dir", str(data_dir), "--allow-code-execution",
               "--device", "cpu", "--bootstrap-iters", "0", "--log-samples", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 0, err[-3000:]
    # humaneval asks for 1024 new tokens, ifeval for 1280: both capped, with a warning each
    assert ("task 'humaneval', model 'tiny': max_gen_toks 1024 does not fit the model's context "
            "length 512") in err
    assert "task 'ifeval', model 'tiny': max_gen_toks 1280 does not fit" in err
    assert "must be less than model's maximum sequence length" not in err
    results = json.loads((out / "results.json").read_text())
    assert results["status"]["tiny"] == {"humaneval": "ok", "ifeval": "ok"}
    assert "- task 'humaneval', model 'tiny': max_gen_toks 1024" in (out / "report.md").read_text()
    for task, requested in (("humaneval", 1024), ("ifeval", 1280)):
        (used,) = results["record"]["generation"][task]["tiny"]
        assert used["requested_max_gen_toks"] == requested and used["context_length"] == 512
        assert used["max_gen_toks"] + used["longest_prompt"] == 512  # the prompt is not cut
        assert results["cells"]["tiny"][task]["warnings"]
        (samples,) = (out / "cells/tiny" / task / "lm_eval").glob(f"samples_{task}_*.jsonl")
        sample = json.loads(samples.read_text().splitlines()[0])
        assert sample["arguments"]["gen_args_0"]["arg_1"]["max_gen_toks"] == used["max_gen_toks"]
    # the record: versions, the model's identity, seed, data files with their hashes
    record = results["record"]
    assert set(record["versions"]) >= {"lm_eval", "mergekit", "torch", "transformers", "mergekit-ace"}
    assert all(record["versions"][k] for k in ("lm_eval", "mergekit", "torch", "transformers"))
    assert len(record["models"]["tiny"]["config_sha256"]) == 64 and record["seed"] == 0
    (served,) = record["data_files"]["ifeval"]
    assert served["files"][0]["path"].endswith("google/IFEval/default/train.jsonl")
    assert len(served["files"][0]["sha256"]) == 64
