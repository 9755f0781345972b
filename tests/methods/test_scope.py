"""``scope`` and ``average_from_dim``: which weights take the rule, the experts' average, the base.

The two paper-scope examples are run through the real ``mergekit-yaml`` on tiny models with their
own parameters (only the model paths swapped), and the output's embeddings and lm_head must be
bit-for-bit what the paper code's scope says.
"""

from pathlib import Path

import pytest
import torch
import yaml

from mergekit_ace.errors import MergeInputError
from mergekit_ace.rules.scope import weight_scope
from tests.mergekit_run import config_for, run_mergekit_yaml
from tests.methods.test_end_to_end import assert_weights_equal, expected_weights, load_weights

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def exact_average(W0, Ws):
    """``W_0 + mean_t (W_t - W_0)`` in float64, cast to W_0's dtype (the order of operations of the
    average in rules/task_vectors.py, so the cast rounds the same float64 value)."""
    acc = torch.zeros(W0.shape, dtype=torch.float64)
    for W in Ws:
        acc += W.double() - W0.double()
    acc *= 1.0 / len(Ws)
    acc += W0.double()
    return acc.to(W0.dtype)


def example_on(path, paths, **overrides):
    """An example config with the tiny models in place of the Hub ids (its parameters untouched)."""
    cfg = yaml.safe_load(path.read_text())
    cfg["base_model"] = str(paths["base"])
    cfg["models"] = [{"model": str(p)} for k, p in paths.items() if k != "base"]
    cfg["dtype"] = "float32"
    cfg.pop("tokenizer", None)
    cfg["parameters"].update(overrides)
    return cfg


# --------------------------------------------------------------------------- the decision
def test_default_scope_is_todays_treatment():
    assert weight_scope("model.layers.0.mlp.down_proj.weight", (3072, 8192)) == "rule"
    assert weight_scope(HEAD, (128256, 3072)) == "rule"
    assert weight_scope(EMBED, (128256, 3072)) == "average"
    assert weight_scope(EMBED, (128256, 3072), merge_embeddings=True) == "rule"
    assert weight_scope("model.norm.weight", (3072,)) == "average"
    # mergekit's vocabulary metadata marks an embedding whatever its name
    assert weight_scope("wte.weight", (100, 8), vocabulary_axis=0) == "average"


def test_explicit_scopes():
    assert weight_scope(EMBED, (128256, 3072), "rule") == "rule"  # overrides merge_embeddings=False
    assert weight_scope("model.norm.weight", (3072,), "rule") == "average"  # rules need a matrix
    for name, shape in [(HEAD, (128256, 3072)), ("model.norm.weight", (3072,))]:
        assert weight_scope(name, shape, "base") == "base"
        assert weight_scope(name, shape, "average", merge_embeddings=True) == "average"


def test_average_from_dim_is_actmat_codes_size_rule():
    # OLMo-3-7B: vocabulary 100278, hidden 4096, MLP 11008; the code's test is max(shape) < 20000.
    assert weight_scope(HEAD, (100278, 4096), average_from_dim=20000) == "average"
    assert weight_scope(EMBED, (100278, 4096), "rule", average_from_dim=20000) == "average"
    assert weight_scope("model.layers.0.mlp.down_proj.weight", (4096, 11008), average_from_dim=20000) == "rule"
    assert weight_scope("x.weight", (19999, 8), average_from_dim=20000) == "rule"
    assert weight_scope("x.weight", (8, 20000), average_from_dim=20000) == "average"
    assert weight_scope(HEAD, (100278, 4096), average_from_dim=0) == "rule"  # 0 = off
    assert weight_scope(HEAD, (100278, 4096), "base", average_from_dim=20000) == "base"


@pytest.mark.parametrize("kwargs, text", [
    (dict(scope="everything"), "scope='everything'"),
    (dict(scope="Rule"), "scope='Rule'"),
    (dict(average_from_dim=-1), "average_from_dim=-1"),
    (dict(average_from_dim=2.5), "average_from_dim=2.5"),
])
def test_invalid_values_name_tensor_and_parameter(kwargs, text):
    with pytest.raises(MergeInputError) as err:
        weight_scope("model.layers.1.mlp.up_proj.weight", (64, 32), **kwargs)
    assert text in str(err.value) and "model.layers.1.mlp.up_proj.weight" in str(err.value)


