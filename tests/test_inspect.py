"""``mergekit-ace inspect`` on tiny models: numbers equal direct computation, files are written."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from mergekit_ace.cli import main
from tests.reference import ace_reference


def test_inspect_numbers_match_direct_computation(llama_family, tmp_path):
    experts = [str(p) for k, p in llama_family.items() if k != "base"]
    out = tmp_path / "inspect"
    rc = main(["inspect", "--base", str(llama_family["base"]), *sum((["--expert", e] for e in experts), []),
               "--output", str(out), "--weights", r"layers\.0\.|lm_head"])
    assert rc == 0
    rows = {r["weight"]: r for r in csv.DictReader(open(out / "inspect.csv"))}
    assert set(rows) == {
        f"model.layers.0.{m}.weight" for m in
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    } | {"lm_head.weight"}
    data = json.loads((out / "inspect.json").read_text())
    assert len(data["weights"]) == len(rows)
    assert (out / "gamma_per_layer.png").stat().st_size > 1000
    assert list(out.glob("spectrum_*.png"))

    base = load_file(str(llama_family["base"] / "model.safetensors"))
    exps = [load_file(str(llama_family[f"expert{i}"] / "model.safetensors")) for i in range(3)]
    name = "model.layers.0.mlp.up_proj.weight"
    row = rows[name]
    D = [e[name].double() - base[name].double() for e in exps]
    tr = [float((d * d).sum()) for d in D]
    logs = torch.log(torch.tensor(tr, dtype=torch.float64) + 1e-12)
    gamma = float(logs.var() / (logs.mean() ** 2 + 1e-12))
    assert float(row["gamma"]) == pytest.approx(gamma, rel=1e-9)
    assert row["branch"] == ("heterogeneous" if gamma > 0.3 else "homogeneous")
    label = f"norm_{llama_family['expert2'].name}"
    assert float(row[label]) == pytest.approx(math.sqrt(tr[2]), rel=1e-9)
    s0 = float(((D[0] - D[0].mean(0)) ** 2).sum()) + 1e-12
    assert float(row[f"eps_over_s_{llama_family['expert0'].name}"]) == pytest.approx(1e-5 / s0, rel=1e-9)
    # spectral concentration of the merged task vector before/after refinement
    W, het = ace_reference(base[name], [e[name] for e in exps])
    W_pre, _ = ace_reference(base[name], [e[name] for e in exps], k_frac=0.0)
    for col, M in (("top5_energy_post", W - base[name].double()), ("top5_energy_pre", W_pre - base[name].double())):
        s2 = torch.linalg.svdvals(M) ** 2
        k = math.ceil(0.05 * s2.numel())
        assert float(row[col]) == pytest.approx(float(s2[:k].sum() / s2.sum()), rel=1e-6)
    # covariance alignment
    G = [d.T @ d for d in D]
    cos01 = float((G[0] * G[1]).sum() / (G[0].norm() * G[1].norm()))
    assert float(row["cov_alignment_min"]) <= cos01 + 1e-12


def test_inspect_errors_are_clear(tmp_path, llama_family):
    proc = subprocess.run(
        [sys.executable, "-m", "mergekit_ace.cli", "inspect", "--base", str(tmp_path / "nope"),
         "--expert", str(llama_family["expert0"]), "--output", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "not found" in proc.stderr and "nope" in proc.stderr


def test_inspect_hands_hub_ids_to_mergekit(tmp_path, monkeypatch, capsys):
    """A Hub id (``org/name``, ``@revision``) is not a missing directory: it goes to mergekit's
    loader (which downloads it); only a path that is neither local nor a repo id is refused."""
    from mergekit_ace import inspect as inspect_mod

    opened = []

    def loader(path):
        opened.append(path)
        raise OSError("no network in this test")

    monkeypatch.setattr(inspect_mod, "_loader", loader)
    argv = ["inspect", "--base", "org/base@v1.0", "--expert", "org/expert", "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    assert opened == ["org/base@v1.0"] and "cannot open the models' weights" in capsys.readouterr().err
    assert main(["inspect", "--base", str(tmp_path / "a" / "b"), "--expert", "org/expert"]) == 2
    assert opened == ["org/base@v1.0"] and "not found" in capsys.readouterr().err
