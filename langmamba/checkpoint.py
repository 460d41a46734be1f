"""Saving and loading langmamba models as a folder of safetensors weights plus ``config.json``.

A checkpoint folder holds

- ``config.json``: the registered model class name and module, its constructor arguments
  (``model.get_config()``), the HU normalisation, the langmamba version, the vocabulary and VLM
  backend/id when the model has them (attributes ``vocabulary``, ``vlm_backend``, ``vlm_id`` of the
  model or, for a wrapper such as LangMamba, of the LangAE inside it), and a free ``extra`` dict
  (training step, metrics ...);
- the weights (the frozen codebook included), either ``model.safetensors`` or, when ``max_shard_mb``
  is given and they do not fit one file, ``model-00001-of-0000N.safetensors`` ... plus
  ``model.safetensors.index.json`` mapping each tensor to its file (the Hugging Face layout). A tensor
  larger than a shard is stored in flat pieces listed under ``split_tensors`` in the index, so no file
  exceeds the limit (files come back from the GPU machines at most 16 MiB each).

A model class takes part by being decorated with :func:`langmamba.models.registry.register_model` and
having ``get_config()`` return JSON-serialisable keyword arguments such that ``cls(**config)`` rebuilds the
architecture (tensors such as the codebook are restored from the weights). Loading rebuilds the model, checks every
tensor name and shape, and copies the weights bit-exactly.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from langmamba.errors import CheckpointError
from langmamba.io.atomic import atomic_output
from langmamba.models.registry import MODEL_REGISTRY, registered_name

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
FORMAT_NAME = "langmamba-checkpoint"
FORMAT_VERSION = 1
_SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_MIB = 1024 * 1024
# Conservative safetensors header cost, so shards stay under max_shard_mb including the header.
_HEADER_BASE_BYTES = 1024
_HEADER_PER_TENSOR_BYTES = 256
_METADATA_KEYS = ("vocabulary", "vlm_backend", "vlm_id")


def _registered_name(model: nn.Module) -> str:
    name = registered_name(model)
    if name is None:
        raise CheckpointError(
            f"{type(model).__name__} is not a registered model class; decorate it with "
            "@langmamba.models.registry.register_model so checkpoints can rebuild it"
        )
    return name


def _find_metadata(model: nn.Module, key: str) -> Any:
    """``model.<key>``, else the first non-None plain attribute ``key`` of a submodule (a wrapped LangAE)."""
    value = getattr(model, key, None)
    if value is not None:
        return value
    return next((vars(m)[key] for m in model.modules() if vars(m).get(key) is not None), None)


def _to_json(value: Any, what: str) -> Any:
    """Round-trip through JSON (tuples become lists) and fail with a named error if impossible."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{what} cannot be written to {CONFIG_NAME}: {error}") from error


def _normalization() -> dict:
    from langmamba.normalization import normalization_config

    return normalization_config()


def _version() -> str:
    from langmamba.version import __version__

    return __version__


def _plan_shards(
    tensors: dict[str, torch.Tensor], max_bytes: int
) -> tuple[list[dict[str, torch.Tensor]], dict[str, dict]]:
    """Greedy packing of tensors into shards under ``max_bytes``; oversized tensors are split flat."""
    payload_limit = max_bytes - _HEADER_BASE_BYTES
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    split: dict[str, dict] = {}

    def add(key: str, tensor: torch.Tensor) -> None:
        nonlocal used
        cost = tensor.numel() * tensor.element_size() + _HEADER_PER_TENSOR_BYTES + len(key)
        if used + cost > payload_limit and shards[-1]:
            shards.append({})
            used = 0
        shards[-1][key] = tensor
        used += cost

    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if size + _HEADER_PER_TENSOR_BYTES + len(key) <= payload_limit:
            add(key, tensor)
            continue
        per_part = (payload_limit - _HEADER_PER_TENSOR_BYTES - len(key) - 32) // tensor.element_size()
        if per_part < 1:
            raise CheckpointError(f"max_shard_mb is too small to hold any part of tensor {key!r}")
        flat = tensor.reshape(-1)
        parts = []
        for i in range(math.ceil(flat.numel() / per_part)):
            part_key = f"{key}.__part{i:05d}"
            add(part_key, flat[i * per_part : (i + 1) * per_part].clone())
            parts.append(part_key)
        split[key] = {"shape": list(tensor.shape), "parts": parts}
    return shards, split


