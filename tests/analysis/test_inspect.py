"""``mergekit-ace inspect`` on tiny models: numbers equal direct computation, files are written."""

import csv
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergekit_ace.cli import main
from mergekit_ace.rules import ace_merge, actmat_merge
from mergekit_ace.rules.sensitivity import expected_rounding_error, storage_sensitivity
from tests.reference import ace_reference, actmat_reference


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
    # sensitivity to the checkpoints' rounding: the float32 checkpoints' own dtype in and out, one
    # sample from seed 0 (its agreement with a float64 truth: tests/rules/test_sensitivity.py)
    W0, Ws = base[name], [e[name] for e in exps]
    assert data["meta"]["sensitivity"] == {"output_dtype": "the base's dtype", "samples": 1}
    for col, rule in (("sensitivity_ace", ace_merge), ("sensitivity_actmat", actmat_merge)):
        direct = storage_sensitivity(rule, W0, Ws, input_dtype=torch.float32, output_dtype=torch.float32, samples=1)
        assert float(row[col]) == pytest.approx(direct.value, rel=1e-9)
        assert 0.1 < float(row[col]) < 1e3


@pytest.mark.slow
def test_inspect_sensitivity_options(llama_family, tmp_path):
    experts = sum((["--expert", str(p)] for k, p in llama_family.items() if k != "base"), [])
    args = ["inspect", "--base", str(llama_family["base"]), *experts,
            "--weights", r"layers\.0\.mlp\.up_proj", "--no-spectra"]
    assert main([*args, "--output", str(tmp_path / "bf16"), "--dtype", "bfloat16", "--sensitivity-samples", "2"]) == 0
    row = json.loads((tmp_path / "bf16" / "inspect.json").read_text())["weights"][0]
    name = "model.layers.0.mlp.up_proj.weight"
    base = load_file(str(llama_family["base"] / "model.safetensors"))[name]
    exps = [load_file(str(llama_family[f"expert{i}"] / "model.safetensors"))[name] for i in range(3)]
    direct = storage_sensitivity(actmat_merge, base, exps, output_dtype=torch.bfloat16, samples=2)
    assert row["sensitivity_actmat"] == pytest.approx(direct.value, rel=1e-9)
    # float32 checkpoints into a bf16 weight: the inputs' rounding is ~2^-16 of the output's
    assert row["sensitivity_actmat"] < 1e-2 and row["sensitivity_ace"] < 1e-2
    assert main([*args, "--output", str(tmp_path / "off"), "--no-sensitivity"]) == 0
    header = open(tmp_path / "off" / "inspect.csv").readline()
    assert "sensitivity" not in header and "gamma" in header
    proc = subprocess.run([sys.executable, "-m", "mergekit_ace.cli", *args, "--output", str(tmp_path / "x"),
                           "--dtype", "int8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--dtype" in proc.stderr and "int8" in proc.stderr


@pytest.mark.slow
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
    from mergekit_ace.analysis import inspect as inspect_mod

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


def test_inspect_sensitivity_of_bf16_checkpoints_against_truth(llama_family, tmp_path):
    """bf16 copies of the float32 family are the "checkpoints"; the float32 originals are the values
    before their rounding. Each sensitivity column against the truth: the float64 merge (independent
    references, tests/reference.py) of the originals against that of the bf16 checkpoints, in units
    of the merged weight's own bf16 rounding. Observed with 2 samples on the 15 weights of layers 0-1
    and lm_head:
    ACTMat 0.85-1.17, ACE 0.80-1.73 (ACE's refinement on a 32x32 weight: a perturbation can swap
    a direction across the top-k boundary, so its response is less linear, docs/methods.md)."""
    keys = ["base", "expert0", "expert1", "expert2"]
    for k in keys:
        d = tmp_path / "bf16" / k
        d.mkdir(parents=True)
        shutil.copy(llama_family[k] / "config.json", d / "config.json")
        tensors = load_file(str(llama_family[k] / "model.safetensors"))
        save_file({n: t.to(torch.bfloat16).contiguous() for n, t in tensors.items()}, str(d / "model.safetensors"))
    out = tmp_path / "out"
    experts = sum((["--expert", str(tmp_path / "bf16" / k)] for k in keys[1:]), [])
    assert main(["inspect", "--base", str(tmp_path / "bf16" / "base"), *experts, "--output", str(out),
                 "--no-spectra", "--sensitivity-samples", "2", "--weights", r"layers\.1\.|lm_head"]) == 0
    rows = json.loads((out / "inspect.json").read_text())["weights"]
    assert len(rows) == 8
    originals = [load_file(str(llama_family[k] / "model.safetensors")) for k in keys]
    bf16 = lambda x: x.to(torch.bfloat16).double()  # noqa: E731
    for row in rows:
        W0, Ws = originals[0][row["weight"]].double(), [o[row["weight"]].double() for o in originals[1:]]
        for col, reference, factor in (("sensitivity_actmat", actmat_reference, 1.5),
                                       ("sensitivity_ace", lambda a, b: ace_reference(a, b)[0], 2.5)):
            exact, stored = reference(W0, Ws), reference(bf16(W0), [bf16(W) for W in Ws])
            truth = float((exact - stored).norm()) / expected_rounding_error(stored, torch.bfloat16)
            assert 1 / factor < row[col] / truth < factor, (row["weight"], col, row[col], truth)
