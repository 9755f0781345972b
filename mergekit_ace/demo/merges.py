"""Merge the demo's experts every way through ``mergekit-yaml`` (a subprocess, exactly as a user
would run it), from a list of methods that is plain data.

Each entry of :data:`METHODS` is ``(label, merge_method, global parameters, per-model parameters)``.
The choices are the values a user would write, taken from the papers' defaults:

* ``linear``: the experts' plain average (weight 1.0 each, mergekit normalises the weights).
* ``task_arithmetic``: base + lambda * sum of task vectors with lambda = 0.3 per expert, the scaling
  used as the default Task Arithmetic baseline in the merging literature (FusionBench, TIES, TSV);
  with three experts it sits close to averaging, as in the ACE paper's Table 8.
* ``ties``: TIES with density 0.5 (keep the top half of each task vector by magnitude), weight 1.0,
  sign election and disjoint mean (mergekit's ``normalize: true``), the TIES paper's lambda = 1.
* ``ace``: ACE-Merging with the paper's defaults (epsilon 1e-5, tau 0.3, k_frac 0.3, scale 1).
* ``actmat``: ACTMat, data-free form, scale 1 (it has no hyper-parameters).
* ``tsv_m``: TSV-M with the per-task rank budget 1/T and alpha = 1 (fusion-bench's default; the
  authors pick alpha on validation data, which a data-free comparison does not have).
* ``iso_c``, ``iso_cts``: isotropic merging, alpha = 1 (likewise), Iso-CTS with the paper's
  common-subspace fraction 0.8.
* ``ace-refine-none``: ACE at the setting the study recommends (``refinement: none``).
* ``wudi``: WUDI-Merging with its defaults (closed form). A method the installed mergekit-ace does
  not register is skipped, and the demo says so (``study.available_variants``).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from mergekit_ace.execution.mergekit_yaml import mergekit_yaml_command, run_mergekit_yaml, subprocess_env

MethodSpec = tuple[str, str, dict[str, object], dict[str, object]]

METHODS: list[MethodSpec] = [
    ("linear", "linear", {"normalize": True}, {"weight": 1.0}),
    ("task_arithmetic", "task_arithmetic", {}, {"weight": 0.3}),
    ("ties", "ties", {"normalize": True}, {"density": 0.5, "weight": 1.0}),
    ("ace", "ace", {"epsilon": 1e-5, "tau": 0.3, "k_frac": 0.3, "scale": 1.0}, {}),
    ("actmat", "actmat", {"scale": 1.0}, {}),
    ("tsv_m", "tsv_m", {"alpha": 1.0}, {}),
    ("iso_c", "iso_c", {"alpha": 1.0}, {}),
    ("iso_cts", "iso_cts", {"alpha": 1.0, "common_space_fraction": 0.8}, {}),
    # ACE at the setting the study recommends (README, "What the study says"): no refinement.
    ("ace-refine-none", "ace", {"epsilon": 1e-5, "tau": 0.3, "k_frac": 0.3, "scale": 1.0, "refinement": "none"}, {}),
    ("wudi", "wudi", {}, {}),  # WUDI-Merging, closed form (skipped where the method is not installed)
]

#: The methods this package adds (they need it pip-installed where mergekit-yaml runs).
OURS = {"ace", "actmat", "tsv_m", "iso_c", "iso_cts"}

# merge methods that take no base model (mergekit would otherwise count the base as an input)
_NO_BASE = {"linear"}


def merge_config(method: MethodSpec, base: Path, experts: Sequence[Path], dtype: str = "float32") -> dict:
    """The mergekit YAML (as a dict) for one method. Paths are made absolute: mergekit treats a
    relative path as a possible Hugging Face Hub id and asks the Hub about it."""
    _, merge_method, global_params, model_params = method
    models = []
    for path in experts:
        entry: dict[str, object] = {"model": str(Path(path).resolve())}
        if model_params:
            entry["parameters"] = dict(model_params)
        models.append(entry)
    config: dict[str, object] = {"merge_method": merge_method, "models": models, "dtype": dtype}
    if merge_method not in _NO_BASE:  # (linear copies the first expert's tokenizer: the same one)
        config["base_model"] = str(Path(base).resolve())
    if global_params:
        config["parameters"] = dict(global_params)
    return config


def run_merge_in_process(config_path: Path, target: Path) -> None:
    """What ``mergekit-yaml <config> <target> --quiet --copy-tokenizer`` does, in this process
    (mergekit's own ``run_merge`` on the same YAML): no interpreter start and no import of torch
    and mergekit per merge. The methods this package adds must be registered in this process."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mergekit_run_merge
    from mergekit.options import MergeOptions

    import mergekit_ace

    mergekit_ace.register_methods()
    source = Path(config_path).read_text()
    config = MergeConfiguration.model_validate(yaml.safe_load(source))
    mergekit_run_merge(config, str(target), options=MergeOptions(quiet=True, copy_tokenizer=True),
                       config_source=source)


def run_merge(method: MethodSpec, base: Path, experts: Sequence[Path], out_dir: Path, log=print,
              in_process: bool = False, dtype: str = "float32") -> tuple[Path, float]:
    """Write ``<out_dir>/<label>.yaml`` (mergekit ``dtype: <dtype>``) and run ``mergekit-yaml`` on it
    into ``<out_dir>/<label>`` (a subprocess, or mergekit's ``run_merge`` in this process with
    ``in_process``).
    Return the merged model's path and the wall time of the merge."""
    from mergekit_ace.errors import UserError

    label = method[0]
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / f"{label}.yaml"
    config_path.write_text(yaml.safe_dump(merge_config(method, base, experts, dtype=dtype), sort_keys=False))
    target = out_dir / label
    if target.exists():
        shutil.rmtree(target)
    if in_process:
        start = time.time()
        try:
            run_merge_in_process(config_path, target)
        except Exception as error:
            raise UserError(f"mergekit's run_merge failed for {label}: {type(error).__name__}: {error}") from error
        elapsed = time.time() - start
        if not (target / "config.json").exists():
            raise UserError(f"mergekit's run_merge wrote no model for {label}")
        log(f"  merged {label:<20} {elapsed:5.1f}s  -> {target}")
        return target, elapsed
    command = mergekit_yaml_command(config_path, target, ["--quiet", "--copy-tokenizer"])
    proc, elapsed = run_mergekit_yaml(command, env=subprocess_env())
    if proc.returncode != 0 or not (target / "config.json").exists():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        hint = ""
        if method[1] in OURS:
            hint = (
                f"\n({method[1]} exists for mergekit-yaml only once mergekit-ace is pip-installed into the "
                "same environment: pip install --no-deps --force-reinstall <mergekit-ace checkout>)"
            )
        raise UserError(f"mergekit-yaml failed for {label} (exit {proc.returncode}):\n{tail}{hint}")
    log(f"  merged {label:<16} {elapsed:5.1f}s  -> {target}")
    return target, elapsed


def run_all_merges(
    base: Path,
    experts: Mapping[str, Path],
    out_dir: Path,
    methods: Sequence[MethodSpec] = METHODS,
    jobs: int | None = None,
    log=print,
    in_process: bool = False,
    dtype: str = "float32",
) -> dict[str, dict[str, object]]:
    """Run every method (``jobs`` mergekit-yaml processes at a time, default: the number of CPU
    cores, at most 4: each one spends most of its few seconds importing torch and mergekit; with
    ``in_process``, one after the other in this process).
    Return ``{label: {"path": Path, "seconds": float, "config": Path}}`` in ``methods`` order."""
    from concurrent.futures import ThreadPoolExecutor

    expert_paths = [Path(experts[name]) for name in experts]
    if in_process:
        done = [(m, run_merge(m, base, expert_paths, out_dir, log, in_process=True, dtype=dtype)) for m in methods]
        return {
            m[0]: {"path": path, "seconds": seconds, "config": Path(out_dir).resolve() / f"{m[0]}.yaml"}
            for m, (path, seconds) in done
        }
    jobs = jobs or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [(m, pool.submit(run_merge, m, base, expert_paths, out_dir, log, False, dtype)) for m in methods]
        done = [(m, f.result()) for m, f in futures]
    return {
        m[0]: {"path": path, "seconds": seconds, "config": Path(out_dir).resolve() / f"{m[0]}.yaml"}
        for m, (path, seconds) in done
    }
