"""Task vectors D_t = W_t - W_0, formed one row block at a time, and the streaming strategies
the rules use to keep their working memory small (docs/execution.md, "Strategies")."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergekit_ace.rules.checks import describe
from mergekit_ace.rules.linalg import add_gram_, row_chunks, symmetrize_gram_


def task_vector(expert: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``D_t = W_t - W_0`` in ``dtype`` (a new tensor; inputs untouched)."""
    return expert.to(dtype) - base.to(dtype)


#: Values per block of rows in :func:`average_task_vectors` (32 MiB in float64).
AVERAGE_BLOCK_ELEMENTS = 1 << 22


def average_task_vectors(
    base: torch.Tensor, experts: Sequence[torch.Tensor], scale: float, dtype: torch.dtype,
    out_dtype: torch.dtype | None = None, block_elements: int = AVERAGE_BLOCK_ELEMENTS,
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


# --------------------------------------------------------------------------- streaming helpers
#: Keep the experts' d_in x d_in proxies and stream row blocks of the task vectors through them
#: (extra memory ~ T d_in^2 + one block; best for tall matrices such as lm_head).
ROW_CHUNKED = "row_chunked"
#: Keep one proxy at a time and full-size numerator/residual accumulators (extra memory
#: ~ d_out d_in + 2 d_in^2; best for wide matrices such as down_proj, where T d_in^2 > d_out d_in).
EXPERT_STREAMED = "expert_streamed"
#: Keep one whole task vector at a time and its d_out x d_out Gram K_t = D_tD_t^T: the products
#: D_tC_t = K_tD_t (ACTMat) and D_t S~_t (ACE) run in the output space
#: (4d_out^2d_in instead of 2d_outd_in^2 flops per expert; the d_in x d_in sum of
#: the Grams is still formed, for the solve). Fewer flops where d_out < d_in / 2 (down_proj: 4096 x
#: 11008); extra memory ~ 2 d_out d_in + d_out^2 + d_in^2, no per-expert d_in x d_in proxy.
OUTPUT_GRAM = "output_gram"
STRATEGIES = (ROW_CHUNKED, EXPERT_STREAMED, OUTPUT_GRAM)
#: ACE only: row blocks as ``row_chunked``, but F = P + Res is not kept for the refinement; it is
#: recomputed block by block ((T+1) more products, one d_out x d_in buffer less: the least memory
#: for tall matrices).
ROW_RECOMPUTED = "row_recomputed"
ACE_STRATEGIES = STRATEGIES + (ROW_RECOMPUTED,)


def check_strategy(strategy: str, name: str | None, allowed: Sequence[str] = STRATEGIES) -> str:
    if strategy not in allowed:
        raise ValueError(f"{describe(name)}: unknown strategy {strategy!r}; expected one of {tuple(allowed)}")
    return strategy


class TaskVectors:
    """The task vectors D_t = W_t - W_0 of one weight, formed on demand one row block at a
    time in ``dtype`` (the precision of the matrix products); never all at once.

    ``row_chunk`` rows per block (``None``: the whole matrix is one block)."""

    def __init__(self, base: torch.Tensor, experts: Sequence[torch.Tensor], dtype: torch.dtype,
                 row_chunk: int | None = None):
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

    def whole(self, t: int, mu: torch.Tensor | None = None) -> torch.Tensor:
        """The whole D_t (or C_t = D_t - 1 mu^T with ``mu``) in ``dtype``."""
        D = self.block(t, slice(0, self.d_out))
        if mu is not None:
            D -= mu.to(self.dtype)
        return D

    def energies_and_means(self, dtype: torch.dtype, means: bool = True) -> tuple[list, list | None]:
        """One cheap pass: ||D_t||_F^2 (python floats, accumulated in float64) and the row
        means mu_t (d_in vectors in ``dtype``) of every expert; ``means=False``: the
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

    def gram(self, t: int, mu: torch.Tensor | None = None) -> torch.Tensor:
        """C_t^T C_t with C_t = D_t - 1 mu^T (uncentred D_t^TD_t if ``mu``
        is None), accumulated over row blocks in ``dtype``. The blocks are centred before the
        product, so no cancellation between D^TD and d_out mu mu^T."""
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
                     mus: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """sum_t w_t D_t[rows] in ``dtype`` (centred rows D_t - mu_t if ``mus``)."""
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
        """``out += sum_t D_t[rows] @ mats[t]``."""
        for t, mat in enumerate(mats):
            self.add_product(out, t, rows, mat)
        return out


# --------------------------------------------------------------------------- SVD-based rules
#: TSV-M, Iso-C and Iso-CTS decompose whole matrices (one task matrix, or the sum, at a time):
#: one strategy; ``row_chunk`` only sets the row blocks of their products.
WHOLE_MATRIX = "whole_matrix"
SVD_STRATEGIES = (WHOLE_MATRIX,)
