"""`mergekit-ace eval` on a real tiny Hugging Face model (lm-eval's hf backend), the CLI's user
errors, and the multi-GPU argument construction."""

import json
import shutil
import subprocess
import sys

import pytest

from mergekit_ace.cli import main
from mergekit_ace.errors import UserError
from mergekit_ace.evaluation import runner
from mergekit_ace.evaluation.squad_metrics import compute_f1

FOUR = "xquad_zh,gsm8k_cot,humaneval,ifeval"


def read_samples(out, model, task):
    (log,) = (out / "cells" / model / task / "lm_eval").glob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_tiny_hf_model_on_four_stock_tasks(tiny_model, data_dir, tmp_path):
    out = tmp_path / "out"
    rc = main([
        "eval", "--model", f"tiny={tiny_model}", "--tasks", FOUR, "--limit", "2",
        "--data-dir", str(data_dir), "--allow-code-execution", "--device", "cpu",
        "--gen-kwargs", "max_gen_toks=8", "--bootstrap-iters", "0", "--output", str(out),
        "--log-samples",
    ])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    scores = results["scores"]["tiny"]
    assert set(scores) == set(FOUR.split(","))
    for task, metric in results["primary_metrics"].items():
        assert 0.0 <= scores[task][metric] <= 1.0
        assert results["lm_eval"]["tiny"]["results"][task]["sample_len"] == 2
    assert results["config"]["model_args"]["tiny"]["pretrained"] == str(tiny_model)
    # the tiny model's real generations, re-scored by hand, give lm-eval's numbers
    xquad = read_samples(out, "tiny", "xquad_zh")
    assert [s["doc"]["id"] for s in xquad] == ["fx-zh-0", "fx-zh-1"]
    by_hand = sum(compute_f1(s["doc"]["answers"]["text"][0], s["filtered_resps"][0]) for s in xquad) / 2
    assert scores["xquad_zh"]["f1,none"] == pytest.approx(by_hand)
    humaneval = read_samples(out, "tiny", "humaneval")
    assert scores["humaneval"]["pass@1,create_test"] == pytest.approx(
        sum(s["pass@1"] for s in humaneval) / 2)
    assert humaneval[0]["filtered_resps"][0][0].startswith(humaneval[0]["doc"]["prompt"])
    ifeval = read_samples(out, "tiny", "ifeval")
    assert scores["ifeval"]["prompt_level_strict_acc,none"] == pytest.approx(
        sum(s["prompt_level_strict_acc"] for s in ifeval) / 2)
    gsm = [s for s in read_samples(out, "tiny", "gsm8k_cot") if s["filter"] == "strict-match"]
    assert len(gsm) == 2 and "Q: There are 15 trees" in gsm[0]["arguments"]["gen_args_0"]["arg_0"]
    assert "## Raw scores" in (out / "report.md").read_text()
    assert (out / "scores_raw.png").stat().st_size > 1000


def test_cli_user_errors(tiny_model, data_dir, tmp_path, capsys):
    def err(*argv):
        rc = main(["eval", *argv, "--output", str(tmp_path / "out")])
        return rc, capsys.readouterr().err

    rc, msg = err("--model", f"m={tmp_path / 'nope'}", "--tasks", "xquad_zh")
    assert rc == 2 and "model 'm': directory" in msg and "does not exist" in msg
    no_tok = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_model, no_tok)
    for f in no_tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    rc, msg = err("--model", f"m={no_tok}", "--tasks", "xquad_zh")
    assert rc == 2 and "has no tokenizer" in msg and str(no_tok) in msg
    rc, msg = err("--model", f"m={tiny_model}", "--tasks", "xquad_zh,not_a_task")
    assert rc == 2 and "unknown task 'not_a_task'" in msg
    owners = tmp_path / "owners.yaml"
    owners.write_text("xquad_zh: m\n")
    rc, msg = err("--model", f"m={tiny_model}", "--tasks", "xquad_zh,gsm8k_cot", "--owners", str(owners))
    assert rc == 2 and "task 'gsm8k_cot' has no owner" in msg
    rc, msg = err("--model", f"m={tiny_model}", "--tasks", "ifeval", "--data-dir", str(tmp_path))
    assert rc == 2 and "google/IFEval/default/train.jsonl" in msg
    rc, msg = err("--model", f"m={tiny_model}", "--tasks", "humaneval", "--data-dir", str(data_dir))
    assert rc == 2 and "--allow-code-execution" in msg
    assert not (tmp_path / "out").exists()


