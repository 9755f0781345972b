"""How far the exact merge moves under the checkpoints' bf16 rounding: truth against the estimate.

Weights shaped like TinyLlama-1.1B's (q 2048x2048, gate 5632x2048, down 2048x5632), or a reduced
version of them (``--scale 4``: 512x512, 1408x512, 512x1408, the same aspect ratios, so the same
T d_out / d_in = 1.09 on down). Base and task vectors from ``mergekit_ace.fixtures.synthetic`` (base
~ N(0, 0.02^2); D_t a rank-64 part with singular values 1/i plus 20 % noise, ||D_t|| / ||W_0||
= 1 / 2.5 / 5 %), generated in float32 and taken as the exact inputs.

For each weight and rule:

    truth    = ||merge64(exact inputs) - merge64(bf16(inputs))||_F / rho_bf16(merge64(bf16 inputs))
    estimate = storage_sensitivity(rule, bf16 inputs, samples=...)   (sees only the bf16 inputs)

rho_bf16(W) is the expected Frobenius norm of W's own bf16 rounding (rules/sensitivity.py); the
direct ||bf16(W) - W|| is printed next to it. Every merge is float64 throughout.

    nice -n 10 python benchmarks/sensitivity.py --scale 4

``--test-cases`` instead runs the cases of tests/rules/test_sensitivity.py (64x64, 96x64, 64x176, T = 3,
truth from the independent references in tests/) over ``--seeds`` seeds and prints, per rule
setting, the range of truth and of estimate / truth: the spread the tests' factor is set from.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mergekit_ace.fixtures.synthetic import DEFAULT_RELATIVE_UPDATES, base_tensor, expert_update  # noqa: E402
from mergekit_ace.rules import ace_merge, actmat_merge, iso_c_merge, tsv_m_merge  # noqa: E402
from mergekit_ace.rules.ace import heterogeneity  # noqa: E402
from mergekit_ace.rules.sensitivity import expected_rounding_error, storage_sensitivity  # noqa: E402

SHAPES = {"q_proj": (2048, 2048), "gate_proj": (5632, 2048), "down_proj": (2048, 5632)}


def rules(d_in: int):
    return [
        ("ace (add)", ace_merge, {}),
        ("ace refinement none", ace_merge, {"refinement": "none"}),
        ("ace epsilon 1e-3", ace_merge, {"epsilon": 1e-3}),
        ("actmat", actmat_merge, {}),
        ("actmat rcond d_in 2^-23", actmat_merge, {"rcond": d_in * 2.0 ** -23}),
        ("tsv_m", tsv_m_merge, {}),
        ("iso_c", iso_c_merge, {}),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=4, help="divide every dimension by this (1: full size)")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", nargs="*", default=list(SHAPES))
    parser.add_argument("--test-cases", action="store_true", help="the unit tests' small cases instead")
    parser.add_argument("--seeds", type=int, default=5, help="seeds for --test-cases")
    args = parser.parse_args(argv)
    if args.test_cases:
        return test_cases(args.seeds, args.samples)
    bf16 = torch.bfloat16
    print("| weight | shape | gamma | rule | truth | estimate | est / truth | rho / direct | estimate s |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for kind in args.weights:
        m, n = (d // args.scale for d in SHAPES[kind])
        name = f"model.layers.0.mlp.{kind}.weight" if kind != "q_proj" else "model.layers.0.self_attn.q_proj.weight"
        W0 = base_tensor(name, (m, n), args.seed).double()
        Ws = [W0 + expert_update(name, W0.float(), r, args.seed, t).double()
              for t, r in enumerate(DEFAULT_RELATIVE_UPDATES)]
        W0b, Wsb = W0.to(bf16), [W.to(bf16) for W in Ws]
        gamma = heterogeneity([float((W - W0b.double()).square().sum()) for W in (x.double() for x in Wsb)])
        for label, rule, params in rules(n):
            exact = rule(W0, Ws, **params)
            stored = rule(W0b.double(), [W.double() for W in Wsb], **params)
            rho = expected_rounding_error(stored, bf16)
            direct = float((stored.to(bf16).double() - stored).norm())
            truth = float((exact - stored).norm()) / rho
            start = time.perf_counter()
            est = storage_sensitivity(rule, W0b, Wsb, samples=args.samples, seed=args.seed, merged=stored, **params)
            seconds = time.perf_counter() - start
            print(f"| {kind} | {m}x{n} | {gamma:.2f} | {label} | {truth:.1f} | {est.value:.1f} | "
                  f"{est.value / truth:.2f} | {rho / direct:.3f} | {seconds:.1f} |", flush=True)
            del exact, stored
    return 0


def test_cases(seeds: int, samples: int) -> int:
    from tests.rules.test_sensitivity import RULES, estimate, fine_tune_like, truth

    print("| rule setting | truth min - max | estimate / truth min - max | cases |")
    print("|---|---:|---:|---:|")
    for rule in RULES:
        fn, reference, params = RULES[rule]
        truths, ratios = [], []
        for shape in ((64, 64), (96, 64), (64, 176)):
            for seed in range(seeds):
                W0, Ws = fine_tune_like(shape, seed=seed)
                t = truth(reference, W0, Ws, **params)
                truths.append(t)
                ratios.append(estimate(fn, W0, Ws, seed=seed, samples=samples, **params).value / t)
        print(f"| {rule} | {min(truths):.2f} - {max(truths):.2f} | {min(ratios):.2f} - {max(ratios):.2f} | "
              f"{len(ratios)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
