"""The A1111 prompt language: emphasis, prompt editing, alternation, AND, extra-network tags.

Pure Python (no torch). The behaviour follows AUTOMATIC1111 v1.10 (`modules/prompt_parser.py`,
`modules/extra_networks.py`, `extensions-builtin/Lora/extra_networks_lora.py`), re-implemented
from its documented behaviour and doctests. Where A1111 would crash or misbehave we degrade
instead; each such difference is listed in the docstring of the function concerned.

No function here raises on any prompt text. The order A1111 applies things in, which
`parse_prompt` follows:

1. extra-network tags (`<lora:name:0.8>`) are taken out of the whole prompt;
2. the rest is split on `AND` into weighted sub-prompts;
3. each sub-prompt's prompt editing / alternation is expanded into a per-step schedule;
4. each scheduled text is parsed for emphasis (`parse_attention`) by the conditioning code,
   which also finds textual-inversion names in the plain text.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "BREAK",
    "ExtraNetworkTag",
    "ParsedPrompt",
    "SubPrompt",
    "extract_extra_networks",
    "get_prompt_schedule",
    "parse_attention",
    "parse_prompt",
    "split_and",
    "text_at_step",
]

# The chunk-break marker in `parse_attention` output: the conditioning code starts a new
# 75-token chunk when it meets a fragment equal to this.
BREAK: tuple[str, float] = ("BREAK", -1.0)

ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1

_MAX_WEIGHT = sys.float_info.max

# --------------------------------------------------------------------------------------------
# Emphasis: (word), (word:1.2), [word], escapes, BREAK
# --------------------------------------------------------------------------------------------

_ATTENTION_TOKEN = re.compile(
    r"""
      \\[()\[\]\\]              # escaped bracket or backslash: the literal character
    | \\                        # any other backslash: dropped, as A1111 does
    | [(\[]                     # opening bracket
    | :\s*([+-]?[.\d]+)\s*\)    # explicit weight that closes a round bracket
    | [)\]]                     # closing bracket
    | [^\\()\[\]:]+             # plain text
    | :                         # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _finite_float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split `text` into (fragment, weight) pairs the way A1111's `parse_prompt_attention` does.

    `(x)` multiplies by 1.1, `[x]` by 1/1.1, `(x:1.3)` by 1.3; nesting multiplies. `\\(`,
    `\\)`, `\\[`, `\\]`, `\\\\` are literal characters; any other backslash is dropped.
    Unmatched closing brackets are literal text; brackets left open apply their multiplier to
    the rest of the prompt (round ones first, then square, in opening order). Neighbours of
    equal weight are merged; an empty prompt gives `[("", 1.0)]`. The word `BREAK` gives the
    `BREAK` marker `("BREAK", -1.0)`.

    Differences from A1111, all in cases where A1111 crashes or produces nonsense:
    - a `BREAK` inside brackets stays a chunk break (A1111 multiplies the marker's -1 weight,
      so it turns into the literal word "BREAK" with a negative weight);
    - a weight that is not a finite number, such as `(x:1.2.3)`, is literal text and the
      bracket closes as a plain `)` (A1111 raises ValueError);
    - weights saturate at the largest finite float instead of overflowing.
    """
    # each entry: [text, weight, is_break_marker]
    fragments: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for fragment in fragments[start:]:
            if not fragment[2]:
                fragment[1] = max(-_MAX_WEIGHT, min(_MAX_WEIGHT, fragment[1] * multiplier))

    def add_text(chunk: str) -> None:
        for i, part in enumerate(_BREAK_SPLIT.split(chunk)):
            if i > 0:
                fragments.append([BREAK[0], BREAK[1], True])
            fragments.append([part, 1.0, False])

    for match in _ATTENTION_TOKEN.finditer(text):
        token = match.group(0)
        weight_text = match.group(1)
        if token[0] == "\\":
            fragments.append([token[1:], 1.0, False])
        elif token in ("(", "["):
            (open_round if token == "(" else open_square).append(len(fragments))
        elif weight_text is not None and open_round:
            weight = _finite_float(weight_text)
            if weight is None:
                add_text(token[:-1])
                multiply_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
            else:
                multiply_from(open_round.pop(), weight)
        elif token == ")" and open_round:
            multiply_from(open_round.pop(), ROUND_BRACKET_MULTIPLIER)
        elif token == "]" and open_square:
            multiply_from(open_square.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            add_text(token)

    for start in open_round:
        multiply_from(start, ROUND_BRACKET_MULTIPLIER)
    for start in open_square:
        multiply_from(start, SQUARE_BRACKET_MULTIPLIER)

    if not fragments:
        return [("", 1.0)]

    merged: list[list] = [fragments[0]]
    for fragment in fragments[1:]:
        last = merged[-1]
        if not last[2] and not fragment[2] and last[1] == fragment[1]:
            last[0] += fragment[0]
        else:
            merged.append(fragment)
    return [(t, float(w)) for t, w, _ in merged]


# --------------------------------------------------------------------------------------------
# Prompt editing [from:to:when] and alternation [a|b]
# --------------------------------------------------------------------------------------------


@dataclass
class _Scheduled:
    before: list | None  # items; None for the `[to:when]` form
    after: list
    number: str  # `when` as written
    when: int = 0  # resolved step, filled in by _resolve_steps


@dataclass
class _Alternate:
    options: list[list]


# A prompt is a list of items: str (literal text), _Scheduled or _Alternate.
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")
# lark's common SIGNED_NUMBER, then optional whitespace and the closing bracket
_WHEN = re.compile(r"\s*([+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)\s*\]")


class _ScheduleParser:
    """Recursive descent over A1111's prompt-editing grammar (a lark grammar in A1111):

        start:       (prompt | /[][():]/+)*
        prompt:      (emphasized | scheduled | alternate | plain | WHITESPACE)*
        emphasized:  "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"
        scheduled:   "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
        alternate:   "[" prompt ("|" [prompt])+ "]"
        plain:       /([^\\\\\\[\\]():|]|\\\\.)+/

    Inside brackets every sub-prompt ends at one of `] ) : |`, so one token of look-ahead
    decides between the bracket forms. Stray brackets and colons are only allowed at the top
    level, where a bracket that does not close a valid construct is literal text. Prompts are
    memoised by position so failed constructs are never re-parsed.
    """

    def __init__(self, text: str):
        self.text = text
        self.memo: dict[int, tuple[list, int]] = {}

    def parse(self) -> list | None:
        text, items, pos = self.text, [], 0
        while pos < len(text):
            prompt, end = self.prompt(pos)
            if end > pos:
                items.extend(prompt)
                pos = end
            elif text[pos] in "[]():":
                items.append(text[pos])
                pos += 1
            else:  # "|" outside an alternation, or a backslash with nothing to escape
                return None
        return items

    def prompt(self, start: int) -> tuple[list, int]:
        cached = self.memo.get(start)
        if cached is not None:
            return cached
        text, items, pos = self.text, [], start
        while pos < len(text):
            char = text[pos]
            if char in "([":
                bracket = self.bracket(pos)
                if bracket is None:
                    break
                node, pos = bracket
                items.extend(node)
            elif char in "]):|":
                break
            else:
                match = _PLAIN.match(text, pos)
                if match is None:
                    break
                items.append(match.group(0))
                pos = match.end()
        self.memo[start] = (items, pos)
        return items, pos

    def bracket(self, start: int) -> tuple[list, int] | None:
        text = self.text
        opening = text[start]
        first, pos = self.prompt(start + 1)
        if pos >= len(text):
            return None
        char = text[pos]
        if opening == "(":
            if char == ")":
                return ["(", *first, ")"], pos + 1
            if char == ":":
                second, end = self.prompt(pos + 1)
                if end < len(text) and text[end] == ")":
                    return ["(", *first, ":", *second, ")"], end + 1
            return None
        if char == "]":
            return ["[", *first, "]"], pos + 1
        if char == "|":
            options = [first]
            while pos < len(text) and text[pos] == "|":
                option, pos = self.prompt(pos + 1)
                options.append(option)
            if pos < len(text) and text[pos] == "]":
                return [_Alternate(options)], pos + 1
            return None
        if char == ":":
            when = _WHEN.match(text, pos + 1)
            if when is not None:
                return [_Scheduled(None, first, when.group(1))], when.end()
            second, end = self.prompt(pos + 1)
            if end < len(text) and text[end] == ":":
                when = _WHEN.match(text, end + 1)
                if when is not None:
                    return [_Scheduled(first, second, when.group(1))], when.end()
        return None


def _walk(items: list):
    for item in items:
        if isinstance(item, _Scheduled):
            yield item
            if item.before is not None:
                yield from _walk(item.before)
            yield from _walk(item.after)
        elif isinstance(item, _Alternate):
            yield item
            for option in item.options:
                yield from _walk(option)


def _resolve_when(number: str, steps: int, int_offset: int, flt_offset: float, old: bool) -> int:
    value = float(number)
    if old:
        value = value * steps if value < 1 else value
    elif "." in number:
        value = (value - flt_offset) * steps
    else:
        value = value - int_offset
    # A1111: min(steps, int(value)); clamped first so huge exponents cannot overflow int()
    if value >= steps:
        return steps
    return int(value) if value > -1 else -1


def _render(items: list, step: int) -> str:
    out: list[str] = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Scheduled):
            if step <= item.when:
                if item.before is not None:
                    out.append(_render(item.before, step))
            else:
                out.append(_render(item.after, step))
        else:
            option = item.options[(step - 1) % len(item.options)]
            out.append(_render(option, step))
    return "".join(out)


def get_prompt_schedule(
    prompt: str,
    steps: int,
    *,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[tuple[int, str]]:
    """Expand prompt editing and alternation into `[(end_step, text), ...]`.

    Same result as A1111's `get_learned_conditioning_prompt_schedules([prompt], ...)[0]`:
    `text` is used up to and including `end_step` (see `text_at_step`), the last entry ends at
    `steps`. `[from:to:when]` uses `from` while step <= when and `to` after it; `[to:when]`
    and `[from::when]` add or remove text. A `when` written with a `.` is a fraction of the
    steps (`0.25`, `1.0`), one without is a step number (`10`). `[a|b|c]` cycles a, b, c with
    the step, so any alternation gives one entry per step. If the prompt does not fit the
    grammar (for example a `|` outside brackets) the whole prompt is used literally, as A1111
    does; emphasis brackets are left in the text for `parse_attention`.

    `hires_steps` selects A1111's hires-pass timeline (integers count from the end of the base
    pass, fractions 1..2 span the hires pass). `use_old_scheduling` is A1111's "Old prompt
    editing timelines": values below 1 are fractions, others are steps.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, total = 0, 0.0, steps
    else:
        if hires_steps < 1:
            raise ValueError(f"hires_steps must be at least 1, got {hires_steps}")
        int_offset, flt_offset, total = steps, 1.0, hires_steps

    try:
        items = _ScheduleParser(prompt).parse()
    except RecursionError:  # absurdly deep nesting: keep the text as written
        items = None
    if items is None:
        return [(total, prompt)]

    boundaries = {total}
    for node in _walk(items):
        if isinstance(node, _Scheduled):
            node.when = _resolve_when(
                node.number, total, int_offset, flt_offset, use_old_scheduling
            )
            if node.when >= 1:
                boundaries.add(node.when)
        else:
            boundaries.update(range(1, total + 1))
    return [(step, _render(items, step)) for step in sorted(boundaries)]


