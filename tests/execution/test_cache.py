"""The resume cache (``MERGEKIT_ACE_CACHE_DIR``, mergekit_ace/execution/cache.py): a merge killed with
SIGKILL and rerun with the same ``mergekit-yaml`` command gives the uninterrupted merge bit for bit
and computes only the missing weights; changed inputs or parameters, corrupt entries and an
unwritable directory are handled."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergekit_ace
from mergekit_ace.execution import cache, executor, merge_cli
from mergekit_ace.rules.ace import ace_merge
from mergekit_ace.rules.actmat import actmat_merge
from tests.mergekit_run import BIN, config_for
from tests.rules.test_precision import bf16_experts


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(cache, "_dirs", {})
    monkeypatch.setattr(executor, "_auto_float64_streak", {})
    monkeypatch.delenv(cache.CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv(cache.TEST_DELAY_ENV, raising=False)


def _start(config: dict, workdir: Path, out_name: str, cache_dir=None, delay=None):
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / f"{out_name}.yml"
    cfg.write_text(yaml.safe_dump(config))
    env = dict(os.environ)
    env.pop(cache.CACHE_DIR_ENV, None)
    if cache_dir is not None:
        env[cache.CACHE_DIR_ENV] = str(cache_dir)
    if delay is not None:
        env[cache.TEST_DELAY_ENV] = str(delay)
    out = workdir / out_name
    proc = subprocess.Popen([str(BIN / "mergekit-yaml"), str(cfg), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, out


def _run(*args, **kw):
    proc, out = _start(*args, **kw)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return out, stderr


def _tensors(out: Path) -> dict:
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _assert_bit_for_bit(a: Path, b: Path):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in tb:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def _events(cache_dir, pid):
    return [(r["event"], r["name"], r["entry"]) for r in cache.read_log(cache_dir) if r["pid"] == pid]


@pytest.fixture(scope="module")
def ace_merged(llama_family, tmp_path_factory):
    """A config and its merge without a cache (the reference of both mergekit-yaml tests)."""
    config = config_for("ace", llama_family, parameters={"tau": 0.3})
    reference, _ = _run(config, tmp_path_factory.mktemp("reference"), "reference")
    return config, reference


@pytest.mark.slow
def test_killed_merge_resumes_bit_for_bit_without_recomputing(ace_merged, llama_family, tmp_path):
    config, reference = ace_merged
    rule_weights = {n for n, t in _tensors(reference).items() if t.ndim == 2 and "embed_tokens" not in n}
    assert len(rule_weights) == 15

    cache_dir = tmp_path / "cache"
    proc, out = _start(config, tmp_path, "resumed", cache_dir=cache_dir, delay=0.4)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if sum(e == "computed" for e, *_ in _events(cache_dir, proc.pid)) >= 4:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed part-way, not finished
    logged = {entry for e, _, entry in _events(cache_dir, proc.pid) if e == "computed"}
    stored = {p.name for p in cache_dir.glob("*" + cache.SUFFIX)}
    # every logged weight is stored; the kill may fall between an entry's rename and its log line
    assert logged <= stored and len(stored - logged) <= 1
    assert 4 <= len(stored) < len(rule_weights)

    out, _ = _run(config, tmp_path, "resumed", cache_dir=cache_dir)  # the same command, no test delay
    second = [r for r in cache.read_log(cache_dir) if r["pid"] not in {proc.pid}]
    loaded = {r["entry"] for r in second if r["event"] == "loaded"}
    computed = {r["entry"] for r in second if r["event"] == "computed"}
    assert loaded == stored  # the cached weights were taken, none recomputed
    assert not [r for r in second if r["event"] == "corrupt"]  # a killed write left no partial entry
    assert not computed & stored
    assert {r["name"] for r in second if r["event"] in ("loaded", "computed")} == rule_weights
    assert len(loaded) + len(computed) == len(rule_weights)
    _assert_bit_for_bit(out, reference)

    # the same through `mergekit-ace merge CONFIG OUT --resume` (cache in OUT, removed after success)
    out_cli = tmp_path / "cli"
    shutil.copytree(cache_dir, out_cli / merge_cli.CACHE_SUBDIR)
    proc_cli = subprocess.run([sys.executable, "-m", "mergekit_ace.cli", "merge", str(tmp_path / "resumed.yml"),
                               str(out_cli), "--resume"], capture_output=True, text=True, timeout=600)
    assert proc_cli.returncode == 0, proc_cli.stderr[-3000:]
    assert f"{len(rule_weights)} weights taken from the cache, 0 computed" in proc_cli.stderr
    assert not (out_cli / merge_cli.CACHE_SUBDIR).exists()
    _assert_bit_for_bit(out_cli, reference)

    # a changed parameter: every weight is computed again, nothing taken from the cache
    changed = config_for("ace", llama_family, parameters={"tau": 0.5})
    before = {r["pid"] for r in cache.read_log(cache_dir)}
    _run(changed, tmp_path, "changed", cache_dir=cache_dir)
    third = [r for r in cache.read_log(cache_dir) if r["pid"] not in before]
    assert [r["event"] for r in third] == ["computed"] * len(rule_weights)


@pytest.mark.slow
def test_unwritable_cache_dir_still_merges(ace_merged, tmp_path):
    """A cache path that cannot be created (under a regular file: root ignores permissions) logs one
    warning; the merge is the one without a cache."""
    config, reference = ace_merged
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    out, stderr = _run(config, tmp_path, "uncached", cache_dir=blocker / "cache")
    assert stderr.count("cannot be written") == 1
    _assert_bit_for_bit(out, reference)


# ---- in-process: the key, corrupt entries, write failures, "auto"'s replay ---------------------

def _call(W0, experts, name="w", rule="ace", out_dtype=torch.float32, **params):
    fn = {"ace": ace_merge, "actmat": actmat_merge}[rule]
    return cache.cached_execute_rule(rule, fn, W0, experts, name=name, out_dtype=out_dtype,
                                     compute_dtype=torch.float64, scale=1.0, **params)


def _last_event(cache_dir):
    return cache.read_log(cache_dir)[-1]["event"]


def test_only_an_identical_key_is_loaded(monkeypatch, tmp_path):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    W0, experts = bf16_experts((48, 32))
    first = _call(W0, experts, tau=0.3)
    assert _last_event(tmp_path) == "computed"
    again = _call(W0, experts, tau=0.3, ids=["other", "labels", "only"])
    assert _last_event(tmp_path) == "loaded" and torch.equal(first, again)

    changed_input = [e.clone() for e in experts]
    changed_input[1][3, 5] += 1e-2  # one element of one expert
    swapped = [experts[1], experts[0], experts[2]]
    variants = [  # (rule, name, experts, out_dtype, parameters): one thing changed each time
        ("ace", "w", experts, torch.float32, dict(tau=0.5)),                # a parameter
        ("ace", "w", experts, torch.float32, dict(tau=0.3, k_frac=0.2)),    # one left at its default before
        ("ace", "w", changed_input, torch.float32, dict(tau=0.3)),          # the inputs' content
        ("ace", "w", swapped, torch.float32, dict(tau=0.3)),                # their order
        ("ace", "other.weight", experts, torch.float32, dict(tau=0.3)),     # the tensor
        ("ace", "w", experts, torch.bfloat16, dict(tau=0.3)),               # the output dtype
        ("actmat", "w", experts, torch.float32, {}),                        # the method
    ]
    for rule, name, inputs, out_dtype, parameters in variants:
        _call(W0, inputs, name=name, rule=rule, out_dtype=out_dtype, **parameters)
        assert _last_event(tmp_path) == "computed", (rule, name, out_dtype, parameters)
    monkeypatch.setenv(executor.MATMUL_DTYPE_ENV, "float64")
    _call(W0, experts, tau=0.3)
    assert _last_event(tmp_path) == "computed"
    monkeypatch.delenv(executor.MATMUL_DTYPE_ENV)
    monkeypatch.setattr(mergekit_ace, "__version__", mergekit_ace.__version__ + ".post1")
    _call(W0, experts, tau=0.3)
    assert _last_event(tmp_path) == "computed"


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupt_entry_is_recomputed(monkeypatch, tmp_path, caplog, damage):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    W0, experts = bf16_experts((40, 24), seed=3)
    reference = executor.execute_rule("ace", ace_merge, W0, experts, compute_dtype=torch.float64, scale=1.0).float()
    _call(W0, experts)
    (entry,) = tmp_path.glob("*" + cache.SUFFIX)
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[-7] ^= 0x10  # one bit of the weight
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"\x00" * len(data))
    entry.write_bytes(bytes(data))
    out = _call(W0, experts)
    assert [r["event"] for r in cache.read_log(tmp_path)][-2:] == ["corrupt", "computed"]
    assert "corrupt" in caplog.text
    assert torch.equal(out, reference)
    assert torch.equal(_call(W0, experts), reference) and _last_event(tmp_path) == "loaded"  # replaced


def test_a_failing_write_warns_once_and_leaves_nothing(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.os, "fsync", disk_full)
    outs = []
    for seed in range(3):
        W0, experts = bf16_experts((40, 24), seed=seed)
        outs.append(_call(W0, experts, name=f"w{seed}"))
        ref = executor.execute_rule("ace", ace_merge, W0, experts, compute_dtype=torch.float64, scale=1.0)
        assert torch.equal(outs[-1], ref.float())
    assert caplog.text.count("cannot be written") == 1
    assert list(tmp_path.iterdir()) == []  # no entry, no temporary file, no log


def test_a_dead_process_temporary_file_is_removed(monkeypatch, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"{cache.TMP_PREFIX}{dead.pid}-1-x{cache.SUFFIX}"
    stale.write_bytes(b"half")
    live = tmp_path / f"{cache.TMP_PREFIX}{os.getpid()}-1-y{cache.SUFFIX}"  # this process's: kept
    live.write_bytes(b"half")
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    W0, experts = bf16_experts((40, 24))
    _call(W0, experts)
    assert not stale.exists() and live.exists()


#: bf16 outputs: float32 products can serve their contract (docs/execution.md, "Precision")
AUTO_KIND = dict(out_dtype=torch.bfloat16)


def test_auto_decisions_are_replayed_from_the_cache(monkeypatch, tmp_path):
    """Two weights of one kind that need float64 make "auto" compute the next weight of that kind
    in float64 directly, even one whose float32 attempt would be accepted (bits differ). A rerun
    that loads the first two from the cache must take the same decision for the third. Hard: norms
    100x apart, ACE's heterogeneous branch with its refinement (float64 at once); easy: equal norms,
    the homogeneous branch (float32 accepted); large enough that the float32 and float64 results
    differ in some bf16 bits."""
    shape = (384, 256)
    hard = [bf16_experts(shape, rank=4, std=1e-2, scales=(1.0, 0.01, 0.1), seed=s) for s in (1, 2)]
    easy = bf16_experts(shape, scales=(1.0, 1.05, 0.95), seed=3)
    weights = hard + [easy]

    def merge_all(cache_dir, upto=3):
        if cache_dir is None:
            monkeypatch.delenv(cache.CACHE_DIR_ENV, raising=False)
        else:
            monkeypatch.setenv(cache.CACHE_DIR_ENV, str(cache_dir))
        outs, outcomes = [], []
        for i, (W0, experts) in enumerate(weights[:upto]):
            outs.append(_call(W0, experts, name=f"layers.{i}.w", matmul_dtype="auto", **AUTO_KIND))
            outcomes.append(executor.last_auto_outcome())
        return outs, outcomes

    uninterrupted, outcomes = merge_all(None)
    assert outcomes == ["float64", "float64", "skipped"]
    # the easy weight on its own takes float32, with other bits: the replay below matters
    monkeypatch.setattr(executor, "_auto_float64_streak", {})
    W0, experts = easy
    fresh = _call(W0, experts, name="layers.2.w", matmul_dtype="auto", **AUTO_KIND)
    assert executor.last_auto_outcome() == "float32" and not torch.equal(fresh, uninterrupted[2])

    merge_all(tmp_path, upto=2)  # "killed" after two weights
    monkeypatch.setattr(executor, "_auto_float64_streak", {})  # the rerun is a new process
    resumed, _ = merge_all(tmp_path)
    assert [r["event"] for r in cache.read_log(tmp_path)] == ["computed", "computed", "loaded", "loaded", "computed"]
    assert json.loads(json.dumps(cache.read_log(tmp_path)[-1]))["auto_outcome"] == "skipped"
    for a, b in zip(resumed, uninterrupted):
        assert torch.equal(a, b)
