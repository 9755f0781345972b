"""The ``output_gram`` strategy against ``expert_streamed`` on one full-size wide weight (down_proj)
of the synthetic checkpoints (``mergekit_ace/fixtures/synthetic.py``: the same tensor, seed and relative
updates 1 / 2.5 / 5 % as ``bench_model.py``), float64 products as a whole-model merge runs them
after its first layers: time and peak extra RSS of each rule call, and the relative difference of
the merged task vectors.

    python benchmarks/output_gram.py                                   # 7B and 3B down_proj, ace and actmat
    python benchmarks/output_gram.py --weights 7b --rules actmat --json r.json

Each call runs once (a down_proj takes 30-100 s here) after a warm-up on a small weight; the
strategies alternate, so that a change of machine speed during the run shows as a spread between
the repeats (``--repeats``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.calibration import machine_speed  # noqa: E402
from mergekit_ace.execution.memory import estimate  # noqa: E402
from mergekit_ace.execution.peakmem import peak_extra_rss  # noqa: E402
from mergekit_ace.fixtures import synthetic  # noqa: E402
from mergekit_ace.rules.ace import ace_merge  # noqa: E402
from mergekit_ace.rules.actmat import actmat_merge  # noqa: E402

WEIGHTS = {  # the down_proj of layer 0 of each bench shape: (tensor name, (d_out, d_in))
    "7b": ("model.layers.0.mlp.down_proj.weight", (4096, 11008)),
    "3b": ("model.layers.0.mlp.down_proj.weight", (3072, 8192)),
}
RULES = {"ace": ace_merge, "actmat": actmat_merge}
STRATEGIES = ("expert_streamed", "output_gram")
GIB = 2 ** 30


def weight(shape, name, seed=0):
    base = synthetic.base_tensor(name, shape, seed).bfloat16()
    experts = [(base.float() + synthetic.expert_update(name, base.float(), r, seed, t)).bfloat16()
               for t, r in enumerate(synthetic.DEFAULT_RELATIVE_UPDATES)]
    return base, experts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", nargs="*", default=list(WEIGHTS), choices=list(WEIGHTS))
    p.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--row-chunk", type=int, default=1024, help="rows per block (the planner's choice: 1024)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    # Warm-up: map the LAPACK/BLAS code paths and the allocator's first pages before any timing.
    small_base, small_experts = weight((256, 704), WEIGHTS["7b"][0])
    for rule in args.rules:
        for strategy in STRATEGIES:
            RULES[rule](small_base, small_experts, strategy=strategy, matmul_dtype=torch.float64)
    records = dict(calibration_before=machine_speed("cpu"), runs=[])
    print(f"machine speed: {json.dumps(records['calibration_before'])}", flush=True)
    for key in args.weights:
        name, shape = WEIGHTS[key]
        base, experts = weight(shape, name)
        for rule in args.rules:
            outs = {}
            for rep in range(args.repeats):
                for strategy in STRATEGIES:
                    t = time.perf_counter()
                    out, peak = peak_extra_rss(lambda: RULES[rule](
                        base, experts, name=name, strategy=strategy, row_chunk=args.row_chunk,
                        matmul_dtype=torch.float64))
                    wall = time.perf_counter() - t
                    est = estimate(rule, strategy, *shape, len(experts), args.row_chunk)
                    outs[strategy] = out
                    rec = dict(weight=key, shape=shape, rule=rule, strategy=strategy, repeat=rep, seconds=wall,
                               peak_extra_gib=peak / GIB, estimate_gib=est.peak_bytes / GIB,
                               estimate_tflop=est.flops / 1e12)
                    records["runs"].append(rec)
                    print(f"{key} {name} {shape} {rule:6s} {strategy:16s} repeat {rep}: {wall:6.1f} s, "
                          f"peak extra {peak / GIB:.2f} GiB (estimate {est.peak_bytes / GIB:.2f}), "
                          f"{est.flops / 1e12:.2f} TFLOP counted", flush=True)
            ref = outs["expert_streamed"].double() - base.double()
            diff = float((outs["output_gram"].double() - outs["expert_streamed"].double()).norm() / ref.norm())
            records["runs"].append(dict(weight=key, rule=rule, relative_difference=diff))
            print(f"{key} {rule}: output_gram vs expert_streamed, relative difference of the merged task "
                  f"vectors {diff:.2e}", flush=True)
            del outs
    records["calibration_after"] = machine_speed("cpu")
    print(f"machine speed after: {json.dumps(records['calibration_after'])}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