def test_subprocess_error_has_no_traceback(tmp_path, subprocess_env):
    proc = subprocess.run(
        [sys.executable, "-m", "mergekit_ace.cli", "eval", "--model", f"base={tmp_path / 'missing'}",
         "--tasks", "ace-llama", "--output", str(tmp_path / "out")],
        capture_output=True, text=True, env=subprocess_env, timeout=300,
    )
    assert proc.returncode == 2
    assert "model 'base': directory" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_subprocess_real_run(tiny_model, data_dir, tmp_path, subprocess_env):
    owners = tmp_path / "owners.json"
    owners.write_text(json.dumps({"a": ["xquad_zh"], "b": ["humaneval"]}))
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "mergekit_ace.cli", "eval", "--model", f"a={tiny_model}",
            "--model", f"b={tiny_model}", "--tasks", "xquad_zh,humaneval", "--limit", "1",
            "--data-dir", str(data_dir), "--allow-code-execution", "--owners", str(owners),
            "--gen-kwargs", "max_gen_toks=4", "--bootstrap-iters", "0", "--output", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["roles"] == {"a": "expert", "b": "expert"}
    # the same model twice: identical greedy generations, identical scores
    assert results["scores"]["a"] == results["scores"]["b"]
    assert json.loads(proc.stdout)["scores"]["a"] == results["raw"]["a"]
    # a second run refuses to replace the results
    again = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_vllm_and_hf_model_args():
    args = runner.build_model_args(
        "vllm", "/m/merged", "gpu_memory_utilization=0.8,dtype=bfloat16",
        tensor_parallel_size=2, data_parallel_size=4,
    )
    assert args == {"pretrained": "/m/merged", "tensor_parallel_size": 2, "data_parallel_size": 4,
                    "gpu_memory_utilization": 0.8, "dtype": "bfloat16"}
    assert runner.build_model_args("hf", "/m/x", {"parallelize": True}) == {
        "pretrained": "/m/x", "parallelize": True}
    with pytest.raises(UserError, match="--tensor-parallel-size is for --backend vllm"):
        runner.build_model_args("hf", "/m/x", tensor_parallel_size=2)
    with pytest.raises(UserError, match="tensor_parallel_size given twice"):
        runner.build_model_args("vllm", "/m/x", "tensor_parallel_size=4", tensor_parallel_size=2)
    with pytest.raises(UserError, match="pretrained"):
        runner.build_model_args("hf", "/m/x", "pretrained=/other")


def test_lm_eval_call_for_vllm_and_non_main_rank(tiny_model, data_dir, tmp_path, monkeypatch):
    """What lm-eval receives with --backend vllm (vLLM itself is not needed), and that a non-main
    rank of `accelerate launch` (RANK > 0; simple_evaluate returns None) writes nothing."""
    import lm_eval
    import lm_eval.api.registry
    from lm_eval.api.model import LM

    created, calls = [], []

    class FakeVLLM(LM):
        @classmethod
        def create_from_arg_obj(cls, arg_dict, additional_config=None):
            created.append((arg_dict, additional_config))
            return cls()

        def generate_until(self, requests, disable_tqdm=False):
            raise AssertionError("simple_evaluate is faked; the model is never asked")

        loglikelihood = loglikelihood_rolling = generate_until

    def fake_get_model(name):
        assert name == "vllm"
        return FakeVLLM

    def fake_simple_evaluate(**kwargs):
        calls.append(kwargs)
        return None

    monkeypatch.setattr(lm_eval.api.registry, "get_model", fake_get_model)
    monkeypatch.setattr(lm_eval, "simple_evaluate", fake_simple_evaluate)
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "out"
    rc = main(["eval", "--model", f"m={tiny_model}", "--tasks", "xquad_zh,gsm8k_cot", "--backend",
               "vllm", "--tensor-parallel-size", "2", "--data-parallel-size", "2", "--model-args",
               "gpu_memory_utilization=0.5", "--batch-size", "auto", "--limit", "3",
               "--data-dir", str(data_dir), "--output", str(out)])
    assert rc == 0 and len(created) == 1  # the model is loaded once for all its tasks
    args, extra = created[0]
    assert args == {"pretrained": str(tiny_model), "tensor_parallel_size": 2,
                    "data_parallel_size": 2, "gpu_memory_utilization": 0.5}
    assert extra["batch_size"] == "auto" and extra.get("device") is None
    assert [c["tasks"] for c in calls] == [["xquad_zh"], ["gsm8k_cot"]]  # every rank runs every cell
    call = calls[0]
    assert isinstance(call["model"], FakeVLLM) and call["limit"] == 3 and "device" not in call
    assert call["log_samples"] is False and call["evaluation_tracker"] is None
    assert not out.exists() and list(tmp_path.iterdir()) == []
