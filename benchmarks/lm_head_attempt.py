"""Time of ACE's float32 attempt on the synthetic OLMo-3-7B lm_head (seed 0, the bench's relative
updates 1 / 2.5 / 5 %), from the start of the rule to the early give-up; the Grams' order."""
import sys
import time

import torch

from mergekit_ace.fixtures import synthetic
from mergekit_ace.rules import ace, precision, task_vectors

torch.set_num_threads(2)
name, shape = "lm_head.weight", (100278, 4096)
t0 = time.time()
base = synthetic.base_tensor(name, shape, 0).bfloat16()
experts = [(base.float() + synthetic.expert_update(name, base.float(), r, 0, t)).bfloat16()
           for t, r in enumerate(synthetic.DEFAULT_RELATIVE_UPDATES)]
print(sys.argv[1] if len(sys.argv) > 1 else "", name, "generated in %.1f s" % (time.time() - t0), flush=True)
gram = task_vectors.TaskVectors.gram


def traced(self, t, *a, **k):
    t1 = time.time()
    out = gram(self, t, *a, **k)
    print(f"  Gram of expert {t:d} ({self.dtype}): {time.time() - t1:.1f} s", flush=True)
    return out


task_vectors.TaskVectors.gram = traced
t0 = time.time()
try:
    run = ace._Run(name, None, torch.float64, 8192, "row_chunked", torch.bfloat16, matmul_dtype=torch.float32,
                   check=True)
    ace._ace(base, experts, ace.ACEParameters(), run)
    print("  attempt ran to the end")
except precision.NeedsFloat64 as e:
    print("  gave up:", e)
print("  float32 attempt: %.1f s" % (time.time() - t0), flush=True)
