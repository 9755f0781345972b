r"""Peak extra memory and flops of one weight's merge, per rule and strategy (estimates).

Counted: every buffer the rule allocates (proxies, accumulators, factors, the eigensolver's
workspace, the row-block temporaries and the result), in bytes, as the maximum over the rule's
phases. Not counted: the inputs (base and experts are already resident). Sizes follow
``rules/ace.py``, ``rules/actmat.py`` and ``rules/wudi.py``; ``tests/execution`` checks them against
measured peaks.

Notation: ``m`` = d_out, ``n`` = d_in, ``r`` = rows per block, ``T`` experts, ``bd`` bytes of
the compute dtype, ``bm`` bytes of the matmul dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mergekit_ace.rules.task_vectors import (
    ACE_STRATEGIES,
    AVERAGE_BLOCK_ELEMENTS,
    EXPERT_STREAMED,
    OUTPUT_GRAM,
    ROW_RECOMPUTED,
    STRATEGIES,
    SVD_STRATEGIES,
)

#: The symmetric eigensolver (LAPACK syevd, cuSOLVER syevd) needs a copy of the matrix that
#: becomes the eigenvectors plus about 2 n^2 of workspace.
EIGH_COPIES = 3
#: Flops of a symmetric eigendecomposition with vectors, ~9 n^3 (tridiagonalisation 4/3 n^3,
#: divide and conquer, back-transformation); Golub & Van Loan's count, used for time estimates.
EIGH_FLOP_FACTOR = 9.0
#: Thin SVD of an m x n matrix (m >= n) with U_1 and V: the R-SVD's 6 m n^2 + 20 n^3
#: (Golub & Van Loan, Table 8.6.1), counted with the eigendecompositions.
SVD_FLOPS_MN2, SVD_FLOPS_N3 = 6.0, 20.0
#: The SVD-based rules (``rules/tsv_m.py``, ``rules/iso.py``).
SVD_RULES = ("tsv_m", "iso_c", "iso_cts")
#: WUDI's official Adam solver (``rules/wudi.py: wudi_adam``): one strategy, the whole matrix.
WUDI_ADAM = "wudi_adam"
#: Iterations the estimate of ``wudi_adam`` assumes unless told (the official 300).
ADAM_ITERATIONS = 300
#: Strategies each rule offers the planner (wudi's closed form is ACTMat's kernel).
RULE_STRATEGIES = {"ace": ACE_STRATEGIES, "actmat": STRATEGIES, "wudi": STRATEGIES, WUDI_ADAM: SVD_STRATEGIES,
                   **{rule: SVD_STRATEGIES for rule in SVD_RULES}}


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
    row_chunk: int | None = None,
    *,
    compute_bytes: int = 8,
    matmul_bytes: int = 8,
    refine: bool = True,
    k_frac: float = 0.3,
    iterations: int = ADAM_ITERATIONS,
    solve: str = "exact",
) -> Estimate:
    """Peak extra bytes and flops of ``rule`` (ace, actmat, wudi, wudi_adam, tsv_m, iso_c, iso_cts)
    on one d_out x d_in weight (``iterations``: wudi_adam's; ``solve``: actmat's and wudi's, whose
    "truncated" cutoff takes a d_in x d_in eigendecomposition where the exact solve factors A by
    Cholesky; :func:`solve_of` gives it from the merge's parameters).

    For ACE, ``refine`` says whether the heterogeneous branch's refinement runs (unknown before the
    traces are read: the planner assumes it does, an upper bound). For the SVD rules the estimate
    is that of their full-SVD route (an upper bound: the Gram route, taken where its estimated
    error allows, needs about half the memory and fewer flops; :func:`svd_rule_gram_route`)."""
    m, n, T = int(d_out), int(d_in), int(n_experts)
    r = m if not row_chunk or row_chunk >= m else int(row_chunk)
    bd, bm = compute_bytes, matmul_bytes
    nn, mn, rn = n * n, m * n, r * n
    streamed = strategy in (EXPERT_STREAMED, OUTPUT_GRAM)
    gram_space = strategy == OUTPUT_GRAM
    if rule not in RULE_STRATEGIES:
        raise ValueError(f"unknown rule {rule!r}")
    if strategy not in RULE_STRATEGIES[rule]:
        raise ValueError(f"unknown strategy {strategy!r} for {rule}")
    if rule in SVD_RULES:
        return _svd_rule(rule, m, n, T, r, bd, svd_route=True)
    if rule == "ace":
        return _ace(m, n, T, r, bd, bm, streamed, strategy == ROW_RECOMPUTED, refine and k_frac > 0, k_frac,
                    nn, mn, rn, gram_space)
    if rule in ("actmat", "wudi"):
        return _actmat(m, n, T, r, bd, bm, streamed, nn, mn, rn, gram_space, keep_start=rule == "wudi",
                       truncated=solve == "truncated")
    if rule == WUDI_ADAM:
        return _wudi_adam(m, n, T, int(iterations))
    raise ValueError(f"unknown rule {rule!r}")


def _output_gram_phase(m, n, bd, bm, nn, mn, rn) -> int:
    r"""Strategy ``output_gram``, while the experts' Grams are summed: the full-size accumulator (Q or
    N) and the d_in x d_in sum (plus its products-precision copy when that is narrower), one whole
    task vector (two while it is formed), its d_out x d_out Gram and a block of the product."""
    return mn * bd + nn * bd + (nn * bm if bm != bd else 0) + mn * bm + max(mn * bm, m * m * bm + rn * bd)


def _grams_and_products_flops(m, n, T, gram_space) -> float:
    """The T Grams and the T products with them (2 m n^2 each), or, with ``output_gram``, the T
    d_in x d_in Grams, the T d_out x d_out ones and their products (2 m^2 n each); Grams counted as
    full products (as the throughput is measured), though only their upper blocks are computed."""
    return T * (2.0 * m * n * n + 4.0 * m * m * n) if gram_space else T * 2.0 * m * n * n * 2


def _ace(m, n, T, r, bd, bm, streamed, recompute, refine, k_frac, nn, mn, rn, gram_space=False) -> Estimate:
    k = int(math.floor(k_frac * min(m, n))) if refine else 0
    tall = m >= n
    kept = (0 if streamed else T * nn * bm) + (mn * bd if streamed else 0)  # S~_t list, or Q
    block = 3 * rn * bm  # one task-vector block, its centred copy, one product
    proxies = kept + nn * bm + nn * bd + block  # + the proxy being built + S_sum
    if gram_space:
        proxies = _output_gram_phase(m, n, bd, bm, nn, mn, rn)
    solve_block = 6 * rn * bd + 2 * rn * bm  # q, N, eps-sum, solve temporaries, F, sum_t D_t
    sbar = nn * bm if refine else 0
    f_buffer = mn * bm if refine and not (streamed or recompute) else 0  # F kept (Q's place if streamed)
    solve = kept + mn * bd + 2 * nn * bd + sbar + f_buffer + solve_block  # + P, M, L
    phases = [proxies, solve]
    mm = _grams_and_products_flops(m, n, T, gram_space) + 2.0 * m * nn + nn * n / 3.0  # + solve, Cholesky
    eig = 0.0
    if refine:
        if recompute:  # P, the proxies and Sbar stay; F's blocks are recomputed ((T+1) more products)
            held = mn * bd + kept + sbar + 2 * rn * bd + 2 * rn * bm
            mm += (T + 1) * 2.0 * m * nn
        else:  # P and F (the proxies are released)
            held = mn * bd + (mn * bd if streamed else mn * bm)
        if tall:
            # Gram of F (plus a float64 one when float32 is checked and misses), eigh workspace.
            phases.append(held + nn * bm + nn * bd + EIGH_COPIES * nn * bd + rn * bd)
            phases.append(held + n * k * bd + 3 * rn * bd)
            mm += 2.0 * m * nn * 2 + 4.0 * m * n * k  # (sum D) Sbar, F^T F, F V S^-1 V^T
            eig = EIGH_FLOP_FACTOR * n ** 3
        else:
            phases.append(held + mn * bm + m * m * bd + EIGH_COPIES * m * m * bd)
            phases.append(held + 2 * k * n * bd + 2 * mn * bd)
            mm += 2.0 * m * nn + 2.0 * m * m * n + 4.0 * m * n * k
            eig = EIGH_FLOP_FACTOR * m ** 3
    return Estimate(int(max(phases)), mm, eig)


def solve_of(rule: str, params) -> str:
    """The ``solve`` a merge of ``rule`` runs with ``params``: the parameter, else the rule's default
    (actmat: the papers' truncation; wudi: exact)."""
    if "solve" in params and params["solve"] is not None:
        return str(params["solve"])
    if rule == "actmat":
        from mergekit_ace.rules.actmat import DEFAULTS
    elif rule == "wudi":
        from mergekit_ace.rules.wudi import DEFAULTS
    else:
        return "exact"
    return DEFAULTS["solve"]


def _actmat(m, n, T, r, bd, bm, streamed, nn, mn, rn, gram_space=False, keep_start=False,
            truncated=False) -> Estimate:
    """ACTMat, and WUDI's closed form (``keep_start``: the task vectors' sum S outside A's range,
    a block of S and its projection, or the whole S on the wide route)."""
    start = mn * bd if keep_start else 0
    if T * m <= n:  # wide weight, A singular or nearly: the stacked task vectors' small Gram (actmat._actmat_wide)
        tm = T * m
        peak = start + max(tm * n * bd + tm * tm * bd * (1 + EIGH_COPIES) + n * tm * bd,  # X, K, eigh, Q
                           tm * n * bd + n * tm * bd + 3 * mn * bd)  # X, Q, N, W and a temporary
        mm = 2.0 * tm * tm * n * 2 + 2.0 * T * m * m * n + 4.0 * m * n * tm
        return Estimate(int(peak), mm, EIGH_FLOP_FACTOR * tm ** 3)
    kept = mn * bd if streamed else T * nn * bm  # N, or the C_t list
    grams = kept + nn * bm + nn * bd + 3 * rn * bm  # + the Gram being built + A
    if gram_space:
        grams = _output_gram_phase(m, n, bd, bm, nn, mn, rn)
    eig = kept + nn * bd + EIGH_COPIES * nn * bd + nn * bd  # A, eigh, kept eigenvectors
    apply = kept + nn * bd + (0 if streamed else mn * bd) + 5 * rn * bd + (2 * rn * bd if keep_start else 0)
    mm = _grams_and_products_flops(m, n, T, gram_space)  # Grams and numerator products
    if not streamed and m > T * n:
        mm += T * 2.0 * n * nn  # G_t = C_t A^+ once per expert (actmat: per_expert)
    else:
        mm += 2.0 * m * nn  # N A^+ row by row
    # With T m > n, A is invertible unless the experts' updates share a null space: its Cholesky
    # factor (n^3 / 3) and the conditioning estimate (precision.extreme_eigenvalues: 20 steps of
    # 4 probes, a product and two triangular solves each) are what runs (rules.actmat.range_solver);
    # a singular A takes an eigendecomposition instead, which the memory above allows for and the
    # flops leave out.
    mm += nn * n / 3.0 + 20 * 4 * 3 * 2.0 * nn
    # The truncated solve keeps eigenvalues above d_in eps_float32 lambda_max: fine-tune-like sums
    # have many below that, so the eigendecomposition is counted (rules.actmat.range_solver).
    return Estimate(int(max(grams, eig, apply)), mm, EIGH_FLOP_FACTOR * nn * n if truncated else 0.0)


def _wudi_adam(m, n, T, iterations) -> Estimate:
    """WUDI's Adam solver (``rules/wudi.py: wudi_adam``), float32: the T stacked task vectors, tau,
    its gradient, Adam's two moments and ~2 temporaries of its step, the residual tau - D_t, and
    the m x m product (d_out <= d_in) or the T d_in x d_in C_t (tall); then tau and the float64
    result. Per iteration 4 T m^2 n flops (wide) or 2 T m n^2 (tall, after 2 T m n^2 for the C_t)."""
    mn, b = m * n, 4
    inner = m * m if m <= n else T * n * n
    solve = (T * mn + 7 * mn + inner) * b
    result = mn * b + 2 * mn * 8  # tau, its float64 copy, W
    if m <= n:
        flops = iterations * T * 4.0 * m * m * n
    else:
        flops = T * 2.0 * m * n * n + iterations * T * 2.0 * m * n * n
    return Estimate(int(max(solve, result)), flops + iterations * 10.0 * mn, 0.0)


def _svd(p: int, q: int) -> float:
    """Flops of a thin SVD with both factors."""
    big, small = max(p, q), min(p, q)
    return SVD_FLOPS_MN2 * big * small * small + SVD_FLOPS_N3 * small ** 3


def _svd_rule(rule, m, n, T, r, bd, svd_route) -> Estimate:
    """TSV-M, Iso-C, Iso-CTS (``rules/tsv_m.py``, ``rules/iso.py``). Buffers: the task matrix or
    sum being decomposed (m n), the stacked bases U (m x <=min) and V (n x <=min), the result
    (m n), a decomposition's workspace, block temporaries. The full-SVD route's decomposition
    holds a copy of its input, U and V^T (~2 m n + min^2) plus LAPACK's workspace (~3 min^2) at
    once; the Gram route a Gram matrix and the eigensolver's copies (EIGH_COPIES + 1) min^2, and
    its polar factors are formed in place."""
    mn, g = m * n, min(m, n)
    gg = g * g
    stacked = (mn + gg) * bd  # U_hat (m x <=g) and V_hat (n x <=g); g <= n, g <= m
    blocks = 2 * r * n * bd
    if svd_route:
        decomposition = (2 * mn + 4 * gg) * bd
    else:
        decomposition = (EIGH_COPIES + 1) * gg * bd + m * g * bd
    # phase 1 (the matrix being decomposed, the bases filled so far, the decomposition) and the
    # last phase (bases, their polar factors' decompositions or the result).
    phase1 = mn * bd + (0 if rule == "iso_c" else stacked) + decomposition + blocks
    if rule == "iso_c":
        last = 2 * mn * bd + blocks + (mn * bd if svd_route else 0)  # the sum or P, the result
    else:
        polar = (2 * mn + 4 * gg) * bd if svd_route else (EIGH_COPIES + 2) * gg * bd
        last = max(stacked + polar, stacked + mn * bd) + blocks
    peak = int(max(phase1, last))
    k_common = int(0.8 * g)
    if svd_route:
        decompose = {"tsv_m": T * _svd(m, n) + _svd(m, g) + _svd(n, g),
                     "iso_c": _svd(m, n),
                     "iso_cts": (T + 1) * _svd(m, n) + _svd(m, g) + _svd(n, g)}[rule]
        products = {"tsv_m": 2.0 * mn * g + 2.0 * (m + n) * g * g,
                    "iso_c": 2.0 * mn * g,
                    "iso_cts": T * 4.0 * mn * k_common + 2.0 * mn * g}[rule]
    else:
        eig = EIGH_FLOP_FACTOR * g ** 3
        decompose = {"tsv_m": (T + 2) * eig, "iso_c": eig, "iso_cts": (T + 3) * eig}[rule]
        gram = mn * g  # one symmetric Gram
        products = {"tsv_m": T * (gram + 2.0 * mn * g / T) + 2 * ((m + n) * g * g + 2.0 * (m + n) * g * g)
                    + 2.0 * mn * g,
                    "iso_c": gram + 2.0 * mn * g + 2.0 * g ** 3,
                    "iso_cts": (T + 1) * gram + 2.0 * mn * k_common + T * 4.0 * mn * k_common
                    + 2 * ((m + n) * g * g + 2.0 * (m + n) * g * g) + 2.0 * mn * g}[rule]
    return Estimate(peak, products + T * mn, decompose)


def svd_rule_gram_route(rule: str, d_out: int, d_in: int, n_experts: int, row_chunk: int | None = None,
                        compute_bytes: int = 8) -> Estimate:
    """The estimate of an SVD rule when every decomposition takes the Gram route (for comparison
    with :func:`estimate`'s upper bound)."""
    m, n, T = int(d_out), int(d_in), int(n_experts)
    r = m if not row_chunk or row_chunk >= m else int(row_chunk)
    return _svd_rule(rule, m, n, T, r, compute_bytes, svd_route=False)


def average_estimate(shape, n_experts: int, compute_bytes: int = 8, out_bytes: int | None = None,
                     block_elements: int = AVERAGE_BLOCK_ELEMENTS) -> Estimate:
    """The experts' average (non-2-D weights, embeddings; ``task_vectors.average_task_vectors``): the
    result in the inputs' dtype (``out_bytes``, default ``compute_bytes``) plus one block of rows
    (about ``block_elements`` values) as base, accumulator and expert in ``compute_bytes``."""
    numel = math.prod(shape) if shape else 1
    per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
    block = min(numel, max(block_elements, per_row))
    result = numel * (out_bytes or compute_bytes)
    return Estimate(result + 3 * block * compute_bytes, float(n_experts * numel), 0.0)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"
