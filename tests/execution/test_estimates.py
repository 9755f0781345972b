"""The planner's peak-memory estimates are within 2x of the measured peaks on the CPU."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mergekit_ace.execution import peakmem
from mergekit_ace.execution.memory import estimate

pytestmark = pytest.mark.slow  # each test measures real merges' peaks in a subprocess: seconds each

ROOT = Path(__file__).resolve().parents[2]
CASES = [  # rule, strategy, d_out, d_in, row_chunk, tau (ACE: 0.3 heterogeneous for these inputs; SVD rules: route;
    # ACTMat: the updates' rank, None = full)
    ("ace", "row_chunked", 4096, 384, 512, 0.3),
    ("ace", "expert_streamed", 4096, 384, 512, 0.3),
    ("ace", "row_recomputed", 4096, 384, 512, 0.3),
    ("ace", "row_chunked", 384, 1536, None, 0.3),
    ("ace", "expert_streamed", 384, 1536, None, 0.3),
    ("ace", "output_gram", 384, 1536, None, 0.3),
    ("ace", "output_gram", 384, 1536, 96, 0.3),
    ("actmat", "row_chunked", 4096, 384, 512, None),
    ("actmat", "expert_streamed", 384, 1536, None, None),  # 3 x 384 < 1536: the small-Gram route
    ("actmat", "expert_streamed", 768, 1536, None, None),
    ("actmat", "output_gram", 768, 1536, None, 256),  # rank 3 x 256 < 1536: A singular, eigh (the estimate's peak)
    ("wudi", "row_chunked", 4096, 384, 512, None),  # WUDI's closed form: ACTMat's kernel with weights
    ("wudi", "expert_streamed", 384, 1536, None, None),  # the small-Gram route, the start S kept whole
    ("wudi", "row_chunked", 768, 1536, 256, 256),  # singular A: eigh, S(I - AA^+) row block by row block
    ("wudi_adam", "whole_matrix", 384, 1536, None, None),  # Adam (3 iterations): m x m products
    ("wudi_adam", "whole_matrix", 1536, 384, None, None),  # tall: the T C_t
    # the SVD rules: the full-SVD route's estimate must cover both routes' measured peaks
    ("tsv_m", "whole_matrix", 4096, 384, None, "auto"),
    ("tsv_m", "whole_matrix", 384, 1536, None, "svd"),
    ("iso_c", "whole_matrix", 4096, 384, None, "svd"),
    ("iso_c", "whole_matrix", 384, 1536, None, "auto"),
    ("iso_cts", "whole_matrix", 4096, 384, None, "svd"),
    ("iso_cts", "whole_matrix", 384, 1536, None, "auto"),
]

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from mergekit_ace.execution.peakmem import peak_extra_rss
    from mergekit_ace.rules.ace import ace_merge
    from mergekit_ace.rules.actmat import actmat_merge
    from mergekit_ace.rules import iso_c_merge, iso_cts_merge, tsv_m_merge
    from mergekit_ace.rules.wudi import wudi_merge
    from tests.reference import make_experts
    SVD_RULES = {"tsv_m": tsv_m_merge, "iso_c": iso_c_merge, "iso_cts": iso_cts_merge}
    # Warm up every code path first: the first call of a LAPACK routine maps library code pages,
    # which RSS would otherwise count as the merge's memory.
    W0, experts = make_experts((96, 48), 3, [1.0, 0.01, 0.3], seed=0)
    for s in ("row_chunked", "expert_streamed", "output_gram"):
        for shape in ((96, 48), (48, 96)):
            W0, experts = make_experts(shape, 3, [1.0, 0.01, 0.3], seed=0)
            ace_merge(W0, experts, strategy=s, row_chunk=16)
            actmat_merge(W0, experts, strategy=s, row_chunk=16)
            wudi_merge(W0, experts, strategy=s, row_chunk=16)
            wudi_merge(W0, experts, solver="adam", iterations=2)
            ace_merge(W0, experts, strategy="row_recomputed", row_chunk=16)
            for f in SVD_RULES.values():
                f(W0, experts, route="auto")
                f(W0, experts, route="svd")
    out = []
    for rule, strategy, m, n, chunk, tau in json.loads(sys.argv[1]):
        W0, experts = make_experts((m, n), 3, [1.0, 0.01, 0.3], seed=0,
                                   rank=tau if rule in ("actmat", "wudi") else None)
        kw = dict(strategy=strategy, row_chunk=chunk)
        if rule == "ace":
            fn = lambda: ace_merge(W0, experts, tau=tau, **kw)
        elif rule == "wudi":
            fn = lambda: wudi_merge(W0, experts, **kw)
        elif rule == "wudi_adam":
            fn = lambda: wudi_merge(W0, experts, solver="adam", iterations=3, **kw)
        elif rule in SVD_RULES:  # tau holds the route
            fn = lambda: SVD_RULES[rule](W0, experts, route=tau, **kw)
        else:
            fn = lambda: actmat_merge(W0, experts, **kw)
        result, peak = peak_extra_rss(fn)
        del result
        out.append(peak)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not peakmem.available(), reason="needs Linux /proc peak-RSS accounting")
def test_estimates_within_2x_of_measured_cpu_peaks():
    # A fixed glibc mmap threshold: every large buffer is returned to the kernel when freed, so
    # RSS follows the live allocations (the dynamic threshold would keep freed blocks resident).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(CASES)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    for (rule, strategy, m, n, chunk, tau), peak in zip(CASES, measured):
        est = estimate(rule, strategy, m, n, 3, chunk).peak_bytes
        if tau == "auto":  # the SVD route's estimate is an upper bound of the Gram route's peak
            assert est / 3 <= peak <= est, (rule, strategy, m, n, chunk, est, peak)
        else:
            assert est / 2 <= peak <= est * 2, (rule, strategy, m, n, chunk, est, peak)


AVERAGE_SCRIPT = textwrap.dedent("""
    import json, torch
    torch.set_num_threads(1)
    from mergekit_ace.execution.peakmem import peak_extra_rss
    from mergekit_ace.rules.task_vectors import average_task_vectors
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40000, 768, generator=g).bfloat16()   # an embedding-like 30.7M-value weight
    experts = [(base.float() + 0.01 * torch.randn(40000, 768, generator=g)).bfloat16() for _ in range(3)]
    average_task_vectors(base[:64], [e[:64] for e in experts], 1.0, torch.float64, out_dtype=torch.bfloat16)
    result, peak = peak_extra_rss(
        lambda: average_task_vectors(base, experts, 1.0, torch.float64, out_dtype=torch.bfloat16))
    print(json.dumps(peak))
""")


@pytest.mark.skipif(not peakmem.available(), reason="needs Linux /proc peak-RSS accounting")
def test_average_estimate_follows_the_blockwise_average():
    """Embeddings are averaged a block of rows at a time into the inputs' dtype: the plan's estimate
    is the bf16 result plus three float64 blocks (not T + 2 float64 copies), within 2x of the peak."""
    from mergekit_ace.execution.memory import average_estimate

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", AVERAGE_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    est = average_estimate((40000, 768), 3, out_bytes=2).peak_bytes
    assert est == 40000 * 768 * 2 + 3 * (1 << 22) * 8
    assert est / 2 <= peak <= est * 2, (est, peak)
    # the old whole-tensor float64 figure would be 4x the estimate here
    assert 3 * 40000 * 768 * 8 > 2 * est
