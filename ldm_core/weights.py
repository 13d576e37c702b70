"""Reading and writing weight files, strict assignment into modules, and file hashes.

Safetensors files are parsed here (the format is an 8-byte header length, a JSON header, then raw
little-endian tensor data) so that every problem with a file becomes a `CheckpointError` naming
the file, and so that tensors are read from a memory map one at a time: each tensor is copied into
its own compute-dtype buffer and the file pages behind it are released, which keeps peak memory
near the size of the finished model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import struct
import threading
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    SAFETENSORS_DTYPES["F8_E4M3"] = torch.float8_e4m3fn
    SAFETENSORS_DTYPES["F8_E5M2"] = torch.float8_e5m2


class CheckpointError(ValueError):
    """A weight file that cannot be used, with the file named in the message."""

    def __init__(self, path: str | os.PathLike | None, message: str):
        self.path = None if path is None else str(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


class WeightFile:
    """A weight file opened for lazy, per-tensor reading.

    `shapes` and `metadata` are available without reading any tensor data, which is what
    detection needs. Use as a context manager, or call `close()`.
    """

    LOAD_WORKERS = 2

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.metadata: dict[str, str] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._tensors: dict[str, torch.Tensor] = {}  # legacy .ckpt/.pt: already in memory
        self._file = None
        self._mmap: mmap.mmap | None = None
        if not self.path.is_file():
            raise CheckpointError(self.path, "file not found")
        suffix = self.path.suffix.lower()
        if suffix in (".ckpt", ".pt", ".pth", ".bin"):
            self._tensors = load_legacy_state_dict(self.path)
        else:
            self._open_safetensors()

    # -- opening ---------------------------------------------------------------------------
    def _open_safetensors(self) -> None:
        size = self.path.stat().st_size
        if size < 8:
            raise CheckpointError(self.path, f"not a safetensors file ({size} bytes, truncated?)")
        self._file = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > MAX_HEADER_BYTES or header_len + 8 > size:
            self.close()
            raise CheckpointError(
                self.path,
                "not a safetensors file (invalid header length; the file may be corrupt, "
                "truncated or of another format)",
            )
        raw = self._file.read(header_len)
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            self.close()
            raise CheckpointError(
                self.path, f"not a safetensors file (bad header: {exc})"
            ) from None
        data_start = 8 + header_len
        meta = header.pop("__metadata__", None) or {}
        self.metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
        for name, entry in header.items():
            self._infos[name] = self._parse_entry(name, entry, data_start, size)
        if size > data_start:
            self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def _parse_entry(self, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]  # type: ignore[index]
            shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
            begin, end = (int(o) for o in entry["data_offsets"])  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as exc:
            self.close()
            raise CheckpointError(
                self.path, f"tensor {name!r} has a malformed header entry ({exc})"
            ) from None
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != nbytes or begin < 0:
            self.close()
            raise CheckpointError(
                self.path, f"tensor {name!r}: header size does not match its shape {list(shape)}"
            )
        if data_start + end > size:
            self.close()
            raise CheckpointError(
                self.path,
                f"file is truncated: tensor {name!r} ends at byte {data_start + end:,} "
                f"but the file has {size:,} bytes",
            )
        return TensorInfo(dtype, shape, data_start + begin, data_start + end)

    # -- queries ---------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._infos) if self._infos else list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: str) -> bool:
        return key in self._infos or key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._infos:
            return self._infos[key].shape
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        if key in self._infos:
            return self._infos[key].dtype
        return self._tensors[key].dtype

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self.keys()}

    # -- reading ---------------------------------------------------------------------------
    def target_dtype(self, key: str, dtype: torch.dtype | None) -> torch.dtype:
        """The dtype `get(key, dtype)` returns: floats are cast, integers and bools kept."""
        src = self.dtype(key)
        return dtype if (dtype is not None and src.is_floating_point) else src

    def get(
        self,
        key: str,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One tensor, copied into fresh memory or into `out` (never a view of the file)."""
        target = self.target_dtype(key, dtype)
        if key in self._tensors:
            t = self._tensors[key]
            if out is not None:
                return out.copy_(t)
            return t.to(device=device, dtype=target, copy=True)
        info = self._infos[key]
        if info.end == info.start:
            return out if out is not None else torch.empty(info.shape, dtype=target, device=device)
        assert self._mmap is not None
        with warnings.catch_warnings():  # the map is read-only; we only ever copy out of it
            warnings.simplefilter("ignore", UserWarning)
            src = torch.frombuffer(
                memoryview(self._mmap)[info.start : info.end], dtype=info.dtype
            ).view(info.shape)
        if out is None:
            out = torch.empty(info.shape, dtype=target, device=device)
        out.copy_(src)
        del src
        self._release(info.start, info.end)
        return out

    def _release(self, start: int, end: int) -> None:
        """Drop the file pages of a tensor we have copied from this process's resident set."""
        if self._mmap is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = start - start % page
        with contextlib.suppress(OSError, ValueError):
            self._mmap.madvise(mmap.MADV_DONTNEED, lo, end - lo)

    def load(
        self,
        keys: Iterable[str] | None = None,
        *,
        strip_prefix: str = "",
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """Tensors by name (prefix stripped). On the CPU they are carved from one arena."""
        keys = self.keys() if keys is None else list(keys)
        arena = None
        if torch.device(device).type == "cpu" and keys:
            arena = Arena(sum(_nbytes(self.shape(k), self.target_dtype(k, dtype)) for k in keys))
        bufs = [
            arena.take(self.shape(k), self.target_dtype(k, dtype)) if arena else None for k in keys
        ]
        # Copies release the GIL: two workers overlap the page faults of the many small tensors
        # that torch would otherwise copy one by one on a single core.
        with ThreadPoolExecutor(max_workers=self.LOAD_WORKERS) as pool:
            tensors = list(
                pool.map(
                    lambda kb: self.get(kb[0], dtype, device, kb[1]), zip(keys, bufs, strict=True)
                )
            )
        out = {}
        for k, t in zip(keys, tensors, strict=True):
            out[k[len(strip_prefix) :] if k.startswith(strip_prefix) else k] = t
        return out

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> WeightFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


class Arena:
    """One private anonymous memory block that a module's tensors are carved from.

    One mapping per module instead of a thousand allocator calls. Measured on the 2-core VM we
    develop on (4.3 GB, first touch): a private mapping faults in at 1.6 s, a shared one (Python's
    default for anonymous maps) at 3.0 s, and transparent huge pages at 8.0 s, so we ask for
    none of those extras.
    """

    ALIGN = 64

    def __init__(self, nbytes: int):
        self.size = nbytes + self.ALIGN * 1024
        flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
        if flags:
            self._map = mmap.mmap(-1, max(self.size, 1), flags=flags)
        else:  # platforms without those flags (Windows): a plain anonymous map
            self._map = mmap.mmap(-1, max(self.size, 1))
        self._bytes = torch.frombuffer(self._map, dtype=torch.uint8)
        self._offset = 0

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = _nbytes(shape, dtype)
        itemsize = torch.empty((), dtype=dtype).element_size()
        start = -(-self._offset // max(self.ALIGN, itemsize)) * max(self.ALIGN, itemsize)
        if start + n > self.size:  # more tensors than announced: fall back to the allocator
            return torch.empty(shape, dtype=dtype)
        self._offset = start + n
        return self._bytes[start : start + n].view(dtype).view(shape)


def load_legacy_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A `.ckpt`/`.pt` pickle through torch's weights-only unpickler: nothing in it is executed."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "zip" not in str(exc).lower():
            raise CheckpointError(path, f"cannot read legacy checkpoint: {exc}") from None
        # Pre-1.6 torch files are not zip archives and cannot be memory-mapped.
        obj = _weights_only_load(path, mmap_ok=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling error is a refusal
        raise _refusal(path, exc) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(
            path, f"legacy checkpoint holds a {type(obj).__name__}, not a state dict"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, "legacy checkpoint holds no tensors")
    return tensors


def _weights_only_load(path: Path, mmap_ok: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_ok)
    except Exception as exc:  # noqa: BLE001
        raise _refusal(path, exc) from None


def _refusal(path: Path, exc: Exception) -> CheckpointError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
        return CheckpointError(
            path,
            "refused: this pickle contains Python objects other than tensors, and loading it "
            "could run arbitrary code. Convert it to .safetensors with a tool you trust. "
            f"({text})",
        )
    return CheckpointError(
        path, f"cannot read legacy checkpoint (corrupt or not a torch file): {text}"
    )


def module_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Expected state-dict shapes of a module (works on the meta device)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def check_keys(
    expected: dict[str, tuple[int, ...]],
    got: dict[str, tuple[int, ...]],
    *,
    source: str | os.PathLike,
    what: str,
) -> None:
    """Raise a `CheckpointError` listing missing, unexpected and mis-shaped keys."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    misshaped = [
        f"{k}: file {list(got[k])}, model {list(expected[k])}"
        for k in expected
        if k in got and tuple(got[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("mis-shaped", misshaped),
    ):
        if items:
            shown = "; ".join(items[:10]) + (
                f"; ... ({len(items) - 10} more)" if len(items) > 10 else ""
            )
            parts.append(f"{len(items)} {label} key(s): {shown}")
    raise CheckpointError(source, f"{what} weights do not match the model. " + " | ".join(parts))


def assign_weights(
    module: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str | os.PathLike, what: str
) -> nn.Module:
    """Strictly load `state_dict` into a (meta-built) module by assigning the tensors."""
    check_keys(
        module_shapes(module),
        {k: tuple(v.shape) for k, v in state_dict.items()},
        source=source,
        what=what,
    )
    module.load_state_dict(state_dict, strict=True, assign=True)
    leftover = [n for n, t in _named_tensors(module) if t.is_meta]
    if leftover:
        raise CheckpointError(
            source, f"{what}: tensors left uninitialised after loading: {leftover[:5]}"
        )
    return module


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def save_safetensors(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically (temp file in the same folder, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(
            contiguous, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()}
        )
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# -- hashes -------------------------------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


class HashCache:
    """sha256 of files, remembered by (path, size, mtime) so a file is hashed once.

    With a `path`, the cache persists as JSON across runs (A1111 keeps a similar cache.json).
    """

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        if self.path and self.path.is_file():
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                log.warning("ignoring unreadable hash cache %s", self.path)

    def sha256(self, file: str | os.PathLike) -> str:
        file = Path(file).resolve()
        st = file.stat()
        key = str(file)
        with self._lock:
            entry = self._entries.get(key)
            if entry and entry.get("size") == st.st_size and entry.get("mtime") == st.st_mtime:
                return entry["sha256"]
        digest = sha256_file(file)
        with self._lock:
            self._entries[key] = {"size": st.st_size, "mtime": st.st_mtime, "sha256": digest}
            self._save()
        return digest

    def _save(self) -> None:
        if not self.path:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self._entries, indent=1))
        os.replace(tmp, self.path)


def model_hash(sha256: str) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's sha256."""
    return sha256[:10]
