"""Prompt text -> conditioning tensors, encoded the way AUTOMATIC1111 encodes prompts.

The steps (A1111 `modules/sd_hijack_clip.py`, `sd_emphasis.py`, `prompt_parser.py`,
`textual_inversion/textual_inversion.py`, re-implemented from their documented behaviour):

1. `prompts.parse_prompt` removes extra-network tags, splits on `AND` and expands prompt
   editing / alternation into a per-step schedule of plain texts.
2. Each distinct text is split into weighted fragments (`parse_attention`), each fragment is
   tokenized, textual-inversion names are found in the token stream and replaced by their
   vectors, and the tokens are packed into chunks of 75: `BREAK` starts a new chunk, and a chunk
   that fills up within 20 tokens of a comma moves the text after the comma to the next chunk.
3. Every chunk becomes `[BOS] + 75 tokens + [EOS]`, padded with EOS, and everything after the
   first EOS is set to the encoder's pad id (49407 for CLIP-L, 0 for OpenCLIP). The chunks go
   through the text encoder separately (with clip skip), emphasis is applied to each chunk's
   hidden states, and the chunks are concatenated: context [77·k, D].
4. Contexts are aligned per step the way A1111's CFG denoiser does it: positive contexts of
   different lengths are padded by repeating their last vector, negative ones likewise, and
   (with `pad_conds`, A1111's "Pad prompt/negative prompt") the shorter group is padded with
   the encoding of an empty prompt so the UNet sees one batch.

Known differences from A1111, all deliberate:
- Emphasis "Original" restores the mean per text and chunk. A1111 encodes all scheduled
  variants of one prompt as one batch and takes the mean over that batch, so with prompt
  editing its means mix variants (and the empty chunks that pad shorter variants).
- When the comma rule moves text to the next chunk, textual-inversion vectors in that text move
  with it (A1111 leaves them in the old chunk's padding).
- Lone surrogate characters, which the tokenizer cannot take, become U+FFFD.

Textual-inversion files are read by `ldm_core.textual_inversion` (re-exported here).
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ldm_core.denoiser import Conditioning, ScheduledCond
from ldm_core.prompts import (
    BREAK,
    ExtraNetworkTag,
    extract_extra_networks,
    get_prompt_schedule,
    parse_attention,
    parse_prompt,
    split_and,
)
from ldm_core.textual_inversion import (
    Embedding,
    EmbeddingError,
    EmbeddingLibrary,
    load_embedding_file,
    replace_lone_surrogates,
)
from ldm_core.tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, tokenize_ids

Tensor = torch.Tensor

__all__ = [
    "CHUNK_LENGTH",
    "EMPHASIS_MODES",
    "EncodedPrompts",
    "EncodedText",
    "Embedding",
    "EmbeddingError",
    "EmbeddingLibrary",
    "PromptCache",
    "PromptChunk",
    "apply_emphasis",
    "count_tokens",
    "encode_prompts",
    "encode_text",
    "load_embedding_file",
    "tokenize_prompt",
]

CHUNK_LENGTH = MAX_LENGTH - 2  # 75 prompt tokens between BOS and EOS
COMMA_ID = 267  # ",</w>"
COMMA_BACKTRACK = 20  # A1111 "Prompt word wrap length limit"
# A1111's emphasis modes: "Ignore" drops the weights, "None" also reads brackets as text.
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


# --------------------------------------------------------------------------------------------
# Tokens -> 75-token chunks
# --------------------------------------------------------------------------------------------


@dataclass
class PromptChunk:
    """Up to 75 tokens with their weights; `fixes` are (offset, embedding) placements."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    fixes: list[tuple[int, Embedding]] = field(default_factory=list)

    def split(self, at: int) -> PromptChunk:
        """Cut this chunk at `at`; return the tail as a new chunk (embeddings move with it)."""
        tail = PromptChunk(
            self.tokens[at:],
            self.weights[at:],
            [(offset - at, emb) for offset, emb in self.fixes if offset >= at],
        )
        del self.tokens[at:], self.weights[at:]
        self.fixes = [(offset, emb) for offset, emb in self.fixes if offset < at]
        return tail

    def input_ids(self, pad_id: int) -> list[int]:
        """The 77 ids: BOS, tokens, EOS padding, EOS; after the first EOS, `pad_id`."""
        ids = [BOS_ID, *self.tokens] + [EOS_ID] * (CHUNK_LENGTH - len(self.tokens) + 1)
        first_eos = ids.index(EOS_ID)
        ids[first_eos + 1 :] = [pad_id] * (len(ids) - first_eos - 1)
        return ids

    def full_weights(self) -> list[float]:
        return [1.0, *self.weights] + [1.0] * (CHUNK_LENGTH - len(self.weights) + 1)


