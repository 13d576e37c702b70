from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldm_core.tokenizer import (
    BOS_ID,
    EOS_ID,
    VOCAB_SIZE,
    bpe_vocab_and_merges,
    get_tokenizer,
    tokenize_ids,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("a photo of a cat", [320, 1125, 539, 320, 2368]),
        ("a photo of a dog", [320, 1125, 539, 320, 1929]),
        ("A PHOTO of a Cat", [320, 1125, 539, 320, 2368]),  # lower-cased
        ("a, b.", [320, 267, 321, 269]),  # single characters: 256 + byte - 33
        ("!", [256]),  # "!</w>"
        ("a   \n photo", [320, 1125]),  # whitespace collapsed
        ("", []),
    ],
)
def test_known_ids(text, ids):
    assert tokenize_ids(text) == ids


def test_call_adds_bos_eos_and_pads():
    tokenizer = get_tokenizer()
    assert tokenizer("a photo of a cat")["input_ids"] == [BOS_ID, 320, 1125, 539, 320, 2368, EOS_ID]
    padded = tokenizer("a cat", padding="max_length", max_length=77)["input_ids"]
    assert padded[:4] == [BOS_ID, 320, 2368, EOS_ID] and padded[4:] == [EOS_ID] * 73
    assert tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (49406, 49407)


def test_vocab_reconstruction():
    vocab, merges = bpe_vocab_and_merges()
    assert len(vocab) == VOCAB_SIZE == 49408 and len(merges) == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab[",</w>"] == 267
    assert vocab["<|startoftext|>"] == BOS_ID and vocab["<|endoftext|>"] == EOS_ID
    assert merges[0] == "i n" and vocab["in"] == 512
    tokenizer = get_tokenizer()
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.convert_tokens_to_ids(["!", ",</w>", "cat</w>"]) == [0, 267, 2368]


def test_padding_calls_do_not_leak_into_tokenize_ids():
    get_tokenizer()("a cat", padding="max_length", max_length=77, truncation=True)
    assert tokenize_ids("a cat") == [320, 2368]


def test_cached_and_long_prompts_untruncated():
    assert get_tokenizer() is get_tokenizer()
    assert tokenize_ids("cat " * 100) == [2368] * 100


def test_unicode_and_emoji_do_not_crash():
    ids = tokenize_ids("🐱 café naïve 日本語 ½ — “quotes” \u200b")
    assert ids and all(0 <= i < VOCAB_SIZE for i in ids)
    assert tokenize_ids("CAFÉ") == tokenize_ids("café")


def test_builds_offline_without_network(tmp_path):
    # A fresh interpreter with the hub disabled, an empty HF cache and sockets that refuse to
    # connect: building the tokenizer must not notice.
    code = (
        "import socket\n"
        "def refuse(*a, **k):\n"
        "    raise OSError('network access attempted')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from ldm_core.tokenizer import get_tokenizer\n"
        "print(get_tokenizer()('a photo of a cat')['input_ids'])\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[49406, 320, 1125, 539, 320, 2368, 49407]"
    assert not (tmp_path / "hf").exists()
