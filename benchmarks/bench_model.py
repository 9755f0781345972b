"""Whole synthetic model merged through ``mergekit-yaml`` with ace, actmat, ties and
task_arithmetic on the same inputs; wall time of each ``mergekit-yaml`` process and its ratio to
ties. The model is a randomly initialised Llama (toymodels) with three perturbed experts whose
update norms differ (1 : 0.1 : 0.5 x 1e-3). Needs the package installed in the environment
(``pip install --no-deps --force-reinstall .``) so that mergekit-yaml knows ace/actmat.

    python benchmarks/bench_model.py                      # hidden 512, 4 layers (a few minutes here)
    python benchmarks/bench_model.py --hidden 1024 --intermediate 2816 --layers 8 --vocab 32000
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(root: Path, hidden, intermediate, layers, vocab):
    from mergekit_ace import toymodels

    tok = toymodels.train_tokenizer()
    cfg = toymodels.tiny_config("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                num_layers=layers, num_heads=max(1, hidden // 64), num_kv_heads=max(1, hidden // 256))
    base = toymodels.make_model(cfg, seed=0)
    paths = [toymodels.save_pretrained(base, tok, root / "base", dtype="bfloat16")]
    for i, s in enumerate((1e-3, 1e-4, 5e-4), start=1):
        paths.append(toymodels.save_pretrained(toymodels.perturbed_copy(base, seed=i, scale=s), tok,
                                               root / f"expert{i}", dtype="bfloat16"))
    return paths


def config(method, paths):
    params = {"ties": "      weight: 1.0\n      density: 0.5\n", "task_arithmetic": "      weight: 0.3333\n"}
    models = "".join(f"  - model: {p}\n" + (f"    parameters:\n{params[method]}" if method in params else "")
                     for p in paths[1:])
    return f"merge_method: {method}\nbase_model: {paths[0]}\nmodels:\n{models}dtype: bfloat16\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--methods", nargs="*", default=["ties", "task_arithmetic", "ace", "actmat"])
    args = p.parse_args()
    exe = Path(sys.executable).with_name("mergekit-yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = build(root, args.hidden, args.intermediate, args.layers, args.vocab)
        print(f"model: llama hidden={args.hidden} intermediate={args.intermediate} layers={args.layers} "
              f"vocab={args.vocab}, 3 experts, bfloat16; torch threads: default")
        times = {}
        for method in args.methods:
            cfg = root / f"{method}.yml"
            cfg.write_text(config(method, paths))
            t = time.perf_counter()
            proc = subprocess.run([str(exe), str(cfg), str(root / f"out-{method}")], capture_output=True,
                                  text=True, env=env)
            times[method] = time.perf_counter() - t
            if proc.returncode != 0:
                print(proc.stderr[-3000:])
                raise SystemExit(f"mergekit-yaml failed for {method}")
        ref = times.get("ties")
        for method, secs in times.items():
            print(f"{method:16s} {secs:8.1f} s" + (f"   {secs / ref:6.2f} x ties" if ref else ""))


if __name__ == "__main__":
    main()
