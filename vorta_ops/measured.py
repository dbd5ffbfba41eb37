"""Measured routing tables: the training-free router's per-head branch errors, on disk.

Two uses, one file format (safetensors, like the router files):

* a cache (``ErrorCache``): one file per measurement key (model fingerprint with its LoRAs and
  strengths, token grid, the sampler's rounded sigmas, CFG, branch options, row sampling and this
  module's PROFILE_VERSION), holding the errors of every denoising span measured under that key.
  A rerun with the same key finds them and measures nothing. The key's text is stored in the file
  and compared on load, so a hash collision can never hand over another run's errors.
* a shareable router (``MeasuredTable``, ``save_measured`` / ``load_measured``): the spans and
  their errors plus the tau they are read with. The Router Loader loads it like a trained router;
  it decides per head the cheapest branch within tau (vorta_ops.profiling.decide_from_errors).

Errors are stored, never decisions: changing tau needs no new measurement.

Tensors: ``errors`` float32 [spans, blocks, heads, branches] (NaN = not measured). Metadata:
format, format_version, branch_order, and a JSON ``spans`` list of [first, last] sampling percents
(0 = the start of denoising) per span, in schedule order.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .branches import BRANCH_NAMES, N_BRANCHES
from .router_io import RouterFileError  # (router_io imports this module only inside load_router)

__all__ = ["PROFILE_VERSION", "MEASURED_FORMAT", "MeasuredTable", "ErrorCache", "save_measured", "load_measured",
           "is_measured_file", "span_key"]

# Bump when what the errors mean changes (row sampling, the error measure, a branch's maths):
# cached measurements of an older version are then never used.
PROFILE_VERSION = 1
MEASURED_FORMAT = "vorta-measured"
FORMAT_VERSION = "1"
BRANCH_ORDER = ",".join(BRANCH_NAMES)


def span_key(first: float, last: float) -> tuple[float, float]:
    """A span's identity: its first and last step's sampling percent, rounded (stable across runs
    of the same schedule, different for the two halves of a split schedule)."""
    return (round(float(first), 4), round(float(last), 4))


class MeasuredFileError(RouterFileError):
    """A measured-table file that cannot be read or written (one line: what and what to do)."""


@dataclass
class MeasuredTable:
    """Errors per denoising span, read with ``tau``. spans: [(first, last)] sampling percents."""

    family: str
    spans: list[tuple[float, float]]
    errors: torch.Tensor  # float32 [spans, blocks, heads, N_BRANCHES]
    tau: float
    warmup: float = 0.0
    dense_block0: bool = True
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        e = self.errors
        if e.dim() != 4 or e.shape[-1] != N_BRANCHES or e.shape[0] != len(self.spans):
            raise ValueError(f"errors must be [spans={len(self.spans)}, blocks, heads, {N_BRANCHES}], got {tuple(e.shape)}")
        if not self.tau >= 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")

    @property
    def blocks(self) -> int:
        return self.errors.shape[1]

    @property
    def heads(self) -> int:
        return self.errors.shape[2]

    def span_index(self, percent: float | None, eps: float = 1e-3) -> int | None:
        """The span a step at this sampling percent belongs to: the last span starting at or before
        it (a span runs until the next one starts), None before the first (warm-up: dense) or after
        the last span's last step when that step ends the schedule's routed part."""
        if percent is None or not self.spans:
            return None
        idx = None
        for i, (first, _) in enumerate(self.spans):
            if percent >= first - eps:
                idx = i
        if idx is None:
            return None
        last = self.spans[-1][1]
        if idx == len(self.spans) - 1 and percent > last + eps and self.meta.get("last_dense") == "1":
            return None
        return idx

    def describe(self) -> str:
        return (f"measured router ({self.family}, {self.blocks} blocks x {self.heads} heads, {len(self.spans)} spans, "
                f"tau {self.tau:g})")


def _atomic_save(tensors: dict, meta: dict, path: Path) -> None:
    """safetensors into a temporary file beside ``path``, then renamed onto it (router_io's rule)."""
    from safetensors.torch import save_file

    from .router_io import _atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _read(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError, OSError
        raise MeasuredFileError(f"{path}: not a readable safetensors file (corrupt or truncated?): {e}") from e
    return meta, tensors


def is_measured_file(meta: dict) -> bool:
    return meta.get("format") == MEASURED_FORMAT


def _check_meta(meta: dict, path: Path) -> None:
    if not is_measured_file(meta):
        raise MeasuredFileError(f"{path}: not a VORTA measured table (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MeasuredFileError(f"{path}: measured-table version {meta.get('format_version')!r} is not supported; "
                                f"this version reads {FORMAT_VERSION}. Update the pack or measure again.")
    if meta.get("branch_order") != BRANCH_ORDER:
        raise MeasuredFileError(f"{path}: branch order {meta.get('branch_order')!r}, expected {BRANCH_ORDER!r} "
                                f"(the branches of this version); measure again")


def save_measured(table: MeasuredTable, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a shareable measured router. Refuses to replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise MeasuredFileError(f"{path}: a measured router is saved as .safetensors")
    if path.exists() and not overwrite:
        raise MeasuredFileError(f"{path} already exists; choose another name (nothing was overwritten)")
    meta = {
        "format": MEASURED_FORMAT, "format_version": FORMAT_VERSION, "branch_order": BRANCH_ORDER,
        "family": table.family, "blocks": str(table.blocks), "heads": str(table.heads),
        "spans": json.dumps([list(s) for s in table.spans]), "tau": repr(float(table.tau)),
        "warmup": repr(float(table.warmup)), "dense_block0": "1" if table.dense_block0 else "0",
        "meta": json.dumps({str(k): str(v) for k, v in table.meta.items()}),
    }
    try:
        _atomic_save({"errors": table.errors.to(torch.float32).contiguous()}, meta, path)
    except Exception as e:
        raise MeasuredFileError(f"cannot write {path}: {' '.join(str(e).split()) or type(e).__name__}") from e
    return path


def load_measured(path: str | os.PathLike, meta: dict | None = None, tensors: dict | None = None) -> MeasuredTable:
    path = Path(path)
    if meta is None or tensors is None:
        meta, tensors = _read(path)
    _check_meta(meta, path)
    try:
        spans = [span_key(*s) for s in json.loads(meta["spans"])]
        extra = json.loads(meta.get("meta", "{}"))
        table = MeasuredTable(meta.get("family", "generic"), spans, tensors["errors"].float(), float(meta["tau"]),
                              float(meta.get("warmup", "0")), meta.get("dense_block0", "1") == "1", extra)
    except (KeyError, ValueError, TypeError) as e:
        raise MeasuredFileError(f"{path}: measured-table contents are incomplete or malformed ({e})") from e
    declared = (int(meta.get("blocks", -1)), int(meta.get("heads", -1)))
    if declared != (table.blocks, table.heads):
        raise MeasuredFileError(f"{path}: errors {tuple(table.errors.shape)} do not match blocks x heads {declared}")
    return table


class ErrorCache:
    """Measured errors on disk, one file per measurement key in ``folder``."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.writes = 0  # files written (tests)

    @staticmethod
    def key_text(fields: dict) -> str:
        return json.dumps({**fields, "profile_version": PROFILE_VERSION}, sort_keys=True, default=repr)

    def path(self, key_text: str) -> Path:
        return self.folder / (hashlib.sha256(key_text.encode()).hexdigest()[:32] + ".safetensors")

    def load(self, key_text: str) -> dict[tuple[float, float], torch.Tensor]:
        """{span key: errors [blocks, heads, branches]} stored under this key ({} if none)."""
        path = self.path(key_text)
        if not path.exists():
            return {}
        try:
            meta, tensors = _read(path)
            _check_meta(meta, path)
            if meta.get("key") != key_text:
                return {}  # another key with the same hash: never use its errors
            spans = [span_key(*s) for s in json.loads(meta["spans"])]
            errors = tensors["errors"].float()
            # a span holds when every block measured some sparse branch (Profiler.finish's rule)
            return {s: errors[i] for i, s in enumerate(spans) if bool((~errors[i, ..., 1:].isnan()).any(-1).any(-1).all())}
        except (MeasuredFileError, KeyError, ValueError, TypeError):
            return {}  # unreadable cache entry: measure again (it is rewritten then)

    def store(self, key_text: str, span: tuple[float, float], errors: torch.Tensor) -> Path:
        """Add (or replace) one span's errors in the key's file."""
        found = self.load(key_text)
        found[span_key(*span)] = errors.to("cpu", torch.float32)
        spans = sorted(found)
        meta = {"format": MEASURED_FORMAT, "format_version": FORMAT_VERSION, "branch_order": BRANCH_ORDER,
                "key": key_text, "spans": json.dumps([list(s) for s in spans]),
                "blocks": str(errors.shape[0]), "heads": str(errors.shape[1]), "tau": "0", "cache": "1"}
        path = self.path(key_text)
        _atomic_save({"errors": torch.stack([found[s] for s in spans]).contiguous()}, meta, path)
        self.writes += 1
        return path
