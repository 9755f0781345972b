"""A tiny merge that runs anywhere in seconds.

Writes a tiny Llama base and three experts under OUT (default examples/tiny/models/) and, next to
them, ``ace-tiny.yml`` and ``actmat-tiny.yml`` with absolute paths (mergekit treats relative paths
as Hub ids). Then:

    python examples/tiny/make_tiny_experts.py
    mergekit-yaml examples/tiny/models/ace-tiny.yml /tmp/ace-tiny
"""

import sys
from pathlib import Path

import yaml

from mergekit_ace.fixtures.toymodels import make_model, perturbed_copy, save_pretrained, tiny_config, train_tokenizer
from mergekit_ace.rules.ace import DEFAULTS as ACE_DEFAULTS


def main(out: Path) -> None:
    tokenizer = train_tokenizer()
    base = make_model(tiny_config("llama"), seed=0)
    base_path = save_pretrained(base, tokenizer, out / "base")
    experts = []
    # Updates of different sizes (0.003 to 0.1): ACE takes its heterogeneous branch on them.
    for i, (skill, scale) in enumerate([("multilingual", 0.003), ("math", 0.03), ("coding", 0.1)]):
        experts.append(save_pretrained(perturbed_copy(base, seed=i + 1, scale=scale), tokenizer, out / skill))
    ace_parameters = {key: ACE_DEFAULTS[key] for key in ("epsilon", "tau", "k_frac")}  # the paper's
    for method, parameters in (("ace", ace_parameters), ("actmat", {"scale": 1.0})):
        config = {
            "merge_method": method,
            "base_model": str(base_path),
            "models": [{"model": str(p)} for p in experts],
            "parameters": parameters,
            "dtype": "float32",
        }
        (out / f"{method}-tiny.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        print(out / f"{method}-tiny.yml")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "models").resolve())
