"""Train the demo's tokenizer, base model and one expert per skill, with a content-addressed cache.

Recipe (all CPU, float32, fixed seeds):

1. A byte-level BPE tokenizer with single-digit tokens, trained on a seeded sample of all skills.
2. A tiny Llama trained *briefly* on the mixture of the three skills: it learns the formats and a
   little of each skill, so it is weak at all of them.
3. One expert per skill: a copy of the base fine-tuned on that skill only (completion-only loss,
   no weight decay, so the task vector is exactly what the skill taught). The number of steps and
   the learning rate are set per skill in the configuration; the skills differ in difficulty and
   their task vectors differ in size accordingly (the report prints their norms, and the share of
   weight matrices that ACE's heterogeneity test sends down its heterogeneous branch).
4. A configuration with ``storage_dtype="bfloat16"`` (``realistic``) is not trained itself: it
   stores its float32 twin's models (:meth:`DemoConfig.float32_twin`, trained or reused first)
   with every weight rounded to bf16, as real checkpoints are stored.

Everything trained goes to ``<cache>/<config name>-<hash>/`` where the hash covers the whole
training configuration and a recipe version; a run whose configuration hashes the same reuses it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mergekit_ace.demo.skills import SKILL_NAMES, Example, Skill, build_skills, unique_examples

if TYPE_CHECKING:
    import torch

# Bump when the training code changes in a way that changes the models for the same config.
RECIPE_VERSION = 1


@dataclass(frozen=True)
class ExpertSpec:
    steps: int
    lr: float


@dataclass(frozen=True)
class DemoConfig:
    """Everything that determines the trained models and the evaluation data."""

    name: str = "default"
    seed: int = 1234
    # model
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    max_seq_len: int = 64
    # tokenizer
    tokenizer_corpus_per_skill: int = 3000
    # base: brief training on the mixture
    base_steps: int = 300
    base_lr: float = 2e-3
    # experts: per skill
    experts: tuple[tuple[str, ExpertSpec], ...] = (
        ("arithmetic", ExpertSpec(steps=800, lr=2e-3)),
        ("rpn", ExpertSpec(steps=300, lr=1e-3)),
        ("translate", ExpertSpec(steps=150, lr=1e-3)),
    )
    batch_size: int = 64
    warmup_frac: float = 0.1
    # Skills' generator options, as (skill, ((key, value), ...)) so the config stays hashable.
    # ``skill_options`` define the skills the experts learn and the evaluation measures;
    # ``base_skill_options`` the easier versions the base is trained on (its "pre-training").
    skill_options: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    base_skill_options: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = ()
    # share of each skill in the base's training mixture (arithmetic, rpn, translate)
    base_mixture: tuple[float, ...] = (1.0, 1.0, 1.0)
    # evaluation data (held out: never seen in training)
    eval_examples: int = 100
    # How base and experts are stored and merged. ``bfloat16``: trained in float32 exactly like the
    # float32 twin (:meth:`float32_twin`, which is trained or reused first), then every weight is
    # rounded to bf16 on save, as real checkpoints are stored; the merges use ``dtype: bfloat16``.
    storage_dtype: str = "float32"
    merge_dtype: str = "float32"

    def skill_kwargs(self) -> dict[str, dict]:
        return {skill: dict(opts) for skill, opts in self.skill_options}

    def base_skill_kwargs(self) -> dict[str, dict]:
        return {skill: dict(opts) for skill, opts in self.base_skill_options}

    def expert_specs(self) -> dict[str, ExpertSpec]:
        return dict(self.experts)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of everything that determines the models. Fields added after the first cached
        models (:data:`_LATER_FIELDS`) enter it only when they differ from their defaults, so a
        configuration that does not use them keeps its hash and its cache."""
        config = self.to_dict()
        for name in _LATER_FIELDS:
            if config[name] == _FIELD_DEFAULTS[name]:
                del config[name]
        payload = json.dumps({"recipe": RECIPE_VERSION, "config": config}, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def float32_twin(self) -> DemoConfig:
        """The same training stored and merged in float32 (named ``<name>-float32``); a bf16
        configuration's models are this one's, rounded to bf16."""
        if self.storage_dtype == "float32" and self.merge_dtype == "float32":
            return self
        name = self.name if self.name.endswith("-float32") else f"{self.name}-float32"
        return dataclasses.replace(self, name=name, storage_dtype="float32", merge_dtype="float32")


#: DemoConfig fields added after models were first cached (see DemoConfig.digest).
_LATER_FIELDS = ("storage_dtype", "merge_dtype")
_FIELD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DemoConfig)}
#: What ``storage_dtype`` / ``merge_dtype`` may be.
DTYPES = ("float32", "bfloat16")


