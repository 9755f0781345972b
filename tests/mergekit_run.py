"""Run the real ``mergekit-yaml`` of this environment on a config written from a dict."""

import sys
from pathlib import Path

import yaml

from mergekit_ace.execution import mergekit_yaml

BIN = Path(sys.executable).parent


def run_mergekit_yaml(config: dict, workdir: Path, out_name: str = "out", extra_args=()):
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / f"{out_name}.yml"
    cfg.write_text(yaml.safe_dump(config))
    out = workdir / out_name
    command = mergekit_yaml.mergekit_yaml_command(cfg, out, extra_args)
    proc, _seconds = mergekit_yaml.run_mergekit_yaml(command, timeout=600)  # output captured
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