def text_at_step(schedule: Sequence[tuple[int, str]], step: int) -> str:
    """The scheduled text for a sampler step, selected the way A1111 does.

    A1111 passes the sampler's 0-based step index and takes the first entry whose end_step is
    >= that index (the last entry if none is), so `[(3, "a"), (10, "b")]` gives "a" for steps
    0..3.
    """
    for end_step, text in schedule:
        if step <= end_step:
            return text
    return schedule[-1][1]


# --------------------------------------------------------------------------------------------
# AND (composable diffusion)
# --------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_SUBPROMPT_WEIGHT = re.compile(r"^([\s\S]*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split on the word `AND` into `(sub_prompt, weight)`; `a :0.7` ends in weight 0.7.

    As in A1111 the text keeps its leading whitespace and loses its trailing whitespace and
    weight; the default weight is 1.0. Unlike A1111 identical sub-prompts are not merged
    (A1111 only shares their encoding; each still counts with its own weight). A weight too
    large to be a finite float is kept as text.
    """
    result = []
    for subprompt in _AND.split(prompt):
        match = _SUBPROMPT_WEIGHT.match(subprompt)
        text, weight_text = match.groups()  # the pattern matches any string
        weight = 1.0 if weight_text is None else _finite_float(weight_text)
        if weight is None:
            text, weight = subprompt.rstrip(), 1.0
        result.append((text, weight))
    return result


# --------------------------------------------------------------------------------------------
# Extra-network tags <kind:name:args...>
# --------------------------------------------------------------------------------------------

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One `<kind:name:arg:...>` tag, such as `<lora:add_detail:0.8>`.

    Arguments are split on `:`; `key=value` items go to `named`, the rest are positional
    (A1111's ExtraNetworkParams). The weights follow A1111's LoRA rule, used for every kind:
    `te_weight` = positional 1 or `te=`, default 1.0; `unet_weight` = positional 2 or `unet=`,
    default te_weight; `dyn_dim` = positional 3 or `dyn=`. For `<hypernet:name:m>` both
    weights are m. A value that is not a finite number leaves the default in place and sets
    `error`, which the code that activates the network should report (A1111 raises there).
    """

    kind: str
    name: str
    te_weight: float = 1.0
    unet_weight: float = 1.0
    dyn_dim: int | None = None
    args: tuple[str, ...] = ()  # positional items after the name
    named: dict[str, str] = field(default_factory=dict, hash=False)
    text: str = ""  # the tag as written
    error: str | None = None


