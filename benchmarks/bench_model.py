"""Whole models at the mission's size merged through plain ``mergekit-yaml``: ace, actmat, ties and
task_arithmetic on the same synthetic checkpoints (exact Llama-3.2-3B / OLMo-3-7B tensor names,
shapes and configs; ``mergekit_ace/fixtures/synthetic.py``), one ``mergekit-yaml`` process per method.

    python benchmarks/bench_model.py --shape llama-3.2-3b                 # all 28 layers, CPU
    python benchmarks/bench_model.py --shape llama-3.2-3b --layers 2      # full-size layers, quick
    python benchmarks/bench_model.py --shape olmo-3-7b --cuda --json r.json
    MERGEKIT_ACE_MEMORY_BUDGET=2GiB python benchmarks/bench_model.py --shape olmo-3-7b --cuda --methods ace
    python benchmarks/bench_model.py --shape olmo-3-7b --layers 1 --cuda --verify   # CUDA == CPU?
    python benchmarks/bench_model.py --layers 4 --methods ties ace ace@float64 ace+refinement=none actmat

Per method: wall time of the process, its phases (loading, this package's rule, writing, the rest;
``benchmarks/merge_probe.py``), peak RSS, peak anonymous and file-backed RSS, on CUDA the peak GPU memory
allocated, OOM retries, CPU fallbacks and float64 recomputations, and ``mergekit-ace plan``'s
estimate next to it (rule seconds from a throughput measured when the plan runs; the largest weight's
memory need). ``--verify`` merges this package's methods with float32 output on the chosen device and on
the CPU and prints the relative difference of the merged task vectors.

Checkpoints are written once into ``--workdir`` (reused while their parameters match:
base + T experts, each 6.4 GB for the 3B shape and 14.6 GB for the 7B one); each merge goes to
``--out-root`` and is deleted after it is measured (``--keep`` keeps them). Needs the package
installed (``pip install .``: mergekit-yaml must know ace and actmat).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.calibration import cpu_times, machine_speed, steal_between  # noqa: E402
from mergekit_ace.fixtures import synthetic  # noqa: E402

METHODS = ("ties", "task_arithmetic", "ace", "actmat")
RULES = ("ace", "actmat", "tsv_m", "iso_c", "iso_cts")  # this package's methods (plan, --verify)
GIB = 2 ** 30


def parse_variant(spec: str):
    """``method[+param=value...][@matmul_dtype]`` -> (method, parameters, matmul dtype or None), e.g.
    ``ace+refinement=none`` or ``actmat@float64`` (MERGEKIT_ACE_MATMUL_DTYPE for that run)."""
    head, _, matmul = spec.partition("@")
    method, *pairs = head.split("+")
    params = dict(pair.split("=", 1) for pair in pairs)
    return method, params, matmul or None


def merge_config(method: str, paths, dtype: str = "bfloat16", parameters=None) -> str:
    experts = paths[1:]
    params = {"ties": "      weight: 1.0\n      density: 0.5\n",
              "task_arithmetic": f"      weight: {1.0 / len(experts):.6f}\n"}
    models = "".join(f"  - model: {p}\n" + (f"    parameters:\n{params[method]}" if method in params else "")
                     for p in experts)
    block = "".join(f"  {k}: {v}\n" for k, v in (parameters or {}).items())
    return (f"merge_method: {method}\nbase_model: {paths[0]}\nmodels:\n{models}dtype: {dtype}\n"
            + (f"parameters:\n{block}" if block else ""))


def run_probe(config: Path, out: Path, record: Path, cuda: bool, env, extra=()) -> dict:
    record.unlink(missing_ok=True)  # a stale record must not stand for this run
    cmd = [sys.executable, str(HERE / "merge_probe.py"), str(record), "--", str(config), str(out), *extra]
    if cuda:
        cmd.append("--cuda")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, stderr = proc.communicate()
    except BaseException:  # interrupted: stop the merge; its probe still writes a partial record
        proc.terminate()
        proc.communicate()
        raise
    if not record.exists():
        sys.stderr.write(stderr[-5000:])
        raise SystemExit(f"merge probe produced no record for {config.name} (exit {proc.returncode})")
    result = json.loads(record.read_text())
    if not result["ok"]:
        sys.stderr.write(stderr[-5000:])
    result["stderr_tail"] = stderr[-2000:]
    return result


def plan_estimate(config: Path, env) -> dict:
    proc = subprocess.run([sys.executable, "-m", "mergekit_ace.cli", "plan", str(config), "--json"],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr[-500:]}
    summary = json.loads(proc.stdout)["summary"]
    return {"seconds": summary["seconds"], "worst_weight": summary["worst_weight"],
            "worst_weight_bytes": summary["worst_weight_bytes"], "matmul_flops": summary["matmul_flops"],
            "eigh_flops": summary["eigh_flops"], "planned_for": summary["planned_for"]}


def compare_outputs(a: Path, b: Path, base: Path) -> dict:
    """Relative difference of two merges' task vectors: ||A - B|| / ||B - W_0|| over all 2-D weights
    (Frobenius, summed), and the largest per-weight value."""
    from safetensors import safe_open

    def tensors(d: Path):
        handles = {}
        index = d / "model.safetensors.index.json"
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
                 else [p.name for p in d.glob("*.safetensors")])
        for f in files:
            h = safe_open(str(d / f), "pt")
            for k in h.keys():
                handles[k] = h
        return handles

    ha, hb, h0 = tensors(a), tensors(b), tensors(base)
    num = den = 0.0
    worst, worst_name = 0.0, None
    for name, h in hb.items():
        x = h.get_tensor(name).double()
        if x.ndim != 2 or name not in h0:
            continue
        y = ha[name].get_tensor(name).double()
        w0 = h0[name].get_tensor(name).double()
        d2, t2 = float((y - x).square().sum()), float((x - w0).square().sum())
        num, den = num + d2, den + t2
        if t2 > 0 and (d2 / t2) ** 0.5 > worst:
            worst, worst_name = (d2 / t2) ** 0.5, name
    return {"relative_difference": (num / den) ** 0.5 if den else float("nan"),
            "worst_weight": worst_name, "worst_relative_difference": worst}


def fmt_gib(b):
    return "" if b is None else f"{b / GIB:.2f}"


def table(rows, cuda: bool) -> str:
    ties = next((r["wall_s"] for r in rows if r["method"] == "ties" and r["ok"]), None)
    head = ["method", "wall s", "x ties", "CPU s", "load s", "rule s", "write s", "other s", "peak RSS GiB",
            "peak anon GiB", "peak file GiB"] + (["GPU peak GiB"] if cuda else []) + [
            "OOM retries", "CPU fallbacks", "fp64 redo", "plan rule s", "plan largest GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        plan = r.get("plan") or {}
        secs = plan.get("seconds") or {}
        key = next((k for k in secs if ("cpu" not in k) == cuda), None)
        cells = [r["method"] + ("" if r["ok"] else " (FAILED)"), f"{r['wall_s']:.1f}",
                 f"{r['wall_s'] / ties:.2f}" if ties else "",
                 f"{r['cpu_s']:.0f}" if r.get("cpu_s") is not None else "", f"{r['load_s']:.1f}", f"{r['rule_s']:.1f}",
                 f"{r['write_s']:.1f}", f"{r['other_s']:.1f}", fmt_gib(r["peak_rss_bytes"]),
                 fmt_gib(r["peak_anon_rss_bytes"]), fmt_gib(r.get("peak_file_rss_bytes"))]
        if cuda:
            cells.append(fmt_gib(r.get("cuda_max_allocated_bytes")))
        cells += [str(r["oom_retries"]), str(r["cpu_fallbacks"]), str(r["float64_recomputes"]),
                  f"{secs[key]:.0f}" if key else "", fmt_gib(plan.get("worst_weight_bytes"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(synthetic.FAMILIES), default="llama-3.2-3b")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (full-size layers)")
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="*", default=list(METHODS),
                   help="mergekit methods to run (default: %(default)s; also tsv_m, iso_c, iso_cts); a variant "
                        "as method+param=value[@float64], e.g. ace+refinement=none, ace@float64")
    p.add_argument("--cuda", action="store_true", help="pass --cuda to mergekit-yaml")
    p.add_argument("--gen-device", default=None,
                   help="where the checkpoints' random numbers are drawn (default: cuda with --cuda, else cpu)")
    p.add_argument("--workdir", default="bench-work", help="where the checkpoints are written and reused")
    p.add_argument("--out-root", default=None,
                   help="where merges and their records are written (default: beside the checkpoints)")
    p.add_argument("--keep", action="store_true", help="keep the merged models")
    p.add_argument("--verify", action="store_true",
                   help="ace/actmat with float32 output on the chosen device and on the CPU; compare")
    p.add_argument("--no-plan", action="store_true", help="skip mergekit-ace plan's estimate")
    p.add_argument("--out-shard-size", default=None,
                   help="passed to mergekit-yaml (e.g. 1B): caps the merged tensors its writer holds in memory")
    p.add_argument("--json", default=None, help="write every record to this file")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip the machine-speed figures taken before and after the merges (calibration.py)")
    args = p.parse_args()

    work = Path(args.workdir).resolve()
    ckpt = work / f"{args.shape}-L{args.layers or 'all'}-T{args.experts}-s{args.seed}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))

    t = time.perf_counter()
    cfg = synthetic.transformers_config(args.shape, args.layers)
    n_tensors = len(synthetic.tensor_shapes(cfg))
    step = max(1, n_tensors // 10)
    paths = synthetic.write_checkpoints(
        ckpt, args.shape,
        num_experts=args.experts, num_layers=args.layers, seed=args.seed,
        device=args.gen_device or ("cuda" if args.cuda else "cpu"),
        progress=lambda i, n, name: print(f"  checkpoints: {i}/{n} tensors", flush=True) if i % step == 0 else None)
    gen_s = time.perf_counter() - t
    out_root = Path(args.out_root).resolve() if args.out_root else ckpt / "merges"
    out_root.mkdir(parents=True, exist_ok=True)
    size = synthetic.checkpoint_bytes(args.shape, args.layers)
    header = (f"shape {args.shape}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, intermediate "
              f"{cfg.intermediate_size}, vocab {cfg.vocab_size}, {'tied' if cfg.tie_word_embeddings else 'untied'} "
              f"head; base + {args.experts} experts, bf16, {size / GIB:.2f} GiB each; checkpoints ready in "
              f"{gen_s:.0f} s; device {'cuda' if args.cuda else 'cpu'}; "
              f"{os.environ.get('MERGEKIT_ACE_MEMORY_BUDGET', 'default')} budget, "
              f"{os.environ.get('MERGEKIT_ACE_MATMUL_DTYPE', 'auto')} products; "
              f"out shard size {args.out_shard_size or 'default (5B)'}; torch {torch.__version__}, "
              f"{platform.machine()} {os.cpu_count()} CPUs")
    print(header, flush=True)
    calibration = {}
    if not args.no_calibrate:
        calibration["before"] = machine_speed("cuda" if args.cuda else "cpu")
        print(f"machine speed: {json.dumps(calibration['before'])}", flush=True)
    run_ticks = cpu_times()

    def dump():
        Path(args.json).write_text(json.dumps(dict(header=header, calibration=calibration, records=records),
                                              indent=1))

    records = []
    if args.verify:
        for method in [m for m in args.methods if m in RULES]:
            outs = {}
            for dev in (["cuda", "cpu"] if args.cuda else ["cpu"]):
                conf = out_root / f"{method}-verify.yml"
                conf.write_text(merge_config(method, paths, dtype="float32"))
                out = out_root / f"verify-{method}-{dev}"
                shutil.rmtree(out, ignore_errors=True)
                r = run_probe(conf, out, out_root / f"{method}-{dev}.json", dev == "cuda", env)
                if not r["ok"]:
                    raise SystemExit(f"{method} on {dev} failed: {r['error']}")
                outs[dev] = out
                print(f"verify {method} on {dev}: {r['wall_s']:.1f} s", flush=True)
            if len(outs) == 2:
                cmp = compare_outputs(outs["cuda"], outs["cpu"], paths[0])
                print(f"verify {method}: cuda vs cpu relative difference {cmp['relative_difference']:.2e} "
                      f"(worst weight {cmp['worst_weight']}: {cmp['worst_relative_difference']:.2e})", flush=True)
                records.append(dict(method=method, verify=cmp))
            if not args.keep:
                for out in outs.values():
                    shutil.rmtree(out, ignore_errors=True)
    else:
        for spec in args.methods:
            method, parameters, matmul = parse_variant(spec)
            label = spec.replace("+", "_").replace("=", "-").replace("@", "_")
            conf = out_root / f"{label}.yml"
            conf.write_text(merge_config(method, paths, parameters=parameters))
            out = out_root / f"out-{label}"
            shutil.rmtree(out, ignore_errors=True)
            extra = ["--out-shard-size", args.out_shard_size] if args.out_shard_size else []
            run_env = dict(env, MERGEKIT_ACE_MATMUL_DTYPE=matmul) if matmul else env
            r = run_probe(conf, out, out_root / f"{label}.json", args.cuda, run_env, extra)
            r["method"] = spec
            if method in RULES and not args.no_plan:
                r["plan"] = plan_estimate(conf, run_env)
            records.append(r)
            print(f"{method}: {'ok' if r['ok'] else 'FAILED: ' + str(r['error'])} in {r['wall_s']:.1f} s", flush=True)
            if args.json:  # after every method, so that an interrupted run keeps what it measured
                dump()
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
        print()
        print(table(records, args.cuda))
    calibration["steal_fraction_during_run"] = steal_between(run_ticks, cpu_times())
    if not args.no_calibrate:
        calibration["after"] = machine_speed("cuda" if args.cuda else "cpu")
        print(f"machine speed after: {json.dumps(calibration['after'])}", flush=True)
    if args.json:
        dump()
    return 0 if all(r.get("ok", True) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