# --------------------------------------------------------------------------- through mergekit-yaml
@pytest.mark.slow
def test_ace_paper_scope_example_keeps_base_embeddings_and_head(llama_family, tmp_path):
    proc, out = run_mergekit_yaml(example_on(EXAMPLES / "ace-llama-3.2-3b-paper-scope.yml", llama_family), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged, base = load_weights(out), load_weights(llama_family["base"])
    for name in (EMBED, HEAD):
        assert torch.equal(merged[name], base[name]), name
    params = dict(epsilon=1e-5, tau=0.3, k_frac=0.3, scale=1.0)
    expected = expected_weights("ace", llama_family, lambda name: params)
    rest = {k: v for k, v in expected.items() if k not in (EMBED, HEAD)}
    assert_weights_equal_subset(merged, rest)
    # the default merges lm_head by the rule: a different weight
    assert float((merged[HEAD].double() - expected[HEAD]).norm() / expected[HEAD].norm()) > 1e-3


@pytest.mark.slow
def test_actmat_paper_scope_example_averages_embeddings_and_head(olmo_family, tmp_path):
    # The example's threshold is 20000; the tiny vocabulary is 320, the other weights at most 64 wide.
    cfg = example_on(EXAMPLES / "actmat-olmo-3-7b-paper-scope.yml", olmo_family, average_from_dim=320)
    assert yaml.safe_load((EXAMPLES / "actmat-olmo-3-7b-paper-scope.yml").read_text())["parameters"][
        "average_from_dim"] == 20000
    proc, out = run_mergekit_yaml(cfg, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged, base = load_weights(out), load_weights(olmo_family["base"])
    experts = [load_weights(p) for k, p in olmo_family.items() if k != "base"]
    for name in (EMBED, HEAD):
        assert torch.equal(merged[name], exact_average(base[name], [e[name] for e in experts])), name
    expected = expected_weights("actmat", olmo_family, lambda name: {"scale": 1.0, "keep_base": True})
    assert_weights_equal_subset(merged, {k: v for k, v in expected.items() if k not in (EMBED, HEAD)})
    assert float((merged[HEAD].double() - expected[HEAD]).norm() / expected[HEAD].norm()) > 1e-3


@pytest.mark.slow
def test_per_tensor_scope_through_filters(llama_family, tmp_path):
    params = {"alpha": 1.0, "scope": [
        {"filter": "self_attn", "value": "average"},
        {"filter": "mlp.down_proj", "value": "base"},
        {"filter": "embed_tokens", "value": "rule"},
        {"value": "default"},
    ]}
    proc, out = run_mergekit_yaml(config_for("tsv_m", llama_family, params), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged, base = load_weights(out), load_weights(llama_family["base"])
    experts = [load_weights(p) for k, p in llama_family.items() if k != "base"]
    ruled = expected_weights("tsv_m", llama_family, merge_embeddings=True)
    for name in merged:
        if "self_attn" in name:
            assert torch.equal(merged[name], exact_average(base[name], [e[name] for e in experts])), name
        elif "mlp.down_proj" in name:
            assert torch.equal(merged[name], base[name]), name
    assert_weights_equal_subset(merged, {k: v for k, v in ruled.items()
                                         if "self_attn" not in k and "down_proj" not in k})
    assert any("self_attn" in k for k in merged) and any("down_proj" in k for k in merged)


@pytest.mark.slow
def test_default_scope_written_out_changes_nothing(llama_family, tmp_path):
    proc, out = run_mergekit_yaml(config_for("iso_c", llama_family, {"scope": "default", "average_from_dim": 0}),
                                  tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_weights_equal(out, expected_weights("iso_c", llama_family))


@pytest.mark.slow
def test_unknown_scope_fails_naming_tensor_and_parameter(llama_family, tmp_path):
    params = {"scope": [{"filter": "lm_head", "value": "keep"}, {"value": "default"}]}
    proc, out = run_mergekit_yaml(config_for("actmat", llama_family, params), tmp_path)
    assert proc.returncode != 0
    assert "scope='keep'" in proc.stderr and "lm_head.weight" in proc.stderr
    assert "rule, average, base" in proc.stderr
    assert not (out / "model.safetensors").exists()


def test_plan_shows_the_scope(llama_family, tmp_path, capsys):
    import json

    from mergekit_ace.cli import main

    cfg = example_on(EXAMPLES / "ace-llama-3.2-3b-paper-scope.yml", llama_family)
    path = tmp_path / "ace.yml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(path), "--gpu-memory", "24GiB", "--json"]) == 0
    weights = {w["name"]: w["rule"] for w in json.loads(capsys.readouterr().out)["weights"]}
    assert weights[EMBED] == "base" and weights[HEAD] == "base"
    assert weights["model.layers.0.mlp.up_proj.weight"] == "ace"
    assert weights["model.norm.weight"] == "average"


def assert_weights_equal_subset(merged, expected, rtol=2e-5):
    for name, ref in expected.items():
        err = float((merged[name].double() - ref).norm() / ref.norm())
        assert err < rtol, f"{name}: relative error {err:.2e}"
