"""Synthetic full-size checkpoints: a base and T experts with the exact tensor names, shapes and
config of a real model family, written without the Hub and without holding a model in memory.

Used by ``benchmarks/bench_model.py`` (whole 3B/7B merges through ``mergekit-yaml``) and the tests
(a shallow, narrow smoke version). Every model directory gets ``config.json``, sharded bf16
safetensors with ``model.safetensors.index.json``, and tokenizer files.

The weights (all drawn with a CPU generator seeded from ``(seed, tensor name, role)``, so a
checkpoint is the same on every machine and a ``layers=N`` model equals the first N layers of the
full one):

* base ``W_0``: 2-D weights ~ N(0, 0.02^2); 1-D weights (norms) ~ 1 + N(0, 0.02^2);
* expert t: ``W_t = W_0 + D_t`` with ``||D_t||_F / ||W_0||_F = rel_t`` (default 1%, 2.5%, 5%:
  the update norms of the experts differ 5x). For 2-D weights ``D_t`` is a low-rank part with a
  decaying singular spectrum (rank ``min(64, m, n)``, singular values ~ 1/i, 80% of the energy)
  plus i.i.d. noise (20%), like a real fine-tune's update; input embeddings change only on a
  random 10% of their rows (tokens the fine-tune saw); 1-D weights get i.i.d. noise.

Files are written one tensor at a time: the safetensors header of each shard is known from the
shapes before any data is made, so each tensor is generated for all models at once, its bytes
appended to every model's current shard, and dropped (peak memory: one tensor per model).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from mergekit_ace.rules.common import is_input_embedding
from mergekit_ace.toymodels import train_tokenizer

#: Shapes and configs of the real models (public config.json of each Hub repository).
FAMILIES: Dict[str, dict] = {
    # meta-llama/Llama-3.2-3B-Instruct
    "llama-3.2-3b": dict(
        arch="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
        num_attention_heads=24, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
        max_position_embeddings=131072, rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128009,
    ),
    # allenai/Olmo-3-1025-7B (and its RL-Zero experts)
    "olmo-3-7b": dict(
        arch="olmo3", vocab_size=100278, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False,
        max_position_embeddings=65536, rms_norm_eps=1e-6, sliding_window=4096, bos_token_id=None,
        eos_token_id=100257, pad_token_id=100277,
    ),
}

BASE_STD = 0.02
DEFAULT_RELATIVE_UPDATES = (0.01, 0.025, 0.05)
LOW_RANK = 64
LOW_RANK_ENERGY = 0.8
EMBEDDING_ROW_FRACTION = 0.1
SHARD_BYTES = 2 * 2 ** 30
_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def transformers_config(family: str, num_layers: Optional[int] = None, **overrides):
    """The transformers config of ``family`` (``FAMILIES``), optionally with fewer layers or other
    sizes (the tests use narrow ones)."""
    from transformers import LlamaConfig, Olmo3Config

    if family not in FAMILIES:
        raise ValueError(f"unknown shape {family!r}; expected one of {', '.join(FAMILIES)}")
    spec = {k: v for k, v in FAMILIES[family].items() if k != "arch"}
    spec.update(overrides)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # narrow test vocabularies
        if spec.get(key) is not None and spec[key] >= spec["vocab_size"]:
            spec[key] = None
    if num_layers is not None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be at least 1, got {num_layers}")
        spec["num_hidden_layers"] = num_layers
    cls = LlamaConfig if FAMILIES[family]["arch"] == "llama" else Olmo3Config
    config = cls(**spec)
    config.architectures = ["LlamaForCausalLM" if cls is LlamaConfig else "Olmo3ForCausalLM"]
    config.dtype = "bfloat16"
    return config


def tensor_shapes(config) -> List[Tuple[str, Tuple[int, ...]]]:
    """``(name, shape)`` of every tensor a checkpoint of ``config`` holds, in the model's order
    (the model is built on the meta device: no memory). Tied output heads are not stored."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = set(getattr(model, "_tied_weights_keys", None) or ["lm_head.weight"])
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items() if name not in tied]


