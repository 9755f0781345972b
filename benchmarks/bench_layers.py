"""Per-layer time and peak memory of the package's rules (as mergekit calls them: the executor's
plan, "auto" precision) versus the naive float32 formulation (benchmarks/naive.py), on
1B/3B/7B-shaped layers with three synthetic experts; the largest relative difference of the two
results on the merged task vector; and the precision "auto" chose (ace, actmat, wudi) or the routes the
SVD rules took (tsv_m, iso_c, iso_cts: "gram 5/5" = five decompositions, all by the Gram route).

Each measurement runs in fresh subprocesses: the time in one with the default allocator (the
median of up to three calls, as many as fit in ~10 s), the peak memory in another (peak RSS of
the call minus RSS before it, /proc clear_refs + VmHWM, glibc mmap threshold fixed at 64 KiB so
freed buffers leave RSS), both after a warm-up that maps the LAPACK code pages. Inputs (bf16 base
+ experts) are not counted.

    python benchmarks/bench_layers.py --quick            # 1B-shaped layers (~20 min here)
    python benchmarks/bench_layers.py --layers 3b.k_proj 7b.q_proj
    python benchmarks/bench_layers.py --layers 1b.k_proj 1b.q_proj --rules tsv_m iso_c iso_cts
    python benchmarks/bench_layers.py --gpu              # 7B-shaped three-expert merge on a GPU
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (d_out, d_in)   TinyLlama-1.1B, Llama-3.2-3B, Llama-2-7B / OLMo-3-7B
LAYERS = {
    "1b.q_proj": (2048, 2048), "1b.k_proj": (256, 2048), "1b.gate_proj": (5632, 2048),
    "1b.down_proj": (2048, 5632), "1b.lm_head": (32000, 2048),
    "3b.q_proj": (3072, 3072), "3b.k_proj": (1024, 3072), "3b.gate_proj": (8192, 3072),
    "3b.down_proj": (3072, 8192), "3b.lm_head": (128256, 3072),
    "7b.q_proj": (4096, 4096), "7b.gate_proj": (11008, 4096), "7b.down_proj": (4096, 11008),
    "7b.lm_head": (32000, 4096), "olmo7b.lm_head": (100278, 4096),
}
QUICK = ["1b.k_proj", "1b.q_proj", "1b.down_proj", "1b.lm_head"]
ALL_RULES = ["ace", "actmat", "tsv_m", "iso_c", "iso_cts", "wudi"]

WORKER = r"""
import json, sys, time, torch
args = json.loads(sys.argv[1])
torch.set_num_threads(args["threads"])
sys.path.insert(0, args["root"])
from mergekit_ace.execution.peakmem import peak_extra_rss
from mergekit_ace.execution.executor import execute_rule
from mergekit_ace.rules import ace_merge, actmat_merge, iso_c_merge, iso_cts_merge, tsv_m_merge, wudi_merge
from benchmarks import naive
RULES = {"ace": (ace_merge, naive.ace_naive), "actmat": (actmat_merge, naive.actmat_naive),
         "tsv_m": (tsv_m_merge, naive.tsv_m_naive), "iso_c": (iso_c_merge, naive.iso_c_naive),
         "iso_cts": (iso_cts_merge, naive.iso_cts_naive), "wudi": (wudi_merge, naive.wudi_naive)}

def inputs(m, n, seed=0, kind="random"):
    g = torch.Generator().manual_seed(seed)
    W0 = (torch.randn(m, n, generator=g) * 0.02).to(torch.bfloat16)
    # three experts, update norms 1 : 0.1 : 0.5 relative (a heterogeneous layer); "random": full
    # rank, flat spectrum; "decaying": singular values ~ 1/i (as fine-tuning updates tend to have)
    ex = []
    for s in (1.0, 0.1, 0.5):
        d = torch.randn(m, n, generator=g)
        if kind == "decaying":
            r = min(m, n)
            U = torch.linalg.qr(torch.randn(m, r, generator=g)).Q
            V = torch.linalg.qr(torch.randn(n, r, generator=g)).Q
            d = (U * torch.arange(1, r + 1, dtype=torch.float32) ** -1.0) @ V.T
            d = d / d.std()
        ex.append((W0.float() + d * 1e-3 * s).to(torch.bfloat16))
    return W0, ex

# warm-up on a small problem: map every code path's library pages
W0, ex = inputs(64, 48)
for name, (ours, naive_fn) in RULES.items():
    naive_fn(W0, ex)
    execute_rule(name, ours, W0, ex, budget=1e9)
execute_rule("ace", ace_merge, W0, ex, budget=1e9, tau=0.0)  # refinement (SciPy eigh)
for name in ("tsv_m", "iso_c", "iso_cts"):
    RULES[name][0](W0, ex, route="svd")
W0, ex = inputs(*args["shape"], kind=args["inputs"])
rule = args["rule"]
if args["impl"] == "naive":
    fn = lambda: RULES[rule][1](W0, ex)
else:
    budget = args["budget"]
    fn = lambda: execute_rule(rule, RULES[rule][0], W0, ex, budget=budget, return_diagnostics=True)
if args["measure"] == "memory":
    t = time.perf_counter()
    out, peak = peak_extra_rss(fn)
    secs = time.perf_counter() - t
