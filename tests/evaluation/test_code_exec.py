"""pass@k estimator and sandboxed execution of generated programs (no lm-eval needed)."""

import math
import time

import pytest

from mergekit_ace.evaluation.code_exec import (
    CodeEvalMetric,
    CodeExecutionNotAllowed,
    estimate_pass_at_k,
    run_program,
    use_offline_code_eval,
)


def brute_force_pass_at_k(n, c, k):
    """Probability that a random size-k subset of n samples (c correct) holds a correct one."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_hand_values():
    assert estimate_pass_at_k(10, [3], 1)[0] == pytest.approx(0.3)
    assert estimate_pass_at_k(10, [3], 2)[0] == pytest.approx(1 - 21 / 45)
    assert estimate_pass_at_k(4, [2], 3)[0] == 1.0  # n - c < k: every 3-subset has a pass
    assert list(estimate_pass_at_k([5, 5], [0, 5], 1)) == [0.0, 1.0]


def test_pass_at_k_matches_combinatorial_definition():
    for n in range(1, 12):
        for c in range(0, n + 1):
            for k in range(1, n + 1):
                got = estimate_pass_at_k(n, [c], k)[0]
                assert got == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_rejects_bad_input():
    with pytest.raises(ValueError):
        estimate_pass_at_k(3, [4], 1)
    with pytest.raises(ValueError):
        estimate_pass_at_k(3, [1], 0)


def test_run_program_pass_fail_and_error_output():
    ok = run_program("def f(x):\n    return x * 2\nassert f(3) == 6\n", timeout=10)
    assert ok.passed and ok.status == "passed" and ok.returncode == 0
    bad = run_program("assert 1 + 1 == 3, 'arithmetic'\n", timeout=10)
    assert not bad.passed and bad.status == "failed" and bad.returncode != 0
    assert "AssertionError" in bad.output and "arithmetic" in bad.output


def test_looping_program_is_killed_at_the_timeout():
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout=1.0)
    elapsed = time.monotonic() - start
    assert not result.passed and result.status == "timed out"
    assert 1.0 <= elapsed < 6.0


def test_program_has_no_network_and_no_process_control():
    net = run_program(
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n", timeout=10
    )
    assert not net.passed and "network access is disabled" in net.output
    kill = run_program("import os\nos.kill(os.getpid(), 9)\n", timeout=10)
    assert not kill.passed and "PermissionError" in kill.output


def test_program_runs_in_its_own_directory(tmp_path):
    marker = tmp_path / "marker.txt"
    result = run_program(
        f"import os\nopen('scratch.txt', 'w').write('x')\nassert os.getcwd() != {str(tmp_path)!r}\n",
        timeout=10,
    )
    assert result.passed and not marker.exists()


def test_code_eval_metric_pass_at_k_over_samples():
    metric = CodeEvalMetric(allow_code_execution=True, timeout=5)
    good = "def add(a, b):\n    return a + b\n"
    wrong = "def add(a, b):\n    return a - b\n"
    scores, details = metric.compute(
        references=["assert add(2, 3) == 5"],
        predictions=[[good, wrong, wrong, good]],
        k=[1, 2],
    )
    assert scores["pass@1"] == pytest.approx(0.5)
    assert scores["pass@2"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
    assert [r["passed"] for _, r in details[0]] == [True, False, False, True]
    assert metric.programs_run == 4


def test_code_eval_metric_refuses_without_permission():
    metric = CodeEvalMetric(allow_code_execution=False)
    with pytest.raises(CodeExecutionNotAllowed, match="--allow-code-execution"):
        metric.compute(references=["assert True"], predictions=[["pass"]], k=[1])


def test_offline_code_eval_replaces_evaluate_load_only_inside():
    import evaluate

    original = evaluate.load
    metric = CodeEvalMetric(allow_code_execution=True)
    with use_offline_code_eval(metric):
        assert evaluate.load("code_eval") is metric
        assert evaluate.load("evaluate-metric/code_eval") is metric
    assert evaluate.load is original