def _generator(seed: int, name: str, role: str, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}:{name}:{role}".encode()))


def base_tensor(name: str, shape: Sequence[int], seed: int, device="cpu") -> torch.Tensor:
    """``W_0`` of one tensor (float32, on ``device``)."""
    x = torch.randn(tuple(shape), generator=_generator(seed, name, "base", device), device=device) * BASE_STD
    if len(shape) == 1:
        x += 1.0
    return x


def expert_update(name: str, base: torch.Tensor, relative: float, seed: int, expert: int,
                  low_rank_energy: float = LOW_RANK_ENERGY) -> torch.Tensor:
    r"""``D_t`` of one tensor (float32) with :math:`\|D_t\|_F = relative \cdot \|W_0\|_F` (see the
    module docstring for its structure; ``low_rank_energy``: the low-rank part's share of the energy)."""
    dev = base.device
    g = _generator(seed, name, f"expert{expert}", dev)
    target = relative * float(torch.linalg.vector_norm(base))
    if base.ndim != 2:
        noise = torch.randn(base.shape, generator=g, device=dev)
        return noise * (target / float(torch.linalg.vector_norm(noise)))
    m, n = base.shape
    rows = None
    if is_input_embedding(name):
        count = max(1, int(EMBEDDING_ROW_FRACTION * m))
        rows = torch.randperm(m, generator=g, device=dev)[:count].sort().values
        m = count
    r = min(LOW_RANK, m, n)
    left = torch.randn(m, r, generator=g, device=dev)
    right = torch.randn(r, n, generator=g, device=dev)
    decay = 1.0 / torch.arange(1, r + 1, dtype=torch.float32, device=dev)
    low_rank = (left * decay) @ right
    noise = torch.randn(m, n, generator=g, device=dev)
    low_rank *= math.sqrt(low_rank_energy) / float(torch.linalg.vector_norm(low_rank))
    noise *= math.sqrt(1.0 - low_rank_energy) / float(torch.linalg.vector_norm(noise))
    update = low_rank.add_(noise)
    update *= target / float(torch.linalg.vector_norm(update))
    if rows is None:
        return update
    full = torch.zeros_like(base)
    full[rows] = update
    return full


def layer_experts(shape: Sequence[int], relative: Sequence[float] = DEFAULT_RELATIVE_UPDATES, seed: int = 0,
                  name: str = "layer.weight", dtype: torch.dtype = torch.bfloat16,
                  low_rank_energy: float = LOW_RANK_ENERGY):
    """One weight's base and experts as checkpoints store them (``dtype``): ``(W_0, [W_t])`` with the
    fine-tune-like updates of :func:`expert_update` (benchmarks and precision tests of single weights)."""
    base = base_tensor(name, shape, seed)
    experts = [(base + expert_update(name, base, rel, seed, t, low_rank_energy)).to(dtype)
               for t, rel in enumerate(relative)]
    return base.to(dtype), experts


@dataclass
class _Shard:
    file: str
    names: List[str] = field(default_factory=list)
    nbytes: int = 0


def _plan_shards(shapes, element_bytes: int, shard_bytes: int) -> List[_Shard]:
    shards = [_Shard("")]
    for name, shape in shapes:
        size = math.prod(shape) * element_bytes
        if shards[-1].names and shards[-1].nbytes + size > shard_bytes:
            shards.append(_Shard(""))
        shards[-1].names.append(name)
        shards[-1].nbytes += size
    for i, shard in enumerate(shards, start=1):
        shard.file = (f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1
                      else "model.safetensors")
    return shards