def _parse_tag(kind: str, arguments: str, text: str) -> ExtraNetworkTag:
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in arguments.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)

    errors: list[str] = []

    def number(raw: str | None, default, convert):
        if raw is None:
            return default
        try:
            value = convert(raw.strip())
        except (ValueError, OverflowError):
            value = None
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            errors.append(f"{raw!r} is not a valid number")
            return default
        return value

    def pick(index: int, key: str) -> str | None:
        if key in named:
            return named[key]
        return positional[index] if len(positional) > index else None

    te_weight = number(pick(1, "te"), 1.0, float)
    unet_weight = number(pick(2, "unet"), te_weight, float)
    dyn_dim = number(pick(3, "dyn"), None, int)
    name = positional[0] if positional else ""
    if not name:
        errors.insert(0, "no network name")
    error = f"{text}: {'; '.join(errors)}" if errors else None
    return ExtraNetworkTag(
        kind=kind,
        name=name,
        te_weight=te_weight,
        unet_weight=unet_weight,
        dyn_dim=dyn_dim,
        args=tuple(positional[1:]),
        named=named,
        text=text,
        error=error,
    )


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetworkTag]]:
    """Remove every `<kind:args>` tag from `prompt`; return the text and the tags in order."""
    tags: list[ExtraNetworkTag] = []

    def take(match: re.Match) -> str:
        tags.append(_parse_tag(match.group(1), match.group(2), match.group(0)))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), tags


