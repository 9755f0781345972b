"""A merge killed half-way and rerun with ``MERGEKIT_ACE_CACHE_DIR`` (mergekit_ace/execution/cache.py):
what the rerun costs, the cache's disk use, and its overhead on an uninterrupted run.

    nice -n 10 python benchmarks/resume_cache.py --shape llama-3.2-3b --layers 4 --workdir /work/bench26 \\
        --json benchmarks/results-resume-3b-L4-cpu.json

On the synthetic checkpoints of ``bench_model.py`` (same directory layout, reused), each run is
``mergekit-yaml`` under ``benchmarks/merge_probe.py`` (rule time = time inside ``execute_rule``):

1. ``plain`` (with ``--baseline``): no cache;
2. ``cached``: a fresh cache, uninterrupted: the cache's overhead (fingerprints + stores, from its
   log) and disk use; its output is the reference;
3. ``killed``: a second fresh cache; the process is killed with SIGKILL once the weights stored
   hold ``--kill-fraction`` of run 2's rule time (from the cache's log);
4. ``resumed``: the same command again on that cache: its rule time, what it loaded and computed,
   and whether its output equals run 2's bit for bit (every tensor, ``torch.equal``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.bench_model import merge_config, run_probe  # noqa: E402
from benchmarks.calibration import machine_speed  # noqa: E402
from mergekit_ace.execution.cache import CACHE_DIR_ENV, read_log  # noqa: E402
from mergekit_ace.fixtures import synthetic  # noqa: E402


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def cache_summary(d: Path, pid=None) -> dict:
    log = [r for r in read_log(d) if pid is None or r["pid"] == pid]
    computed = [r for r in log if r["event"] == "computed"]
    loaded = [r for r in log if r["event"] == "loaded"]
    return dict(computed=len(computed), loaded=len(loaded),
                rule_s_of_computed=sum(r["rule_s"] for r in computed),
                fingerprint_s=sum(r["fingerprint_s"] for r in log if "fingerprint_s" in r),
                store_s=sum(r["store_s"] for r in computed), load_s=sum(r["load_s"] for r in loaded),
                entries_bytes=sum(r["bytes"] for r in computed))


def outputs_equal(a: Path, b: Path) -> dict:
    """Every tensor of two merged models, compared bit for bit."""
    import torch
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    ta, tb = tensors(a), tensors(b)
    differ = [k for k in tb if k not in ta or ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    return dict(tensors=len(tb), same_names=sorted(ta) == sorted(tb), differing=differ)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(synthetic.FAMILIES), default="llama-3.2-3b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="ace")
    p.add_argument("--workdir", default="bench-work")
    p.add_argument("--kill-fraction", type=float, default=0.5)
    p.add_argument("--baseline", action="store_true", help="also run without the cache (run 1)")
    p.add_argument("--calibrate", action="store_true",
                   help="measure the machine's speed before and after (benchmarks/calibration.py)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    work = Path(args.workdir).resolve()
    ckpt = work / f"{args.shape}-L{args.layers or 'all'}-T{args.experts}-s{args.seed}"
    paths = synthetic.write_checkpoints(ckpt, args.shape, num_experts=args.experts, num_layers=args.layers,
                                        seed=args.seed, device="cpu")
    root = ckpt / "resume"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    conf = root / f"{args.method}.yml"
    conf.write_text(merge_config(args.method, paths))
    base_env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                    PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
    base_env.pop(CACHE_DIR_ENV, None)
    result = dict(shape=args.shape, layers=args.layers, experts=args.experts, method=args.method,
                  machine_speed_before=machine_speed("cpu") if args.calibrate else None, runs={})

    def dump():
        print(json.dumps(result, indent=1), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))

    def probe(name, cache):
        env = dict(base_env, **({CACHE_DIR_ENV: str(cache)} if cache else {}))
        out = root / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        r = run_probe(conf, out, root / f"{name}.json", False, env)
        if not r["ok"]:
            raise SystemExit(f"{name} failed: {r['error']}")
        keep = {k: r[k] for k in ("wall_s", "rule_s", "load_s", "write_s", "other_s", "rule_calls",
                                   "float64_recomputes", "peak_anon_rss_bytes")}
        print(f"{name}: wall {r['wall_s']:.1f} s, rule {r['rule_s']:.1f} s", flush=True)
        return keep, out

    if args.baseline:
        result["runs"]["plain"], out_plain = probe("plain", None)
        shutil.rmtree(out_plain, ignore_errors=True)
        dump()
    cache_a = root / "cache-a"
    result["runs"]["cached"], out_ref = probe("cached", cache_a)
    result["runs"]["cached"]["cache"] = cache_summary(cache_a)
    result["runs"]["cached"]["cache_dir_bytes"] = dir_bytes(cache_a)
    result["runs"]["cached"]["output_bytes"] = sum(f.stat().st_size for f in out_ref.glob("*.safetensors"))
    total_rule = result["runs"]["cached"]["cache"]["rule_s_of_computed"]
    dump()

    # 3. killed once the stored weights hold kill_fraction of the rule time
    cache_b = root / "cache-b"
    out_b = root / "out-resume"
    shutil.rmtree(out_b, ignore_errors=True)
    env = dict(base_env, **{CACHE_DIR_ENV: str(cache_b)})
    cmd = [sys.executable, str(HERE / "merge_probe.py"), str(root / "killed.json"), "--", str(conf), str(out_b)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while proc.poll() is None:
        done = cache_summary(cache_b)["rule_s_of_computed"] if (cache_b / "log.jsonl").exists() else 0.0
        if done >= args.kill_fraction * total_rule:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.5)
    proc.wait()
    killed = cache_summary(cache_b)
    result["runs"]["killed"] = dict(wall_s=time.perf_counter() - start, returncode=proc.returncode,
                                    cache=killed, cache_dir_bytes=dir_bytes(cache_b))
    print(f"killed after {result['runs']['killed']['wall_s']:.1f} s with {killed['computed']} weights "
          f"({killed['rule_s_of_computed']:.1f} s of rule time) stored", flush=True)
    dump()

    # 4. the same command again
    env_r = dict(base_env, **{CACHE_DIR_ENV: str(cache_b)})
    r = run_probe(conf, out_b, root / "resumed.json", False, env_r)
    if not r["ok"]:
        raise SystemExit(f"resumed run failed: {r['error']}")
    pids = {rec["pid"] for rec in read_log(cache_b)}
    last_pid = read_log(cache_b)[-1]["pid"]
    result["runs"]["resumed"] = {k: r[k] for k in ("wall_s", "rule_s", "load_s", "write_s", "other_s", "rule_calls",
                                                    "float64_recomputes")}
    result["runs"]["resumed"]["cache"] = cache_summary(cache_b, pid=last_pid)
    result["runs"]["resumed"]["processes_in_log"] = len(pids)
    result["runs"]["resumed"]["bitwise_vs_cached_run"] = outputs_equal(out_b, out_ref)
    result["machine_speed_after"] = machine_speed("cpu") if args.calibrate else None
    dump()
    for d in (out_ref, out_b, cache_a, cache_b):
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
