"""Bad input: a clear error naming the tensor (and model), a non-zero exit, inputs untouched."""

import functools

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_ace.rules import (
    MergeInputError,
    ace_merge,
    actmat_merge,
    iso_c_merge,
    iso_cts_merge,
    tsv_m_merge,
    wudi_merge,
)
from tests.mergekit_run import config_for, run_mergekit_yaml
from tests.reference import ace_reference, make_experts, rel_err

RULES = {"ace": ace_merge, "actmat": actmat_merge, "tsv_m": tsv_m_merge, "iso_c": iso_c_merge,
         "iso_cts": iso_cts_merge, "wudi": wudi_merge, "wudi_adam": functools.partial(wudi_merge, solver="adam")}
ALL = list(RULES)


@pytest.mark.parametrize("rule", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_values_are_refused_naming_tensor_and_model(rule, bad, dtype):
    W0, experts = make_experts((12, 8), 3, [1.0, 0.1, 0.5])
    W0, experts = W0.to(dtype), [e.to(dtype) for e in experts]
    experts[1] = experts[1].clone()
    experts[1][3, 4] = bad
    with pytest.raises(MergeInputError, match=r"'layers\.0\.q'.*model m1 .*non-finite"):
        RULES[rule](W0, experts, name="layers.0.q", ids=["m0", "m1", "m2"])
    W0_bad = W0.clone()
    W0_bad[0, 0] = bad
    with pytest.raises(MergeInputError, match="model base"):
        RULES[rule](W0_bad, experts[:1], name="w")


@pytest.mark.parametrize("rule", ALL)
def test_shape_mismatch(rule):
    W0, experts = make_experts((12, 8), 2, [1.0, 0.1])
    with pytest.raises(MergeInputError, match=r"'w'.*shape mismatch.*model e1 has \(12, 7\)"):
        RULES[rule](W0, [experts[0], experts[1][:, :7]], name="w", ids=["e0", "e1"])


@pytest.mark.parametrize("rule", ["ace", "actmat", "wudi", "wudi_adam"])
def test_expert_identical_to_base(rule):
    # (ace/actmat/wudi only: the SVD rules merge a zero task vector as contributing nothing,
    # tests/rules/test_peers.py::test_zero_task_vector_contributes_nothing)
    W0, experts = make_experts((12, 8), 2, [1.0, 0.1])
    with pytest.raises(MergeInputError, match=r"'w'.*expert\(s\) twin .*identical to the base"):
        RULES[rule](W0, [experts[0], W0.clone()], name="w", ids=["e0", "twin"])


@pytest.mark.parametrize("rule", ALL)
def test_no_expert(rule):
    W0, _ = make_experts((12, 8), 1, [1.0])
    with pytest.raises(MergeInputError, match="at least one expert"):
        RULES[rule](W0, [], name="w")


def test_single_expert_is_finite_and_exact():
    W0, experts = make_experts((20, 8), 1, [0.3])
    out, diag = ace_merge(W0, experts, return_diagnostics=True)
    assert not diag.heterogeneous  # gamma undefined for T = 1: homogeneous branch, no NaN
    assert torch.isfinite(out).all()
    assert rel_err(out, ace_reference(W0, experts)[0], W0) < 1e-6
    out = actmat_merge(W0, experts)
    # One expert with a full-rank update: ACTMat returns the expert itself.
    torch.testing.assert_close(out, experts[0].double(), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("rule", ALL)
def test_rank_deficient_covariance_sum_gives_finite_result(rule):
    W0, experts = make_experts((10, 30), 2, [1.0, 0.01], rank=2)
    kwargs = {"epsilon": 0.0} if rule == "ace" else {}
    out = RULES[rule](W0, experts, **kwargs)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("rule", ALL)
def test_inputs_are_never_modified(rule):
    W0, experts = make_experts((16, 10), 3, [1.0, 0.01, 0.3])
    for dtype in (torch.float32, torch.bfloat16):
        b, es = W0.to(dtype), [e.to(dtype) for e in experts]
        copies = [b.clone()] + [e.clone() for e in es]
        RULES[rule](b, es, row_chunk=5)
        for before, after in zip(copies, [b] + es):
            assert torch.equal(before, after)


def test_invalid_parameters_are_refused_naming_them():
    from mergekit.merge_methods import merge_tensors

    import mergekit_ace

    mergekit_ace.register_methods()
    W0, experts = make_experts((6, 4), 2, [1.0, 0.1])
    with pytest.raises(MergeInputError, match=r"'w'.*k_frac=1.5"):
        merge_tensors([W0, *experts], "ace", base_index=0, name="w", parameters={"k_frac": 1.5})
    with pytest.raises(MergeInputError, match="epsilon=-1.0"):
        merge_tensors([W0, *experts], "ace", base_index=0, name="w", parameters={"epsilon": -1.0})
    with pytest.raises(MergeInputError, match="scale=nan"):
        merge_tensors([W0, *experts], "actmat", base_index=0, name="w", parameters={"scale": float("nan")})
    with pytest.raises(MergeInputError, match=r"'w'.*solve='truncate'"):
        merge_tensors([W0, *experts], "wudi", base_index=0, name="w", parameters={"solve": "truncate"})
    with pytest.raises(MergeInputError, match=r"'w'.*solve='pinv'"):
        merge_tensors([W0, *experts], "actmat", base_index=0, name="w", parameters={"solve": "pinv"})
    with pytest.raises(MergeInputError, match=r"'w'.*iterations=-3"):
        merge_tensors([W0, *experts], "wudi", base_index=0, name="w", parameters={"solver": "adam", "iterations": -3})


# ----------------------------------------------------------------------------- through mergekit-yaml
@pytest.mark.parametrize("method", ["ace", "iso_cts", "wudi"])
@pytest.mark.slow
def test_config_without_base_model_fails_before_loading(method, tmp_path, llama_family):
    cfg = config_for(method, llama_family)
    del cfg["base_model"]
    # Point the "models" at directories with no weights at all: if anything were loaded it would
    # fail differently; the planner must refuse first with the base-model message.
    proc, out = run_mergekit_yaml(cfg, tmp_path)
    assert proc.returncode != 0
    assert "needs a base model" in proc.stderr and "base_model" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("method", ["actmat", "wudi"])  # shared glue; every rule: test_non_finite_values_...
@pytest.mark.slow
def test_nan_expert_fails_with_tensor_and_model_named(method, tmp_path, llama_family):
    import shutil

    bad = tmp_path / "bad_expert"
    shutil.copytree(llama_family["expert1"], bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    before = (llama_family["expert1"] / "model.safetensors").read_bytes()
    paths = dict(llama_family, expert1=bad)
    proc, _ = run_mergekit_yaml(config_for(method, paths), tmp_path)
    assert proc.returncode != 0
    assert "model.layers.1.mlp.up_proj.weight" in proc.stderr
    assert str(bad) in proc.stderr and "non-finite" in proc.stderr
    assert (llama_family["expert1"] / "model.safetensors").read_bytes() == before


def test_rule_level_parameter_checks():
    W0, experts = make_experts((6, 4), 2, [1.0, 0.1])
    with pytest.raises(MergeInputError, match="rcond=2.0"):
        actmat_merge(W0, experts, rcond=2.0, name="w")
    with pytest.raises(MergeInputError, match="scale=inf"):
        actmat_merge(W0, experts, scale=float("inf"), name="w")
    with pytest.raises(MergeInputError, match="tau=-0.1"):
        ace_merge(W0, experts, tau=-0.1, name="w")