_FULL_SKILLS = (
    ("arithmetic", (("min_digits", 2), ("max_digits", 2))),
    ("rpn", (("min_ops", 2), ("max_ops", 3))),
    ("translate", ()),
)

_REALISTIC_SKILLS = (
    ("arithmetic", (("min_digits", 1), ("max_digits", 2))),
    ("rpn", (("min_ops", 2), ("max_ops", 3))),
    ("translate", ()),
)

CONFIGS: dict[str, DemoConfig] = {
    # The base trains briefly (250 steps) on a mixture of the full skills, weighted towards the
    # hardest (arithmetic 60%, rpn 30%, translate 10%) so that no skill is mastered; each expert
    # then fine-tunes on its skill only at lr 5e-4. The skills differ in difficulty, so the experts
    # need different numbers of steps and end up with task vectors of different sizes.
    "default": DemoConfig(
        name="default",
        base_steps=250,
        base_lr=2e-3,
        base_mixture=(0.6, 0.3, 0.1),
        base_skill_options=_FULL_SKILLS,
        skill_options=_FULL_SKILLS,
        experts=(
            ("arithmetic", ExpertSpec(steps=800, lr=5e-4)),
            ("rpn", ExpertSpec(steps=300, lr=5e-4)),
            ("translate", ExpertSpec(steps=200, lr=5e-4)),
        ),
    ),
    # The regime of real LLM fine-tunes: task vectors of a few per cent of the base's norm
    # (||D_t|| / ||W_0||, printed per expert), against 20-50 % in `default`. The base trains twice
    # as long as `default`'s (500 steps) on all three skills, mostly arithmetic (82 %, with 1- and
    # 2-digit sums) and little rpn (15 %) and translate (3 %), so it is partly able at each; the
    # experts then fine-tune briefly at a small learning rate (5e-5 to 6e-5, 200-400 steps), which
    # sharpens a skill the base already half has instead of teaching it from scratch.
    # Like real checkpoints, base and experts are stored in bf16 and merged with `dtype: bfloat16`
    # (`realistic-float32`: the same models unrounded, merged in float32), and the MLP has the real
    # models' ratio: 344 / 128 = 2.69 (OLMo-3-7B 11008 / 4096 = 2.69, Llama-3.2-3B 8192 / 3072 =
    # 2.67), so that down_proj's T d_out / d_in with T = 3 experts is 3 * 128 / 344 = 1.12 (real:
    # 1.12-1.13), where ACTMat's sum_t D_t^T D_t (d_in x d_in, rank <= T d_out) is nearly singular.
    "realistic": DemoConfig(
        name="realistic",
        intermediate_size=344,
        storage_dtype="bfloat16",
        merge_dtype="bfloat16",
        base_steps=500,
        base_lr=2e-3,
        base_mixture=(0.82, 0.15, 0.03),
        base_skill_options=_REALISTIC_SKILLS,
        skill_options=_REALISTIC_SKILLS,
        experts=(
            ("arithmetic", ExpertSpec(steps=400, lr=6e-5)),
            ("rpn", ExpertSpec(steps=200, lr=5e-5)),
            ("translate", ExpertSpec(steps=200, lr=5e-5)),
        ),
    ),
    # Seconds-scale: for the test suite. A smaller model, fewer steps and examples, easier skills
    # (one-digit sums), and a base that sees only easy versions of rpn and translate (one operator,
    # single phrases); the experts still have to beat the base on their own skill.
    "small": DemoConfig(
        name="small",
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        tokenizer_corpus_per_skill=1000,
        base_steps=60,
        base_lr=3e-3,
        experts=(
            ("arithmetic", ExpertSpec(steps=200, lr=3e-3)),
            ("rpn", ExpertSpec(steps=100, lr=3e-3)),
            ("translate", ExpertSpec(steps=80, lr=3e-3)),
        ),
        batch_size=32,
        base_skill_options=(
            ("arithmetic", (("min_digits", 1), ("max_digits", 1))),
            ("rpn", (("min_ops", 1), ("max_ops", 1))),
            ("translate", (("phrases_only", True),)),
        ),
        skill_options=(
            ("arithmetic", (("min_digits", 1), ("max_digits", 1))),
            ("rpn", (("min_ops", 2), ("max_ops", 2))),
            ("translate", (("p_adjective", 0.0),)),
        ),
        eval_examples=24,
    ),
}
CONFIGS["realistic-float32"] = CONFIGS["realistic"].float32_twin()


