"""Installing the package is enough: plain mergekit (and its API) finds ``ace`` and ``actmat``."""

import re
import subprocess
import sys

import pytest
import torch

from tests.reference import ace_reference, actmat_reference, make_experts, rel_err, wudi_reference


def run_python(code, *flags):
    return subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=300)


def test_fresh_interpreter_sees_methods_through_mergekit_only():
    proc = run_python(
        "import mergekit.merge_methods as m\n"
        "for name in ('ace', 'actmat', 'tsv_m', 'iso_c', 'iso_cts', 'wudi'): print(m.get(name).spec.pretty_name)"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "ACE-Merging", "ACTMat", "TSV-M (Task Singular Vectors: Merge)",
        "Iso-C (isotropic merging in the common subspace)",
        "Iso-CTS (isotropic merging in common and task-specific subspaces)", "WUDI-Merging"]


def test_startup_cost_and_no_heavy_imports():
    proc = run_python("import sys; print('torch' in sys.modules, 'mergekit' in sys.modules)", "-X", "importtime")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
    ours = [line for line in proc.stderr.splitlines() if "mergekit_ace" in line]
    assert ours, "the registration hook should be imported at start-up"
    # "import time: self | cumulative | name": the package's own cumulative time, microseconds.
    cumulative = max(int(re.split(r"\s*\|\s*", line)[1]) for line in ours)
    assert cumulative < 5000


def test_registration_is_idempotent():
    proc = run_python(
        "import mergekit_ace, mergekit_ace_hook, mergekit.merge_methods as m\n"
        "a = mergekit_ace.register_methods(); b = mergekit_ace.register_methods()\n"
        "mergekit_ace_hook.install(); mergekit_ace_hook.install()\n"
        "names = [x.spec.name for x in m.registered_methods()]\n"
        "print(*[names.count(n) for n in ('ace', 'actmat', 'tsv_m', 'iso_c', 'iso_cts', 'wudi')], a[0] is b[0], len(a))"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "1", "1", "1", "1", "1", "True", "6"]


@pytest.fixture(scope="module")
def methods():
    import mergekit_ace

    return mergekit_ace.register_methods()


def test_merge_tensors_api(methods):
    from mergekit.merge_methods import get, merge_tensors

    W0, experts = make_experts((24, 10), 3, [1.0, 0.02, 0.3], seed=1)
    out = merge_tensors([W0, *experts], "ace", base_index=0, name="model.layers.0.mlp.up_proj.weight",
                        parameters={"epsilon": 1e-4})
    assert out.dtype == torch.float32
    assert rel_err(out, ace_reference(W0, experts, epsilon=1e-4)[0], W0) < 1e-5
    out = merge_tensors([W0, *experts], get("actmat"), base_index=0, name="w")
    assert rel_err(out, actmat_reference(W0, experts), W0) < 1e-5
    out = merge_tensors([W0, *experts], get("wudi"), base_index=0, name="w", parameters={"solve": "truncated"})
    assert rel_err(out, wudi_reference(W0, experts, solve="truncated"), W0) < 1e-5


def test_merge_state_dicts_api_with_embeddings_norms_and_head(methods):
    from mergekit.merge_methods import merge_state_dicts

    g = torch.Generator().manual_seed(0)
    names = {
        "model.embed_tokens.weight": (40, 8),
        "model.layers.0.mlp.up_proj.weight": (16, 8),
        "model.norm.weight": (8,),
        "lm_head.weight": (40, 8),
    }
    base = {n: torch.randn(*s, generator=g) for n, s in names.items()}
    experts = [{n: t + 0.05 * (i + 1) * torch.randn(t.shape, generator=g) for n, t in base.items()} for i in range(3)]
    for method, ref_fn in (("ace", lambda b, e: ace_reference(b, e)[0]), ("actmat", actmat_reference),
                           ("wudi", wudi_reference)):
        merged = merge_state_dicts({"base": base, "a": experts[0], "b": experts[1], "c": experts[2]}, method,
                                   base="base")
        for n in names:
            Ws = [e[n] for e in experts]
            avg = base[n].double() + sum(w.double() - base[n].double() for w in Ws) / 3
            if n in ("model.embed_tokens.weight", "model.norm.weight"):
                expected = avg  # embeddings and 1-D weights: the experts' average
            else:
                expected = ref_fn(base[n], Ws)  # lm_head takes the rule
                assert rel_err(merged[n], avg, base[n]) > 1e-3
            assert rel_err(merged[n], expected, base[n]) < 1e-5, (method, n)
        with_rule = merge_state_dicts(
            {"base": base, "a": experts[0], "b": experts[1], "c": experts[2]}, method, base="base",
            parameters={"merge_embeddings": True},
        )
        n = "model.embed_tokens.weight"
        assert rel_err(with_rule[n], ref_fn(base[n], [e[n] for e in experts]), base[n]) < 1e-5
