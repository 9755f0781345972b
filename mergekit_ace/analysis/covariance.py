r"""The covariance claim, tested where the truth is known.

ACE and ACTMat replace RegMean's input covariances by proxies built from the task vectors alone
(ACTMat: D_t^T D_t; ACE: the row-centred C_t^T C_t). Where the experts'
training data is at hand (the demo), the real thing can be measured, and each merge can be scored
by the objective both papers start from.

Per linear layer (weight ``W``, d_out x d_in) and task ``t``:

* ``G_t`` = X_t^T X_t / n_t, the second moment (uncentred covariance) of the layer's
  inputs over all ``n_t`` non-padding token positions of task t's data. The activations are the
  **expert t's own** (forward hooks on expert t, running task t's examples): the RegMean objective
  that ACE and ACTMat derive their closed forms from asks the merged layer to answer *the inputs
  expert t's layer sees* like expert t does, and ACTMat's Theorem 3.1 relates
  D_t^T D_t to the inputs seen during fine-tuning, which are the expert's (drifting
  from the base's). :func:`input_grams` can hook any model, so the base's inputs can be measured
  as well (the study reports the cosine for both). Dividing by ``n_t`` weighs every task the same
  whatever its examples' lengths.
* (a) :func:`frobenius_cosine` of the proxy and ``G_t``: <A, B>_F /
  (||A||_F ||B||_F); both are positive semi-definite, so it lies in [0, 1]. The identity's cosine
  with ``G_t`` (tr G_t / (sqrt(d_in) ||G_t||_F)) is the baseline: the cosine
  an isotropic guess, which needs no proxy at all, already gets.
* (b) :func:`regmean_objective`: L(W) = sum_t ||(W - W_t) X_t^T||_F^2 / n_t =
  sum_t tr((W - W_t) G_t (W - W_t)^T), reported relative to the experts' plain
  average's (the ``linear`` merge).
* (c) :func:`regmean_solution`: the minimiser of (b), W^* = (sum_t W_t G_t)(sum_t G_t)^-1,
  computed in the equivalent task-vector form W_0 + (sum_t D_t G_t)A^+, A = sum_t G_t,
  the pseudo-inverse from A's eigendecomposition keeping lambda > 1e-10 lambda_max
  (``REGMEAN_RTOL``; float64 products put rounding noise near 1e-16 lambda_max, of
  either sign). Where A is invertible the two forms are equal; where it is singular (inputs
  confined to a subspace) the task-vector form keeps the base in A's null space (the objective
  cannot see those directions) instead of zeroing it. Every merge's objective is at
  least L(W^*), and L(W) - L(W^*) = sum_t tr((W - W^*) G_t (W - W^*)^T).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

import torch

#: eigenvalues of sum_t G_t at or below this times the largest are null in :func:`regmean_solution`
REGMEAN_RTOL = 1e-10


# ------------------------------------------------------------------------------------ numbers
def frobenius_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """``<a, b>_F / (||a||_F ||b||_F)`` in float64; NaN where either is zero."""
    a, b = a.double(), b.double()
    na, nb = float(a.norm()), float(b.norm())
    if na == 0.0 or nb == 0.0:
        return float("nan")
    return float((a * b).sum()) / (na * nb)


def proxy_actmat(delta: torch.Tensor) -> torch.Tensor:
    """ACTMat's covariance proxy ``D^T D`` (d_in x d_in, float64)."""
    d = delta.double()
    return d.T @ d


def proxy_ace(delta: torch.Tensor) -> torch.Tensor:
    """ACE's proxy ``C^T C`` with ``C = D - 1 mu^T`` (rows centred: docs/methods.md, "ACE-Merging", step 2)."""
    c = delta.double()
    c = c - c.mean(dim=0, keepdim=True)
    return c.T @ c


def identity_cosine(gram: torch.Tensor) -> float:
    """Cosine between the identity and ``gram``: ``tr(G) / (sqrt(n) ||G||_F)``."""
    g = gram.double()
    return float(torch.trace(g)) / (math.sqrt(g.shape[0]) * float(g.norm()))


