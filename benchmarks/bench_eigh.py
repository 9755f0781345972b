"""The CPU eigendecomposition behind ACE's refinement: which LAPACK driver is fastest for the top
k+1 eigenpairs (k = 0.3 d) of a d x d Gram matrix, on the Gram ACE actually decomposes.

ACE's step 6 needs the top-k singular pairs of F, from the eigendecomposition of F's smaller Gram
(``rules/ace.py``, ``precision.top_eigenpairs``). On the 7B-shaped whole-model run that Gram is
4096 x 4096 for every weight, and its eigendecomposition was 41% of a 4096 x 4096 weight's time.
This script times, on the same Gram:

* ``evr subset``: SciPy's ``syevr`` for the wanted pairs only (tridiagonalisation, MRRR for the
  k+1 pairs, back-transformation of k+1 vectors);
* ``evd full``: SciPy's ``syevd`` (divide and conquer, every pair), then the top k+1 taken;
* ``torch eigh``: ``torch.linalg.eigh`` (MKL's ``syevd`` in the CPU wheel).

Grams: ``ace`` = the Gram of F that ``ace_merge`` builds for a d x d weight of the synthetic
checkpoints (``mergekit_ace.fixtures.synthetic``: a rank-64 part with singular values ~ 1/i plus a noise
bulk; captured at the call), ``random`` = X^T X for a Gaussian 1.5d x d matrix (a
Marchenko-Pastur spectrum). One call each, in one process, threads as torch has them.

    python benchmarks/bench_eigh.py --sizes 2048 3072 4096
"""

import argparse
import json
import time

import numpy as np
import scipy.linalg
import torch
from threadpoolctl import threadpool_limits

from mergekit_ace.fixtures.synthetic import base_tensor, expert_update
from mergekit_ace.rules import ace as ace_module

NAME = "model.layers.2.self_attn.q_proj.weight"


def ace_gram(d: int, seed: int = 0):
    """The Gram of F and the pair count that ``ace_merge`` decomposes for a d x d synthetic weight
    (three experts, relative updates 1%, 2.5%, 5%), float64 products."""
    base = base_tensor(NAME, (d, d), seed).to(torch.bfloat16)
    experts = [(base.float() + expert_update(NAME, base.float(), r, seed, t)).to(torch.bfloat16)
               for t, r in enumerate((0.01, 0.025, 0.05), 1)]
    captured = {}
    real = ace_module.top_eigenpairs

    def capture(gram, count):
        captured.setdefault("gram", gram.clone())
        captured.setdefault("count", count)
        return real(gram, count)

    ace_module.top_eigenpairs = capture
    try:
        ace_module.ace_merge(base, experts, name=NAME, matmul_dtype=torch.float64)
    finally:
        ace_module.top_eigenpairs = real
    return captured["gram"], captured["count"]


def random_gram(d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(d + d // 2, d, generator=g, dtype=torch.float64)
    return X.T @ X, int(0.3 * d) + 1


def drivers(count: int):
    def evr(G):
        n = G.shape[0]
        return scipy.linalg.eigh(G, subset_by_index=[n - count, n - 1], driver="evr", check_finite=False)

    def evd(G):
        values, vectors = scipy.linalg.eigh(G, driver="evd", check_finite=False)
        return values[-count:], vectors[:, -count:]

    def torch_eigh(G):
        values, vectors = torch.linalg.eigh(torch.from_numpy(G))
        return values[-count:].numpy(), vectors[:, -count:].numpy()

    return {"evr subset": evr, "evd full": evd, "torch eigh": torch_eigh}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 3072, 4096])
    parser.add_argument("--grams", nargs="+", default=["ace", "random"], choices=["ace", "random"])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, SciPy {scipy.__version__}")
    print("| gram | d | dtype | evr subset s | evd full s | torch eigh s | max |dlambda|/lambda_1 (evd vs evr) |")
    print("|---|---|---|---|---|---|---|")
    rows = []
    for d in args.sizes:
        for kind in args.grams:
            gram64, count = ace_gram(d) if kind == "ace" else random_gram(d)
            for dtype in args.dtypes:
                G = gram64.to(getattr(torch, dtype)).numpy()
                times, values = {}, {}
                with threadpool_limits(limits=threads, user_api="blas"):
                    for label, fn in drivers(count).items():
                        t0 = time.perf_counter()
                        values[label] = fn(G)[0]
                        times[label] = time.perf_counter() - t0
                top = float(np.abs(values["evr subset"]).max())
                agree = float(np.abs(values["evd full"] - values["evr subset"]).max()) / top
                row = dict(gram=kind, d=d, dtype=dtype, count=count, seconds=times, value_agreement=agree)
                rows.append(row)
                print(f"| {kind} | {d} | {dtype} | {times['evr subset']:.2f} | {times['evd full']:.2f} | "
                      f"{times['torch eigh']:.2f} | {agree:.1e} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