def _check_emphasis(emphasis: str) -> None:
    if emphasis not in EMPHASIS_MODES:
        raise ValueError(f"unknown emphasis mode {emphasis!r}; expected one of {EMPHASIS_MODES}")


def tokenize_prompt(
    text: str,
    embeddings: EmbeddingLibrary | None = None,
    emphasis: str = "Original",
) -> tuple[list[PromptChunk], int]:
    """Pack one plain (already scheduled) prompt into 75-token chunks, as A1111 does.

    Returns the chunks and A1111's token count for the UI counter (75 for every chunk but the
    last, which counts its own tokens).
    """
    _check_emphasis(emphasis)
    text = replace_lone_surrogates(text)
    fragments = [(text, 1.0)] if emphasis == "None" else parse_attention(text)
    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1

    def next_chunk(is_last: bool = False) -> None:
        nonlocal chunk, token_count, last_comma
        token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
        chunks.append(chunk)
        chunk = PromptChunk()
        last_comma = -1

    for fragment, weight in fragments:
        if (fragment, weight) == BREAK:
            next_chunk()
            continue
        tokens = tokenize_ids(fragment)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == COMMA_ID:
                last_comma = len(chunk.tokens)
            elif (
                len(chunk.tokens) == CHUNK_LENGTH
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= COMMA_BACKTRACK
            ):
                tail = chunk.split(last_comma + 1)
                next_chunk()
                chunk = tail
            if len(chunk.tokens) == CHUNK_LENGTH:
                next_chunk()

            found = embeddings.find_at(tokens, position) if embeddings is not None else None
            if found is None:
                chunk.tokens.append(token)
                chunk.weights.append(weight)
                position += 1
                continue
            embedding, name_length = found
            count = embedding.num_vectors
            if len(chunk.tokens) + count > CHUNK_LENGTH:
                next_chunk()
            chunk.fixes.append((len(chunk.tokens), embedding))
            chunk.tokens += [0] * count  # placeholder ids; their embedding rows are replaced
            chunk.weights += [weight] * count
            position += name_length

    if chunk.tokens or not chunks:
        next_chunk(is_last=True)
    return chunks, token_count


# --------------------------------------------------------------------------------------------
# Chunks -> hidden states
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class EncodedText:
    """One plain prompt text encoded: context [77·k, D] and what went into it."""

    context: Tensor  # [77 * chunks, sum of encoder widths]
    token_count: int
    input_ids: list[Tensor]  # per text encoder: [chunks, 77]
    weights: Tensor  # [chunks, 77]
    embeddings: tuple[Embedding, ...]

    @property
    def num_chunks(self) -> int:
        return self.weights.shape[0]


def apply_emphasis(z: Tensor, weights: Tensor, emphasis: str) -> Tensor:
    """Weights on hidden states z [k, 77, D] per chunk; weights [k, 77].

    "Original": z·w, then rescaled so each chunk's mean is its mean before weighting
    (A1111: `z *= original_mean / new_mean`). "No norm": z·w. "Ignore"/"None": z.
    """
    _check_emphasis(emphasis)
    if emphasis in ("Ignore", "None"):
        return z
    z32 = z.float()
    weighted = z32 * weights.to(z32)[..., None]
    if emphasis == "Original":
        original_mean = z32.mean(dim=(1, 2), keepdim=True)
        ratio = original_mean / weighted.mean(dim=(1, 2), keepdim=True)
        # A zero mean after weighting (e.g. weight 0 everywhere) has no rescale to restore.
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
        weighted = weighted * ratio
    return weighted.to(z.dtype)