def save_checkpoint(
    model: nn.Module,
    directory: str | Path,
    *,
    extra: dict | None = None,
    max_shard_mb: float | None = None,
) -> Path:
    """Write ``model`` to ``directory`` (created if needed; the config.json and weight files of an older
    checkpoint there are replaced, other files are left alone). Returns the folder.

    The save is all-or-nothing: every file is written to a hidden staging folder in ``directory`` first and
    moved into place by renames only once all were written (config.json last), after the earlier checkpoint's
    files were moved aside. A failure at any point leaves the earlier checkpoint as it was and no temporary
    files behind.

    Args:
        model: an instance of a class registered with :func:`~langmamba.models.registry.register_model` that
            has ``get_config()``.
        directory: the checkpoint folder.
        extra: JSON-serialisable values stored under ``"extra"`` in ``config.json``.
        max_shard_mb: largest weight file in MiB; ``None`` writes a single ``model.safetensors``.
    """
    name = _registered_name(model)
    get_config = getattr(model, "get_config", None)
    if not callable(get_config):
        raise CheckpointError(f"{type(model).__name__} has no get_config() method, so it cannot be checkpointed")
    config: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_class": name,
        "model_module": type(model).__module__,
        "model_config": _to_json(get_config(), f"{name}.get_config()"),
        "normalization": _normalization(),
        "langmamba_version": _version(),
    }
    for key in _METADATA_KEYS:
        value = _find_metadata(model, key)
        if value is not None:
            config[key] = _to_json(list(value) if key == "vocabulary" else value, key)
    config["extra"] = _to_json(dict(extra or {}), "extra")

    # Own contiguous CPU copies: safetensors refuses tensors that share memory.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_mb is not None and max_shard_mb <= 0:
        raise CheckpointError(f"max_shard_mb must be positive, got {max_shard_mb}")
    max_bytes = None if max_shard_mb is None else int(max_shard_mb * _MIB)

    directory = Path(directory)
    written: list[str] = []
    backup: Path | None = None
    set_aside = False
    try:
        # Every file is written into a hidden staging folder first; atomic_output then moves them into the
        # checkpoint folder by rename, config.json last.
        with atomic_output(directory / CONFIG_NAME, as_folder=False, overwrite=True) as staging:
            written = _write_weights(tensors, staging, max_bytes, total, config)
            (staging / CONFIG_NAME).write_text(json.dumps(config, indent=1), encoding="utf-8")
            backup = Path(tempfile.mkdtemp(prefix=f".{CONFIG_NAME}.old-", dir=directory))
            _set_aside(directory, backup)
            set_aside = True
    except BaseException:
        if backup is not None:
            _restore(directory, backup, [*written, CONFIG_NAME] if set_aside else [])
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    logger.info("saved %s (%.1f MiB of weights) to %s", name, total / _MIB, directory)
    return directory


def _write_weights(
    tensors: dict[str, torch.Tensor], folder: Path, max_bytes: int | None, total: int, config: dict[str, Any]
) -> list[str]:
    """Write the weight file(s) (and the shard index) into ``folder``, record them under ``config["weights"]``
    and return the names of the files written."""
    from safetensors.torch import save_file

    metadata = {"format": "pt"}
    header_estimate = _HEADER_BASE_BYTES + sum(_HEADER_PER_TENSOR_BYTES + len(k) for k in tensors)
    if max_bytes is None or total + header_estimate <= max_bytes:
        save_file(tensors, str(folder / WEIGHTS_NAME), metadata=metadata)
        config["weights"] = {"files": [WEIGHTS_NAME], "total_size": total}
        return [WEIGHTS_NAME]
    shards, split = _plan_shards(tensors, max_bytes)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file_name, shard in zip(files, shards):
        save_file(shard, str(folder / file_name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file_name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map, "split_tensors": split}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=1), encoding="utf-8")
    config["weights"] = {"files": files, "index": INDEX_NAME, "total_size": total}
    return [*files, INDEX_NAME]


