"""The model calls of one (model, task) cell: which lm-eval stage a failure happened in, and
generation fitted to the model's context length.

:func:`observe` wraps the request methods of an lm-eval ``LM`` (``generate_until``,
``loglikelihood``, ``loglikelihood_rolling``; lm-eval's evaluator calls them by name) for the
duration of one ``simple_evaluate``:

* the :class:`Stage` moves from ``prepare task`` (building the task, loading its data and the
  requests) to the request type while the model runs, then to ``score`` (filters, metrics, code
  execution, aggregation);
* before ``generate_until`` runs, each request's ``max_gen_toks`` (the task's
  ``generation_kwargs`` merged with ``--gen-kwargs`` by lm-eval, else the model's default) is
  compared with the model's context length (lm-eval's ``max_length`` of the model) and capped
  by :func:`fit_max_gen_toks` with a warning, instead of lm-eval's assertion (hf) or a silently
  truncated prompt.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

REQUEST_METHODS = ("generate_until", "loglikelihood", "loglikelihood_rolling")
_MAX_TOKEN_ALIASES = ("max_new_tokens", "max_tokens", "max_completion_tokens")


class GenerationDoesNotFit(ValueError):
    """The model's context cannot hold a prompt and a generated token."""


@dataclass
class Stage:
    """The lm-eval stage a cell is in; a failure is reported with it."""

    name: str = "prepare task"


@dataclass
class CallRecord:
    """What the model calls of one cell did."""

    generation: list[dict[str, Any]] = field(default_factory=list)  # effective settings per group
    warnings: list[str] = field(default_factory=list)


def fit_max_gen_toks(requested: int, context_length: int, longest_prompt: int | None) -> int:
    """How many tokens to generate, given the model's context length and the longest prompt.

    lm-eval gives the prompt ``context_length - max_gen_toks`` tokens (cutting longer prompts
    from the left) and the hf model refuses ``max_gen_toks >= context_length``. The prompt keeps
    its own length, but at most half the context (a longer prompt is cut, as lm-eval always
    does); generation gets the rest, never more than ``requested``:
    ``min(requested, context_length - min(longest_prompt, context_length // 2))``, with at least
    one token for the prompt. :class:`GenerationDoesNotFit` when not even one prompt token and
    one generated token fit.
    """
    prompt = context_length // 2 if longest_prompt is None else min(longest_prompt, context_length // 2)
    allowed = context_length - max(1, prompt)
    if allowed < 1:
        raise GenerationDoesNotFit(
            f"the model's context length ({context_length} tokens) leaves no room for a prompt "
            f"and the generation (max_gen_toks {requested})"
        )
    return min(int(requested), allowed)


def _context_length(lm) -> int | None:
    try:
        value = getattr(lm, "max_length", None)
    except Exception:  # a backend whose max_length needs a loaded engine it does not have
        return None
    return int(value) if isinstance(value, (int, float)) and value > 0 else None


def _prompt_length(lm, context: Any) -> int | None:
    encode = getattr(lm, "tok_encode", None)
    if encode is None or not isinstance(context, str):
        return None
    try:
        return len(encode(context))
    except Exception:
        return None


def fit_requests(lm, requests, model: str, task: str, record: CallRecord) -> None:
    """Cap ``max_gen_toks`` of ``generate_until`` requests to the model's context (in place);
    record the effective generation settings and any warning."""
    from lm_eval.models.utils import normalize_gen_kwargs

    context_length = _context_length(lm)
    default = getattr(lm, "max_gen_toks", 256)
    groups: dict[str, tuple[dict[str, Any], list[Any]]] = {}
    for req in requests:  # args: (context, gen_kwargs[, multimodal inputs])
        gen_kwargs = req.args[1] if len(req.args) > 1 and isinstance(req.args[1], dict) else {}
        key = json.dumps(gen_kwargs, sort_keys=True, default=str)
        groups.setdefault(key, (dict(gen_kwargs), []))[1].append(req)
    for gen_kwargs, reqs in groups.values():
        requested = int(normalize_gen_kwargs(gen_kwargs, default)["max_gen_toks"])
        effective = dict(gen_kwargs)
        entry: dict[str, Any] = {"requested_max_gen_toks": requested}
        if context_length is not None:
            lengths = [_prompt_length(lm, r.args[0]) for r in reqs]
            longest = None if any(n is None for n in lengths) else max(lengths, default=0)
            allowed = fit_max_gen_toks(requested, context_length, longest)
            entry.update(context_length=context_length, longest_prompt=longest)
            if allowed < requested:
                message = (
                    f"task {task!r}, model {model!r}: max_gen_toks {requested} does not fit the "
                    f"model's context length {context_length} (longest prompt "
                    f"{'unknown' if longest is None else longest} tokens); generating at most "
                    f"{allowed} tokens"
                )
                log.warning("%s", message)
                record.warnings.append(message)
                for alias in _MAX_TOKEN_ALIASES:
                    effective.pop(alias, None)
                effective["max_gen_toks"] = allowed
                for req in reqs:
                    req.arguments = (req.args[0], effective, *req.args[2:])
            if longest is not None and longest > context_length - allowed:
                message = (
                    f"task {task!r}, model {model!r}: the longest prompt has {longest} tokens; "
                    f"lm-eval keeps its last {context_length - allowed} (context length "
                    f"{context_length} minus {allowed} to generate)"
                )
                log.warning("%s", message)
                record.warnings.append(message)
        entry["max_gen_toks"] = int(normalize_gen_kwargs(effective, default)["max_gen_toks"])
        entry["gen_kwargs"] = effective
        entry["requests"] = len(reqs)
        record.generation.append(entry)


@contextlib.contextmanager
def observe(lm, model: str, task: str, stage: Stage) -> Iterator[CallRecord]:
    """Within the block, ``lm``'s request methods set ``stage`` and fit generation (module doc)."""
    record = CallRecord()
    wrapped: dict[str, Callable | None] = {}  # name -> the instance's own attribute, if any

    def wrap(name: str, method: Callable) -> Callable:
        def call(requests, *args, **kwargs):
            stage.name = name
            if name == "generate_until":
                fit_requests(lm, requests, model, task, record)
            result = method(requests, *args, **kwargs)
            stage.name = "score"
            return result

        return call

    for name in REQUEST_METHODS:
        method = getattr(lm, name, None)
        if method is not None:
            wrapped[name] = vars(lm).get(name) if hasattr(lm, "__dict__") else None
            setattr(lm, name, wrap(name, method))
    try:
        yield record
    finally:
        for name, own in wrapped.items():
            if own is not None:
                setattr(lm, name, own)
            else:
                delattr(lm, name)  # back to the class's method
