"""Conditioning: 75-token chunks, emphasis, schedules, AND, padding, textual inversion."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ldm_core.conditioning import (
    EmbeddingLibrary,
    PromptCache,
    count_tokens,
    encode_prompts,
    encode_text,
    load_embedding_file,
    tokenize_prompt,
)
from ldm_core.config import OPEN_CLIP_H, TextEncoderConfig
from ldm_core.denoiser import GuidedDenoiser
from ldm_core.nn.text_encoders import TextEncoder
from ldm_core.patcher import ModelHandle
from ldm_core.samplers import sample_euler
from ldm_core.schedules import ModelSampling, get_sigmas
from ldm_core.tokenizer import BOS_ID, EOS_ID, tokenize_ids

TINY_CLIP = TextEncoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=1)
TINY_OPEN_CLIP = dataclasses.replace(
    OPEN_CLIP_H, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=1, projection_dim=64
)
CAT = tokenize_ids("cat")[0]


def _random_text_encoder(cfg: TextEncoderConfig, seed: int) -> TextEncoder:
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in TextEncoder(cfg).to_original_state_dict().items()}
    sd = {
        k: torch.randn(shape, generator=gen) * (0.02 if "embedding" in k else 0.2)
        for k, shape in shapes.items()
    }
    return TextEncoder.from_state_dict(cfg, sd, source="test")


class CountingEncoder:
    """Counts text-encoder passes (rows) without changing results."""

    def __init__(self, encoder: TextEncoder):
        self.encoder, self.rows = encoder, 0
        original = encoder.forward_embeds

        def counted(embeds, clip_skip=1):
            self.rows += embeds.shape[0]
            return original(embeds, clip_skip)

        encoder.forward_embeds = counted


@pytest.fixture(scope="module")
def sd1():
    return SimpleNamespace(text_encoders=[_random_text_encoder(TINY_CLIP, 1)])


@pytest.fixture(scope="module")
def sd2():
    return SimpleNamespace(text_encoders=[_random_text_encoder(TINY_OPEN_CLIP, 2)])


@pytest.fixture
def fresh_sd1():
    return SimpleNamespace(text_encoders=[_random_text_encoder(TINY_CLIP, 3)])


def context(ck, prompt: str, **kw) -> torch.Tensor:
    return encode_text(ck, prompt, **kw).context


def only_context(encoded, row: int = 0, part: int = 0) -> torch.Tensor:
    schedule = encoded.cond[row].parts[part].schedule
    assert len(schedule) == 1
    return schedule[0][1]


# -- chunking ---------------------------------------------------------------------------------


def test_150_token_prompt_gives_two_chunks_encoded_separately(sd1):
    prompt = "cat " * 150
    chunks, count = tokenize_prompt(prompt)
    assert [len(c.tokens) for c in chunks] == [75, 75] and count == 150
    encoded = encode_prompts(sd1, [prompt], [""], 20)
    ctx = only_context(encoded)
    assert ctx.shape == (154, 64)
    half = context(sd1, "cat " * 75)
    assert half.shape == (77, 64)
    torch.testing.assert_close(ctx[:77], half, rtol=0, atol=1e-6)
    torch.testing.assert_close(ctx[77:], half, rtol=0, atol=1e-6)
    assert encoded.token_counts == [(150, 150)]


def test_chunk_ids_bos_eos_and_pad_ids(sd1, sd2):
    tokens = tokenize_ids("a photo of a cat")
    n = len(tokens)
    sd1_ids = encode_text(sd1, "a photo of a cat").input_ids[0][0].tolist()
    assert sd1_ids == [BOS_ID, *tokens] + [EOS_ID] * (76 - n)
    encoded = encode_text(sd2, "a photo of a cat")
    ids = encoded.input_ids[0][0].tolist()
    assert ids == [BOS_ID, *tokens, EOS_ID] + [0] * (75 - n)  # OpenCLIP pads with 0 after EOS
    with torch.no_grad():
        direct = sd2.text_encoders[0](torch.tensor([ids]))[0]
    assert torch.equal(encoded.context, direct)
    full = encode_text(sd2, "cat " * 75).input_ids[0][0].tolist()
    assert full == [BOS_ID] + [CAT] * 75 + [EOS_ID]


def test_break_starts_a_new_chunk(sd1):
    chunks, count = tokenize_prompt("a cat BREAK a dog")
    assert [c.tokens for c in chunks] == [tokenize_ids("a cat"), tokenize_ids("a dog")]
    assert count == 75 + 2
    ctx = only_context(encode_prompts(sd1, ["a cat BREAK a dog"], [""], 20))
    assert ctx.shape == (154, 64)
    torch.testing.assert_close(ctx[:77], context(sd1, "a cat"), rtol=0, atol=1e-6)
    torch.testing.assert_close(ctx[77:], context(sd1, "a dog"), rtol=0, atol=1e-6)


def test_comma_backtrack_moves_tail_to_next_chunk():
    dog = tokenize_ids("dog")[0]
    chunks, count = tokenize_prompt("cat " * 70 + ", " + "dog " * 10)
    assert chunks[0].tokens == [CAT] * 70 + [267]
    assert chunks[1].tokens == [dog] * 10
    assert count == 75 + 10
    # A comma further back than 20 tokens: the chunk is cut at 75 tokens.
    chunks, _ = tokenize_prompt("cat " * 30 + ", " + "dog " * 60)
    assert len(chunks[0].tokens) == 75 and len(chunks[1].tokens) == 16


# -- emphasis ---------------------------------------------------------------------------------


def test_weight_one_equals_plain(sd1):
    plain = encode_prompts(sd1, ["a cat photo"], ["ugly"], 20)
    weighted = encode_prompts(sd1, ["a (cat:1.0) photo"], ["(ugly:1.0)"], 20)
    assert torch.equal(only_context(plain), only_context(weighted))
    assert torch.equal(plain.uncond[0].parts[0].at(0), weighted.uncond[0].parts[0].at(0))


def test_weights_change_exactly_the_weighted_tokens_then_mean_is_restored(sd1):
    raw = context(sd1, "a cat photo", emphasis="Ignore")  # hidden states before emphasis
    chunks, _ = tokenize_prompt("a ((cat)) photo")
    assert chunks[0].weights == pytest.approx([1.0, 1.21, 1.0])
    no_norm = context(sd1, "a ((cat)) photo", emphasis="No norm")
    weight = torch.tensor(chunks[0].weights[1])
    assert torch.equal(no_norm[2], raw[2] * weight)  # position 2: BOS, "a", "cat"
    keep = torch.ones(77, dtype=torch.bool)
    keep[2] = False
    assert torch.equal(no_norm[keep], raw[keep])
    original = context(sd1, "a ((cat)) photo")
    torch.testing.assert_close(original, no_norm * (raw.mean() / no_norm.mean()), rtol=1e-6, atol=0)
    torch.testing.assert_close(original.mean(), raw.mean(), rtol=1e-5, atol=0)
    assert not torch.equal(original, raw)
    # "None": brackets are literal text, so the tokens themselves change.
    assert encode_text(sd1, "a ((cat)) photo", emphasis="None").input_ids[0].shape == (1, 77)
    assert tokenize_prompt("(cat)", emphasis="None")[0][0].tokens == tokenize_ids("(cat)")
    with pytest.raises(ValueError, match="emphasis"):
        encode_prompts(sd1, ["x"], [""], 20, emphasis="Loud")


# -- batches: AND, padding, schedules ----------------------------------------------------------


def test_negative_is_padded_to_the_positive_length(sd1):
    encoded = encode_prompts(sd1, ["cat " * 100], ["ugly"], 20)
    cond, uncond = only_context(encoded), encoded.uncond[0].parts[0].at(0)
    assert cond.shape == uncond.shape == (154, 64)
    assert torch.equal(uncond[:77], context(sd1, "ugly"))
    assert torch.equal(uncond[77:], context(sd1, ""))  # the empty prompt's encoding
    assert encoded.padded_conds
    assert encoded.negative_token_counts == [(1, 75)]
    separate = encode_prompts(sd1, ["cat " * 100], ["ugly"], 20, pad_conds=False)
    assert separate.uncond[0].parts[0].at(0).shape == (77, 64) and not separate.padded_conds
    # Negative longer than positive: the positive is padded instead.
    swapped = encode_prompts(sd1, ["ugly"], ["cat " * 100], 20)
    assert only_context(swapped).shape == (154, 64)


def test_and_gives_weighted_parts_padded_like_a1111(sd1):
    encoded = encode_prompts(sd1, ["a cat AND " + "dog " * 80 + ":0.5"], [""], 20)
    parts = encoded.cond[0].parts
    assert [p.weight for p in parts] == [1.0, 0.5]
    first, second = parts[0].at(0), parts[1].at(0)
    assert first.shape == second.shape == encoded.uncond[0].parts[0].at(0).shape == (154, 64)
    # Within the positive group a shorter context repeats its last vector (A1111).
    assert torch.equal(first[:77], context(sd1, "a cat"))
    assert torch.equal(first[77:], first[76:77].expand(77, -1))


def test_prompt_editing_switches_after_the_step(sd1):
    encoded = encode_prompts(sd1, ["a [cat:dog:10] photo"], [""], 20)
    part = encoded.cond[0].parts[0]
    assert [end for end, _ in part.schedule] == [10, 20]
    cat, dog = context(sd1, "a cat photo"), context(sd1, "a dog photo")
    assert all(torch.equal(part.at(step), cat) for step in range(11))
    assert all(torch.equal(part.at(step), dog) for step in range(11, 20))
    fraction = encode_prompts(sd1, ["a [cat:dog:0.25] photo"], [""], 20)
    assert [end for end, _ in fraction.cond[0].parts[0].schedule] == [5, 20]


def test_prompt_edit_switch_seen_through_the_sampler_callback(sd1):
    encoded = encode_prompts(sd1, ["a [cat:dog:10] photo"], ["ugly"], 20)
    cat, dog = context(sd1, "a cat photo"), context(sd1, "a dog photo")

    class RecordingUNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.zeros(()))
            self.contexts: list[torch.Tensor] = []

        def forward(self, x, timesteps, context=None, y=None, hooks=None):
            self.contexts.append(context[0].clone())  # row 0 is the cond row
            return x * self.scale

    unet = RecordingUNet()
    ms = ModelSampling.discrete()
    handle = ModelHandle(SimpleNamespace(unet=unet), ms)
    sigmas = get_sigmas("karras", 20, ms)
    denoiser = GuidedDenoiser(handle, encoded.cond, encoded.uncond, 7.0, sigmas)
    seen = []
    x = torch.randn(1, 4, 8, 8) * sigmas[0]
    with torch.no_grad():
        sample_euler(denoiser, x, sigmas, callback=lambda d: seen.append(d["i"]))
    assert seen == list(range(20)) and len(unet.contexts) == 20
    used = [
        "cat" if torch.equal(c, cat) else "dog" if torch.equal(c, dog) else "?"
        for c in unet.contexts
    ]
    assert used == ["cat"] * 11 + ["dog"] * 9


def test_alternation_and_each_text_encoded_once(fresh_sd1):
    counter = CountingEncoder(fresh_sd1.text_encoders[0])
    encoded = encode_prompts(fresh_sd1, ["[cat|dog] photo"] * 3, [""], 20)
    assert counter.rows == 3  # "cat photo", "dog photo", "" (negative)
    part = encoded.cond[0].parts[0]
    assert len(part.schedule) == 20
    cat, dog = context(fresh_sd1, "cat photo"), context(fresh_sd1, "dog photo")
    assert [torch.equal(part.at(s), cat) for s in (1, 2, 3, 4)] == [True, False, True, False]
    assert [torch.equal(part.at(s), dog) for s in (1, 2, 3, 4)] == [False, True, False, True]
    assert encoded.cond[1].parts[0].at(5) is part.at(5)  # repeated prompts share tensors


def test_prompt_cache_across_calls(fresh_sd1):
    encoder = fresh_sd1.text_encoders[0]
    counter = CountingEncoder(encoder)
    cache = PromptCache(maxsize=8)
    first = encode_prompts(fresh_sd1, ["a cat"], ["ugly"], 20, cache=cache)
    assert counter.rows == 2 and len(cache) == 2
    again = encode_prompts(fresh_sd1, ["a cat"], ["ugly"], 20, cache=cache)
    assert counter.rows == 2
    assert torch.equal(only_context(first), only_context(again))
    encode_prompts(fresh_sd1, ["a cat"], ["ugly"], 20, clip_skip=2, cache=cache)
    assert counter.rows == 4
    with torch.no_grad():  # an in-place weight patch (LoRA) must miss the cache
        encoder.text_model.get_input_embeddings().weight.add_(0.0)
    encode_prompts(fresh_sd1, ["a cat"], ["ugly"], 20, cache=cache)
    assert counter.rows == 6


def test_extra_network_tags_are_returned_and_stripped(sd1):
    encoded = encode_prompts(sd1, ["a cat <lora:detail:0.8>", "a dog"], ["ugly <lora:bad:1>"], 20)
    assert [(t.kind, t.name, t.te_weight) for t in encoded.extra_networks] == [
        ("lora", "detail", 0.8)
    ]
    assert [len(tags) for tags in encoded.extra_networks_per_prompt] == [1, 0]
    assert encoded.negative_extra_networks[0][0].name == "bad"
    assert torch.equal(only_context(encoded), context(sd1, "a cat "))
    assert torch.equal(encoded.uncond[0].parts[0].at(0), context(sd1, "ugly "))
    assert len(encoded.uncond) == 2  # one negative for the whole batch


def test_bad_arguments_raise(sd1):
    with pytest.raises(ValueError, match="steps"):
        encode_prompts(sd1, ["x"], [""], 0)
    with pytest.raises(ValueError, match="negative"):
        encode_prompts(sd1, ["x", "y", "z"], ["a", "b"], 20)


# -- textual inversion ------------------------------------------------------------------------


def test_textual_inversion_inserted_like_manual_insertion(sd1, tmp_path):
    vectors = torch.randn(2, 64)
    save_file({"emb_params": vectors}, tmp_path / "myembed.safetensors")
    library = EmbeddingLibrary(tmp_path)
    encoded = encode_prompts(sd1, ["a photo of myembed"], [""], 20, embeddings=library)
    ctx = only_context(encoded)
    assert not torch.equal(ctx, context(sd1, "a photo of myembed"))

    encoder = sd1.text_encoders[0]
    prefix = tokenize_ids("a photo of")
    ids = [BOS_ID, *prefix, 0, 0] + [EOS_ID] * (75 - len(prefix) - 1)
    with torch.no_grad():
        embeds = encoder.token_embeddings(torch.tensor([ids]))
        embeds[0, 1 + len(prefix) : 3 + len(prefix)] = vectors
        manual = encoder.forward_embeds(embeds)[0]
    assert torch.equal(ctx, manual)

    sha = hashlib.sha256((tmp_path / "myembed.safetensors").read_bytes()).hexdigest()
    assert encoded.used_embeddings == {"myembed": sha[:12]}
    assert count_tokens("a photo of myembed", embeddings=library) == (len(prefix) + 2, 75)
    weighted = tokenize_prompt("(myembed:1.3)", library)[0][0]
    assert weighted.tokens == [0, 0] and weighted.weights == [1.3, 1.3]


def test_embedding_formats_and_skips(sd1, tmp_path):
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.randn(3, 64)},
            "name": "x",
            "step": 100,
        },
        tmp_path / "a1111.pt",
    )
    sub = tmp_path / "nested"
    sub.mkdir()
    save_file({"<concept>": torch.randn(64)}, sub / "concept.safetensors")
    torch.save({"<tok>": torch.randn(64)}, tmp_path / "learned.bin")
    save_file({"emb_params": torch.randn(1, 32)}, tmp_path / "narrow.safetensors")
    save_file(
        {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, tmp_path / "xl.safetensors"
    )
    save_file({"a": torch.randn(2, 64), "b": torch.randn(2, 64)}, tmp_path / "odd.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")

    library = EmbeddingLibrary(tmp_path)
    assert library.get("a1111").num_vectors == 3
    assert library.get("xl").dims == (768, 1280)
    encode_prompts(sd1, ["x"], [""], 20, embeddings=library)  # validates against width 64
    assert library.names() == ["a1111", "concept", "learned"]
    assert library.get("concept").num_vectors == 1
    assert set(library.skipped) == {"narrow", "xl", "odd", "broken"}
    assert "(32,)" in library.skipped["narrow"] and "(64,)" in library.skipped["narrow"]
    assert "SDXL" in library.skipped["xl"]
    assert "layout" in library.skipped["odd"]
    assert library.get("narrow") is None
    # "narrow" stays plain text; its vectors are never inserted.
    assert tokenize_prompt("narrow", library)[0][0].tokens == tokenize_ids("narrow")


def test_library_notices_added_changed_and_removed_files(tmp_path):
    library = EmbeddingLibrary(tmp_path, dims=[64])
    assert len(library) == 0 and not library.refresh()
    path = tmp_path / "late.safetensors"
    save_file({"emb_params": torch.randn(1, 64)}, path)
    assert library.refresh() and "late" in library
    save_file({"emb_params": torch.randn(4, 64)}, path)
    library.refresh()
    assert library.get("late").num_vectors == 4
    path.unlink()
    assert library.refresh() and library.names() == []


class _Payload:
    """Pickles as a call to exec; loading it unsafely would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_legacy_pickle_with_objects_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.randn(1, 64)}, "x": _Payload(marker)}, path)
    library = EmbeddingLibrary(tmp_path)
    assert not marker.exists()
    assert "evil" not in library and "refused" in library.skipped["evil"]
    with pytest.raises(ValueError, match="refused"):
        load_embedding_file(path)
    assert not marker.exists()