@torch.no_grad()
def _encode_chunks(
    encoders: Sequence, chunks: list[PromptChunk], clip_skip: int, emphasis: str
) -> tuple[Tensor, list[Tensor], Tensor]:
    weights = torch.tensor([chunk.full_weights() for chunk in chunks], dtype=torch.float32)
    contexts, all_ids = [], []
    for index, encoder in enumerate(encoders):
        device = next(encoder.parameters()).device
        ids = torch.tensor([chunk.input_ids(encoder.pad_token_id) for chunk in chunks])
        all_ids.append(ids)
        embeds = encoder.token_embeddings(ids.to(device))  # [k, 77, D]
        for row, chunk in enumerate(chunks):
            for offset, embedding in chunk.fixes:
                vectors = embedding.vectors_for(index).to(embeds)
                embeds[row, offset + 1 : offset + 1 + vectors.shape[0]] = vectors
        z = encoder.forward_embeds(embeds, clip_skip)  # [k, 77, D]
        contexts.append(apply_emphasis(z, weights.to(z.device), emphasis))
    context = torch.cat(contexts, dim=-1)
    return context.reshape(-1, context.shape[-1]), all_ids, weights


def encode_text(
    checkpoint,
    text: str,
    *,
    clip_skip: int = 1,
    embeddings: EmbeddingLibrary | None = None,
    emphasis: str = "Original",
) -> EncodedText:
    """Encode one plain prompt text (no AND, no scheduling) with `checkpoint.text_encoders`.

    Several text encoders (SDXL) have their contexts concatenated along the feature axis.
    """
    encoders = list(checkpoint.text_encoders)
    if not encoders:
        raise ValueError("the checkpoint has no text encoder")
    chunks, token_count = tokenize_prompt(text, embeddings, emphasis)
    context, ids, weights = _encode_chunks(encoders, chunks, clip_skip, emphasis)
    used: dict[int, Embedding] = {}
    for chunk in chunks:
        for _, embedding in chunk.fixes:
            used[id(embedding)] = embedding
    return EncodedText(context, token_count, ids, weights, tuple(used.values()))


class PromptCache:
    """Encoded texts remembered across calls (least recently used dropped first).

    Owned by the caller, so nothing is global. Entries are keyed by the text, clip skip,
    emphasis, the embedding library's version, and each text encoder's identity and parameter
    versions, so in-place weight patches (LoRA) and reloaded models miss the cache. Call
    `clear()` after replacing parameter objects of a live encoder.
    """

    def __init__(self, maxsize: int = 64):
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple, EncodedText] = OrderedDict()

    def get(self, key: tuple) -> EncodedText | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: tuple, value: EncodedText) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _encoder_key(encoder: torch.nn.Module) -> tuple:
    # weakref: hashes and compares like the module while it lives, never matches a new one.
    return (weakref.ref(encoder), tuple(p._version for p in encoder.parameters()))


class _TextEncoding:
    """Encodes texts for one `encode_prompts` call: each distinct text once."""

    def __init__(self, checkpoint, clip_skip, embeddings, emphasis, cache: PromptCache | None):
        self.checkpoint = checkpoint
        self.options = {"clip_skip": clip_skip, "embeddings": embeddings, "emphasis": emphasis}
        self.cache = cache
        self.memo: dict[str, EncodedText] = {}
        if cache is not None:
            library = None
            if embeddings is not None:
                library = (weakref.ref(embeddings), embeddings.version)
            encoders = tuple(_encoder_key(e) for e in checkpoint.text_encoders)
            self.key = (encoders, clip_skip, emphasis, library)

    def __call__(self, text: str) -> EncodedText:
        encoded = self.memo.get(text)
        if encoded is not None:
            return encoded
        if self.cache is not None:
            encoded = self.cache.get((*self.key, text))
        if encoded is None:
            encoded = encode_text(self.checkpoint, text, **self.options)
            if self.cache is not None:
                self.cache.put((*self.key, text), encoded)
        self.memo[text] = encoded
        return encoded


# --------------------------------------------------------------------------------------------
# Batches of prompts -> Conditioning
# --------------------------------------------------------------------------------------------

Schedule = list[tuple[int, Tensor]]


