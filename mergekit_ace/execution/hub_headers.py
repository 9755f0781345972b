"""Shapes and dtypes of a Hugging Face Hub model from its safetensors headers, without its tensor data.

Online, :func:`huggingface_hub.get_safetensors_metadata` reads each safetensors file's header by
HTTP range request (the first 100 kB of the file, a second request only for a larger header) and, for
a sharded checkpoint, downloads ``model.safetensors.index.json`` (a few kB, kept in the Hub cache).
The token is huggingface_hub's own: ``HF_TOKEN``, else the one ``hf auth login`` saved.

With ``HF_HUB_OFFLINE=1`` nothing is requested: the headers are read from the files of the model
in the local Hub cache (``HF_HUB_CACHE``), which hold them only where the model was downloaded before.

Every failure is a one-line :class:`~mergekit_ace.errors.UserError` naming the repository.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from mergekit_ace.errors import UserError

Shapes = dict[str, tuple[tuple[int, ...], str]]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def safetensors_file_shapes(files: Iterable[Path]) -> Shapes:
    """name -> (shape, dtype) read from the headers of local safetensors files (``safe_open``
    parses only the header; no tensor is read)."""
    from safetensors import safe_open

    shapes: Shapes = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                sl = fh.get_slice(key)
                shapes[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    return shapes


def is_hub_repo_id(name: str) -> bool:
    """True when ``name`` is a valid Hub repo id (``repo`` or ``namespace/repo``); a missing local
    path such as ``/data/models/x`` or ``./x`` is not one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, as huggingface_hub read it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _where(repo_id: str, revision: str | None) -> str:
    return f"{repo_id}@{revision}" if revision else repo_id


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def read_hub_shapes(repo_id: str, revision: str | None = None) -> Shapes:
    """name -> (shape, dtype) of every tensor of Hub model ``repo_id`` at ``revision`` (default: main),
    from its safetensors headers: by range request, or from the local cache when offline."""
    if hub_offline():
        return read_cached_shapes(repo_id, revision)
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        NotASafetensorsRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _where(repo_id, revision)
    try:
        meta = huggingface_hub.get_safetensors_metadata(repo_id, revision=revision)
    except GatedRepoError:
        raise UserError(gated_message(repo_id)) from None
    except NotASafetensorsRepoError:
        # file_exists() answers False for a missing repo, a missing revision and a private repo
        # without access alike, so the Hub's answer cannot tell these apart.
        raise UserError(f"{where}: neither a local directory nor a Hub model with {SINGLE_FILE} or {INDEX_FILE} "
                        "(check the id and revision; a private repo needs HF_TOKEN; plan reads safetensors "
                        "checkpoints only)") from None
    except RevisionNotFoundError:
        raise UserError(f"{where}: the Hub has no revision {revision!r} of {repo_id}") from None
    except RepositoryNotFoundError:
        raise UserError(f"{where}: no such model on the Hub (or a private one: set HF_TOKEN)") from None
    except HfHubHTTPError as error:
        raise UserError(f"{where}: the Hub refused to serve its safetensors headers: {_first_line(error)}") from error
    except Exception as error:  # network failures (connection, timeout), unparsable headers
        raise UserError(f"{where}: could not read its safetensors headers from the Hub "
                        f"({type(error).__name__}: {_first_line(error)}); with the model in the local Hub "
                        "cache, HF_HUB_OFFLINE=1 plans from there") from error
    return {name: (tuple(int(s) for s in info.shape), str(info.dtype))
            for file_meta in meta.files_metadata.values() for name, info in file_meta.tensors.items()}


def gated_message(repo_id: str) -> str:
    """One line for a gated repo that refused us: whether a token was sent, and what to do."""
    from huggingface_hub import get_token

    try:
        token = get_token()
    except Exception:  # an OIDC exchange that failed counts as no token
        token = None
    page = f"https://huggingface.co/{repo_id}"
    if token:
        return (f"{repo_id}: gated repo, access refused for the token in use: accept its licence at {page} "
                "with that token's account (or set HF_TOKEN to a token of an account that has)")
    return (f"{repo_id}: gated repo and no Hugging Face token: accept its licence at {page}, then set HF_TOKEN "
            "(or run `hf auth login`)")


def read_cached_shapes(repo_id: str, revision: str | None = None) -> Shapes:
    """The headers of ``repo_id``'s safetensors files in the local Hub cache (``HF_HUB_OFFLINE``):
    ``model.safetensors``, or the index and every shard it names."""
    from huggingface_hub import constants, try_to_load_from_cache

    where = _where(repo_id, revision)

    def cached(filename: str) -> Path | None:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        return Path(found) if isinstance(found, str) else None

    single = cached(SINGLE_FILE)
    if single is not None:
        return safetensors_file_shapes([single])
    index = cached(INDEX_FILE)
    if index is None:
        raise UserError(f"{where}: HF_HUB_OFFLINE is set and the local Hub cache ({constants.HF_HUB_CACHE}) "
                        f"has no {SINGLE_FILE} or {INDEX_FILE} of it; unset HF_HUB_OFFLINE to read the "
                        "headers from the Hub")
    try:
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"{where}: the cached {INDEX_FILE} is not a safetensors index ({error})") from error
    shards = {name: cached(name) for name in shard_names}
    missing = [name for name, path in shards.items() if path is None]
    if missing:
        raise UserError(f"{where}: HF_HUB_OFFLINE is set and {len(missing)} of its {len(shards)} shard(s) are "
                        f"not in the local Hub cache, e.g. {missing[0]}; unset HF_HUB_OFFLINE to read the "
                        "headers from the Hub")
    return safetensors_file_shapes(shards.values())