# --------------------------------------------------------------------------------------------
# data


def eval_sets(config: DemoConfig, skills: dict[str, Skill]) -> dict[str, list[Example]]:
    """The held-out evaluation examples per skill (seeded, distinct prompts)."""
    out = {}
    for i, name in enumerate(SKILL_NAMES):
        rng = random.Random(config.seed * 1000 + 17 + i)
        out[name] = unique_examples(skills[name].generate, config.eval_examples, rng)
    return out


class Batcher:
    """Draws training batches from one or several skills, never an evaluation prompt."""

    def __init__(self, tokenizer, skills: Sequence[Skill], exclude: set, seed: int, max_len: int,
                 weights: Sequence[float] | None = None):
        self.tok = tokenizer
        self.skills = list(skills)
        self.weights = list(weights) if weights else [1.0] * len(self.skills)
        self.exclude = exclude
        self.rng = random.Random(seed)
        self.max_len = max_len

    def examples(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            skill = self.rng.choices(self.skills, weights=self.weights)[0]
            prompt, answer = skill.generate(self.rng)
            if prompt not in self.exclude:
                out.append((prompt, answer))
        return out

    def batch(self, n: int):
        """input_ids, attention_mask, labels (-100 on prompt and padding)."""
        examples = self.examples(n)
        return encode_examples(self.tok, examples, self.max_len)


def encode_examples(tokenizer, examples: Sequence[Example], max_len: int):
    """Encode ``prompt + answer + "\\n" + eos`` as prompt ids followed by answer ids (exactly what
    lm-eval does at inference: it encodes the prompt alone and the model continues it)."""
    import torch

    prompts = tokenizer([p for p, _ in examples], add_special_tokens=False)["input_ids"]
    answers = tokenizer([a + "\n" for _, a in examples], add_special_tokens=False)["input_ids"]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = []
    for p, a in zip(prompts, answers):
        ids = (p + a + [eos])[:max_len]
        labels = ([-100] * len(p) + a + [eos])[:max_len]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return input_ids, mask, labels


# --------------------------------------------------------------------------------------------
# training


def train_steps(
    model,
    batcher: Batcher,
    steps: int,
    lr: float,
    batch_size: int,
    warmup_frac: float,
    weight_decay: float = 0.0,
    log: Callable[[str], None] | None = None,
    label: str = "",
) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss every step."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warmup = max(1, int(warmup_frac * steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    losses = []
    start = time.time()
    for step in range(steps):
        input_ids, mask, labels = batcher.batch(batch_size)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and (step + 1) % max(1, steps // 5) == 0:
            recent = sum(losses[-20:]) / len(losses[-20:])
            log(f"  {label} step {step + 1}/{steps}  loss {recent:.3f}  ({time.time() - start:.0f}s)")
    model.eval()
    return losses


def greedy_accuracy(model, tokenizer, skill: Skill, examples: Sequence[Example], max_new_tokens: int = 24) -> float:
    """A quick in-process greedy score (for training logs and tuning; the demo's reported numbers
    come from lm-eval). Generates one example at a time, like lm-eval with batch size 1."""
    import torch

    correct = 0
    with torch.no_grad():
        for prompt, answer in examples:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            completion = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
            correct += bool(skill.check(prompt, answer, completion))
    return correct / max(1, len(examples))


def task_vector_stats(base, expert) -> dict[str, float]:
    """Norms of the expert's task vector and ACE's heterogeneity input per 2-D weight."""
    import torch

    out = {}
    base_sd = base.state_dict()
    for name, w in expert.state_dict().items():
        d = (w.double() - base_sd[name].double())
        out[name] = float(torch.sum(d * d))
    return out


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved model directory (its ``*.safetensors`` files)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    for f in files:
        out.update(load_file(str(f)))
    return out


def relative_task_vector_norms(base: Path, experts: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Per expert: ``||D_t|| / ||W_0||`` over all parameters (``global``), and the median over the
    2-D weights the covariance rules merge (not the input embeddings) of the same ratio per weight
    (``median_matrix``). Real LLM fine-tunes sit at a few per cent."""
    from mergekit_ace.rules.scope import is_input_embedding

    w0 = load_weights(base)
    base_sq = sum(float(w.double().square().sum()) for w in w0.values())
    out = {}
    for name, path in experts.items():
        wt = load_weights(path)
        delta_sq, ratios = 0.0, []
        for key, w in w0.items():
            d_sq = float((wt[key].double() - w.double()).square().sum())
            delta_sq += d_sq
            if w.ndim == 2 and not is_input_embedding(key):
                ratios.append(math.sqrt(d_sq) / max(float(w.double().norm()), 1e-30))
        ratios.sort()
        out[name] = {
            "global": math.sqrt(delta_sq / base_sq),
            "median_matrix": ratios[len(ratios) // 2] if ratios else float("nan"),
            "task_vector_norm": math.sqrt(delta_sq),
            "base_norm": math.sqrt(base_sq),
        }
    return out


@dataclass
class TrainedModels:
    """Paths (absolute) of what :func:`ensure_trained` produced, plus its manifest."""

    root: Path
    tokenizer: Path
    base: Path
    experts: dict[str, Path]
    manifest: dict = field(default_factory=dict)


def _paths(root: Path) -> TrainedModels:
    return TrainedModels(
        root=root,
        tokenizer=root / "tokenizer",
        base=root / "base",
        experts={name: root / f"expert-{name}" for name in SKILL_NAMES},
    )


def ensure_trained(
    config: DemoConfig,
    cache_dir: Path,
    force: bool = False,
    log: Callable[[str], None] = print,
    jobs: int | None = None,
) -> TrainedModels:
    """Return the trained tokenizer, base and experts for ``config``, training them if the cache
    has no complete entry for the configuration's hash (or ``force``). The experts train in
    ``jobs`` processes at a time (default: the number of CPU cores, at most 3)."""
    cache_dir = Path(cache_dir).expanduser().resolve()
    root = cache_dir / f"{config.name}-{config.digest()}"
    paths = _paths(root)
    manifest_path = root / "manifest.json"
    if manifest_path.exists() and not force:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("digest") == config.digest() and all(
            (p / "config.json").exists() for p in [paths.base, *paths.experts.values()]
        ):
            log(f"Using cached models in {root} (configuration hash {config.digest()}).")
            paths.manifest = manifest
            return paths
    if config.storage_dtype not in DTYPES or config.merge_dtype not in DTYPES:
        raise ValueError(f"config {config.name}: storage_dtype / merge_dtype must be one of {DTYPES}, got "
                         f"{config.storage_dtype!r} / {config.merge_dtype!r}")
    if root.exists():
        shutil.rmtree(root)
    if config.storage_dtype != "float32":
        twin = ensure_trained(config.float32_twin(), cache_dir, force=force, log=log, jobs=jobs)
        staging = root.with_name(root.name + ".partial")
        if staging.exists():
            shutil.rmtree(staging)
        paths.manifest = _store_rounded(config, twin, _paths(staging), log)
        (staging / "manifest.json").write_text(json.dumps(paths.manifest, indent=2))
        staging.rename(root)  # complete, or not there at all
        return paths
    root.mkdir(parents=True)
    import os

    import torch

    jobs = jobs if jobs is not None else min(3, os.cpu_count() or 1)
    threads = torch.get_num_threads()
    try:
        paths.manifest = _train_all(config, paths, log, jobs=jobs)
    finally:
        torch.set_num_threads(threads)
    manifest_path.write_text(json.dumps(paths.manifest, indent=2))  # written last: marks completion
    return paths


def _store_rounded(config: DemoConfig, twin: TrainedModels, paths: TrainedModels, log) -> dict:
    """Save the float32 twin's tokenizer, base and experts with every weight rounded to
    ``config.storage_dtype``; return the manifest (the twin's, with the task-vector energies of
    the rounded weights, which is what a merge of the stored checkpoints sees)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ace.fixtures import toymodels

    t0 = time.time()
    shutil.copytree(twin.tokenizer, paths.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(twin.base)
    base = AutoModelForCausalLM.from_pretrained(twin.base, dtype=torch.float32)
    toymodels.save_pretrained(base, tokenizer, paths.base, dtype=config.storage_dtype)
    base = AutoModelForCausalLM.from_pretrained(paths.base, dtype=torch.float32)  # the rounded base
    manifest = copy.deepcopy(twin.manifest)
    for name in SKILL_NAMES:
        expert = AutoModelForCausalLM.from_pretrained(twin.experts[name], dtype=torch.float32)
        toymodels.save_pretrained(expert, tokenizer, paths.experts[name], dtype=config.storage_dtype)
        expert = AutoModelForCausalLM.from_pretrained(paths.experts[name], dtype=torch.float32)
        sq = task_vector_stats(base, expert)
        manifest["experts"][name].update(task_vector_norm=math.sqrt(sum(sq.values())), task_vector_sq_norms=sq)
    manifest.update(digest=config.digest(), config=config.to_dict(),
                    stored_from={"digest": twin.manifest.get("digest"), "root": str(twin.root),
                                 "dtype": config.storage_dtype})
    log(f"Stored the {twin.root.name} models in {config.storage_dtype} ({time.time() - t0:.1f}s)")
    return manifest


def _train_expert(config: DemoConfig, index: int, name: str, base_path: str, out_path: str, log=None):
    """Fine-tune a copy of the saved base on one skill; save it; return (name, info, seconds).
    A top-level function so that it can run in a worker process. One intra-op thread: the
    matrices are tiny, and a fixed thread count keeps results identical across machines."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ace.fixtures import toymodels

    torch.set_num_threads(1)
    t0 = time.time()
    skills = build_skills(config.skill_kwargs())
    exclude = {p for examples in eval_sets(config, skills).values() for p, _ in examples}
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    expert = copy.deepcopy(base)
    spec = config.expert_specs()[name]
    batcher = Batcher(tokenizer, [skills[name]], exclude, config.seed + 100 + index, config.max_seq_len)
    torch.manual_seed(config.seed + 100 + index)
    losses = train_steps(expert, batcher, spec.steps, spec.lr, config.batch_size, config.warmup_frac,
                         weight_decay=0.0, log=log, label=name)
    toymodels.save_pretrained(expert, tokenizer, out_path)
    sq = task_vector_stats(base, expert)
    info = {
        "steps": spec.steps,
        "lr": spec.lr,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "task_vector_norm": math.sqrt(sum(sq.values())),
        "task_vector_sq_norms": sq,
    }
    return name, info, time.time() - t0


def _train_expert_subprocess(config: DemoConfig, index: int, name: str, base_path: str, out_path: str):
    """:func:`_train_expert` in a fresh interpreter (``python -m mergekit_ace.demo.train``), so the
    experts train in parallel without multiprocessing's fork/spawn pitfalls."""
    import os
    import pickle
    import subprocess
    import sys

    import mergekit_ace

    job = Path(out_path).with_suffix(".job.pkl")
    result = Path(out_path).with_suffix(".result.pkl")
    job.parent.mkdir(parents=True, exist_ok=True)
    job.write_bytes(pickle.dumps((config, index, name, base_path, out_path)))
    env = dict(os.environ)
    root = str(Path(mergekit_ace.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(
        [sys.executable, "-m", "mergekit_ace.demo.train", str(job), str(result)],
        env=env, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"training the {name} expert failed:\n{proc.stderr[-3000:]}")
    out = pickle.loads(result.read_bytes())
    job.unlink()
    result.unlink()
    return out


def _train_all(config: DemoConfig, paths: TrainedModels, log: Callable[[str], None], jobs: int = 1) -> dict:
    import torch

    from mergekit_ace.fixtures import toymodels

    torch.set_num_threads(1)  # see _train_expert
    torch.manual_seed(config.seed)
    skills = build_skills(config.skill_kwargs())
    base_skills = build_skills(config.base_skill_kwargs())
    held_out = eval_sets(config, skills)
    exclude = {p for examples in held_out.values() for p, _ in examples}
    timings = {}

    t0 = time.time()
    rng = random.Random(config.seed)
    corpus = []
    for name in SKILL_NAMES:
        for source in (skills, base_skills):
            pairs = (source[name].generate(rng) for _ in range(config.tokenizer_corpus_per_skill // 2))
            corpus += [p + a + "\n" for p, a in pairs]
    tokenizer = toymodels.train_digit_tokenizer(corpus, vocab_size=config.vocab_size)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {config.vocab_size}")
    tokenizer.save_pretrained(paths.tokenizer)
    timings["tokenizer"] = time.time() - t0
    log(f"Tokenizer: {len(tokenizer)} tokens ({timings['tokenizer']:.1f}s)")

    model_config = toymodels.tiny_config(
        "llama",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        max_position_embeddings=config.max_seq_len,
    )
    base = toymodels.make_model(model_config, seed=config.seed)
    n_params = sum(p.numel() for p in base.parameters())
    log(f"Base: Llama, {config.num_layers} layers, hidden {config.hidden_size}, {n_params / 1e6:.2f}M parameters; "
        f"{config.base_steps} steps on the mixture")
    t0 = time.time()
    batcher = Batcher(tokenizer, [base_skills[n] for n in SKILL_NAMES], exclude, config.seed + 1, config.max_seq_len,
                      weights=config.base_mixture)
    torch.manual_seed(config.seed + 1)
    base_losses = train_steps(base, batcher, config.base_steps, config.base_lr, config.batch_size,
                              config.warmup_frac, weight_decay=0.01, log=log, label="base")
    timings["base"] = time.time() - t0
    toymodels.save_pretrained(base, tokenizer, paths.base)

    experts_info = {}
    jobs_list = [(config, i, name, str(paths.base), str(paths.experts[name]))
                 for i, (name, spec) in enumerate(config.experts)]
    workers = max(1, min(jobs or 1, len(jobs_list)))
    log("Experts: " + ", ".join(f"{n} ({s.steps} steps, lr {s.lr:g})" for n, s in config.experts)
        + f"; {workers} at a time")
    if workers == 1:
        results = [_train_expert(*job, log=log) for job in jobs_list]
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_train_expert_subprocess, *job) for job in jobs_list]
            results = []
            for future in futures:
                results.append(future.result())
                name, info, seconds = results[-1]
                log(f"  expert {name}: final loss {info['final_loss']:.3f}, task vector norm "
                    f"{info['task_vector_norm']:.2f} ({seconds:.0f}s)")
    for name, info, seconds in results:
        experts_info[name] = info
        timings[f"expert-{name}"] = seconds

    return {
        "digest": config.digest(),
        "recipe_version": RECIPE_VERSION,
        "config": config.to_dict(),
        "parameters": n_params,
        "tokenizer_size": len(tokenizer),
        "base_final_loss": sum(base_losses[-20:]) / len(base_losses[-20:]),
        "experts": experts_info,
        "timings_s": timings,
        "torch_version": torch.__version__,
    }


if __name__ == "__main__":  # worker entry point of _train_expert_subprocess
    import pickle
    import sys

    _job, _result = Path(sys.argv[1]), Path(sys.argv[2])
    _out = _train_expert(*pickle.loads(_job.read_bytes()))
    _result.write_bytes(pickle.dumps(_out))
