"""``mergekit-ace inspect``: what ACE and ACTMat see in a base and its experts, weight by weight.

No merge is written. For every weight (one weight of every model in memory at a time, read lazily
through mergekit's loaders, so 7B checkpoints work on a CPU):

- ``norm_<expert>``: the task vector's Frobenius norm ``||D_t||_F``;
- ``gamma`` and ``branch``: ACE's heterogeneity statistic (Eq. 7) and the branch it selects;
- ``eps_over_s_<expert>``: the ridge ``epsilon / s_t`` of the heterogeneous branch (docs/methods.md,
  "Limits the tests check": a small ``s_t`` makes the refinement blow up, as a large epsilon does);
- ``top5_energy_pre`` / ``top5_energy_post``: share of squared singular values of ACE's merged task
  vector held by the top 5% of singular values, before and after the spectral refinement (the
  paper's Fig. 2 observation: > 99% before, flatter after);
- ``cov_alignment_min`` / ``cov_alignment_mean``: cosine between the experts' ACTMat covariance
  estimates ``D_t^T D_t`` (ACTMat assumes them nearly aligned up to scale);
- ``sensitivity_ace`` / ``sensitivity_actmat``: how far the exact (float64) merge moves when the
  checkpoints' values move by their storage rounding, in units of the rounding error of storing the
  merged weight in the output dtype (``rules.sensitivity.storage_sensitivity``; docs/methods.md,
  "Sensitivity to the checkpoints' rounding"). Information, not an alarm: 10 means the inputs fix
  the exact answer only to ~10x its own storage rounding. Costs about two merges per weight per
  rule (``--no-sensitivity`` skips it).

Writes ``inspect.csv``, ``inspect.json``, ``gamma_per_layer.png`` (Fig. 1) and
``spectrum_<weight>.png`` (Fig. 2) for the chosen weight.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from mergekit_ace.rules.ace import DEFAULTS as ACE_DEFAULTS
from mergekit_ace.rules.ace import ace_merge
from mergekit_ace.rules.actmat import actmat_merge, covariance_alignment
from mergekit_ace.rules.scope import is_input_embedding
from mergekit_ace.rules.sensitivity import resolve_dtype, storage_sensitivity

#: Perturbed merges per weight and rule for the sensitivity columns (``--sensitivity-samples``).
SENSITIVITY_SAMPLES = 1


def top_energy_share(matrix: torch.Tensor, fraction: float = 0.05) -> float:
    """Share of ``sum sigma_i^2`` held by the top ``ceil(fraction * rank_max)`` singular values."""
    sigma = torch.linalg.svdvals(matrix.double())
    k = max(1, math.ceil(fraction * sigma.numel()))
    energy = sigma.square()
    total = float(energy.sum())
    return float(energy[:k].sum()) / total if total > 0 else float("nan")


def inspect_weight(
    name: str,
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    labels: Sequence[str],
    *,
    epsilon: float = ACE_DEFAULTS["epsilon"],
    tau: float = ACE_DEFAULTS["tau"],
    k_frac: float = ACE_DEFAULTS["k_frac"],
    spectra: bool = True,
    sensitivity: bool = True,
    output_dtype: torch.dtype | None = None,
    sensitivity_samples: int = SENSITIVITY_SAMPLES,
) -> dict[str, object]:
    """All diagnostics of one 2-D weight (see the module docstring); plain Python values.

    The sensitivity columns take each tensor's own dtype as its storage format and ``output_dtype``
    (None: the base's dtype) as the merged weight's."""
    deltas = [e.double() - base.double() for e in experts]
    row: dict[str, object] = {"weight": name, "d_out": base.shape[0], "d_in": base.shape[1]}
    for label, d in zip(labels, deltas):
        row[f"norm_{label}"] = float(d.norm())
    if any(float(d.norm()) == 0.0 for d in deltas):
        row["branch"] = "zero task vector"
        return row
    refined, diag = ace_merge(base, experts, epsilon=epsilon, tau=tau, k_frac=k_frac, return_diagnostics=True)
    row["gamma"] = diag.gamma
    row["branch"] = "heterogeneous" if diag.heterogeneous else "homogeneous"
    for label, value in zip(labels, diag.eps_over_s):
        row[f"eps_over_s_{label}"] = value
    if spectra:
        pre = ace_merge(base, experts, epsilon=epsilon, tau=tau, k_frac=0.0) - base.double()
        row["top5_energy_pre"] = top_energy_share(pre)
        row["top5_energy_post"] = top_energy_share(refined - base.double())
    if len(deltas) > 1:
        cos = covariance_alignment(deltas)
        off = cos[~torch.eye(len(deltas), dtype=torch.bool)]
        row["cov_alignment_min"] = float(off.min())
        row["cov_alignment_mean"] = float(off.mean())
    if sensitivity:
        common = dict(output_dtype=output_dtype, samples=sensitivity_samples)
        row["sensitivity_ace"] = storage_sensitivity(
            ace_merge, base, experts, merged=refined, epsilon=epsilon, tau=tau, k_frac=k_frac, **common).value
        row["sensitivity_actmat"] = storage_sensitivity(actmat_merge, base, experts, **common).value
    return row


def _loader(path: str):
    from mergekit.common import ModelReference

    return ModelReference.parse(path).lazy_loader(lazy_unpickle=True)


def _label(path: str, taken: set) -> str:
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(path.rstrip("/")).name) or "expert"
    while label in taken:
        label += "_"
    taken.add(label)
    return label


_LAYER = re.compile(r"\.(\d+)\.")


def inspect_models(
    base: str,
    experts: Sequence[str],
    output: Path,
    *,
    epsilon: float = ACE_DEFAULTS["epsilon"],
    tau: float = ACE_DEFAULTS["tau"],
    k_frac: float = ACE_DEFAULTS["k_frac"],
    weights: str | None = None,
    spectra: bool = True,
    spectrum_weight: str | None = None,
    sensitivity: bool = True,
    output_dtype: str | None = None,
    sensitivity_samples: int = SENSITIVITY_SAMPLES,
) -> list[dict[str, object]]:
    """Inspect every 2-D weight (matching ``weights``, a regex) and write the CSV/JSON/plots.

    ``output_dtype``: the dtype the merged weights would be stored in, for the sensitivity columns
    (None: each base tensor's dtype)."""
    from mergekit_ace.errors import UserError
    from mergekit_ace.execution.hub_headers import is_hub_repo_id

    out_dtype = None
    if output_dtype is not None:
        try:
            out_dtype = resolve_dtype(output_dtype, "--dtype")
        except ValueError as error:
            raise UserError(str(error)) from error
    if sensitivity and (not isinstance(sensitivity_samples, int) or sensitivity_samples < 1):
        raise UserError(f"--sensitivity-samples must be a positive integer, got {sensitivity_samples!r}")

    for path in [base, *experts]:  # as mergekit: an existing path is local, else a Hub id (org/name@revision)
        if not Path(path).exists() and not is_hub_repo_id(path.split("+")[0].split("@")[0]):
            raise UserError(f"model directory not found (and not a Hub repo id): {path}")
    try:
        base_loader = _loader(base)
        expert_loaders = [_loader(p) for p in experts]
    except Exception as error:  # a missing Hub repo or a directory without weights
        raise UserError(f"cannot open the models' weights: {error}") from error
    taken: set = set()
    labels = [_label(p, taken) for p in experts]
    pattern = re.compile(weights) if weights else None
    rows: list[dict[str, object]] = []
    names = sorted(base_loader.index.tensor_paths, key=_natural_key)
    for name in names:
        if pattern is not None and not pattern.search(name):
            continue
        W0 = base_loader.get_tensor(name)
        if W0.ndim != 2 or not W0.is_floating_point() or is_input_embedding(name):
            continue
        Ws = []
        for label, loader in zip(labels, expert_loaders):
            W = loader.get_tensor(name, raise_on_missing=False)
            if W is None:
                raise UserError(f"expert {label} has no tensor {name!r}")
            if W.shape != W0.shape:
                raise UserError(f"{name!r}: expert {label} has shape {tuple(W.shape)}, base {tuple(W0.shape)}")
            Ws.append(W)
        if sensitivity:
            for label, tensor in (("base", W0), *zip(labels, Ws)):
                try:
                    resolve_dtype(tensor.dtype)
                except ValueError:
                    raise UserError(f"{name!r}: {label} is stored as {tensor.dtype}, which has no rounding model "
                                    "for the sensitivity columns; pass --no-sensitivity") from None
        rows.append(inspect_weight(name, W0, Ws, labels, epsilon=epsilon, tau=tau, k_frac=k_frac, spectra=spectra,
                                   sensitivity=sensitivity, output_dtype=out_dtype,
                                   sensitivity_samples=sensitivity_samples))
        del W0, Ws
    if not rows:
        raise UserError("no 2-D weights matched" + (f" --weights {weights!r}" if weights else ""))
    extra = {"sensitivity": {"output_dtype": output_dtype or "the base's dtype", "samples": sensitivity_samples}
             } if sensitivity else {}
    write_outputs(rows, output, base, experts, labels, spectrum_weight, extra_meta=extra,
                  epsilon=epsilon, tau=tau, k_frac=k_frac)
    return rows


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def write_outputs(rows, output: Path, base, experts, labels, spectrum_weight, extra_meta=None, **params) -> None:
    output.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    with open(output / "inspect.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    meta = {"base": base, "experts": dict(zip(labels, experts)), "parameters": params, **(extra_meta or {})}
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    (output / "inspect.json").write_text(json.dumps({"meta": meta, "weights": clean}, indent=1))
    _plot_gamma(rows, output / "gamma_per_layer.png", params["tau"])
    chosen = spectrum_weight or _default_spectrum_weight(rows)
    if chosen is not None:
        _plot_spectrum(chosen, base, experts, output, params)


def _default_spectrum_weight(rows) -> str | None:
    het = [r["weight"] for r in rows if r.get("branch") == "heterogeneous"]
    return het[0] if het else (rows[0]["weight"] if rows else None)


def _plot_gamma(rows, path: Path, tau: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_kind: dict[str, list] = {}
    for r in rows:
        if r.get("gamma") is None or (isinstance(r.get("gamma"), float) and math.isnan(r["gamma"])):
            continue
        m = _LAYER.search(r["weight"])
        layer = int(m.group(1)) if m else -1
        kind = re.sub(r"^.*?\.\d+\.", "", r["weight"]).replace(".weight", "")
        by_kind.setdefault(kind, []).append((layer, r["gamma"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    for kind, pts in sorted(by_kind.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=kind)
    ax.axhline(tau, color="k", ls="--", lw=1, label=f"tau = {tau}")
    ax.set_xlabel("layer (-1: outside the layer stack)")
    ax.set_ylabel("gamma (heterogeneity)")
    ax.set_title("ACE heterogeneity per weight")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_spectrum(name: str, base: str, experts, output: Path, params) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    W0 = _loader(base).get_tensor(name)
    Ws = [_loader(p).get_tensor(name) for p in experts]
    refined = ace_merge(W0, Ws, **params) - W0.double()
    pre = ace_merge(W0, Ws, epsilon=params["epsilon"], tau=params["tau"], k_frac=0.0) - W0.double()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, m in (("preliminary P (before refinement)", pre), ("final (after refinement)", refined)):
        sigma = torch.linalg.svdvals(m)
        ax.semilogy(range(1, sigma.numel() + 1), sigma.clamp_min(1e-30).numpy(), label=label)
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(f"ACE merged task vector spectrum\n{name}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(output / f"spectrum_{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.epilog = ("A Hub id (org/name, org/name@revision) is downloaded whole into the Hugging Face cache "
                     "before any weight is inspected, as mergekit does: its *.safetensors (*.bin where it has "
                     "no safetensors), *.json and tokenizer.model; gated repos need HF_TOKEN. For memory and "
                     "time without downloading weights, see `mergekit-ace plan` (safetensors headers only).")
    parser.add_argument("--base", required=True,
                        help="base model: local directory or Hub id (a Hub id's weights are downloaded, see below)")
    parser.add_argument("--expert", action="append", required=True,
                        help="an expert, local directory or Hub id (repeat for each)")
    parser.add_argument("--output", default="inspect-output", help="directory for CSV/JSON/plots")
    parser.add_argument("--epsilon", type=float, default=ACE_DEFAULTS["epsilon"])
    parser.add_argument("--tau", type=float, default=ACE_DEFAULTS["tau"])
    parser.add_argument("--k-frac", type=float, default=ACE_DEFAULTS["k_frac"])
    parser.add_argument("--weights", help="regex: inspect only matching weight names")
    parser.add_argument("--no-spectra", action="store_true",
                        help="skip the singular-value statistics (the expensive part on large models)")
    parser.add_argument("--spectrum-weight",
                        help="weight for the singular spectrum plot (default: first heterogeneous)")
    parser.add_argument("--no-sensitivity", action="store_true",
                        help="skip the sensitivity_ace / sensitivity_actmat columns (about two merges per weight "
                             "and rule)")
    parser.add_argument("--dtype", default=None,
                        help="dtype the merged weights would be stored in (bfloat16, float16, float32, float64), "
                             "the unit of the sensitivity columns; default: the base's dtype")
    parser.add_argument("--sensitivity-samples", type=int, default=SENSITIVITY_SAMPLES,
                        help="random rounding-like perturbations per weight and rule (default %(default)s)")


def run(args) -> int:
    rows = inspect_models(
        args.base,
        args.expert,
        Path(args.output),
        epsilon=args.epsilon,
        tau=args.tau,
        k_frac=args.k_frac,
        weights=args.weights,
        spectra=not args.no_spectra,
        spectrum_weight=args.spectrum_weight,
        sensitivity=not args.no_sensitivity,
        output_dtype=args.dtype,
        sensitivity_samples=args.sensitivity_samples,
    )
    het = sum(r.get("branch") == "heterogeneous" for r in rows)
    print(f"{len(rows)} weights inspected ({het} heterogeneous); wrote {args.output}/inspect.csv, inspect.json, plots")
    return 0
