"""Checkpoints that are safe to load and survive a killed save.

A checkpoint is a folder::

    checkpoint.json       the manifest: the generation's id, and the size and sha256 of each file below
    model.safetensors     the weights
    config.json           everything needed to rebuild the model and its task (model name and
                          config, vocabularies, data, history, metrics)
    trainer.safetensors   for resuming: the trainer state's tensors (optimizer moments, torch RNG)
    trainer.json          ... and the rest of it (epoch, scheduler, history, Python and NumPy RNG),
                          each tensor replaced by its name in trainer.safetensors

Guarantees (SPEC §7):

* **No pickle.** Loading parses JSON and safetensors only, so nothing in a checkpoint can run
  code. A ``trainer.pt`` (the pickle that earlier attnkit versions wrote) is refused, never opened.
* **A save replaces the checkpoint as a unit.** :func:`save_checkpoint` writes every file of the
  new generation under a fresh hidden name (``.<generation>.model.safetensors``, ...), fsyncs them,
  then renames its ``checkpoint.json`` into place: that rename is the commit. Only then are the
  files renamed to their plain names and the previous generation's leftovers deleted.
  :func:`load_checkpoint` follows ``checkpoint.json`` (hidden name first, then plain name) and checks
  every size and sha256. So a process killed at any moment leaves a folder that loads as the
  complete previous checkpoint or the complete new one, never a mix; a save that fails with an
  exception removes what it wrote and leaves the previous files as they were. One writer at a time.
* **Clear errors.** A missing, truncated, damaged or hand-edited file, a manifest or trainer state
  that is not ours, a ``config.json`` that is not a JSON object or has a field of the wrong type,
  an unknown task: ``ValueError`` naming the file and what is wrong.

A folder without ``checkpoint.json`` (written by an earlier attnkit, or whose manifest was deleted
to accept hand-edited files) loads from its plain file names as they are.

Example::

    >>> import tempfile, torch, attnkit.checkpoint as ck
    >>> m = torch.nn.Linear(2, 3)
    >>> opt = torch.optim.Adam(m.parameters())
    >>> d = tempfile.mkdtemp()
    >>> ck.save_checkpoint(d, model=m, config={"model": "linear"}, trainer_state={"optimizer": opt.state_dict()})
    >>> c = ck.load_checkpoint(d, with_trainer=True)
    >>> torch.equal(c.state_dict["weight"], m.weight.detach()), c.trainer_state["optimizer"]["param_groups"][0]["betas"]
    (True, (0.9, 0.999))
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._io import fsync_dir, write_durably

MANIFEST_FILE = "checkpoint.json"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TRAINER_FILE = "trainer.json"
TRAINER_TENSORS_FILE = "trainer.safetensors"
LEGACY_TRAINER_FILE = "trainer.pt"
_FILES = (MODEL_FILE, CONFIG_FILE, TRAINER_FILE, TRAINER_TENSORS_FILE)
_FORMAT, _TRAINER_FORMAT, _VERSION = "attnkit-checkpoint", "attnkit-trainer-state", 1
_STAGED = re.compile(r"\.([0-9a-f]{16})\.(.+)")  # .<generation>.<file name>: a file before its rename

# Top-level config.json fields that the tasks, the CLI and attnkit viz read, and their JSON types.
_CONFIG_FIELDS: dict[str, type | tuple[type, ...]] = {
    "task": str, "model": str, "model_config": dict, "data": dict, "train": dict, "decode": dict,
    "metrics": dict, "src_tokenizer": dict, "tgt_tokenizer": dict, "vocab": list, "src_vocab": list,
    "tgt_vocab": list, "joint": bool, "bleu_tokenize": str, "history": (dict, list)}
_JSON_NAMES = {str: "a string", dict: "an object", list: "an array", bool: "true or false"}


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    trainer_state: dict[str, Any] | None = field(default=None)

    def require(self, keys: tuple[str, ...], kind: str) -> dict[str, Any]:
        """The config, after checking that it has every key a ``kind`` checkpoint's rebuild reads
        (``ValueError`` naming the first missing key and the file otherwise)."""
        for key in keys:
            if key not in self.config:
                raise ValueError(f"checkpoint {str(self.path)!r}: config.json has no {key!r} (not a {kind} checkpoint?)")
        return self.config


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def save_checkpoint(directory: str | os.PathLike, *, model: torch.nn.Module, config: dict[str, Any],
                    trainer_state: dict[str, Any] | None = None) -> None:
    """Save ``model``'s weights, a JSON-serializable ``config`` and optionally a trainer state as
    the new generation of the checkpoint in ``directory`` (see the module docstring).

    ``trainer_state`` may nest dicts (any JSON-like keys), lists and tuples of tensors, NumPy arrays,
    numbers, strings, bools and None: optimizer and scheduler state dicts, :func:`attnkit.training.rng_state`.
    It loads back equal, with the same types. A save without it leaves a checkpoint that cannot
    be resumed. Under ``torch.distributed`` only rank 0 writes; on the other ranks this does nothing.

    Raises:
        TypeError: ``config`` is not JSON-serializable or ``trainer_state`` holds another type;
            nothing is written then.
    """
    from safetensors.torch import save

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return  # under torch.distributed rank 0 alone writes (every rank holds the same model)
    try:
        text = json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise TypeError(f"config must be JSON-serializable: {e}") from None
    # safetensors refuses shared storage (tied embeddings): store a copy under each name.
    weights = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    files = {MODEL_FILE: save(weights), CONFIG_FILE: (text + "\n").encode("utf-8")}
    if trainer_state is not None:
        tensors: dict[str, torch.Tensor] = {}
        tree = _encode(trainer_state, "", tensors)
        doc = {"format": _TRAINER_FORMAT, "version": _VERSION, "state": tree}
        files[TRAINER_FILE] = (json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8")
        files[TRAINER_TENSORS_FILE] = save(tensors)
    _write_generation(Path(directory), files)


def _write_generation(d: Path, files: dict[str, bytes]) -> None:
    """Stage ``files`` under hidden names, commit them by renaming a manifest into place, then
    give them their plain names and delete the previous generation's leftovers."""
    generation = secrets.token_hex(8)
    manifest = {"format": _FORMAT, "version": _VERSION, "generation": generation,
                "files": {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                          for name, data in files.items()}}
    staged = {name: d / f".{generation}.{name}" for name in [*files, MANIFEST_FILE]}
    d.mkdir(parents=True, exist_ok=True)
    try:
        for name, data in files.items():
            write_durably(staged[name], data)
        write_durably(staged[MANIFEST_FILE], (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        fsync_dir(d)
        os.replace(staged[MANIFEST_FILE], d / MANIFEST_FILE)  # the commit
    except Exception:
        for path in staged.values():
            path.unlink(missing_ok=True)
        raise
    fsync_dir(d)
    for name in files:  # plain names, for people and earlier readers; a reader takes either name
        os.replace(staged[name], d / name)
    fsync_dir(d)
    for path in d.iterdir():  # a save killed earlier, the previous generation's trainer state, a trainer.pt
        m = _STAGED.fullmatch(path.name)
        if (m and m.group(1) != generation and m.group(2) in (*_FILES, MANIFEST_FILE)) or (
                path.name in (*_FILES, LEGACY_TRAINER_FILE) and path.name not in files):
            with contextlib.suppress(OSError):  # the save is committed: a leftover is only untidy
                path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_checkpoint(directory: str | os.PathLike, *, with_trainer: bool = False) -> Checkpoint:
    """Read a checkpoint folder written by :func:`save_checkpoint` (or by an earlier attnkit,
    without its pickled trainer state). ``with_trainer=True`` also reads the trainer state.

    Raises:
        ValueError: naming the file, when the folder or a file is missing, a file does not match
            ``checkpoint.json``, cannot be parsed, or ``config.json`` fails :func:`validate_config`;
            when ``with_trainer`` and there is no trainer state, or only a pickled ``trainer.pt``.
    """
    d = Path(directory)
    if not d.is_dir():
        raise ValueError(f"checkpoint {str(d)!r} is not a folder (expected {MODEL_FILE} and {CONFIG_FILE} in it)")
    files = _read_files(d, [MODEL_FILE, CONFIG_FILE] + ([TRAINER_FILE, TRAINER_TENSORS_FILE] if with_trainer else []))
    config = _parse_json(files[CONFIG_FILE], d / CONFIG_FILE, "checkpoint config")
    validate_config(config, d / CONFIG_FILE)
    state = _parse_safetensors(files[MODEL_FILE], d / MODEL_FILE, "checkpoint weights")
    trainer = None
    if with_trainer:
        doc = _parse_json(files[TRAINER_FILE], d / TRAINER_FILE, "trainer state")
        tensors = _parse_safetensors(files[TRAINER_TENSORS_FILE], d / TRAINER_TENSORS_FILE, "trainer tensors")
        try:
            if not (isinstance(doc, dict) and doc.get("format") == _TRAINER_FORMAT and doc.get("version") == _VERSION):
                raise ValueError(f"expected an object with format {_TRAINER_FORMAT!r}, version {_VERSION}")
            trainer = _decode(doc["state"], tensors)
        except Exception as e:  # noqa: BLE001 - whatever is malformed, the file is
            raise ValueError(f"trainer state {str(d / TRAINER_FILE)!r} is malformed: {e}") from None
    return Checkpoint(d, config, state, trainer)


def validate_config(config: Any, path: str | os.PathLike = CONFIG_FILE) -> dict[str, Any]:
    """Check a checkpoint's config: a JSON object whose known fields (``task``, ``model``,
    ``model_config``, ``data``, ...) have the right JSON types and whose ``task``, if present,
    is a registered task. Returns ``config``; raises ``ValueError`` naming ``path`` otherwise.

    >>> validate_config({"task": "dates", "model_config": []}, "c/config.json")
    Traceback (most recent call last):
    ...
    ValueError: checkpoint config 'c/config.json': field 'model_config' must be an object; got []
    """
    where = f"checkpoint config {str(path)!r}"
    if not isinstance(config, dict):
        raise ValueError(f"{where} must hold a JSON object; got {_show(config)}")
    for key, types in _CONFIG_FIELDS.items():
        if key in config and not isinstance(config[key], types):
            names = " or ".join(_JSON_NAMES[t] for t in (types if isinstance(types, tuple) else (types,)))
            raise ValueError(f"{where}: field {key!r} must be {names}; got {_show(config[key])}")
    if "task" in config:
        from . import tasks

        if config["task"] not in tasks.names():
            raise ValueError(f"{where}: unknown task {config['task']!r}; valid names: "
                             + ", ".join(repr(n) for n in tasks.names()))
    return config


def _read_files(d: Path, names: list[str]) -> dict[str, bytes]:
    """The bytes of ``names``: those of the generation ``checkpoint.json`` commits, checked against
    it, or (no manifest) the plain files as they are."""
    for attempt in range(3):
        raw = _read(d / MANIFEST_FILE)
        if raw is None:
            return {name: _read_plain(d, name) for name in names}
        manifest = _parse_manifest(raw, d / MANIFEST_FILE)
        try:
            return {name: _read_verified(d, name, manifest) for name in names}
        except ValueError:
            if attempt == 2 or _read(d / MANIFEST_FILE) == raw:
                raise
            # else a save committed a new generation while we read: read that one


def _read_plain(d: Path, name: str) -> bytes:
    data = _read(d / name)
    if data is None:
        if name in (TRAINER_FILE, TRAINER_TENSORS_FILE) and (d / LEGACY_TRAINER_FILE).exists():
            raise ValueError(f"trainer state {str(d / LEGACY_TRAINER_FILE)!r} is a pickle (written by an earlier "
                             "attnkit); attnkit no longer loads pickles, because unpickling can run arbitrary code. "
                             "Retrain to resume; the weights and config.json still load without --resume")
        raise _missing(d, name)
    return data


def _read_verified(d: Path, name: str, manifest: dict[str, Any]) -> bytes:
    entry = manifest["files"].get(name)
    if entry is None:
        raise _missing(d, name)
    for path in (d / f".{manifest['generation']}.{name}", d / name):  # before and after its rename
        data = _read(path)
        if data is not None and len(data) == entry["size"] and hashlib.sha256(data).hexdigest() == entry["sha256"]:
            return data
    if data is None:
        raise ValueError(f"checkpoint {str(d)!r} has no {name} (its {MANIFEST_FILE} lists it)")
    what = f"{len(data)} bytes, {entry['size']} expected" if len(data) != entry["size"] else "its sha256 differs"
    raise ValueError(f"checkpoint file {str(d / name)!r} does not match {MANIFEST_FILE} ({what}): it is truncated, "
                     f"damaged or was changed after the save. Restore it, or delete {MANIFEST_FILE} to load the "
                     "files as they are")


def _missing(d: Path, name: str) -> ValueError:
    if name in (TRAINER_FILE, TRAINER_TENSORS_FILE):
        return ValueError(f"checkpoint {str(d)!r} has no trainer state ({TRAINER_FILE}): it cannot be resumed")
    return ValueError(f"checkpoint {str(d)!r} has no {name}")


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ValueError(f"checkpoint file {str(path)!r} cannot be read: {e}") from None


def _parse_manifest(raw: bytes, path: Path) -> dict[str, Any]:
    m = _parse_json(raw, path, "checkpoint manifest")
    if not isinstance(m, dict) or m.get("format") != _FORMAT:
        raise ValueError(f"checkpoint manifest {str(path)!r} is not an attnkit checkpoint manifest")
    if m.get("version") != _VERSION:
        raise ValueError(f"checkpoint manifest {str(path)!r} has version {m.get('version')!r}; this attnkit reads "
                         f"version {_VERSION} (was it written by a newer attnkit?)")
    files = m.get("files")
    ok = (isinstance(m.get("generation"), str) and re.fullmatch(r"[0-9a-f]{16}", m["generation"])
          and isinstance(files, dict) and {MODEL_FILE, CONFIG_FILE} <= files.keys() <= set(_FILES)
          and (TRAINER_FILE in files) == (TRAINER_TENSORS_FILE in files)
          and all(isinstance(e, dict) and type(e.get("size")) is int and isinstance(e.get("sha256"), str)
                  and re.fullmatch(r"[0-9a-f]{64}", e["sha256"]) for e in files.values()))
    if not ok:
        raise ValueError(f"checkpoint manifest {str(path)!r} is malformed: expected a 16-hex-digit 'generation' and "
                         f"'files' with the 'size' and 'sha256' of {MODEL_FILE}, {CONFIG_FILE} and optionally "
                         f"{TRAINER_FILE} with {TRAINER_TENSORS_FILE}")
    return m


def _parse_json(data: bytes, path: Path, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{what} {str(path)!r} is not valid JSON: {e}") from None


def _parse_safetensors(data: bytes, path: Path, what: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:  # noqa: BLE001 - SafetensorError and friends: the file is not readable
        raise ValueError(f"{what} {str(path)!r} are not a readable safetensors file: {e}") from None


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# The trainer state as JSON + tensors. JSON objects with string keys stay objects; the rest are
# tagged objects {"__type__": ...}: tuples, dicts with other keys (optimizer states have int
# keys), tensors (their name in trainer.safetensors) and NumPy arrays (their values).
# ---------------------------------------------------------------------------------------------

_TYPE = "__type__"


def _encode(x: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, np.generic) and x.dtype.kind in "biuf":  # np.int64(3) -> 3
        return x.item()
    if isinstance(x, torch.Tensor):
        name = path.lstrip(".") or "tensor"
        while name in tensors:
            name += "'"
        tensors[name] = x.detach().cpu().contiguous().clone()
        return {_TYPE: "tensor", "name": name}
    if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
        return {_TYPE: "ndarray", "dtype": x.dtype.str, "shape": list(x.shape), "data": x.ravel().tolist()}
    if isinstance(x, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(x)]
    if isinstance(x, tuple):
        return {_TYPE: "tuple", "items": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(x)]}
    if isinstance(x, dict):
        if all(isinstance(k, str) for k in x) and _TYPE not in x:
            return {k: _encode(v, f"{path}.{k}", tensors) for k, v in x.items()}
        return {_TYPE: "dict", "items": [[_encode(k, f"{path}.{k}", tensors), _encode(v, f"{path}.{k}", tensors)]
                                         for k, v in x.items()]}
    raise TypeError(f"trainer_state{path or ''} is a {type(x).__name__}; a trainer state holds only dicts, lists, "
                    "tuples, tensors, NumPy number arrays, numbers, strings, bools and None")


def _decode(x: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(x, list):
        return [_decode(v, tensors) for v in x]
    if not isinstance(x, dict):
        return x
    kind = x.get(_TYPE)
    if kind is None:
        return {k: _decode(v, tensors) for k, v in x.items()}
    if kind == "tuple":
        return tuple(_decode(v, tensors) for v in x["items"])
    if kind == "dict":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in x["items"]}
    if kind == "tensor":
        if x["name"] not in tensors:
            raise ValueError(f"tensor {x['name']!r} is not in {TRAINER_TENSORS_FILE}")
        return tensors[x["name"]]
    if kind == "ndarray":
        dtype = np.dtype(x["dtype"])
        if dtype.kind not in "biuf":
            raise ValueError(f"array dtype {x['dtype']!r} is not a number type")
        return np.array(x["data"], dtype=dtype).reshape(x["shape"])
    raise ValueError(f"unknown {_TYPE} {kind!r}")


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint) -> torch.nn.Module:
    """Load a checkpoint's weights into ``model``, with a clear error on a mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(checkpoint.state_dict))
    unexpected = sorted(set(checkpoint.state_dict) - set(own))
    bad = sorted(k for k in set(own) & set(checkpoint.state_dict) if own[k].shape != checkpoint.state_dict[k].shape)
    if missing or unexpected or bad:
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:5]}")
        if bad:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: checkpoint {tuple(checkpoint.state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in bad[:5]))
        raise ValueError(f"checkpoint {str(checkpoint.path)!r} does not match the model: " + "; ".join(parts))
    model.load_state_dict(checkpoint.state_dict)
    return model
