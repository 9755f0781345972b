"""ACE's refinement on exactly low-rank (LoRA-like) task vectors: do the memory strategies agree, and
how far is each from the float64 SVD reference with the null singular pairs dropped?

Three experts with rank-8 task vectors whose singular values span three decades (the case of
tests/rules/test_ace_refinement.py), tall 300 x 120 and wide 120 x 300: F has rank <= 3 * 9 = 27
while k = floor(0.3 * 120) = 36, so at least 9 of the top-k pairs are null.

    python benchmarks/lowrank_refinement.py                   # this checkout
    python benchmarks/lowrank_refinement.py --code-root DIR   # the rule from another checkout
                                                              # (e.g. `git archive` of an older commit)

Prints, per shape and refinement variant: the largest relative difference (on the merged task
vector) between any two of {row_chunked, expert_streamed, row_recomputed} x {whole, 7-row blocks}
with float64 products, the largest distance of those to the reference, and the distance and
precision of ``matmul_dtype="auto"``. The reference always comes from this checkout.
"""

import argparse
import inspect
import itertools
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code-root", type=Path, default=HERE, help="checkout whose mergekit_ace to measure")
    parser.add_argument("--norms", type=float, nargs=3, default=[1.0, 0.3, 0.5], help="the experts' update norms")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from tests.reference import ace_reference, rel_err  # this checkout's reference
    from tests.rules.test_ace_refinement import low_rank_experts

    sys.path.insert(0, str(args.code_root.resolve()))
    for mod in [m for m in sys.modules if m == "mergekit_ace" or m.startswith("mergekit_ace.")]:
        del sys.modules[mod]
    from mergekit_ace.rules.ace import ace_merge

    has_refinement = "refinement" in inspect.signature(ace_merge).parameters
    print(f"rule from {Path(sys.modules['mergekit_ace'].__file__).parents[1]}")
    print(f"{'shape':>8s} {'refinement':>10s} {'strategies disagree':>20s} {'max dist to ref':>16s} "
          f"{'auto: dist':>11s} {'auto precision':>28s}")
    for shape in [(300, 120), (120, 300)]:
        W0, experts = low_rank_experts(shape, rank=8, norms=args.norms, seed=args.seed)
        for refinement in (["add", "rescale"] if has_refinement else ["add"]):
            kw = dict(refinement=refinement) if has_refinement else {}
            ref, het = ace_reference(W0, experts, refinement=refinement)
            assert het
            outs = [ace_merge(W0, experts, strategy=s, row_chunk=c, **kw)
                    for s, c in itertools.product(["row_chunked", "expert_streamed", "row_recomputed"], [None, 7])]
            spread = max(rel_err(a, b, W0) for a, b in itertools.combinations(outs, 2))
            dist = max(rel_err(o, ref, W0) for o in outs)
            auto, diag = ace_merge(W0, experts, matmul_dtype="auto", return_diagnostics=True, **kw)
            print(f"{'x'.join(map(str, shape)):>8s} {refinement:>10s} {spread:20.2e} {dist:16.2e} "
                  f"{rel_err(auto, ref, W0):11.2e} {diag.precision:>28s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