def regmean_objective(W: torch.Tensor, experts: Sequence[torch.Tensor], grams: Sequence[torch.Tensor]) -> float:
    """``sum_t tr((W - W_t) G_t (W - W_t)^T)`` in float64."""
    W = W.double()
    total = 0.0
    for Wt, G in zip(experts, grams):
        E = W - Wt.double()
        total += float(((E @ G.double()) * E).sum())
    return total


def regmean_solution(
    base: torch.Tensor, experts: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], rtol: float = REGMEAN_RTOL
) -> torch.Tensor:
    """RegMean with the given covariances: ``W_0 + (sum_t D_t G_t) A^+``, ``A = sum_t G_t``, its
    pseudo-inverse keeping the eigenvalues above ``rtol * lambda_max`` (see the module docstring),
    float64."""
    W0 = base.double()
    A = sum(G.double() for G in grams)
    N = sum((Wt.double() - W0) @ G.double() for Wt, G in zip(experts, grams))
    evals, Q = torch.linalg.eigh(0.5 * (A + A.T))
    keep = evals > rtol * float(evals.max())
    Q = Q[:, keep]
    return W0 + ((N @ Q) / evals[keep]) @ Q.T


# ------------------------------------------------------------------------------ activations
@contextmanager
def _hooks(model, names: Iterable[str] | None, store: dict[str, list], mask_box: list):
    """Forward pre-hooks on every ``nn.Linear`` (or those whose weight is in ``names``) that
    accumulate ``X^T X`` over the non-padding positions (``mask_box[0]``) into ``store``."""
    wanted = set(names) if names is not None else None
    handles = []
    # Layers that read the same tensor (q/k/v, gate/up) share one product per batch, taken and
    # accumulated in float64 (a float32 product's ~1e-7 relative error would swamp the eigenvalues
    # of a rank-deficient G_t, which the RegMean reference's ridge is far smaller than).
    # The cache holds each input tensor until the batch ends, so no later tensor can reuse its
    # memory and be mistaken for it.
    shared: dict[tuple[int, tuple, tuple], tuple[torch.Tensor, torch.Tensor, int]] = {}

    def make(weight_name):
        def hook(module, inputs):
            x = inputs[0]
            if mask_box[2] != mask_box[1]:  # a new batch
                shared.clear()
                mask_box[2] = mask_box[1]
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key not in shared or shared[key][0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1])
                mask = mask_box[0]
                if mask is not None:
                    flat = flat[mask.reshape(-1).bool()]
                flat = flat.double()
                shared[key] = (x, flat.T @ flat, flat.shape[0])
            _, gram, n = shared[key]
            entry = store.setdefault(weight_name, [torch.zeros(gram.shape, dtype=torch.float64), 0])
            entry[0] += gram
            entry[1] += n

        return hook

    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight_name = f"{module_name}.weight"
            if wanted is None or weight_name in wanted:
                handles.append(module.register_forward_pre_hook(make(weight_name)))
    try:
        yield
    finally:
        shared.clear()
        for h in handles:
            h.remove()


def input_grams(
    model, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], names: Iterable[str] | None = None
) -> dict[str, tuple[torch.Tensor, int]]:
    """``{weight name: (X^T X / n, n)}`` for every linear layer of ``model`` over ``batches`` of
    ``(input_ids, attention_mask)``; padding positions (mask 0) are left out. float64."""
    store: dict[str, list] = {}
    mask_box: list = [None, 0, -1]  # the batch's attention mask, its number, the cache's batch
    was_training = model.training
    model.eval()
    with torch.no_grad(), _hooks(model, names, store, mask_box):
        for number, (input_ids, attention_mask) in enumerate(batches):
            mask_box[0], mask_box[1] = attention_mask, number
            model(input_ids=input_ids, attention_mask=attention_mask)
    model.train(was_training)
    return {name: (g / max(1, n), n) for name, (g, n) in store.items()}


