"""Sensitivity of the exact merge to the checkpoints' storage rounding (rules/sensitivity.py).

The truth: float64 experts, fine-tune-like (base ~ N(0, 1/d_in), task vectors a rank-16 part with
singular values 1/i plus 20 % noise, 1 / 2.5 / 5 % of ||W_0||), rounded to bf16 (the
"checkpoints"); truth = ||merge64(unrounded) - merge64(rounded)|| / rho_bf16(merge64(rounded)), each
merge computed by the independent float64 references of tests/reference*.py. The estimator gets
only the rounded inputs."""

import functools
import math

import pytest
import torch

import mergekit_ace.rules.sensitivity as sensitivity
from mergekit_ace.rules import ace_merge, actmat_merge, iso_c_merge, tsv_m_merge
from mergekit_ace.rules.sensitivity import (
    expected_rounding_error,
    half_ulp,
    perturbed_copy,
    rounding_perturbation,
    storage_sensitivity,
    unit_roundoff,
)
from tests.reference import ace_reference, actmat_reference
from tests.reference_peers import iso_c_reference, tsv_m_reference

BF16 = torch.bfloat16
#: Largest factor between estimate and truth accepted. Observed with samples=2 over these shapes,
#: 5 seeds and the 8 rule settings below: 0.77-1.19 (``python benchmarks/sensitivity.py
#: --test-cases``, docs/methods.md); a whole ulp instead of half (2x) or the cruder
#: u ||W|| / sqrt(3) unit (1.36x) would fail.
FACTOR = 1.5


