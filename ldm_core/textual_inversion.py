"""Textual-inversion embeddings: reading the files and finding their names in prompts.

Formats (ldm-formats.md §9; A1111 `textual_inversion.py` `create_embedding_from_data`):
A1111 `string_to_param`, kohya `emb_params`, SDXL `clip_l` + `clip_g`, and diffusers'
single-key dicts; `.safetensors`, or legacy `.pt`/`.bin` only through torch's weights-only
unpickler. The trigger word is the file name without its extension. Embeddings whose vector
size does not fit the model's text encoders are "skipped" with the reason, as in A1111.
Unlike A1111, embeddings with more than 75 vectors are skipped too (they cannot fit a chunk).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_core.tokenizer import MAX_LENGTH, tokenize_ids
from ldm_core.weights import sha256_file

Tensor = torch.Tensor
log = logging.getLogger(__name__)

__all__ = [
    "Embedding",
    "EmbeddingError",
    "EmbeddingLibrary",
    "load_embedding_file",
    "replace_lone_surrogates",
]

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
MAX_VECTORS = MAX_LENGTH - 2  # one 75-token chunk
MAX_EMBEDDING_FILE_BYTES = 64 << 20  # embeddings are kilobytes; larger files are something else
SDXL_PAIR_KEYS = ("clip_l", "clip_g")


def replace_lone_surrogates(text: str) -> str:
    """Lone surrogates (possible in text from JSON or file names) -> U+FFFD; pairs are joined.

    The tokenizer cannot take them.
    """
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class EmbeddingError(ValueError):
    """An embedding file that cannot be used; the message is the reason shown to the user."""


@dataclass(eq=False)
class Embedding:
    """A textual-inversion embedding: `vectors` maps an encoder slot to a [n, D] tensor.

    Single-encoder files use the slot "" ; SDXL files hold "clip_l" and "clip_g" (in that
    order, matching the order of the SDXL text encoders).
    """

    name: str
    path: Path
    vectors: dict[str, Tensor]
    sha256: str

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def dims(self) -> tuple[int, ...]:
        """Vector size per text encoder, e.g. (768,) for SD1, (768, 1280) for SDXL."""
        return tuple(v.shape[1] for v in self.vectors.values())

    @property
    def shorthash(self) -> str:
        """The hash A1111 writes to infotext ("TI hashes"): 12 hex digits of the file sha256."""
        return self.sha256[:12]

    def vectors_for(self, encoder_index: int) -> Tensor:
        return list(self.vectors.values())[encoder_index]


def _as_vectors(value: object, what: str) -> Tensor:
    if not isinstance(value, torch.Tensor):
        raise EmbeddingError(f"{what} is a {type(value).__name__}, not a tensor")
    if not value.is_floating_point():
        raise EmbeddingError(f"{what} has dtype {value.dtype}, expected floating point")
    if value.dim() == 1:
        value = value.unsqueeze(0)
    if value.dim() != 2:
        raise EmbeddingError(f"{what} has shape {list(value.shape)}, expected [vectors, dim]")
    if value.shape[0] < 1 or value.shape[1] < 1:
        raise EmbeddingError(f"{what} is empty (shape {list(value.shape)})")
    if value.shape[0] > MAX_VECTORS:
        raise EmbeddingError(
            f"{what} has {value.shape[0]} vectors, more than the {MAX_VECTORS} that fit a chunk"
        )
    value = value.detach().to("cpu", torch.float32).contiguous().clone()
    if not torch.isfinite(value).all():
        raise EmbeddingError(f"{what} contains NaN or infinite values")
    return value


def _vectors_from_data(data: object) -> dict[str, Tensor]:
    """The layouts of ldm-formats.md §9: A1111, kohya, SDXL pair, diffusers single key."""
    if not isinstance(data, dict):
        raise EmbeddingError(f"file holds a {type(data).__name__}, not a dict of tensors")
    if "string_to_param" in data:  # A1111 / original textual inversion
        params = data["string_to_param"]
        if isinstance(params, dict):
            if len(params) != 1:
                raise EmbeddingError(f"string_to_param holds {len(params)} entries, expected 1")
            params = next(iter(params.values()))
        return {"": _as_vectors(params, "string_to_param")}
    if all(key in data for key in SDXL_PAIR_KEYS):
        pair = {key: _as_vectors(data[key], key) for key in SDXL_PAIR_KEYS}
        if pair["clip_l"].shape[0] != pair["clip_g"].shape[0]:
            raise EmbeddingError(
                f"clip_l has {pair['clip_l'].shape[0]} vectors, clip_g {pair['clip_g'].shape[0]}"
            )
        return pair
    if "emb_params" in data:  # kohya sd-scripts
        return {"": _as_vectors(data["emb_params"], "emb_params")}
    if len(data) == 1:  # diffusers "concepts": {"<token>": tensor}
        key, value = next(iter(data.items()))
        return {"": _as_vectors(value, f"entry {key!r}")}
    keys = ", ".join(sorted(str(k) for k in data)[:8])
    raise EmbeddingError(f"not a known embedding layout (keys: {keys})")


def _read_legacy(path: Path) -> object:
    """A `.pt`/`.bin` pickle through torch's weights-only unpickler: nothing in it is executed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a refusal
        message = str(exc)
        first = message.splitlines()[0] if message else type(exc).__name__
        if "weights_only" in message or "Unsupported global" in message or "GLOBAL" in message:
            raise EmbeddingError(
                "refused: this pickle holds Python objects other than tensors, and loading it "
                f"could run arbitrary code; use a .safetensors version ({first})"
            ) from None
        raise EmbeddingError(f"cannot read (corrupt or not a torch file): {first}") from None


