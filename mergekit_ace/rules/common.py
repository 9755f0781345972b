"""Shared pieces of the two rules: input checks, errors, and the weights the rules leave alone."""

from __future__ import annotations

import math
import re
from typing import Hashable, Optional, Sequence, Tuple

import torch

from mergekit_ace.errors import MergeInputError  # noqa: F401  (raised here and by every rule)

#: Constant added in several of ACE's denominators and logarithms (METHODS.md: part of the rule).
TINY = 1e-12

#: Relative cutoff for rank decisions (pseudo-inverses): eigen/singular values below
#: ``PINV_RTOL * largest`` count as zero. Float64 Gram matrices of 1e5-row task vectors carry
#: relative noise around 1e-13; 1e-10 stays well above that and far below any direction a
#: merge could meaningfully use.
PINV_RTOL = 1e-10


def describe(name: Optional[str]) -> str:
    return repr(name) if name else "<unnamed tensor>"


def check_inputs(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    name: Optional[str] = None,
    ids: Optional[Sequence[Hashable]] = None,
    base_id: Optional[Hashable] = None,
    matrix_rule: Optional[str] = None,
) -> None:
    """Raise :class:`MergeInputError` unless base and experts are finite, same-shaped tensors and
    there is at least one expert (and, when ``matrix_rule`` names a rule, the weight is 2-D).
    Nothing is copied or modified."""
    where = describe(name)
    if base is None:
        raise MergeInputError(f"{where}: this rule needs a base model (task vectors are W_t - W_0)")
    if len(experts) == 0:
        raise MergeInputError(f"{where}: at least one expert (non-base model) is required")
    if matrix_rule is not None and base.ndim != 2:
        raise MergeInputError(f"{where}: {matrix_rule}'s rule applies to 2-D weights, got {tuple(base.shape)}")
    ids = list(ids) if ids is not None else [f"expert {i}" for i in range(len(experts))]
    base_label = base_id if base_id is not None else "base"
    for label, tensor in [(base_label, base), *zip(ids, experts)]:
        if tensor.shape != base.shape:
            raise MergeInputError(
                f"{where}: shape mismatch: model {label} has {tuple(tensor.shape)}, "
                f"base has {tuple(base.shape)}"
            )
        if tensor.is_floating_point() and not is_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise MergeInputError(
                f"{where}: model {label} has {bad} non-finite value(s) (NaN or Inf); "
                "refusing to merge it"
            )


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite. ``aminmax`` propagates NaN and shows infinities, and is
    ~30x faster than ``isfinite(...).all()`` on bfloat16 CPU tensors (measured)."""
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite_output(result: torch.Tensor, name: Optional[str], rule: str) -> torch.Tensor:
    if not is_finite(result):
        raise MergeInputError(
            f"{describe(name)}: the {rule} rule produced non-finite values; the inputs are "
            "numerically degenerate for this weight (check the experts' updates and epsilon)"
        )
    return result


# Input-embedding tensors: their "inputs" are one-hot token indicators, so a covariance proxy over
# the hidden dimension says nothing about them. Output heads (lm_head, embed_out) are ordinary
# linear layers and take the rule.
_OUTPUT_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output|score|classifier)(\.|$)")
_INPUT_EMBEDDING = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|embeddings|embedding|wpe"
    r"|position_embeddings|token_type_embeddings)(\.|$)"
)


def is_input_embedding(name: Optional[str], vocabulary_axis: Optional[int] = None) -> bool:
    """True for token/position embedding tables (by mergekit's vocabulary metadata or name)."""
    if not name:
        return False
    if _OUTPUT_HEAD.search(name):
        return False
    if vocabulary_axis is not None:
        return True
    return bool(_INPUT_EMBEDDING.search(name))


# --------------------------------------------------------------------------- scope
#: What a weight gets (docs/methods.md, "Scope"): the method's rule, the experts' average
#: ``W_0 + scale * mean_t D_t``, or the base's values unchanged.
RULE, AVERAGE, BASE = "rule", "average", "base"
#: Values of the ``scope`` parameter; ``default`` is the treatment without the parameter.
SCOPES = ("default", RULE, AVERAGE, BASE)


def weight_scope(
    name: Optional[str],
    shape: Sequence[int],
    scope: str = "default",
    *,
    merge_embeddings: bool = False,
    average_from_dim: int = 0,
    vocabulary_axis: Optional[int] = None,
) -> str:
    """Which of ``rule`` / ``average`` / ``base`` one weight takes.

    ``default``: the rule on 2-D weights except input embeddings (unless ``merge_embeddings``), the
    average on the rest. ``rule``: the rule on a 2-D weight (input embeddings included), the
    average on a weight of another rank (the rules are defined on matrices). ``average`` and
    ``base`` are taken as written. Afterwards a weight bound for the rule with any dimension
    ``>= average_from_dim`` (when that is > 0) is averaged instead: ACTMat's code scope,
    ``max(shape) < 20000`` for the rule (docs/methods.md, "Scope")."""
    if not isinstance(scope, str) or scope not in SCOPES:
        raise MergeInputError(
            f"{describe(name)}: parameter scope={scope!r} must be one of {', '.join(SCOPES)}"
        )
    if isinstance(average_from_dim, bool) or int(average_from_dim) != average_from_dim or average_from_dim < 0:
        raise MergeInputError(
            f"{describe(name)}: parameter average_from_dim={average_from_dim!r} must be an integer >= 0 "
            "(0 = off)"
        )
    if scope in (AVERAGE, BASE):
        return scope
    matrix = len(shape) == 2
    if scope == RULE:
        takes_rule = matrix
    else:
        takes_rule = matrix and (merge_embeddings or not is_input_embedding(name, vocabulary_axis))
    if takes_rule and average_from_dim > 0 and max(int(d) for d in shape) >= average_from_dim:
        takes_rule = False
    return RULE if takes_rule else AVERAGE


def task_vector(expert: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``D_t = W_t - W_0`` in ``dtype`` (a new tensor; inputs untouched)."""
    return expert.to(dtype) - base.to(dtype)


#: Values per block of rows in :func:`average_task_vectors` (32 MiB in float64).
AVERAGE_BLOCK_ELEMENTS = 1 << 22


def average_task_vectors(
    base: torch.Tensor, experts: Sequence[torch.Tensor], scale: float, dtype: torch.dtype,
    out_dtype: Optional[torch.dtype] = None, block_elements: int = AVERAGE_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """``W_0 + scale * mean_t D_t`` -- what both rules do for non-2-D weights and embeddings.

    Computed in ``dtype`` one block of rows (about ``block_elements`` values) at a time and written
    into a result of ``out_dtype`` (default ``dtype``), so a 128k-row embedding needs its result
    plus a few blocks, not T + 2 full-size ``dtype`` copies."""
    out = torch.empty(base.shape, dtype=out_dtype or dtype, device=base.device)
    as_rows = (lambda x: x.reshape(1)) if base.ndim == 0 else (lambda x: x)  # noqa: E731
    rows_out, rows_base, rows_experts = as_rows(out), as_rows(base), [as_rows(e) for e in experts]
    per_row = max(1, rows_base[0].numel())
    for rows in row_chunks(rows_base.shape[0], max(1, block_elements // per_row)):
        base_rows = rows_base[rows].to(dtype)
        acc = torch.zeros_like(base_rows)
        for expert in rows_experts:
            acc += expert[rows].to(dtype) - base_rows
        acc *= scale / len(experts)
        acc += base_rows
        rows_out[rows] = acc
    return out


def check_nonzero_task_vectors(
    traces: Sequence[float], name: Optional[str], ids: Optional[Sequence[Hashable]] = None
) -> None:
    """The rules divide by (or regress on) each expert's update: an all-zero update cannot take
    part. Raise naming the tensor and the expert."""
    ids = list(ids) if ids is not None else [f"expert {i}" for i in range(len(traces))]
    zero = [str(i) for i, tr in zip(ids, traces) if tr == 0.0]
    if zero:
        raise MergeInputError(
            f"{describe(name)}: expert(s) {', '.join(zero)} are identical to the base for this "
            "weight (zero task vector), so the covariance rule cannot use them; drop that expert "
            "or merge this weight with another method"
        )


def row_chunks(n_rows: int, chunk: Optional[int]):
    """Yield ``slice`` objects covering ``range(n_rows)`` in blocks of ``chunk`` rows."""
    step = n_rows if not chunk or chunk >= n_rows else max(1, int(chunk))
    for start in range(0, n_rows, step):
        yield slice(start, min(n_rows, start + step))


def cholesky_solve(B: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    r""":math:`M^{-1}B` with :math:`M = LL^T` (two triangular solves; faster than
    ``torch.cholesky_solve`` for few right-hand sides)."""
    return torch.linalg.solve_triangular(L.T, torch.linalg.solve_triangular(L, B, upper=False), upper=True)


def cholesky_right_solve(N: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    r""":math:`NM^{-1}` with :math:`M = LL^T`, for a block of rows N (two triangular solves from
    the right: :math:`ZL^T = N`, then :math:`XL = Z`)."""
    Z = torch.linalg.solve_triangular(L.T, N, upper=True, left=False)
    return torch.linalg.solve_triangular(L, Z, upper=False, left=False)


def _gram_edges(n: int):
    """Column blocks for :func:`add_gram_`: none below 512 columns, 256 up to 2048, else 512 wide
    (measured fastest here for 1B-7B widths)."""
    if n < 512:
        return [0, n]
    width = 256 if n <= 2048 else 512
    return list(range(0, n, width)) + [n]


def add_gram_(gram: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    r"""``gram += X^T X`` computing only the upper block triangle (the Gram is symmetric): ~40% fewer
    flops than ``X.T @ X`` for wide X. The strictly-lower blocks are left for
    :func:`symmetrize_gram_`, to be called once after the last block (several ``add_gram_`` calls
    may accumulate into one Gram before it)."""
    edges = _gram_edges(X.shape[1])
    for i in range(len(edges) - 1):
        a = slice(edges[i], edges[i + 1])
        for j in range(i, len(edges) - 1):
            b = slice(edges[j], edges[j + 1])
            gram[a, b].addmm_(X[:, a].T, X[:, b])
    return gram


def output_gram(X: torch.Tensor) -> torch.Tensor:
    r""":math:`XX^T` (rows x rows, symmetric), from the upper block triangle as :func:`add_gram_`."""
    gram = torch.zeros(X.shape[0], X.shape[0], dtype=X.dtype, device=X.device)
    return symmetrize_gram_(add_gram_(gram, X.T))


def add_left_product_(out: torch.Tensor, K: torch.Tensor, X: torch.Tensor, alpha: float = 1.0,
                      row_chunk: Optional[int] = None) -> torch.Tensor:
    """``out += alpha * K @ X``, one block of K's rows at a time (the product in X's dtype, summed in
    out's: one block-sized temporary when they differ)."""
    for rows in row_chunks(out.shape[0], row_chunk):
        if out.dtype == X.dtype:
            out[rows].addmm_(K[rows], X, alpha=alpha)
        else:
            prod = (K[rows] @ X).to(out.dtype)
            out[rows].add_(prod, alpha=alpha)
            del prod
    return out


def symmetrize_gram_(gram: torch.Tensor) -> torch.Tensor:
    """Fill the strictly-lower blocks of a Gram accumulated by :func:`add_gram_` from the upper ones."""
    edges = _gram_edges(gram.shape[0])
    for i in range(len(edges) - 1):
        a = slice(edges[i], edges[i + 1])
        for j in range(i + 1, len(edges) - 1):
            b = slice(edges[j], edges[j + 1])
            gram[b, a] = gram[a, b].T
    return gram


def accumulate_gram(block_fn, n_rows: int, n_cols: int, dtype, device, row_chunk: Optional[int] = None):
    r"""Stream :math:`D^T D` and the column sums of D over row blocks, ``block_fn(rows) -> D[rows]``
    (D is never materialised whole). Returns ``(gram, col_sum)``."""
    gram = torch.zeros(n_cols, n_cols, dtype=dtype, device=device)
    col_sum = torch.zeros(n_cols, dtype=dtype, device=device)
    for rows in row_chunks(n_rows, row_chunk):
        block = block_fn(rows)
        add_gram_(gram, block)
        col_sum += block.sum(dim=0)
        del block
    return symmetrize_gram_(gram), col_sum


# --------------------------------------------------------------------------- streaming helpers
#: Keep the experts' d_in x d_in proxies and stream row blocks of the task vectors through them
#: (extra memory ~ T d_in^2 + one block; best for tall matrices such as lm_head).
ROW_CHUNKED = "row_chunked"
#: Keep one proxy at a time and full-size numerator/residual accumulators (extra memory
#: ~ d_out d_in + 2 d_in^2; best for wide matrices such as down_proj, where T d_in^2 > d_out d_in).
EXPERT_STREAMED = "expert_streamed"
#: Keep one whole task vector at a time and its d_out x d_out Gram :math:`K_t = D_tD_t^T`: the products
#: :math:`D_tC_t = K_tD_t` (ACTMat) and :math:`D_t\tilde S_t` (ACE) run in the output space
#: (:math:`4d_{out}^2d_{in}` instead of :math:`2d_{out}d_{in}^2` flops per expert; the d_in x d_in sum of
#: the Grams is still formed, for the solve). Fewer flops where d_out < d_in / 2 (down_proj: 4096 x
#: 11008); extra memory ~ 2 d_out d_in + d_out^2 + d_in^2, no per-expert d_in x d_in proxy.
OUTPUT_GRAM = "output_gram"
STRATEGIES = (ROW_CHUNKED, EXPERT_STREAMED, OUTPUT_GRAM)
#: ACE only: row blocks as ``row_chunked``, but F = P + Res is not kept for the refinement; it is
#: recomputed block by block ((T+1) more products, one d_out x d_in buffer less: the least memory
#: for tall matrices).
ROW_RECOMPUTED = "row_recomputed"
ACE_STRATEGIES = STRATEGIES + (ROW_RECOMPUTED,)


def check_strategy(strategy: str, name: Optional[str], allowed: Sequence[str] = STRATEGIES) -> str:
    if strategy not in allowed:
        raise ValueError(f"{describe(name)}: unknown strategy {strategy!r}; expected one of {tuple(allowed)}")
    return strategy


class TaskVectors:
    r"""The task vectors :math:`D_t = W_t - W_0` of one weight, formed on demand one row block at a
    time in ``dtype`` (the precision of the matrix products); never all at once.

    ``row_chunk`` rows per block (``None``: the whole matrix is one block)."""

    def __init__(self, base: torch.Tensor, experts: Sequence[torch.Tensor], dtype: torch.dtype,
                 row_chunk: Optional[int] = None):
        self.base, self.experts, self.dtype, self.row_chunk = base, experts, dtype, row_chunk
        self.d_out, self.d_in = base.shape
        self.device = base.device

    def __len__(self) -> int:
        return len(self.experts)

    def chunks(self):
        return row_chunks(self.d_out, self.row_chunk)

    def block(self, t: int, rows: slice) -> torch.Tensor:
        """``D_t[rows]`` (one temporary of the block's size; the subtraction is done in ``dtype``)."""
        out = self.experts[t][rows].to(self.dtype, copy=True)
        out -= self.base[rows]
        return out

    def whole(self, t: int, mu: Optional[torch.Tensor] = None) -> torch.Tensor:
        r"""The whole :math:`D_t` (or :math:`C_t = D_t - \mathbf{1}\mu^T` with ``mu``) in ``dtype``."""
        D = self.block(t, slice(0, self.d_out))
        if mu is not None:
            D -= mu.to(self.dtype)
        return D

    def energies_and_means(self, dtype: torch.dtype, means: bool = True) -> Tuple[list, Optional[list]]:
        r"""One cheap pass: :math:`\|D_t\|_F^2` (python floats, accumulated in float64) and the row
        means :math:`\mu_t` (d_in vectors in ``dtype``) of every expert; ``means=False``: the
        energies only (``None`` for the means)."""
        traces, mus = [], []
        for t in range(len(self.experts)):
            energy = 0.0
            col_sum = torch.zeros(self.d_in, dtype=dtype, device=self.device) if means else None
            for rows in self.chunks():
                D = self.block(t, rows)
                energy += float(torch.linalg.vector_norm(D, dtype=torch.float64) ** 2)
                if means:
                    col_sum += D.sum(dim=0, dtype=dtype)
                del D
            traces.append(energy)
            if means:
                mus.append(col_sum / self.d_out)
        return traces, (mus if means else None)

    def gram(self, t: int, mu: Optional[torch.Tensor] = None) -> torch.Tensor:
        r""":math:`C_t^T C_t` with :math:`C_t = D_t - \mathbf{1}\mu^T` (uncentred :math:`D_t^TD_t` if ``mu``
        is None), accumulated over row blocks in ``dtype``. The blocks are centred before the
        product, so no cancellation between :math:`D^TD` and :math:`d_{out}\mu\mu^T`."""
        gram = torch.zeros(self.d_in, self.d_in, dtype=self.dtype, device=self.device)
        mu = None if mu is None else mu.to(self.dtype)
        for rows in self.chunks():
            D = self.block(t, rows)
            if mu is not None:
                D -= mu
            add_gram_(gram, D)
            del D
        return symmetrize_gram_(gram)

    def weighted_sum(self, rows: slice, weights: Sequence[float], dtype: torch.dtype,
                     mus: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        r""":math:`\sum_t w_t D_t[rows]` in ``dtype`` (centred rows :math:`D_t - \mu_t` if ``mus``)."""
        acc = torch.zeros(rows.stop - rows.start, self.d_in, dtype=dtype, device=self.device)
        for t, w in enumerate(weights):
            if w == 0.0:
                continue
            D = self.block(t, rows)
            if mus is not None:
                D -= mus[t].to(D.dtype)
            acc.add_(D, alpha=float(w))
            del D
        return acc

    def add_product(self, out: torch.Tensor, t: int, rows: slice, mat: torch.Tensor) -> torch.Tensor:
        """``out += D_t[rows] @ mat`` (the product in ``dtype``, accumulated in out's dtype)."""
        D = self.block(t, rows)
        if out.dtype == D.dtype == mat.dtype:  # accumulate in place, no temporary
            return out.addmm_(D, mat)
        prod = D @ mat
        del D
        out += prod
        return out

    def add_products(self, out: torch.Tensor, t: int, mat: torch.Tensor) -> torch.Tensor:
        """``out += D_t @ mat`` for the whole weight (out is d_out x d_in), one row block at a time."""
        for rows in self.chunks():
            self.add_product(out[rows], t, rows, mat)
        return out

    def matmul_accumulate(self, out: torch.Tensor, rows: slice, mats: Sequence[torch.Tensor]) -> torch.Tensor:
        r"""``out += \sum_t D_t[rows] @ mats[t]``."""
        for t, mat in enumerate(mats):
            self.add_product(out, t, rows, mat)
        return out


def check_parameter(name: Optional[str], parameter: str, value, *, low=None, high=None) -> None:
    """Refuse a parameter outside its range (or not finite), naming it and the tensor."""
    v = float(value)
    if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
        bounds = f"in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise MergeInputError(f"{describe(name)}: parameter {parameter}={value!r} must be finite and {bounds}")


# --------------------------------------------------------------------------- SVD-based rules
#: TSV-M, Iso-C and Iso-CTS decompose whole matrices (one task matrix, or the sum, at a time):
#: one strategy; ``row_chunk`` only sets the row blocks of their products.
WHOLE_MATRIX = "whole_matrix"
SVD_STRATEGIES = (WHOLE_MATRIX,)