def fine_tune_like(shape, T=3, relative=(0.01, 0.025, 0.05), rank=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    experts = []
    for t in range(T):
        r = min(rank, m, n)
        left = torch.randn(m, r, generator=g, dtype=torch.float64) / torch.arange(1, r + 1)
        low = left @ torch.randn(r, n, generator=g, dtype=torch.float64)
        noise = torch.randn(m, n, generator=g, dtype=torch.float64)
        d = low / low.norm() * math.sqrt(0.8) + noise / noise.norm() * math.sqrt(0.2)
        experts.append(W0 + d / d.norm() * relative[t % len(relative)] * W0.norm())
    return W0, experts


def _ace_ref(W0, Ws, **p):
    return ace_reference(W0, Ws, **p)[0]


RULES = {
    "ace_add": (ace_merge, _ace_ref, dict(tau=0.0)),  # heterogeneous branch: the refinement runs
    "ace_none": (ace_merge, _ace_ref, dict(tau=0.0, refinement="none")),
    "ace_homogeneous": (ace_merge, _ace_ref, dict()),
    "ace_eps1": (ace_merge, _ace_ref, dict(epsilon=1.0)),
    # the exact solve (the default truncation caps what these tests measure)
    "actmat": (functools.partial(actmat_merge, solve="exact"), actmat_reference, dict()),
    "actmat_rcond1e-4": (functools.partial(actmat_merge, solve="exact"),
                         lambda W0, Ws, rcond: _actmat_ref_rcond(W0, Ws, rcond), dict(rcond=1e-4)),
    "tsv_m": (tsv_m_merge, tsv_m_reference, dict()),
    "iso_c": (iso_c_merge, iso_c_reference, dict()),
}


def _actmat_ref_rcond(W0, Ws, rcond):
    D = [W - W0 for W in Ws]
    C = [d.T @ d for d in D]
    return W0 + sum(d @ c for d, c in zip(D, C)) @ torch.linalg.pinv(sum(C), rtol=rcond, hermitian=True)


def truth(reference, W0, Ws, dtype=BF16, out_dtype=BF16, **params):
    exact = torch.as_tensor(reference(W0, Ws, **params)).double()  # the peers' references are numpy
    rounded = [W0.to(dtype).double(), [W.to(dtype).double() for W in Ws]]
    stored = torch.as_tensor(reference(*rounded, **params)).double()
    return float((exact - stored).norm()) / expected_rounding_error(stored, out_dtype)


def estimate(rule, W0, Ws, dtype=BF16, seed=0, **params):
    return storage_sensitivity(rule, W0.to(dtype), [W.to(dtype) for W in Ws], seed=seed, **params)


# ----------------------------------------------------------------------------- the rounding model
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_half_ulp_is_the_largest_rounding_error(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20000, generator=g, dtype=torch.float64)
    x *= torch.exp(torch.randn(20000, generator=g, dtype=torch.float64))  # magnitudes over decades
    x = torch.cat([x, torch.zeros(3, dtype=torch.float64)])
    err = (x.to(dtype).double() - x).abs()
    h = half_ulp(x, dtype)
    # (torch rounds float64 -> bf16 / fp16 through float32: at most 2^-24 |x| more, a double rounding)
    assert bool((err <= h + 2.0 ** -24 * x.abs() * (dtype != torch.float32)).all())
    assert float((err / h.clamp_min(1e-300)).max()) > 0.99  # attained: half an ulp, not a whole one
    assert bool((h[-3:] == 0).all())
    # exact values: 1.0 -> u; 3.0 -> 2u; 0.75 -> u / 2
    u = unit_roundoff(dtype)
    assert half_ulp(torch.tensor([1.0, 3.0, 0.75]), dtype).tolist() == [u, 2 * u, u / 2]


def test_expected_rounding_error_matches_direct_measurement():
    """rho(W) against ||W.to(dtype) - W|| measured directly; u ||W|| / sqrt(3) overstates it ~1.36x."""
    W0, Ws = fine_tune_like((64, 176), seed=3)
    W = actmat_reference(W0, Ws)
    for dtype in (torch.bfloat16, torch.float16):
        direct = float((W.to(dtype).double() - W).norm())
        assert expected_rounding_error(W, dtype) == pytest.approx(direct, rel=0.05)
        naive = unit_roundoff(dtype) * float(W.norm()) / math.sqrt(3)
        assert 1.2 < naive / direct < 1.5


def test_rounding_perturbation_has_the_rounding_statistics():
    x = torch.randn(200, 200, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    E = rounding_perturbation(x, BF16, torch.Generator().manual_seed(0))
    real = x.to(BF16).double() - x
    h = half_ulp(x, BF16)
    assert bool((E.abs() <= h).all())
    assert float(E.norm()) == pytest.approx(float(real.norm()), rel=0.03)
    assert float(E.norm()) == pytest.approx(expected_rounding_error(x, BF16), rel=0.03)
    assert abs(float((E / h).mean())) < 0.01  # zero-mean


def test_perturbed_copy_in_row_blocks(monkeypatch):
    """Blocks of rows give what one whole pass gives; bf16 inputs are held in float32 (the
    perturbation kept to ~2^-16 of its size), float32 inputs in float64."""
    x = torch.randn(50, 40, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    rho = expected_rounding_error(x, BF16)
    monkeypatch.setattr(sensitivity, "BLOCK_ELEMENTS", 120)  # 3 rows per block
    blocked = perturbed_copy(x.to(BF16), BF16, torch.Generator().manual_seed(7))
    assert blocked.dtype == torch.float32
    xb = x.to(BF16).double()
    whole_b = xb + rounding_perturbation(xb, BF16, torch.Generator().manual_seed(7))
    assert float((blocked.double() - whole_b).norm()) < 2.0 ** -15 * float((whole_b - xb).norm())
    assert expected_rounding_error(x, BF16) == pytest.approx(rho, rel=1e-12)
    assert perturbed_copy(x.float(), torch.float32, torch.Generator()).dtype == torch.float64


# ----------------------------------------------------------------------------- estimate vs truth
@pytest.mark.parametrize("shape", [(64, 64), (96, 64), (64, 176)])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_estimate_tracks_the_float64_truth(rule, shape):
    fn, reference, params = RULES[rule]
    for seed in (0, 1):
        W0, Ws = fine_tune_like(shape, seed=seed)
        t = truth(reference, W0, Ws, **params)
        est = estimate(fn, W0, Ws, seed=seed, **params)
        assert est.input_dtypes == ["bfloat16"] * 4 and est.output_dtype == "bfloat16"
        assert 1 / FACTOR < est.value / t < FACTOR, (rule, shape, seed, t, est.value)


def test_estimate_separates_well_and_ill_conditioned_weights():
    """ACTMat with T d_out = 192 vs d_in = 176 (A nearly singular) is >> 10x sensitive, truth and
    estimate alike; ACE with a large epsilon (about the experts' average) is about 1x; ACTMat's
    truncation (rcond) and ACE's refinement: none tame what they are said to tame."""
    W0, Ws = fine_tune_like((64, 176), seed=0)
    values = {}
    for rule in ("actmat", "actmat_rcond1e-4", "ace_eps1", "ace_add", "ace_none"):
        fn, reference, params = RULES[rule]
        values[rule] = (truth(reference, W0, Ws, **params), estimate(fn, W0, Ws, **params).value)
    for k in (0, 1):  # truth, then estimate
        assert values["actmat"][k] > 30
        assert values["ace_eps1"][k] < 1.5
        assert values["actmat_rcond1e-4"][k] < values["actmat"][k] / 2
        assert values["ace_none"][k] < values["ace_add"][k] / 1.3


def test_float32_checkpoints_and_output():
    """Units follow the dtypes: float32 checkpoints merged into a float32 weight."""
    W0, Ws = fine_tune_like((64, 176), seed=1)
    t = truth(actmat_reference, W0, Ws, dtype=torch.float32, out_dtype=torch.float32)
    est = estimate(RULES["actmat"][0], W0, Ws, dtype=torch.float32)
    assert est.output_dtype == "float32"
    assert t > 30 and 1 / FACTOR < est.value / t < FACTOR
    # the same float32 inputs, a bf16 output: the same move in 2^16 larger units
    to_bf16 = storage_sensitivity(RULES["actmat"][0], W0.float(), [W.float() for W in Ws], output_dtype="bfloat16")
    assert to_bf16.value * 2 ** 16 == pytest.approx(est.value, rel=0.05)


# ----------------------------------------------------------------------------- the function's contract
def test_inputs_untouched_merged_reused_and_bad_arguments():
    W0, Ws = fine_tune_like((32, 48), seed=4)
    b, e = W0.to(BF16), [W.to(BF16) for W in Ws]
    copies = [b.clone(), *[x.clone() for x in e]]
    first = storage_sensitivity(ace_merge, b, e, samples=1)
    assert all(torch.equal(x, y) for x, y in zip([b, *e], copies))
    merged = ace_merge(b, e)
    again = storage_sensitivity(ace_merge, b, e, samples=1, merged=merged)
    assert again.value == pytest.approx(first.value, rel=1e-12)
    assert first.changes and len(first.changes) == 1
    with pytest.raises(ValueError, match="samples"):
        storage_sensitivity(ace_merge, b, e, samples=0)
    with pytest.raises(ValueError, match="output_dtype"):
        storage_sensitivity(ace_merge, b, e, output_dtype="int8")
    with pytest.raises(ValueError, match="float64"):
        storage_sensitivity(ace_merge, b, e, matmul_dtype="auto")
