"""Time per iteration of WUDI's official Adam solver (``rules.wudi.wudi_adam``, float32, analytic
gradient) and of the official autograd loop (``tests.reference.wudi_adam_reference``) on one
weight with three synthetic experts, and the closed form's time on the same inputs for comparison.
The official 300 iterations are extrapolated from ``--iterations`` (labelled as such).

    python benchmarks/wudi_adam_time.py --shape 2048 2048 --iterations 5 --threads 2
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergekit_ace.rules.wudi import ADAM_ITERATIONS, wudi_adam, wudi_merge  # noqa: E402
from tests.reference import wudi_adam_reference  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", nargs=2, type=int, default=[2048, 2048])
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    m, n = args.shape
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    W0 = (torch.randn(m, n, generator=g) * 0.02).to(torch.bfloat16)
    experts = [(W0.float() + torch.randn(m, n, generator=g) * 1e-3 * s).to(torch.bfloat16) for s in (1.0, 0.1, 0.5)]
    W0, experts = W0.to(dev), [e.to(dev) for e in experts]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    wudi_adam(W0, experts, iterations=1)  # warm-up
    rows = []
    for label, fn in (("ours (analytic gradient)", lambda k: wudi_adam(W0, experts, iterations=k)),
                      ("official loop (autograd)", lambda k: wudi_adam_reference(W0, experts, 1e-5, k, torch.float32))):
        sync()
        t = time.perf_counter()
        fn(0)
        sync()
        setup = time.perf_counter() - t
        t = time.perf_counter()
        fn(args.iterations)
        sync()
        total = time.perf_counter() - t
        per = (total - setup) / args.iterations
        rows.append((label, per, setup + ADAM_ITERATIONS * per))
    sync()
    t = time.perf_counter()
    wudi_merge(W0, experts, matmul_dtype="auto")
    sync()
    closed = time.perf_counter() - t
    print(f"shape {m}x{n}, 3 experts, {args.threads} thread(s), {dev}, torch {torch.__version__}")
    for label, per, extrapolated in rows:
        print(f"{label:26s}: {per:8.3f} s/iteration (measured over {args.iterations}); "
              f"{ADAM_ITERATIONS} iterations ~{extrapolated:8.1f} s (extrapolated)")
    print(f"closed form (auto products): {closed:8.3f} s (measured, one call)")


if __name__ == "__main__":
    main()