def load_embedding_file(path: str | Path) -> Embedding:
    """Read one embedding file; raises `EmbeddingError` with the reason it cannot be used."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EMBEDDING_SUFFIXES:
        raise EmbeddingError(f"unsupported file type {suffix!r}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise EmbeddingError(f"cannot read: {exc}") from None
    if size > MAX_EMBEDDING_FILE_BYTES:
        raise EmbeddingError(f"{size / 2**20:.0f} MB is too large for an embedding")
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            data = load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - a corrupt file is a skip, not a crash
            raise EmbeddingError(f"cannot read safetensors file: {exc}") from None
    else:
        data = _read_legacy(path)
    vectors = _vectors_from_data(data)
    return Embedding(replace_lone_surrogates(path.stem), path, vectors, sha256_file(path))


class EmbeddingLibrary:
    """Textual-inversion embeddings in a folder (searched recursively), usable by file name.

    `dims` are the text encoders' widths (`set_dims`, done by `encode_prompts`); embeddings
    that do not fit them are listed in `skipped` with the reason, as are files that cannot be
    read. `refresh()` picks up added, changed and removed files (by mtime and size); it returns
    whether anything changed, and `version` increases whenever the usable set may have.
    """

    def __init__(self, directory: str | Path, *, dims: Sequence[int] | None = None):
        self.directory = Path(directory)
        self._dims = tuple(dims) if dims else None
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._files: dict[Path, Embedding | str] = {}  # loaded embedding or reason
        self._usable: dict[str, Embedding] = {}
        self._lookup: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        self.skipped: dict[str, str] = {}
        self.version = 0
        self.refresh()

    def refresh(self) -> bool:
        stamps: dict[Path, tuple[int, int]] = {}
        if self.directory.is_dir():
            for path in sorted(self.directory.rglob("*")):
                if path.suffix.lower() not in EMBEDDING_SUFFIXES:
                    continue
                try:
                    if not path.is_file():
                        continue
                    stat = path.stat()
                except OSError:
                    continue
                stamps[path] = (stat.st_mtime_ns, stat.st_size)
        if stamps == self._stamps and self.version:
            return False
        for path, stamp in stamps.items():
            if self._stamps.get(path) != stamp or path not in self._files:
                self._files[path] = self._load(path)
        for path in set(self._files) - set(stamps):
            del self._files[path]
        self._stamps = stamps
        self._rebuild()
        return True

    def set_dims(self, dims: Sequence[int]) -> None:
        """Validate against text encoders of these widths (no-op when unchanged)."""
        dims = tuple(dims)
        if dims != self._dims:
            self._dims = dims
            self._rebuild()

    @staticmethod
    def _load(path: Path) -> Embedding | str:
        try:
            return load_embedding_file(path)
        except EmbeddingError as exc:
            log.warning("textual inversion %s skipped: %s", path, exc)
            return str(exc)

    def _fit_reason(self, embedding: Embedding) -> str | None:
        if self._dims is None or embedding.dims == self._dims:
            return None
        if len(embedding.dims) != len(self._dims):
            kind = "an SDXL (clip_l + clip_g)" if len(embedding.dims) == 2 else "a single-encoder"
            return f"{kind} embedding does not fit a model with {len(self._dims)} text encoder(s)"
        return f"vector size {embedding.dims} does not match the text encoder(s) {self._dims}"

    def _rebuild(self) -> None:
        usable: dict[str, Embedding] = {}
        skipped: dict[str, str] = {}
        lookup: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        for path in sorted(self._files):
            item = self._files[path]
            name = replace_lone_surrogates(path.stem)
            if isinstance(item, str):
                skipped.setdefault(name, item)
                continue
            if name in usable:
                log.warning(
                    "textual inversion %s ignored: %s has the same name", path, usable[name].path
                )
                continue
            reason = self._fit_reason(item)
            ids = tuple(tokenize_ids(name))
            if reason is None and not ids:
                reason = "the name has no tokens"
            if reason is not None:
                skipped[name] = reason
                continue
            usable[name] = item
            skipped.pop(name, None)
            lookup.setdefault(ids[0], []).append((ids, item))
        for candidates in lookup.values():
            candidates.sort(key=lambda entry: len(entry[0]), reverse=True)
        self._usable, self.skipped, self._lookup = usable, skipped, lookup
        self.version += 1
        log.info("textual inversion embeddings: %d loaded, %d skipped", len(usable), len(skipped))

    def get(self, name: str) -> Embedding | None:
        return self._usable.get(name)

    def names(self) -> list[str]:
        return sorted(self._usable)

    def __len__(self) -> int:
        return len(self._usable)

    def __contains__(self, name: object) -> bool:
        return name in self._usable

    def find_at(self, tokens: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at `position` (longest match) and its length."""
        for ids, embedding in self._lookup.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return embedding, len(ids)
        return None