def _is_checkpoint_file(path: Path) -> bool:
    name = path.name
    is_ours = name in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME) or _SHARD_PATTERN.match(name) is not None
    return is_ours and (path.is_file() or path.is_symlink())


def _set_aside(directory: Path, backup: Path) -> None:
    """Move the config.json and weight files of an earlier checkpoint in ``directory`` into ``backup`` (renames).

    config.json goes first, so from then on the folder is no checkpoint at all until the new config.json lands:
    :func:`load_checkpoint` finds shards through ``model.safetensors.index.json``, so old and new weight files
    side by side could otherwise load as a mix of two checkpoints.
    """
    for path in sorted(filter(_is_checkpoint_file, directory.iterdir()), key=lambda p: p.name != CONFIG_NAME):
        os.rename(path, backup / path.name)


def _restore(directory: Path, backup: Path, published: list[str]) -> None:
    """Undo a failed save: remove the new files named ``published`` that reached ``directory`` and move the earlier
    checkpoint back from ``backup`` (config.json last)."""
    for file_name in published:
        (directory / file_name).unlink(missing_ok=True)
    for path in sorted(backup.iterdir(), key=lambda p: p.name == CONFIG_NAME):
        os.rename(path, directory / path.name)
    backup.rmdir()


def read_checkpoint_config(directory: str | Path) -> dict:
    """The parsed ``config.json`` of a checkpoint folder (no weights are read)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder {directory} does not exist")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {directory} is not a langmamba checkpoint")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} cannot be read as JSON: {error}") from error
    if not isinstance(config, dict) or "model_class" not in config or "model_config" not in config:
        raise CheckpointError(f"{path} lacks 'model_class' or 'model_config'; it is not a langmamba checkpoint")
    return config


def _check_expected(config: dict, expected: dict, path: Path) -> None:
    """Each expected entry is looked up at the top level, then in model_config, then in extra."""
    scopes = (config, config.get("model_config", {}), config.get("extra", {}))
    for key, want in expected.items():
        for scope in scopes:
            if key in scope:
                have = scope[key]
                break
        else:
            raise CheckpointError(f"{path} has no entry {key!r} (expected {want!r})")
        if _to_json(have, key) != _to_json(want, key):
            raise CheckpointError(f"{path}: {key!r} is {have!r} in the checkpoint but {want!r} was expected")


def _resolve_class(config: dict, path: Path) -> type[nn.Module]:
    name = config["model_class"]
    if name not in MODEL_REGISTRY:
        import langmamba.models  # noqa: F401  (registers the built-in networks)

        module = config.get("model_module")
        # Only langmamba's own modules are imported on a checkpoint's say-so.
        if name not in MODEL_REGISTRY and isinstance(module, str) and module.startswith("langmamba."):
            try:
                importlib.import_module(module)
            except ImportError as error:
                raise CheckpointError(f"{path}: cannot import {module} for model class {name!r}: {error}") from error
    if name not in MODEL_REGISTRY:
        known = ", ".join(sorted(MODEL_REGISTRY)) or "none"
        raise CheckpointError(f"{path}: unknown model class {name!r} (registered: {known})")
    return MODEL_REGISTRY[name]


def _build(cls: type[nn.Module], config: dict, path: Path) -> nn.Module:
    """``cls(**model_config)``; recorded vocabulary/VLM values go to the constructor if it takes them,
    else onto the first (sub)module holding an unset plain attribute of that name (e.g. a wrapped LangAE)."""
    kwargs = dict(config["model_config"])
    parameters = inspect.signature(cls).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    for key in _METADATA_KEYS:
        if key in config and (accepts_any or key in parameters):
            kwargs[key] = config[key]
    try:
        model = cls(**kwargs)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: cannot rebuild {cls.__name__} from its model_config: {error}") from error
    for key in _METADATA_KEYS:
        if key in config and _find_metadata(model, key) is None:
            holder = next((m for m in model.modules() if key in vars(m) and vars(m)[key] is None), None)
            if holder is not None:
                setattr(holder, key, config[key])
    return model


def _weight_files(directory: Path) -> tuple[list[Path], dict]:
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            files = sorted(set(index["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError, TypeError) as error:
            raise CheckpointError(f"{index_path} is not a valid shard index: {error}") from error
        paths = [directory / f for f in files]
    elif (directory / WEIGHTS_NAME).is_file():
        index, paths = {}, [directory / WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}: the weights are missing")
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"weight shard {path} listed in {index_path} is missing")
    return paths, index


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint folder by name (shards and split tensors reassembled), on the CPU."""
    directory = Path(directory)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    paths, index = _weight_files(directory)
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            tensors.update(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, RuntimeError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    for key, spec in index.get("split_tensors", {}).items():
        try:
            pieces = [tensors.pop(part) for part in spec["parts"]]
            tensors[key] = torch.cat(pieces).reshape(spec["shape"])
        except (KeyError, RuntimeError) as error:
            raise CheckpointError(
                f"{directory / INDEX_NAME}: split tensor {key!r} cannot be reassembled: {error}"
            ) from error
    return tensors


def _check_state(model: nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Names and shapes of the weights against the rebuilt model, listed in the model's order."""

    def listing(items: list[str]) -> str:
        return "; ".join(items[:5]) + (f"; ... ({len(items)} in all)" if len(items) > 5 else "")

    reference = model.state_dict()
    missing = [k for k in reference if k not in tensors]
    unexpected = [k for k in tensors if k not in reference]
    shapes = [
        f"{key!r} has shape {tuple(tensors[key].shape)} in the checkpoint but {tuple(value.shape)} "
        "in the model built from config.json"
        for key, value in reference.items()
        if key in tensors and tuple(tensors[key].shape) != tuple(value.shape)
    ]
    problems = []
    if shapes:
        problems.append(listing(shapes))
    if missing:
        problems.append("missing in the checkpoint: " + listing(missing))
    if unexpected:
        problems.append("not in the model: " + listing(unexpected))
    if problems:
        raise CheckpointError(f"weights in {directory} do not match {type(model).__name__}: " + " | ".join(problems))


def load_checkpoint(
    directory: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    expected: dict | None = None,
) -> nn.Module:
    """Rebuild the model saved in ``directory`` and load its weights strictly and bit-exactly.

    Args:
        directory: a folder written by :func:`save_checkpoint`.
        map_location: device for the returned model.
        expected: entries the checkpoint must have, e.g. ``{"model_class": "LangAE", "codebook_size": 512}``;
            each key is looked up at the top level of ``config.json``, then in ``model_config``, then in
            ``extra``.

    Returns:
        The model in eval mode, with the parsed ``config.json`` as ``model.checkpoint_config``.

    Raises:
        CheckpointError: missing or unreadable files, an unknown model class, a different HU
            normalisation, an ``expected`` entry that differs, or weights whose names or shapes do not
            match the rebuilt model (the message names them).
    """
    directory = Path(directory)
    config = read_checkpoint_config(directory)
    path = directory / CONFIG_NAME
    recorded = config.get("normalization")
    if recorded is not None and _to_json(recorded, "normalization") != _normalization():
        raise CheckpointError(
            f"{path} was trained with HU normalisation {recorded} but this langmamba uses {_normalization()}"
        )
    if expected:
        _check_expected(config, expected, path)
    model = _build(_resolve_class(config, path), config, path)
    tensors = read_weights(directory)
    _check_state(model, tensors, directory)
    float_dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(float_dtypes) == 1:
        # A checkpoint saved in half precision loads as half precision, so values stay bit-exact.
        model.to(dtype=float_dtypes.pop())
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"weights in {directory} do not load into {type(model).__name__}: {error}") from error
    model.checkpoint_config = config
    return model.to(map_location).eval()