@dataclass
class EncodedPrompts:
    """What the sampling loop and the infotext need from a batch of prompts.

    `cond`/`uncond` hold one `Conditioning` per batch row. `extra_networks` are the tags of the
    first prompt (A1111 activates the first prompt's networks for the whole batch); every
    row's tags are in `extra_networks_per_prompt`. `used_embeddings` maps each textual
    inversion used (positive or negative) to its short hash (infotext "TI hashes").
    `token_counts` are (tokens, limit) per row as the UI counter shows them. `padded_conds` is
    True when empty-prompt padding was added between cond and uncond (infotext "Pad conds").
    """

    cond: list[Conditioning]
    uncond: list[Conditioning]
    extra_networks: list[ExtraNetworkTag]
    used_embeddings: dict[str, str]
    token_counts: list[tuple[int, int]]
    negative_token_counts: list[tuple[int, int]] = field(default_factory=list)
    extra_networks_per_prompt: list[list[ExtraNetworkTag]] = field(default_factory=list)
    negative_extra_networks: list[list[ExtraNetworkTag]] = field(default_factory=list)
    padded_conds: bool = False


def _token_limit(count: int) -> int:
    return math.ceil(max(count, 1) / CHUNK_LENGTH) * CHUNK_LENGTH


def _at(schedule: Schedule, step: int) -> Tensor:
    for end_step, context in schedule:
        if step <= end_step:
            return context
    return schedule[-1][1]


