"""Run the real ``mergekit-yaml`` of this environment on a config written from a dict."""

import subprocess
import sys
from pathlib import Path

import yaml

BIN = Path(sys.executable).parent


def run_mergekit_yaml(config: dict, workdir: Path, out_name: str = "out", extra_args=()):
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / f"{out_name}.yml"
    cfg.write_text(yaml.safe_dump(config))
    out = workdir / out_name
    proc = subprocess.run(
        [str(BIN / "mergekit-yaml"), str(cfg), str(out), *extra_args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return proc, out


def config_for(method: str, paths: dict, parameters=None, dtype="float32", **extra):
    cfg = {
        "merge_method": method,
        "base_model": str(paths["base"]),
        "models": [{"model": str(p)} for k, p in paths.items() if k != "base"],
        "dtype": dtype,
    }
    if parameters:
        cfg["parameters"] = parameters
    cfg.update(extra)
    return cfg