def _header(names, shapes: Dict[str, Tuple[int, ...]], dtype: torch.dtype) -> bytes:
    """The safetensors header (8-byte little-endian length, then JSON, padded to 8 bytes)."""
    element = torch.finfo(dtype).bits // 8
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        size = math.prod(shapes[name]) * element
        entries[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shapes[name]),
                         "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _tensor_bytes(x: torch.Tensor) -> memoryview:
    return memoryview(x.contiguous().cpu().view(torch.uint8).numpy()).cast("B")


def write_checkpoints(
    root: Path,
    family: str,
    *,
    num_experts: int = 3,
    num_layers: Optional[int] = None,
    relative_updates: Optional[Sequence[float]] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int = SHARD_BYTES,
    config_overrides: Optional[dict] = None,
    progress=None,
    device="cpu",
) -> List[Path]:
    """Write ``root/base`` and ``root/expert1..T``; return their paths (base first).

    ``relative_updates``: ``||D_t|| / ||W_0||`` per expert (default: 1%, 2.5%, 5% for T = 3,
    geometrically spaced between 1% and 5% for other T). ``progress(i, n, name)`` is called after
    each tensor. A directory whose ``synthetic.json`` matches the request is reused as it is.
    ``device``: where the random numbers are drawn (``"cuda"`` draws 7B checkpoints far faster than a CPU);
    the weights are the same for the same seed and device type, not across device types.
    """
    root = Path(root)
    if relative_updates is None:
        relative_updates = (DEFAULT_RELATIVE_UPDATES if num_experts == 3 else
                            tuple(0.01 * 5 ** (i / max(1, num_experts - 1)) for i in range(num_experts)))
    relative_updates = tuple(float(r) for r in relative_updates)
    if len(relative_updates) != num_experts:
        raise ValueError(f"{num_experts} experts need {num_experts} relative update sizes, got {relative_updates}")
    config = transformers_config(family, num_layers, **(config_overrides or {}))
    record = dict(family=family, num_layers=config.num_hidden_layers, num_experts=num_experts,
                  relative_updates=list(relative_updates), seed=seed, dtype=str(dtype),
                  overrides=config_overrides or {}, generator=torch.device(device).type, format=1)
    names = ["base"] + [f"expert{t}" for t in range(1, num_experts + 1)]
    dirs = [root / n for n in names]
    stamp = root / "synthetic.json"
    if stamp.exists() and json.loads(stamp.read_text()) == record and all(d.is_dir() for d in dirs):
        return [d.resolve() for d in dirs]
    if stamp.exists():
        stamp.unlink()

    shapes = tensor_shapes(config)
    shape_of = dict(shapes)
    shards = _plan_shards(shapes, torch.finfo(dtype).bits // 8, shard_bytes)
    tokenizer = train_tokenizer()
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("*.safetensors"):
            old.unlink()
        config.save_pretrained(d)
        tokenizer.save_pretrained(d)
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(s.nbytes for s in shards)},
                     "weight_map": {n: s.file for s in shards for n in s.names}}
            (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    done = 0
    for shard in shards:
        header = _header(shard.names, shape_of, dtype)
        files = [open(d / shard.file, "wb") for d in dirs]
        try:
            for f in files:
                f.write(header)
            for name in shard.names:
                base = base_tensor(name, shape_of[name], seed, device)
                files[0].write(_tensor_bytes(base.to(dtype)))
                for t, rel in enumerate(relative_updates, start=1):
                    expert = base + expert_update(name, base, rel, seed, t)
                    files[t].write(_tensor_bytes(expert.to(dtype)))
                    del expert
                del base
                done += 1
                if progress is not None:
                    progress(done, len(shapes), name)
        finally:
            for f in files:
                f.close()
    stamp.write_text(json.dumps(record, indent=2))
    return [d.resolve() for d in dirs]


def checkpoint_bytes(family: str, num_layers: Optional[int] = None, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one model's weights (what each of base and experts takes on disk)."""
    shapes = tensor_shapes(transformers_config(family, num_layers))
    return sum(math.prod(s) for _, s in shapes) * (torch.finfo(dtype).bits // 8)
