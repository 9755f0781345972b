"""Synthetic full-size checkpoints (mergekit_ace/fixtures/synthetic.py), at narrow widths, and the benchmark's
merge probe on them (the whole-model benchmark's path, small)."""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mergekit_ace.fixtures import synthetic

ROOT = Path(__file__).resolve().parents[1]
NARROW = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16)


def load(model_dir: Path) -> dict:
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(model_dir / f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def test_full_size_shapes_match_the_real_models():
    llama = dict(synthetic.tensor_shapes(synthetic.transformers_config("llama-3.2-3b")))
    assert llama["model.embed_tokens.weight"] == (128256, 3072)
    assert llama["model.layers.27.self_attn.k_proj.weight"] == (1024, 3072)
    assert llama["model.layers.27.mlp.down_proj.weight"] == (3072, 8192)
    assert "lm_head.weight" not in llama and "model.layers.28.mlp.up_proj.weight" not in llama
    olmo = dict(synthetic.tensor_shapes(synthetic.transformers_config("olmo-3-7b")))
    assert olmo["lm_head.weight"] == (100278, 4096)
    assert olmo["model.layers.31.mlp.gate_proj.weight"] == (11008, 4096)
    assert olmo["model.layers.0.self_attn.k_norm.weight"] == (4096,)
    assert olmo["model.layers.0.post_feedforward_layernorm.weight"] == (4096,)
    # 3.21e9 parameters (Llama-3.2-3B, tied), 7.30e9 (OLMo-3 7B): bf16 bytes on disk.
    assert synthetic.checkpoint_bytes("llama-3.2-3b") == 2 * sum(math.prod(s) for s in llama.values())
    assert 3.1e9 < synthetic.checkpoint_bytes("llama-3.2-3b") / 2 < 3.3e9
    assert 7.2e9 < synthetic.checkpoint_bytes("olmo-3-7b") / 2 < 7.4e9
    with pytest.raises(ValueError, match="unknown shape"):
        synthetic.transformers_config("llama-70b")


@pytest.mark.parametrize("family", ["llama-3.2-3b", "olmo-3-7b"])
def test_checkpoints_are_sharded_loadable_and_look_like_fine_tunes(tmp_path, family):
    from transformers import AutoModelForCausalLM

    paths = synthetic.write_checkpoints(tmp_path, family, num_layers=2, config_overrides=NARROW,
                                        shard_bytes=150_000, seed=3)
    assert [p.name for p in paths] == ["base", "expert1", "expert2", "expert3"]
    names = dict(synthetic.tensor_shapes(synthetic.transformers_config(family, 2, **NARROW)))
    base = load(paths[0])
    assert {k: tuple(v.shape) for k, v in base.items()} == names
    assert all(v.dtype == torch.bfloat16 for v in base.values())
    index = json.loads((paths[0] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(names)
    for p in paths:
        assert (p / "tokenizer.json").exists()
        model = AutoModelForCausalLM.from_pretrained(p)
        assert model.config.num_hidden_layers == 2
    experts = [load(p) for p in paths[1:]]
    down = "model.layers.1.mlp.down_proj.weight"
    rel = [float((e[down].float() - base[down].float()).norm() / base[down].float().norm()) for e in experts]
    assert rel == pytest.approx([0.01, 0.025, 0.05], rel=0.05)  # bf16 rounding of W0 + D_t
    # A decaying spectrum: the top singular value well above the noise floor.
    s = torch.linalg.svdvals(experts[0][down].float() - base[down].float())
    assert s[0] > 4 * s[20]
    # Input embeddings change on some rows only (10% of them).
    emb = "model.embed_tokens.weight"
    changed = (experts[1][emb] != base[emb]).any(dim=1).sum()
    assert 0 < changed <= 0.1 * NARROW["vocab_size"]


def test_checkpoints_are_deterministic_and_shallow_ones_are_a_prefix(tmp_path):
    a = synthetic.write_checkpoints(tmp_path / "a", "llama-3.2-3b", num_layers=2, config_overrides=NARROW)
    b = synthetic.write_checkpoints(tmp_path / "b", "llama-3.2-3b", num_layers=1, config_overrides=NARROW)
    for pa, pb in zip(a, b):
        ta, tb = load(pa), load(pb)
        assert set(tb) < set(ta)
        for k in tb:
            assert torch.equal(ta[k], tb[k]), k
    stamp = (tmp_path / "a" / "synthetic.json").stat().st_mtime_ns
    again = synthetic.write_checkpoints(tmp_path / "a", "llama-3.2-3b", num_layers=2, config_overrides=NARROW)
    assert again == a and (tmp_path / "a" / "synthetic.json").stat().st_mtime_ns == stamp  # reused


def benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (the folder is put on sys.path only meanwhile)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_merge_probe_records_a_mergekit_yaml_run(tmp_path):
    merge_config = benchmark_module("bench_model").merge_config
    paths = synthetic.write_checkpoints(tmp_path / "ckpt", "olmo-3-7b", num_layers=1, config_overrides=NARROW)
    cfg = tmp_path / "ace.yml"
    cfg.write_text(merge_config("ace", paths))
    record = tmp_path / "ace.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "merge_probe.py"), str(record), "--",
                           str(cfg), str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(record.read_text())
    assert r["ok"] and r["error"] is None
    # 7 linear weights and the untied lm_head take the rule; embeddings and norms are averaged.
    assert r["rule_calls"] == 8 and {w[0] for w in r["per_weight"]} >= {"lm_head.weight"}
    assert 0 < r["rule_s"] <= r["wall_s"]
    assert r["peak_rss_bytes"] >= r["peak_anon_rss_bytes"] > 0
    assert r["partial"] is False and r["peak_file_rss_bytes"] > 0  # the mapped input shards
    assert r["oom_retries"] == 0 and r["cpu_fallbacks"] == 0
    merged = load(tmp_path / "out")
    assert set(merged) == set(load(paths[0]))


def test_merge_probe_sampler_tracks_peaks_and_checkpoints():
    """The probe's sampler keeps the peaks of anonymous and file-backed RSS and calls its checkpoint
    (the partial record a killed run leaves) at the interval it was given."""
    probe = benchmark_module("merge_probe")
    _Sampler, _status_kib = probe._Sampler, probe._status_kib
    calls = []
    sampler = _Sampler(lambda: calls.append(1), checkpoint_s=0.05)
    sampler.start()
    held = torch.ones(64, 2 ** 20, dtype=torch.uint8)  # 64 MiB touched: anonymous RSS
    sampler.stop.wait(0.6)
    sampler.stop.set()
    sampler.join()
    now = _status_kib("RssAnon", "RssFile")
    assert sampler.peak_anon >= 64 * 1024 and sampler.peak_anon <= now["RssAnon"] + 1024 * 1024
    assert sampler.peak_file > 0  # the interpreter's own mapped libraries at least
    assert 2 <= len(calls) <= 12
    del held


def test_calibration_figures_are_measured_and_steal_is_a_share_of_ticks():
    """benchmarks/calibration.py: the machine-speed figures a benchmark records beside its own (GEMM
    rates, the refinement's eigendecomposition, the hypervisor's steal share)."""
    cal = benchmark_module("calibration")
    speed = cal.machine_speed("cpu", n=96, reps=1)
    assert speed["n"] == 96 and speed["threads"] == torch.get_num_threads()
    for key in ("gemm_float64_gflops", "gemm_float32_gflops", "eigh_float64_s"):
        assert math.isfinite(speed[key]) and speed[key] > 0, key
    assert speed["steal_fraction"] is None or 0.0 <= speed["steal_fraction"] <= 1.0
    before = dict(busy=100, idle=100, steal=0)
    assert cal.steal_between(before, dict(busy=150, idle=130, steal=20)) == pytest.approx(20 / 100)
    assert cal.steal_between(before, before) == 0.0 and cal.steal_between(None, before) is None
    ticks = cal.cpu_times()
    if ticks is not None:  # Linux: counters only grow
        later = cal.cpu_times()
        assert all(later[k] >= ticks[k] for k in ticks)