# --------------------------------------------------------------------------------------------
# Everything together
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SubPrompt:
    """One AND-separated part: its text, its weight and its schedule of texts per step."""

    text: str
    weight: float
    schedule: tuple[tuple[int, str], ...]

    def text_at(self, step: int) -> str:
        return text_at_step(self.schedule, step)


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt taken apart: extra-network tags, then weighted AND parts with schedules."""

    text: str  # the prompt without its extra-network tags
    extra_networks: tuple[ExtraNetworkTag, ...]
    subprompts: tuple[SubPrompt, ...]
    steps: int

    def texts_at(self, step: int) -> list[tuple[str, float]]:
        """(text, weight) of each sub-prompt at a 0-based sampler step (see `text_at_step`)."""
        return [(sub.text_at(step), sub.weight) for sub in self.subprompts]


def parse_prompt(
    text: str,
    steps: int,
    *,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> ParsedPrompt:
    """Parse a full prompt for `steps` sampling steps (see the module docstring for the order)."""
    stripped, tags = extract_extra_networks(text)
    subprompts = tuple(
        SubPrompt(
            text=sub,
            weight=weight,
            schedule=tuple(
                get_prompt_schedule(
                    sub, steps, hires_steps=hires_steps, use_old_scheduling=use_old_scheduling
                )
            ),
        )
        for sub, weight in split_and(stripped)
    )
    return ParsedPrompt(
        text=stripped, extra_networks=tuple(tags), subprompts=subprompts, steps=steps
    )
