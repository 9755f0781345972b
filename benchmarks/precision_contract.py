"""The precision contract on fine-tune-like bf16 experts (issue: "every merge as good as its bf16
inputs allow"): for each method and weight shape, the error of the default ("auto" products, bf16
output) and of unchecked float32 products against the exact float64 rule result, in units of that
result's bf16 storage rounding ||bf16(W) - W||, the precision "auto" chose, and the time of
"auto" against float64 products only.

Experts from ``mergekit_ace.fixtures.synthetic.layer_experts`` (as the issue describes them): W_0 ~ N(0, 0.02^2),
each task vector a rank-64 part with singular values 1/i (80 % of its energy) plus isotropic noise,
||D_t|| / ||W_0|| = 1 / 2.5 / 5 %, all stored in bf16. Shapes: TinyLlama-1.1B's q (2048 x 2048), gate (5632 x
2048), down (2048 x 5632); ``--scale 0.5`` halves every side.

    python benchmarks/precision_contract.py [--scale 0.5] [--methods ace ace-none actmat] [--json out.json]

"stored" = ||bf16(result) - W|| / ||bf16(W) - W|| (the contract: <= 1.05); "computed" =
||result - W|| / ||bf16(W) - W|| (the contract: <= 0.3); W, the exact result, has float64
products and ACE's refinement pairs from a full SVD. Times: "auto" against float64 products only
(``MERGEKIT_ACE_MATMUL_DTYPE=float64``), both for a bf16 output; one thread, median of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mergekit_ace.fixtures.synthetic import layer_experts
from mergekit_ace.rules import iso_c_merge, iso_cts_merge, tsv_m_merge
from mergekit_ace.rules.ace import ace_merge
from mergekit_ace.rules.actmat import actmat_merge

SHAPES = {"q": (2048, 2048), "gate": (5632, 2048), "down": (2048, 5632)}
METHODS = {
    "ace": (ace_merge, {}),
    "ace-none": (ace_merge, {"refinement": "none"}),
    "actmat": (actmat_merge, {}),
    "actmat-truncated": (actmat_merge, {"solve": "truncated"}),
    "tsv_m": (tsv_m_merge, {}),
    "iso_c": (iso_c_merge, {}),
    "iso_cts": (iso_cts_merge, {}),
}


def timed(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--low-rank-energy", type=float, default=None,
                        help="the low-rank part's share of each update's energy (default: synthetic's 0.8; "
                             "0.96 = noise of 20 %% of the norm)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print("| method | weight | shape | auto chose | stored (auto) | computed (auto) | computed (float32 unchecked) "
          "| time auto / float64 |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for shape_name in args.shapes:
        shape = tuple(max(8, int(round(s * args.scale))) for s in SHAPES[shape_name])
        extra = {} if args.low_rank_energy is None else dict(low_rank_energy=args.low_rank_energy)
        W0, experts = layer_experts(shape, name=f"model.layers.0.{shape_name}.weight", **extra)
        for method in args.methods:
            merge, params = METHODS[method]
            bf16 = dict(output_dtype=torch.bfloat16, **params)
            # the exact rule result: float64 products, and the refinement's pairs by SVD (float64 output)
            exact = merge(W0, experts, matmul_dtype=torch.float64, **params)
            _, t64 = timed(lambda: merge(W0, experts, matmul_dtype=torch.float64, **bf16), args.repeats)
            (auto, diag), tauto = timed(lambda: merge(W0, experts, matmul_dtype="auto", return_diagnostics=True,
                                                      **bf16), args.repeats)
            f32 = merge(W0, experts, matmul_dtype=torch.float32, **bf16)
            rounding = float((exact.to(torch.bfloat16).double() - exact).norm())
            row = dict(method=method, weight=shape_name, shape=list(shape), precision=diag.precision,
                       stored_auto=float((auto.to(torch.bfloat16).double() - exact).norm()) / rounding,
                       computed_auto=float((auto - exact).norm()) / rounding,
                       computed_float32=float((f32 - exact).norm()) / rounding,
                       seconds_float64=t64, seconds_auto=tauto, time_ratio=tauto / t64)
            rows.append(row)
            print(f"| {method} | {shape_name} | {shape[0]}x{shape[1]} | {row['precision']} | "
                  f"{row['stored_auto']:.3f} | "
                  f"{row['computed_auto']:.3f} | {row['computed_float32']:.2f} | {row['time_ratio']:.2f} "
                  f"({tauto:.1f} / {t64:.1f} s) |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(scale=args.scale, threads=args.threads, repeats=args.repeats,
                           low_rank_energy=args.low_rank_energy, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
