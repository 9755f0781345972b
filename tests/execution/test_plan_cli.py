"""``mergekit-ace plan``: per-weight plan from safetensors headers, totals and the fit verdict."""

import json

import pytest

from mergekit_ace.cli import main
from mergekit_ace.fixtures import toymodels


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan")
    tok = toymodels.train_tokenizer()
    base = toymodels.make_model(toymodels.tiny_config("llama"), seed=0)
    paths = [toymodels.save_pretrained(base, tok, root / "base")]
    for i in (1, 2):
        paths.append(toymodels.save_pretrained(toymodels.perturbed_copy(base, seed=i), tok, root / f"e{i}"))
    cfg = root / "ace.yml"
    cfg.write_text(
        f"merge_method: ace\nbase_model: {paths[0]}\nmodels:\n"
        + "".join(f"  - model: {p}\n" for p in paths[1:])
        + "parameters:\n  k_frac: 0.3\ndtype: float32\n"
    )
    return cfg


def test_plan_lists_every_weight_with_rule_strategy_and_totals(config, capsys):
    assert main(["plan", str(config), "--gpu-memory", "24GiB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    weights = {w["name"]: w for w in plan["weights"]}
    assert plan["experts"] == 2
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert q["shape"] == [32, 32] and q["rule"] == "ace" and q["strategy"] in ("row_chunked", "expert_streamed")
    assert q["peak_bytes"] > 0 and q["matmul_flops"] > 0
    assert weights["model.embed_tokens.weight"]["rule"] == "average"  # input embeddings are averaged
    assert weights["lm_head.weight"]["rule"] == "ace"
    assert weights["model.norm.weight"]["rule"] == "average"
    assert plan["summary"]["fits"] is True
    assert all(s > 0 for s in plan["summary"]["seconds"].values())


def test_plan_text_output_and_tiny_gpu(config, capsys, monkeypatch):
    from mergekit_ace.execution import plan_cli

    monkeypatch.setattr(plan_cli, "measure_throughput", lambda device="cpu": (1e10, 1e9))  # already tested
    assert main(["plan", str(config), "--gpu-memory", "64KiB", "--all"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj.weight" in out and "does NOT fit" in out and "measured now" in out


def test_plan_user_errors(tmp_path, capsys):
    assert main(["plan", str(tmp_path / "missing.yml")]) == 2
    bad = tmp_path / "bad.yml"
    bad.write_text(f"merge_method: ace\nbase_model: {tmp_path}/nope\nmodels:\n  - model: {tmp_path}/nope2\n")
    assert main(["plan", str(bad)]) == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_plan_covers_the_svd_methods(method, config, capsys, tmp_path, monkeypatch):
    from mergekit_ace.execution import plan_cli

    monkeypatch.setattr(plan_cli, "measure_throughput", lambda device="cpu": (1e10, 1e9))
    cfg = tmp_path / f"{method}.yml"
    cfg.write_text(config.read_text().replace("merge_method: ace", f"merge_method: {method}")
                   .replace("  k_frac: 0.3\n", "  alpha: 1.0\n"))
    assert main(["plan", str(cfg), "--gpu-memory", "24GiB", "--json"]) == 0
    weights = {w["name"]: w for w in json.loads(capsys.readouterr().out)["weights"]}
    q = weights["model.layers.0.self_attn.q_proj.weight"]
    assert q["rule"] == method and q["strategy"] == "whole_matrix" and q["eigh_flops"] > 0
    assert weights["model.embed_tokens.weight"]["rule"] == "average"
    assert weights["lm_head.weight"]["rule"] == method
    assert main(["plan", str(cfg), "--gpu-memory", "24GiB"]) == 0
    assert "full-SVD route, an upper bound" in capsys.readouterr().out


def test_one_slow_call_does_not_set_the_measured_time():
    """The time estimate's throughput comes from a median of many calls: one stalled call (a page
    fault, another process's burst) must not make it 10x too slow, as a single timed call did."""
    import time

    from mergekit_ace.execution import plan_cli

    calls = []

    def op():
        calls.append(None)
        if len(calls) == 2:  # the call the old single-shot timing measured (after one warm-up)
            time.sleep(0.3)

    median = plan_cli.median_seconds(op, min_run_time=0.05)
    assert len(calls) > 10
    assert median < 0.03  # the stall is 0.3 s; the call itself takes microseconds


def test_measured_throughput_is_positive_and_finite():
    import math

    from mergekit_ace.execution import plan_cli

    mm, eig = plan_cli.measure_throughput("cpu")
    assert math.isfinite(mm) and math.isfinite(eig) and mm > 0 and eig > 0


# --------------------------------------------------------------------------- Hub ids
# No network: huggingface_hub's header reader is replaced by a stand-in serving the headers of
# checkpoints written here (parsed from the raw safetensors bytes, not through safe_open as the
# local path is); offline mode uses the real cache lookup on a Hub cache laid out here.


def _raw_header(file):
    """A safetensors file's header: 8-byte little-endian length, then that much JSON."""
    import struct

    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def _file_metadata(file):
    from huggingface_hub.utils import SafetensorsFileMetadata, TensorInfo

    header = _raw_header(file)
    meta = header.pop("__metadata__", {})
    return SafetensorsFileMetadata(metadata=meta, tensors={
        k: TensorInfo(dtype=v["dtype"], shape=v["shape"], data_offsets=tuple(v["data_offsets"]))
        for k, v in header.items()})


def _repo_metadata(folder):
    """What get_safetensors_metadata returns for a repo holding ``folder``'s files."""
    from huggingface_hub.utils import SafetensorsRepoMetadata

    if (folder / "model.safetensors").exists():
        fm = _file_metadata(folder / "model.safetensors")
        return SafetensorsRepoMetadata(metadata=None, sharded=False,
                                       weight_map={k: "model.safetensors" for k in fm.tensors},
                                       files_metadata={"model.safetensors": fm})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    return SafetensorsRepoMetadata(metadata=index.get("metadata"), sharded=True, weight_map=index["weight_map"],
                                   files_metadata={s: _file_metadata(folder / s) for s in shards})


def _sharded_copy(src, dst):
    """``src``'s weights as two shards and an index (as a large model is stored on the Hub)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src / "model.safetensors"))
    names = sorted(tensors)
    dst.mkdir()
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), 1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _http_error(cls, status, repo):
    import httpx2

    url = f"https://huggingface.co/{repo}/resolve/main/model.safetensors"
    return cls(f"{status} Client Error.\n\nCannot access repo for url {url}.",
               response=httpx2.Response(status, request=httpx2.Request("HEAD", url)))


@pytest.fixture(scope="module")
def hub_repos(config, tmp_path_factory):
    """Repo id -> local folder: the base and one expert as single files, the other expert sharded."""
    from pathlib import Path

    import yaml

    data = yaml.safe_load(config.read_text())
    base, e1, e2 = Path(data["base_model"]), *(Path(m["model"]) for m in data["models"])
    sharded = _sharded_copy(e2, tmp_path_factory.mktemp("hub") / "e2-sharded")
    return {"org/base": base, "org/expert-1": e1, "org/expert-2": sharded}


def test_the_stand_in_has_the_real_hub_functions_signature():
    """The stand-ins below take what plan passes; the real functions must take the same."""
    import inspect

    import huggingface_hub

    assert {"repo_id", "revision"} <= set(inspect.signature(huggingface_hub.get_safetensors_metadata).parameters)
    cache_lookup = inspect.signature(huggingface_hub.try_to_load_from_cache)
    assert {"repo_id", "filename", "revision"} <= set(cache_lookup.parameters)


class FakeHub:
    """Stand-in for huggingface_hub.get_safetensors_metadata: serves ``repos``' headers, refuses
    ``gated`` ones as the Hub does (GatedRepoError), records (repo_id, revision) of each call."""

    def __init__(self, repos, gated=()):
        self.repos, self.gated, self.calls = repos, set(gated), []

    def __call__(self, repo_id, *, revision=None, **_):
        from huggingface_hub.errors import GatedRepoError, NotASafetensorsRepoError

        self.calls.append((repo_id, revision))
        if repo_id in self.gated:
            raise _http_error(GatedRepoError, 401, repo_id)
        if repo_id not in self.repos:
            raise NotASafetensorsRepoError(f"'{repo_id}' is not a safetensors repo.")
        return _repo_metadata(self.repos[repo_id])


@pytest.fixture
def fake_hub(hub_repos, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    from mergekit_ace.execution import plan_cli

    hub = FakeHub(hub_repos)
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("hf_hub_download", "snapshot_download"):  # plan must never download a file
        monkeypatch.setattr(huggingface_hub, name, lambda *a, **k: pytest.fail("plan downloaded a file"))
    monkeypatch.setattr(plan_cli, "measure_throughput", lambda device="cpu": (1e10, 1e9))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hub_repos["org/base"] / "no-token-here"))
    return hub


def _hub_config(tmp_path, base="org/base", experts=("org/expert-1", "org/expert-2")):
    cfg = tmp_path / "hub.yml"
    cfg.write_text(f"merge_method: ace\nbase_model: {base}\nmodels:\n"
                   + "".join(f"  - model: {e}\n" for e in experts)
                   + "parameters:\n  k_frac: 0.3\ndtype: float32\n")
    return cfg


def _plan_json(cfg, capsys):
    assert main(["plan", str(cfg), "--gpu-memory", "24GiB", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_of_hub_ids_equals_plan_of_the_same_local_checkpoints(config, fake_hub, tmp_path, capsys):
    local = _plan_json(config, capsys)
    hub = _plan_json(_hub_config(tmp_path, base="org/base@v1.0", experts=("org/expert-1", "org/expert-2@abc123")),
                     capsys)
    assert hub["weights"] == local["weights"] and len(hub["weights"]) == len(local["weights"]) > 10
    assert hub["experts"] == 2 and hub["base"] == "org/base@v1.0"
    assert hub["summary"]["worst_weight_bytes"] == local["summary"]["worst_weight_bytes"]
    # every model read once, each at the revision its config entry names
    assert sorted(fake_hub.calls, key=str) == sorted(
        [("org/base", "v1.0"), ("org/expert-1", None), ("org/expert-2", "abc123")], key=str)


def test_plan_hub_expert_shaped_unlike_the_base_is_named(config, fake_hub, hub_repos, tmp_path, capsys):
    from pathlib import Path

    other = toymodels.save_pretrained(toymodels.make_model(toymodels.tiny_config("llama", hidden_size=48), seed=3),
                                      None, tmp_path / "other")
    fake_hub.repos = dict(hub_repos, **{"org/other": Path(other)})
    assert main(["plan", str(_hub_config(tmp_path, experts=("org/expert-1", "org/other"))), "--json"]) == 2
    assert "org/other" in capsys.readouterr().err


def test_plan_gated_hub_repo_without_token_is_a_one_line_error(fake_hub, tmp_path, capsys, monkeypatch):
    repo = "meta-llama/Llama-3.2-3B-Instruct"
    fake_hub.gated.add(repo)
    cfg = _hub_config(tmp_path, base=repo)
    assert main(["plan", str(cfg), "--gpu-memory", "24GiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and repo in err and "gated" in err
    assert "HF_TOKEN" in err and "licence" in err and f"https://huggingface.co/{repo}" in err
    assert "no Hugging Face token" in err

    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")  # a token the Hub refuses
    assert main(["plan", str(cfg), "--gpu-memory", "24GiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and repo in err and "refused for the token in use" in err


def test_plan_unknown_hub_repo_and_bad_path_are_named(fake_hub, tmp_path, capsys):
    assert main(["plan", str(_hub_config(tmp_path, experts=("org/expert-1", "org/no-such-model"))),
                 "--gpu-memory", "24GiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "org/no-such-model" in err and "HF_TOKEN" in err
    # a missing local path is not sent to the Hub
    calls = len(fake_hub.calls)
    assert main(["plan", str(_hub_config(tmp_path, experts=(f"{tmp_path}/missing/model",))),
                 "--gpu-memory", "24GiB"]) == 2
    assert f"{tmp_path}/missing/model" in capsys.readouterr().err
    assert [c[0] for c in fake_hub.calls[calls:]] == ["org/base"]


def _cache_repo(cache, repo_id, folder, ref="main", sha="0123456789abcdef0123456789abcdef01234567", files=None):
    """Lay ``folder``'s safetensors files out as the Hub cache does: refs/<ref> -> snapshots/<sha>/."""
    import shutil

    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(sha)
    snap = root / "snapshots" / sha
    snap.mkdir(parents=True, exist_ok=True)
    for f in files or [p.name for p in folder.iterdir() if p.name.startswith("model")]:
        shutil.copy(folder / f, snap / f)


@pytest.fixture
def offline(fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_plan_offline_reads_the_cached_headers(config, offline, fake_hub, hub_repos, tmp_path, capsys):
    local = _plan_json(config, capsys)
    _cache_repo(offline, "org/base", hub_repos["org/base"], ref="v1.0")
    _cache_repo(offline, "org/expert-1", hub_repos["org/expert-1"])
    _cache_repo(offline, "org/expert-2", hub_repos["org/expert-2"])  # index + 2 shards
    hub = _plan_json(_hub_config(tmp_path, base="org/base@v1.0"), capsys)
    assert hub["weights"] == local["weights"]
    assert fake_hub.calls == []  # nothing asked of the Hub


def test_plan_offline_without_the_headers_in_the_cache_says_so(offline, fake_hub, hub_repos, tmp_path, capsys):
    cfg = _hub_config(tmp_path, base="org/base@v1.0")
    assert main(["plan", str(cfg), "--gpu-memory", "24GiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "org/base@v1.0" in err and "HF_HUB_OFFLINE" in err
    assert str(offline) in err

    _cache_repo(offline, "org/base", hub_repos["org/base"])  # main is cached, v1.0 is not
    assert main(["plan", str(cfg), "--gpu-memory", "24GiB"]) == 2
    assert "org/base@v1.0" in capsys.readouterr().err

    _cache_repo(offline, "org/base", hub_repos["org/base"], ref="v1.0")
    _cache_repo(offline, "org/expert-1", hub_repos["org/expert-1"])
    _cache_repo(offline, "org/expert-2", hub_repos["org/expert-2"],  # the index and one shard only
                files=["model.safetensors.index.json", "model-00001-of-00002.safetensors"])
    assert main(["plan", str(cfg), "--gpu-memory", "24GiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert "org/expert-2" in err and "model-00002-of-00002.safetensors" in err and "1 of its 2" in err
    assert fake_hub.calls == []


def test_plan_covers_wudi_and_its_adam_solver(config, capsys, tmp_path, monkeypatch):
    from mergekit_ace.execution import plan_cli
    from mergekit_ace.execution.memory import estimate

    monkeypatch.setattr(plan_cli, "measure_throughput", lambda device="cpu": (1e10, 1e9))
    plans = {}
    for solver in ("closed_form", "adam"):
        cfg = tmp_path / f"wudi-{solver}.yml"
        cfg.write_text(config.read_text().replace("merge_method: ace", "merge_method: wudi")
                       .replace("  k_frac: 0.3\n", f"  solver: {solver}\n  iterations: 100\n"))
        assert main(["plan", str(cfg), "--gpu-memory", "24GiB", "--json"]) == 0
        plans[solver] = {w["name"]: w for w in json.loads(capsys.readouterr().out)["weights"]}
    q = "model.layers.0.self_attn.q_proj.weight"
    assert plans["closed_form"][q]["rule"] == "wudi"
    assert plans["closed_form"][q]["strategy"] in ("row_chunked", "expert_streamed", "output_gram")
    adam = plans["adam"][q]
    assert adam["rule"] == "wudi_adam" and adam["strategy"] == "whole_matrix"
    # the configured iteration count reaches the estimate: 100 x 4 T m^2 n (+ Adam's elementwise work)
    assert adam["matmul_flops"] == estimate("wudi_adam", "whole_matrix", 32, 32, 2, iterations=100).matmul_flops
    assert adam["matmul_flops"] >= 100 * 4 * 2 * 32 ** 3
    for solver in plans:
        assert plans[solver]["model.embed_tokens.weight"]["rule"] == "average"
        assert plans[solver]["lm_head.weight"]["rule"] in ("wudi", "wudi_adam")
    assert main(["plan", str(tmp_path / "wudi-adam.yml"), "--gpu-memory", "24GiB"]) == 0
    assert "solver: adam" in capsys.readouterr().out
