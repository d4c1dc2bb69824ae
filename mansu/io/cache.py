"""Stage artifacts keyed by the config that produced them, shared by every run and sweep job.

A stage's result is stored under cache_dir/<stage>/<key>/; the key hashes exactly the config parts
that decide it (θ0's evaluation does not depend on the method, so a sweep over methods evaluates θ0
once). An entry is one unit: its files are written into a temp folder with a manifest of their
sizes and SHA-256 written last, and the folder is renamed into place, so a killed job leaves a whole
entry or none. Every read checks the manifest; an entry that is missing a file or does not match is
discarded with one warning naming it and recomputed, never half used.

Only JSON and safetensors are stored (no pickle: a cache is shared on a cluster and copied between
machines, and loading it must not run code). Python values holding tensors — dataclasses such as
Attribution and Circuit, tuples, dicts with tuple keys — are encoded by `encode`/`decode` below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

FORMAT = 2  # entry layout version; entries of another version are recomputed
MANIFEST = "manifest.json"
VALUE = "value.json"
TENSORS = "tensors.safetensors"
# Dataclasses are rebuilt only from the project's own modules: a planted entry cannot name others.
TRUSTED_MODULES = ("mansu", "baselines")


class CorruptEntry(ValueError):
    """A cache entry that is incomplete, altered, or not decodable."""


def key_of(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Values holding tensors <-> (JSON skeleton, named tensors)


def encode(value, tensors: dict[str, torch.Tensor], path: str = "v"):
    """The JSON skeleton of `value`; its tensors go into `tensors` under their path in the value."""
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        fields = {f.name: encode(getattr(value, f.name), tensors, f"{path}.{f.name}")
                  for f in dataclasses.fields(value) if f.init}
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in value.items()}
        return {"__items__": [[encode(k, tensors, f"{path}.k{i}"), encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(value.items())]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalars
        return value.item()
    raise TypeError(f"cannot store a {type(value).__name__} in the cache (at {path})")


def decode(skeleton, tensors: dict[str, torch.Tensor]):
    if isinstance(skeleton, list):
        return [decode(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        if skeleton["__tensor__"] not in tensors:
            raise CorruptEntry(f"tensor {skeleton['__tensor__']!r} is missing")
        return tensors[skeleton["__tensor__"]]
    if "__tuple__" in skeleton:
        return tuple(decode(v, tensors) for v in skeleton["__tuple__"])
    if "__items__" in skeleton:
        return {_hashable(decode(k, tensors)): decode(v, tensors) for k, v in skeleton["__items__"]}
    if "__dataclass__" in skeleton:
        cls = trusted_dataclass(skeleton["__dataclass__"])
        return cls(**{k: decode(v, tensors) for k, v in skeleton["fields"].items()})
    return {k: decode(v, tensors) for k, v in skeleton.items()}


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def trusted_dataclass(name: str) -> type:
    module_name, _, qualname = name.partition(":")
    if module_name.split(".")[0] not in TRUSTED_MODULES:
        raise CorruptEntry(f"refusing to rebuild {name}: not a class of this project")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise CorruptEntry(f"class {name} no longer exists ({err})") from None
    if not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        raise CorruptEntry(f"{name} is not a dataclass")
    return obj


# ---------------------------------------------------------------------------------------------
# Entries


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_entry(folder: Path, value) -> None:
    """Write `value` as folder/{value.json, tensors.safetensors, manifest.json}, as one unit."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = encode(value, tensors)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    tmp.mkdir()
    try:
        (tmp / VALUE).write_text(json.dumps(skeleton), encoding="utf-8")
        if tensors:
            save_file(tensors, tmp / TENSORS)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
                 for p in sorted(tmp.iterdir())}
        with (tmp / MANIFEST).open("w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / MANIFEST).is_file():  # not a concurrent writer of the same entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_entry(folder: Path):
    """The value stored in `folder`; CorruptEntry when any file is missing, altered or unreadable."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CorruptEntry(f"no {MANIFEST} (an unfinished or foreign entry)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptEntry(f"unreadable {MANIFEST}: {err}") from None
    if manifest.get("format") != FORMAT or VALUE not in files:
        raise CorruptEntry(f"entry format {manifest.get('format')!r}, expected {FORMAT}")
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CorruptEntry(f"{name} is missing")
        if path.stat().st_size != expected["bytes"]:
            raise CorruptEntry(f"{name} has {path.stat().st_size} bytes, expected {expected['bytes']}")
        if sha256_of(path) != expected["sha256"]:
            raise CorruptEntry(f"{name} does not match its SHA-256")
    try:
        skeleton = json.loads((folder / VALUE).read_text(encoding="utf-8"))
        tensors = load_file(folder / TENSORS) if TENSORS in files else {}
        return decode(skeleton, tensors)
    except CorruptEntry:
        raise
    except Exception as err:  # any decoding failure means the entry cannot be trusted
        raise CorruptEntry(f"cannot decode: {type(err).__name__}: {err}") from None


class StageCache:
    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = enabled

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def get(self, stage: str, key: str, compute: Callable[[], object]):
        """The cached value of (stage, key), or compute() stored as a new entry (neither read nor
        written when the cache is off)."""
        folder = self.entry(stage, key)
        if not self.enabled:
            return compute()
        if folder.exists():
            try:
                value = read_entry(folder)
                log.info("%s: reusing %s", stage, folder)
                return value
            except CorruptEntry as err:
                log.warning("cache entry %s is discarded and recomputed: %s", folder, err)
                shutil.rmtree(folder, ignore_errors=True)
        value = compute()
        write_entry(folder, value)
        return value

    # JSON results, tensors and objects holding tensors are all entries of the same form.
    json = objects = tensors = get
