r"""Peak extra memory and flops of one weight's merge, per rule and strategy (estimates).

Counted: every buffer the rule allocates (proxies, accumulators, factors, the eigensolver's
workspace, the row-block temporaries and the result), in bytes, as the maximum over the rule's
phases. Not counted: the inputs (base and experts are already resident). Sizes follow
``rules/ace.py`` and ``rules/actmat.py``; ``tests/execution`` checks them against measured peaks.

Notation: ``m`` = d_out, ``n`` = d_in, ``r`` = rows per block, ``T`` experts, ``bd`` bytes of
the compute dtype, ``bm`` bytes of the matmul dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from mergekit_ace.rules.common import EXPERT_STREAMED, ROW_CHUNKED

#: The symmetric eigensolver (LAPACK syevd, cuSOLVER syevd) needs a copy of the matrix that
#: becomes the eigenvectors plus about 2 n^2 of workspace.
EIGH_COPIES = 3
#: Flops of a symmetric eigendecomposition with vectors, ~9 n^3 (tridiagonalisation 4/3 n^3,
#: divide and conquer, back-transformation); Golub & Van Loan's count, used for time estimates.
EIGH_FLOP_FACTOR = 9.0


@dataclass(frozen=True)
class Estimate:
    peak_bytes: int
    matmul_flops: float  # dense products and triangular solves
    eigh_flops: float  # symmetric eigendecompositions (slower per flop than matmuls)

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.eigh_flops


def estimate(
    rule: str,
    strategy: str,
    d_out: int,
    d_in: int,
    n_experts: int,
    row_chunk: Optional[int] = None,
    *,
    compute_bytes: int = 8,
    matmul_bytes: int = 8,
    refine: bool = True,
    k_frac: float = 0.3,
) -> Estimate:
    """Peak extra bytes and flops of ``rule`` (``"ace"`` or ``"actmat"``) on one d_out x d_in weight.

    For ACE, ``refine`` says whether the heterogeneous branch's refinement runs (unknown before the
    traces are read: the planner assumes it does, an upper bound)."""
    m, n, T = int(d_out), int(d_in), int(n_experts)
    r = m if not row_chunk or row_chunk >= m else int(row_chunk)
    bd, bm = compute_bytes, matmul_bytes
    nn, mn, rn = n * n, m * n, r * n
    streamed = strategy == EXPERT_STREAMED
    if strategy not in (ROW_CHUNKED, EXPERT_STREAMED):
        raise ValueError(f"unknown strategy {strategy!r}")
    if rule == "ace":
        return _ace(m, n, T, r, bd, bm, streamed, refine and k_frac > 0, k_frac, nn, mn, rn)
    if rule == "actmat":
        return _actmat(m, n, T, r, bd, bm, streamed, nn, mn, rn)
    raise ValueError(f"unknown rule {rule!r}")


def _ace(m, n, T, r, bd, bm, streamed, refine, k_frac, nn, mn, rn) -> Estimate:
    k = int(math.floor(k_frac * min(m, n))) if refine else 0
    tall = m >= n
    kept = (0 if streamed else T * nn * bm) + (mn * bd if streamed else 0)  # S~_t list, or Q
    block = 3 * rn * bm  # one task-vector block, its centred copy, one product
    proxies = kept + nn * bm + nn * bd + block  # + the proxy being built + S_sum
    solve_block = 6 * rn * bd + 2 * rn * bm  # q, N, eps-sum, solve temporaries, F, sum_t D_t
    sbar = nn * bd if refine else 0
    fgram = nn * bm if refine and tall else 0
    solve = kept + mn * bd + 2 * nn * bd + sbar + fgram + solve_block  # + P, M, L
    phases = [proxies, solve]
    mm = T * 2.0 * m * nn * 2 + 2.0 * m * nn + nn * n / 3.0  # grams, D S~, solve, Cholesky
    eig = 0.0
    if refine:
        if tall:
            phases.append(kept + mn * bd + sbar + fgram + nn * bd + EIGH_COPIES * nn * bd)
            phases.append(kept + mn * bd + sbar + n * k * bd + 4 * rn * bd + 2 * rn * bm)
            mm += 2.0 * m * nn * 2 + 4.0 * m * n * k  # (sum D) Sbar, F^T F, F V S^-1 V^T
            if not streamed:
                mm += (T + 1) * 2.0 * m * nn  # Res recomputed block by block in the second pass
            eig = EIGH_FLOP_FACTOR * n ** 3
        else:
            f_whole = 0 if streamed else mn * bd
            phases.append(kept + mn * bd + sbar + f_whole + m * m * bd + EIGH_COPIES * m * m * bd)
            phases.append(kept + mn * bd + sbar + f_whole + 2 * k * n * bd + 2 * mn * bd)
            mm += 2.0 * m * nn + 2.0 * m * m * n + 4.0 * m * n * k
            if not streamed:
                mm += (T + 1) * 2.0 * m * nn
            eig = EIGH_FLOP_FACTOR * m ** 3
    return Estimate(int(max(phases)), mm, eig)


def _actmat(m, n, T, r, bd, bm, streamed, nn, mn, rn) -> Estimate:
    kept = mn * bd if streamed else T * nn * bm  # N, or the C_t list
    grams = kept + nn * bm + nn * bd + 3 * rn * bm  # + the Gram being built + A
    eig = kept + nn * bd + EIGH_COPIES * nn * bd + nn * bd  # A, eigh, kept eigenvectors
    apply = kept + nn * bd + (0 if streamed else mn * bd) + 5 * rn * bd
    mm = T * 2.0 * m * nn * 2 + 4.0 * m * nn
    return Estimate(int(max(grams, eig, apply)), mm, EIGH_FLOP_FACTOR * n ** 3)


def average_estimate(shape, n_experts: int, compute_bytes: int = 8) -> Estimate:
    """The experts' average (non-2-D weights, embeddings): one accumulator and one result."""
    numel = math.prod(shape) if shape else 1
    return Estimate(3 * numel * compute_bytes, float(n_experts * numel), 0.0)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