else:
    # The median of up to 3 calls in this process (a merge runs many weights in one process), as
    # many as fit in ~10 s: small layers vary by +-30% from call to call on this VM.
    times, peak = [], 0
    while len(times) < 3 and (not times or sum(times) < 10.0):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    secs = sorted(times)[(len(times) - 1) // 2]
precision = "float32"
if isinstance(out, tuple):
    out, diag = out
    if hasattr(diag, "routes"):  # the SVD rules: which route each decomposition took
        precision = f"gram {diag.routes.count('gram')}/{len(diag.routes)}"
    else:
        precision = diag.precision
torch.save(out.float(), args["out"])
print(json.dumps(dict(seconds=secs, peak_bytes=peak, precision=precision)))
"""


def run_one(rule, impl, shape, threads, budget, tmp, kind="random"):
    """Two fresh processes: one timed with the default allocator, one measuring the peak with a fixed
    mmap threshold (which makes every large buffer a fresh mapping: honest RSS, but page faults
    that a user's process does not pay, ~1 s on a 2048x2048 ACE merge)."""
    out = str(Path(tmp) / f"{rule}-{impl}-{shape[0]}x{shape[1]}.pt")
    result = {}
    for measure in ("time", "memory"):
        env = dict(os.environ)
        if measure == "memory":
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        args = dict(rule=rule, impl=impl, shape=list(shape), threads=threads, budget=budget, out=out, inputs=kind,
                    root=str(ROOT), measure=measure)
        proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(args)], capture_output=True, text=True,
                              env=env)
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-3000:])
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        if measure == "time":
            result.update(seconds=got["seconds"], precision=got["precision"])
        else:
            result.update(peak_bytes=got["peak_bytes"])
    return result, out


def rel_diff(a_path, b_path, shape):
    import torch

    g = torch.Generator().manual_seed(0)
    W0 = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16).double()
    a, b = torch.load(a_path).double(), torch.load(b_path).double()
    return float((a - b).norm() / (b - W0).norm()), float((a - b).abs().max() / (b - W0).abs().max())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", nargs="*", default=None, help=f"from {sorted(LAYERS)}")
    p.add_argument("--quick", action="store_true", help=f"the 1B-shaped subset {QUICK}")
    p.add_argument("--rules", nargs="*", default=ALL_RULES, choices=ALL_RULES)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each worker (default 1)")
    p.add_argument("--budget", default="8GiB", help="memory budget handed to the planner")
    p.add_argument("--inputs", choices=["random", "decaying"], default="random",
                   help="task vectors with a flat spectrum (default) or singular values ~ 1/i")
    p.add_argument("--gpu", action="store_true", help="run the GPU benchmark instead (needs CUDA)")
    args = p.parse_args()
    if args.gpu:
        return gpu_benchmark()
    import tempfile

    from mergekit_ace.execution.budget import parse_size

    layers = args.layers or (QUICK if args.quick else list(LAYERS))
    budget = parse_size(args.budget)
    print(f"threads={args.threads} budget={args.budget} inputs={args.inputs} python={sys.version.split()[0]}")
    print(f"{'layer':16s} {'shape':>13s} {'rule':>7s} {'naive s':>8s} {'ours s':>8s} {'speedup':>7s} "
          f"{'naive MiB':>9s} {'ours MiB':>9s} {'mem ratio':>9s} {'rel diff':>9s} {'max diff':>9s}  precision/route")
    with tempfile.TemporaryDirectory() as tmp:
        for layer in layers:
            shape = LAYERS[layer]
            for rule in args.rules:
                naive, npath = run_one(rule, "naive", shape, args.threads, budget, tmp, args.inputs)
                ours, opath = run_one(rule, "ours", shape, args.threads, budget, tmp, args.inputs)
                rel, mx = rel_diff(opath, npath, shape)
                print(f"{layer:16s} {'x'.join(map(str, shape)):>13s} {rule:>7s} {naive['seconds']:8.2f} "
                      f"{ours['seconds']:8.2f} {naive['seconds'] / ours['seconds']:7.2f} "
                      f"{naive['peak_bytes'] / 2**20:9.0f} {ours['peak_bytes'] / 2**20:9.0f} "
                      f"{ours['peak_bytes'] / max(1, naive['peak_bytes']):9.2f} {rel:9.1e} {mx:9.1e}  "
                      f"{ours['precision']}", flush=True)


def gpu_benchmark():
    """A 7B-shaped (Llama-2-7B) three-expert merge of one decoder layer per rule (all five) on the GPU, timed
    and scaled by 32 layers, plus lm_head; peak GPU memory from torch.cuda.max_memory_allocated.
    Targets (issue 3): under 120 s of merge compute and under 20 GB on one H100."""
    import torch

    from mergekit_ace import rules
    from mergekit_ace.execution.executor import execute_rule

    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark did not run")
        return 1
    dev = torch.device("cuda")
    layer = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
             "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
    print(torch.cuda.get_device_name(), "free/total GiB", [x / 2**30 for x in torch.cuda.mem_get_info()])
    for rule in ALL_RULES:
        fn = getattr(rules, f"{rule}_merge")
        torch.cuda.reset_peak_memory_stats()
        total = 0.0
        for name, shape in list(layer.items()) + [("lm_head", (32000, 4096))]:
            g = torch.Generator(device=dev).manual_seed(0)
            W0 = (torch.randn(*shape, generator=g, device=dev) * 0.02).to(torch.bfloat16)
            ex = [(W0.float() + torch.randn(*shape, generator=g, device=dev) * 1e-3 * s).to(torch.bfloat16)
                  for s in (1.0, 0.1, 0.5)]
            torch.cuda.synchronize()
            t = time.perf_counter()
            execute_rule(rule, fn, W0, ex, name=name)
            torch.cuda.synchronize()
            secs = time.perf_counter() - t
            total += secs * (32 if name != "lm_head" else 1)
            print(f"{rule} {name} {shape} {secs:.2f} s")
            del W0, ex
        print(f"{rule}: whole 7B model (32 layers + lm_head) ~{total:.0f} s of merge compute; peak GPU memory "
              f"{torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