# ------------------------------------------------------------------------------- per layer
def analyse_layer(
    name: str,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    merges: Mapping[str, torch.Tensor],
    labels: Sequence[str],
    *,
    reference_label: str = "linear",
    base_grams: Sequence[torch.Tensor] | None = None,
) -> tuple[dict[str, object], torch.Tensor]:
    """Everything (a)-(c) for one weight: ``(row of plain numbers, W*)``. ``merges`` maps labels to merged weights
    and must hold ``reference_label`` (the experts' average) unless it is missing, in which case the average is
    computed here. ``base_grams`` (the base's inputs on each task) add a second cosine column."""
    W0 = base.double()
    deltas = [W.double() - W0 for W in experts]
    row: dict[str, object] = {"weight": name, "d_out": int(base.shape[0]), "d_in": int(base.shape[1])}
    for label, d, G in zip(labels, deltas, grams):
        row[f"cos_DtD_{label}"] = frobenius_cosine(proxy_actmat(d), G)
        row[f"cos_CtC_{label}"] = frobenius_cosine(proxy_ace(d), G)
        row[f"cos_I_{label}"] = identity_cosine(G)
    if base_grams is not None:
        for label, d, G in zip(labels, deltas, base_grams):
            row[f"cos_DtD_base_inputs_{label}"] = frobenius_cosine(proxy_actmat(d), G)
    W_star = regmean_solution(W0, experts, grams)
    average = merges.get(reference_label)
    if average is None:
        average = sum(W.double() for W in experts) / len(experts)
    L_avg = regmean_objective(average, experts, grams)
    L_star = regmean_objective(W_star, experts, grams)
    ref_size = float((W_star - W0).norm())
    row["objective_average"] = L_avg
    row["objective_regmean"] = L_star
    row["rel_objective_regmean"] = L_star / L_avg if L_avg > 0 else float("nan")
    for label, W in merges.items():
        L = regmean_objective(W, experts, grams)
        row[f"objective_{label}"] = L
        row[f"rel_objective_{label}"] = L / L_avg if L_avg > 0 else float("nan")
        row[f"dist_regmean_{label}"] = float((W.double() - W_star).norm()) / ref_size if ref_size > 0 else float("nan")
    return row, W_star


_LAYER = re.compile(r"\.(\d+)\.")


def weight_kind(name: str) -> str:
    """``model.layers.3.mlp.down_proj.weight`` -> ``mlp.down_proj``; ``lm_head.weight`` -> ``lm_head``."""
    return re.sub(r"^.*?\.\d+\.", "", name).replace(".weight", "")


def layer_index(name: str) -> int:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else -1


def aggregate(rows: Sequence[Mapping[str, object]], merge_labels: Sequence[str], expert_labels: Sequence[str]) -> dict:
    """Across layers: mean and median cosine per proxy and task; each merge's objective relative to
    the average as the ratio of the sums over layers and as the median of per-layer ratios; its
    median distance to the RegMean solution."""

    def stats(values):
        vals = sorted(v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
        if not vals:
            return {"mean": None, "median": None, "min": None, "max": None}
        mid = len(vals) // 2
        median = vals[mid] if len(vals) % 2 else 0.5 * (vals[mid - 1] + vals[mid])
        return {"mean": sum(vals) / len(vals), "median": median, "min": vals[0], "max": vals[-1]}

    out: dict[str, object] = {"layers": len(rows), "cosine": {}, "objective": {}, "distance_to_regmean": {}}
    for proxy in ("DtD", "CtC", "I", "DtD_base_inputs"):
        per_task = {t: stats([r.get(f"cos_{proxy}_{t}") for r in rows]) for t in expert_labels}
        if all(v["mean"] is None for v in per_task.values()):
            continue
        pooled = stats([r.get(f"cos_{proxy}_{t}") for r in rows for t in expert_labels])
        out["cosine"][proxy] = {"per_task": per_task, "all": pooled}
    total_avg = sum(float(r["objective_average"]) for r in rows)
    for label in ["regmean", *merge_labels]:
        total = sum(float(r[f"objective_{label}"]) for r in rows)
        out["objective"][label] = {
            "sum_ratio": total / total_avg if total_avg > 0 else None,
            "median_ratio": stats([r[f"rel_objective_{label}"] for r in rows])["median"],
        }
        if label != "regmean":
            out["distance_to_regmean"][label] = stats([r[f"dist_regmean_{label}"] for r in rows])["median"]
    return out
