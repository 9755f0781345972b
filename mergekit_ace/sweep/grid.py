"""The sweep's grid and config: ``--grid`` parsed into typed values and checked against the merge
method's declared parameters, and each grid point applied to the mergekit config
(:func:`apply_point`), which mergekit then validates. Nothing here merges or scores."""

from __future__ import annotations

import copy
import itertools
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from mergekit_ace.errors import UserError

BASE_NAME = "base"
_NAME_RE = re.compile(r"[^A-Za-z0-9._+-]+")


# --------------------------------------------------------------------------- the grid
class _ScalarLoader(yaml.SafeLoader):
    """YAML's safe loader with YAML 1.2's floats and booleans: ``1e-5`` is a number, as a user
    means it (PyYAML's YAML 1.1 rules read a float without a dot as a string), and only
    ``true``/``false`` are booleans (YAML 1.1 also reads ``on``, ``off``, ``yes``, ``no`` so)."""


_ScalarLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ScalarLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ScalarLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """One grid value as a YAML scalar: ``1e-5`` -> 1e-05, ``3`` -> 3, ``true`` -> True,
    ``add`` -> ``"add"``."""
    try:
        value = yaml.load(text, Loader=_ScalarLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"--grid value {text!r} is not a YAML scalar ({problem})") from None
    if value is None or isinstance(value, (list, dict)):
        raise UserError(f"--grid value {text!r} must be a number, string or boolean")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"--grid value {text!r} is not finite")
    return value


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["epsilon=1e-5,1e-3", "tau=0.3"]`` -> ``{"epsilon": [1e-05, 0.001], "tau": [0.3]}``."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UserError(f"--grid {item!r}: expected NAME=VALUE[,VALUE...], e.g. epsilon=1e-5,1e-3")
        if key in grid:
            raise UserError(f"--grid {key!r} is given twice; list all its values in one --grid")
        parsed = [parse_value(v.strip()) for v in values.split(",")]
        seen: list[Any] = []
        for v in parsed:
            if any(type(v) is type(s) and v == s for s in seen):
                raise UserError(f"--grid {key!r}: value {format_value(v)} is given twice")
            seen.append(v)
        grid[key] = parsed
    if not grid:
        raise UserError("no grid given: use --grid NAME=VALUE[,VALUE...] (repeat for each parameter)")
    return grid


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination, the last key varying fastest (``itertools.product`` order)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def point_label(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in point.items())


# --------------------------------------------------------------------------- the config
def load_config(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UserError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(config, dict) or not config.get("merge_method"):
        raise UserError(f"config {path} is not a mergekit config (no merge_method)")
    return config


def method_spec(name: str):
    """The merge method's declared spec from mergekit's registry (this package's methods
    registered first)."""
    import mergekit.merge_methods as registry

    from mergekit_ace import register_methods

    register_methods()
    try:
        return registry.get(name).spec
    except RuntimeError:
        known = sorted(m.spec.name for m in registry.registered_methods())
        raise UserError(f"unknown merge_method {name!r}; mergekit knows {', '.join(known)}") from None


def check_grid(grid: Mapping[str, Sequence[Any]], spec) -> None:
    """Every key is a parameter the method declares, every value has the declared type."""
    declared = {p.name: p for p in spec.parameters}
    for key, values in grid.items():
        if key not in declared:
            names = ", ".join(sorted(declared)) or "none"
            raise UserError(f"--grid {key!r} is not a parameter of merge method {spec.name!r} "
                            f"(its parameters: {names})")
        for value in values:
            try:
                declared[key].validate(value)
            except Exception as error:
                first = str(error).strip().splitlines()
                reason = first[-1].strip() if first else type(error).__name__
                raise UserError(f"--grid {key}={format_value(value)}: not a valid value for "
                                f"{spec.name}'s {key!r} ({reason})") from None


def apply_point(config: Mapping[str, Any], point: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The config with each of the point's values in the global ``parameters:`` block, replacing
    whatever was there (a scalar or a filtered list), and removed from every per-model, per-slice
    or per-module ``parameters:`` block, so that the whole merge uses the grid's value. Returns the
    new config and the places a value was removed from (``models[0].parameters.epsilon``)."""
    out = copy.deepcopy(dict(config))
    removed: list[str] = []

    def strip(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in list(node.items()):
                if key == "parameters" and isinstance(value, dict):
                    for name in point:
                        if name in value:
                            removed.append(f"{where}.parameters.{name}")
                            del value[name]
                    if not value:
                        del node[key]
                else:
                    strip(value, f"{where}.{key}" if where else str(key))
        elif isinstance(node, list):
            for i, item in enumerate(node):
                strip(item, f"{where}[{i}]")

    for key, value in out.items():
        if key != "parameters":
            strip(value, str(key))
    parameters = dict(out.get("parameters") or {})
    parameters.update(point)
    out["parameters"] = parameters
    return out, removed


def validate_config(config: Mapping[str, Any], label: str):
    from mergekit.config import MergeConfiguration

    try:
        return MergeConfiguration.model_validate(copy.deepcopy(dict(config)))
    except Exception as error:
        message = " ".join(str(error).split())
        raise UserError(f"the config with {label} is not a valid mergekit config: {message[:400]}") from None


def reference_models(merge_config) -> tuple[dict[str, str], str | None, dict[str, str]]:
    """``({name: path}, base name, {path as written: name})`` for the models the config merges:
    the base is ``base``, each other model is named after its directory (``expert-math``)."""
    models: dict[str, str] = {}
    aliases: dict[str, str] = {}
    base = None
    refs = list(merge_config.referenced_models())
    ordered = ([merge_config.base_model] if merge_config.base_model else []) + sorted(
        (r for r in refs if r != merge_config.base_model), key=str)
    for ref in ordered:
        if ref.lora is not None:
            raise UserError(f"model {ref} has a LoRA adapter; scoring the references needs plain models")
        path = ref.model.path
        if ref == merge_config.base_model:
            name = BASE_NAME
            base = name
        else:
            stem = _NAME_RE.sub("_", Path(path.rstrip("/")).name).strip("._") or "expert"
            name, n = stem, 2
            while name in models or name == BASE_NAME:
                name, n = f"{stem}-{n}", n + 1
        models[name] = path
        aliases[str(ref)] = name
        aliases[path] = name
    return models, base, aliases
