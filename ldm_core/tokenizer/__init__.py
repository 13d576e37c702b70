"""The CLIP BPE tokenizer, built offline from the BPE merge list shipped next to this file.

Every SD family (CLIP-L and the OpenCLIP towers) uses the same 49 408-token vocabulary. It is
reconstructed from `bpe_simple_vocab_16e6.txt.gz` (the file OpenAI CLIP and open_clip ship):
256 byte symbols, the same with `</w>`, 48 894 merges, then the two specials. The resulting
`vocab.json`/`merges.txt` are byte-identical to the Hugging Face SD tokenizer files
(ldm-formats.md §3.1). Only the pad id differs between models; the prompt code pads itself.
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from importlib import resources
from pathlib import Path

BOS_ID = 49406
EOS_ID = 49407
VOCAB_SIZE = 49408
MAX_LENGTH = 77  # BOS + 75 prompt tokens + EOS

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # vocabulary size of the BPE training run minus bytes and specials

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "MAX_LENGTH",
    "VOCAB_SIZE",
    "bpe_vocab_and_merges",
    "get_tokenizer",
    "tokenize_ids",
]


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character table, in byte-symbol order (printables first)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = [chr(b) for b in printable]
    remapped = [b for b in range(256) if b not in set(printable)]
    chars += [chr(256 + k) for k in range(len(remapped))]
    return chars


@functools.cache
def bpe_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """(token -> id, merge lines "a b") reconstructed from the shipped BPE file."""
    data = resources.files(__name__).joinpath(_BPE_FILE).read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = lines[1 : _NUM_MERGES + 1]  # line 0 is a header
    if len(merges) != _NUM_MERGES or any(len(m.split(" ")) != 2 for m in merges):
        raise ValueError(f"{_BPE_FILE} is not the CLIP BPE merge list (bad merge lines)")
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += [m.replace(" ", "") for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{_BPE_FILE} gives {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


@functools.cache
def get_tokenizer():
    """A transformers CLIP tokenizer (fast, `tokenizers`-backed), built without the hub.

    The vocabulary files are written to a throw-away temporary directory and loaded with
    `local_files_only=True`, which works on every transformers version we support and from a
    read-only install.
    """
    import transformers

    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    vocab, merges = bpe_vocab_and_merges()
    with tempfile.TemporaryDirectory(prefix="ldm_clip_tokenizer_") as tmp:
        folder = Path(tmp)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
        tokenizer = cls.from_pretrained(
            str(folder),
            local_files_only=True,
            bos_token=BOS_TOKEN,
            eos_token=EOS_TOKEN,
            unk_token=EOS_TOKEN,
            pad_token=EOS_TOKEN,
            model_max_length=MAX_LENGTH,
        )
    if tokenizer.bos_token_id != BOS_ID or tokenizer.eos_token_id != EOS_ID:
        raise RuntimeError(
            f"CLIP tokenizer built with bos/eos {tokenizer.bos_token_id}/{tokenizer.eos_token_id}, "
            f"expected {BOS_ID}/{EOS_ID}"
        )
    return tokenizer


@functools.cache
def _plain_backend():
    """A private copy of the backend tokenizer with padding and truncation off.

    Calling the transformers tokenizer with `padding=`/`truncation=` switches those on in its
    shared backend and leaves them on, so we never encode through that shared object.
    """
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(get_tokenizer().backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


def tokenize_ids(text: str) -> list[int]:
    """CLIP token ids of `text`, without BOS/EOS and without truncation."""
    # Long prompts are normal here: the prompt code splits them into 75-token chunks.
    return _plain_backend().encode(text, add_special_tokens=False).ids
