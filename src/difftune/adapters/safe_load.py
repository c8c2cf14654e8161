"""Reading weight files safely: the safetensors header is checked before any tensor is read.

Every adapter command reads files through :func:`read_header` and :func:`load_tensors`, so a
truncated, corrupted or hostile file is refused with a one-line reason before memory is spent on
it, and pickle files (which can run code when loaded) are refused unless asked for.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difftune.errors import DifftuneError

#: The largest JSON header accepted (real adapters have headers of a few hundred KB at most).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: The largest tensor accepted, in elements (a 12B-parameter transformer's largest matrix is ~10^9).
MAX_NUMEL = 2**33
MAX_NDIM = 8
#: The largest LoRA rank accepted.
MAX_RANK = 4096

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
#: Names tried, in order, when a folder is given instead of a file.
FOLDER_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
#: Key fragments that mark the "down" factor of a low-rank pair: its first dimension is the rank.
_RANK_KEYS = (".lora_A.", ".lora_down.", "lora.down.", ".hada_w1_b", ".hada_w2_b", ".lokr_w1_b", ".lokr_w2_b")


@dataclass
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Header:
    """A checked safetensors header: tensor entries and the ``__metadata__`` strings."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def resolve_weight_file(path: str | Path) -> Path:
    """A file as given, or the adapter file inside a folder (a difftune run folder, a diffusers LoRA folder)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in FOLDER_WEIGHT_NAMES:
            if (p / name).is_file():
                return p / name
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        what = "no .safetensors file" if not found else f"{len(found)} .safetensors files"
        raise DifftuneError(f"{p}: folder holds {what}; name the adapter file itself")
    if not p.is_file():
        raise DifftuneError(f"{p}: no such file")
    return p


def read_header(path: str | Path) -> Header:
    """Parse and check a safetensors header (8-byte length + JSON) without reading any tensor data."""
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise DifftuneError(f"{path}: truncated ({size} bytes; a safetensors file starts with an 8-byte header size)")
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER_BYTES:
            raise DifftuneError(f"{path}: header claims {n:,} bytes (limit {MAX_HEADER_BYTES:,}); not a valid safetensors file")
        if 8 + n > size:
            raise DifftuneError(f"{path}: truncated (header claims {n:,} bytes but the file has {size - 8:,} after the size)")
        raw = fh.read(n)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DifftuneError(f"{path}: corrupted header (not valid JSON: {exc})") from None
    if not isinstance(doc, dict):
        raise DifftuneError(f"{path}: corrupted header (not a JSON object)")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise DifftuneError(f"{path}: corrupted header (__metadata__ must map strings to strings)")
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _check_entry(path, name, entry, data_size)
    _check_no_overlap(path, tensors)
    return Header(path, tensors, meta)


def _check_entry(path: Path, name: str, entry, data_size: int) -> TensorInfo:
    def bad(why: str) -> DifftuneError:
        return DifftuneError(f"{path}: tensor {name!r}: {why}")

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_BYTES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise bad(f"invalid shape {shape!r}")
    if len(shape) > MAX_NDIM:
        raise bad(f"{len(shape)} dimensions (limit {MAX_NDIM})")
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise bad(f"shape {shape} has {numel:,} elements (limit {MAX_NUMEL:,}); refusing a file that claims it")
    if any(k in name for k in _RANK_KEYS) and shape and shape[0] > MAX_RANK:
        raise bad(f"rank {shape[0]} exceeds {MAX_RANK}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise bad(f"invalid data_offsets {offsets!r}")
    start, end = offsets
    if end > data_size:
        raise bad(f"data ends at byte {end:,} but the file holds {data_size:,} bytes of data (truncated?)")
    if end - start != numel * DTYPE_BYTES[dtype]:
        raise bad(f"{end - start:,} bytes stored for shape {shape} of {dtype}")
    return TensorInfo(dtype, tuple(shape), start, end)


def _check_no_overlap(path: Path, tensors: dict[str, TensorInfo]) -> None:
    spans = sorted((t.start, t.end, k) for k, t in tensors.items() if t.end > t.start)
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise DifftuneError(f"{path}: tensors {a!r} and {b!r} overlap in the file (corrupted)")


def load_tensors(path: str | Path, *, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a weight file and its metadata, after the header passed :func:`read_header`.

    Pickle files (``.bin``, ``.ckpt``, ``.pt``) are refused unless ``allow_pickle``; then they are
    read with ``torch.load(weights_only=True)``, which refuses arbitrary objects.
    """
    path = resolve_weight_file(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _load_pickle(path, allow_pickle), {}
    header = read_header(path)
    from safetensors import safe_open

    tensors = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in header.tensors:
                tensors[name] = f.get_tensor(name)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for bad files
        raise DifftuneError(f"{path}: could not read tensors ({exc})") from None
    return tensors, dict(header.metadata)


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or infinity, sorted."""
    return sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))


def non_finite_in_file(path: str | Path, *, allow_pickle: bool = False) -> list[str]:
    """:func:`non_finite` of a weight file, reading one tensor at a time."""
    path = resolve_weight_file(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return non_finite(_load_pickle(path, allow_pickle))
    header = read_header(path)
    from safetensors import safe_open

    bad = []
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name in header.tensors:
            if non_finite({name: f.get_tensor(name)}):
                bad.append(name)
    return sorted(bad)


def require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse weights holding NaN or infinity (a diverged run's result): they give black or noise images."""
    bad = non_finite(tensors)
    if bad:
        raise DifftuneError(f"{what}: {len(bad)} tensor(s) hold NaN or infinity (e.g. {bad[0]}); these weights are "
                            "broken (the training diverged) and are not used")


def _load_pickle(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if not allow_pickle:
        raise DifftuneError(
            f"{path}: pickle files can run code when loaded; refused. Convert it to .safetensors, or pass "
            "--allow-pickle if you trust its source (it is then read with torch.load(weights_only=True))"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad or unsafe pickles
        raise DifftuneError(f"{path}: could not load the pickle file safely ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise DifftuneError(f"{path}: expected a dictionary of tensors, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[str(k)] = v
        elif isinstance(v, dict):  # A1111 embeddings nest tensors one level down
            out.update({f"{k}.{kk}": vv for kk, vv in v.items() if isinstance(vv, torch.Tensor)})
    return out


def parse_weighted(spec: str, default: float = 1.0) -> tuple[str, float]:
    """``path:0.7`` -> (path, 0.7). A ``:`` not followed by a valid number is part of the path."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, default


def parse_token_suffix(spec: str) -> tuple[str, str | None]:
    """``file.safetensors:<tok>`` -> (file, "<tok>"), unless the whole spec is an existing path."""
    if Path(spec).exists():
        return spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head and Path(head).exists():
        return head, tail or None
    return spec, None