def _align(
    cond_schedules: list[Schedule],
    uncond_schedules: list[Schedule],
    empty: Callable[[], Tensor],
    pad_conds: bool,
) -> tuple[list[Schedule], list[Schedule], bool]:
    """Per step, make contexts batchable as A1111's CFG denoiser does.

    Within the positive group (every row and AND part) and within the negative group, shorter
    contexts are padded by repeating their last vector; with `pad_conds` the shorter group is
    then padded with empty-prompt encodings. Schedules are re-cut at the union of all switch
    steps so each entry has one target length.
    """
    boundaries = sorted({end for s in cond_schedules + uncond_schedules for end, _ in s})
    padded_any = False
    made: dict[tuple[int, int, int], Tensor] = {}
    sources: list[Tensor] = []  # keeps ids in `made` keys unique

    def pad(context: Tensor, group_length: int, final_length: int) -> Tensor:
        key = (id(context), group_length, final_length)
        if key not in made:
            sources.append(context)
            out = context
            if out.shape[0] < group_length:
                out = torch.cat([out, out[-1:].expand(group_length - out.shape[0], -1)])
            if out.shape[0] < final_length:
                repeats = -(-(final_length - out.shape[0]) // MAX_LENGTH)
                out = torch.cat([out, empty().repeat(repeats, 1)])[:final_length]
            made[key] = out
        return made[key]

    new_cond: list[Schedule] = [[] for _ in cond_schedules]
    new_uncond: list[Schedule] = [[] for _ in uncond_schedules]
    for step in boundaries:
        conds = [_at(s, step) for s in cond_schedules]
        unconds = [_at(s, step) for s in uncond_schedules]
        cond_length = max((c.shape[0] for c in conds), default=0)
        uncond_length = max((u.shape[0] for u in unconds), default=0)
        final = max(cond_length, uncond_length) if pad_conds else 0
        if pad_conds and conds and unconds and cond_length != uncond_length:
            padded_any = True
        for group, contexts, length in (
            (new_cond, conds, cond_length),
            (new_uncond, unconds, uncond_length),
        ):
            for schedule, context in zip(group, contexts, strict=True):
                out = pad(context, length, final)
                if schedule and schedule[-1][1] is out:
                    schedule[-1] = (step, out)
                else:
                    schedule.append((step, out))
    return new_cond, new_uncond, padded_any


def encode_prompts(
    checkpoint,
    prompts: list[str],
    negative_prompts: list[str],
    steps: int,
    *,
    clip_skip: int = 1,
    embeddings: EmbeddingLibrary | None = None,
    emphasis: str = "Original",
    pad_conds: bool = True,
    hires_steps: int | None = None,
    cache: PromptCache | None = None,
) -> EncodedPrompts:
    """Encode a batch of positive and negative prompts for `steps` sampling steps.

    `negative_prompts` has one entry per prompt, or one (or none, meaning "") for all. The
    negative prompt supports prompt editing but not `AND`, as in A1111. `pad_conds=True` pads
    cond and uncond to one length with empty-prompt encodings so they run as one UNet batch
    (A1111's optional "Pad prompt/negative prompt"; its default runs them separately, which
    `pad_conds=False` reproduces). `hires_steps` selects the hires-pass prompt-editing
    timeline. Malformed prompt text never raises; bad arguments raise ValueError.
    """
    _check_emphasis(emphasis)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not prompts:
        raise ValueError("no prompts given")
    if len(negative_prompts) not in (0, 1, len(prompts)):
        raise ValueError(
            f"{len(negative_prompts)} negative prompts for {len(prompts)} prompts; "
            "give one per prompt or a single one"
        )
    negatives = list(negative_prompts) or [""]
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    encoders = list(checkpoint.text_encoders)
    if not encoders:
        raise ValueError("the checkpoint has no text encoder")
    if embeddings is not None:
        embeddings.refresh()
        embeddings.set_dims([encoder.hidden_size for encoder in encoders])
    encode = _TextEncoding(checkpoint, clip_skip, embeddings, emphasis, cache)

    def scheduled(schedule) -> tuple[Schedule, int]:
        entries = [(end, encode(text)) for end, text in schedule]
        count = max(e.token_count for _, e in entries)
        return [(end, e.context) for end, e in entries], count

    cond_parts: list[list[tuple[float, Schedule]]] = []
    tags_per_prompt, token_counts = [], []
    for prompt in prompts:
        parsed = parse_prompt(replace_lone_surrogates(prompt), steps, hires_steps=hires_steps)
        parts, count = [], 0
        for sub in parsed.subprompts:
            schedule, sub_count = scheduled(sub.schedule)
            parts.append((sub.weight, schedule))
            count = max(count, sub_count)
        cond_parts.append(parts)
        tags_per_prompt.append(list(parsed.extra_networks))
        token_counts.append((count, _token_limit(count)))

    uncond_schedules: list[Schedule] = []
    negative_tags, negative_counts = [], []
    for negative in negatives:
        text, tags = extract_extra_networks(replace_lone_surrogates(negative))
        schedule, count = scheduled(get_prompt_schedule(text, steps, hires_steps=hires_steps))
        uncond_schedules.append(schedule)
        negative_tags.append(tags)
        negative_counts.append((count, _token_limit(count)))

    flat = [schedule for parts in cond_parts for _, schedule in parts]
    flat, uncond_schedules, padded = _align(
        flat, uncond_schedules, lambda: encode("").context, pad_conds
    )
    cond: list[Conditioning] = []
    position = 0
    for parts in cond_parts:
        cond.append(
            Conditioning(
                [ScheduledCond(flat[position + i], weight) for i, (weight, _) in enumerate(parts)]
            )
        )
        position += len(parts)
    uncond = [Conditioning([ScheduledCond(schedule, 1.0)]) for schedule in uncond_schedules]

    used: dict[str, str] = {}
    for encoded in encode.memo.values():
        for embedding in encoded.embeddings:
            used[embedding.name] = embedding.shorthash
    return EncodedPrompts(
        cond=cond,
        uncond=uncond,
        extra_networks=tags_per_prompt[0],
        used_embeddings=used,
        token_counts=token_counts,
        negative_token_counts=negative_counts,
        extra_networks_per_prompt=tags_per_prompt,
        negative_extra_networks=negative_tags,
        padded_conds=padded,
    )


def count_tokens(
    prompt: str,
    steps: int = 20,
    *,
    embeddings: EmbeddingLibrary | None = None,
    is_positive: bool = True,
    emphasis: str = "Original",
) -> tuple[int, int]:
    """(tokens used, limit) for the UI counter "N/75", as A1111's counter computes it.

    Extra-network tags are removed, a positive prompt is split on AND, prompt editing is
    expanded, and the longest variant is counted; the limit is the next multiple of 75. Never
    raises on prompt text (steps below 1 count as 1).
    """
    steps = max(1, int(steps))
    text, _ = extract_extra_networks(replace_lone_surrogates(prompt))
    subprompts = [sub for sub, _ in split_and(text)] if is_positive else [text]
    count = 0
    for sub in subprompts:
        for _, variant in get_prompt_schedule(sub, steps):
            count = max(count, tokenize_prompt(variant, embeddings, emphasis)[1])
    return count, _token_limit(count)