# -- token counter and robustness -------------------------------------------------------------


def test_count_tokens_like_the_a1111_counter():
    assert count_tokens("") == (0, 75)
    assert count_tokens("cat " * 10) == (10, 75)
    assert count_tokens("cat " * 80) == (80, 150)
    assert count_tokens("cat " * 150) == (150, 150)
    assert count_tokens("a cat BREAK dog") == (76, 150)
    assert count_tokens("a [cat:" + "dog " * 80 + ":5]") == (81, 150)  # the longest variant
    assert count_tokens("cat AND " + "dog " * 80) == (80, 150)
    assert count_tokens("cat <lora:x:1> (dog:1.2)") == (2, 75)
    assert count_tokens("cat", steps=0) == (1, 75)


PROMPT_PIECES = st.sampled_from(
    [
        "(",
        ")",
        "[",
        "]",
        ":",
        "|",
        "\\",
        "<",
        ">",
        ",",
        " ",
        "AND",
        "BREAK",
        "lora",
        "cat",
        "0.5",
        "1e400",
        "10",
        "-2",
        ".",
        "myembed",
        "\ud800",
        "\x00",
        "\u00e9",
        "\U0001f600",
    ]
)
PROMPTS = st.one_of(st.text(max_size=120), st.lists(PROMPT_PIECES, max_size=40).map("".join))


@settings(max_examples=40, deadline=None)
@given(prompt=PROMPTS, negative=PROMPTS, steps=st.integers(1, 12))
def test_arbitrary_text_never_crashes(sd1, prompt, negative, steps):
    encoded = encode_prompts(sd1, [prompt], [negative], steps)
    rows = encoded.cond + encoded.uncond
    for step in range(steps + 1):  # one batch per step: every context has the same length
        lengths = {part.at(step).shape[0] for row in rows for part in row.parts}
        assert len(lengths) == 1 and lengths.pop() % 77 == 0
    count, limit = count_tokens(prompt, steps)
    assert 0 <= count <= limit and limit % 75 == 0
