"""Stage 5b of the demo recipe: the text encoder learns to read captions before it meets images.

Measured on 2026-12-02 (docs/demo-model.md, "The 90-minute budget"): trained jointly from random
weights, the text encoder and UNet need 250,000 to 340,000 samples before shapes go where the
prompt says; with a text encoder that already tells the positions apart, a UNet from random
weights gets positions right within 51,000. What is slow is the text encoder learning "top left"
from the diffusion loss alone. So it first learns it from text alone: each training caption
(the same augmented captions the joint stage uses) is trained against the labels of its scene.
No images, no UNet: thousands of captions a second.

Two objectives (`TextPretrainConfig.objective`). "heads": one learnt query per attribute attends
over the final-LN'd token states (as the UNet's cross-attention reads them), or their mean is
taken, then a linear layer gives the class. "targets" (what train_demo's stage uses): the EOS and
padding states regress onto a fixed random code of the labels (`LabelTargets`) in which position
has the largest share, as it has in the padding states of a text encoder trained jointly with
the UNet. Labels: the main object's colour, shape, size and position, the background, and the
second object's colour, shape, size and position ("none" for one-object scenes). Captions that
leave an attribute out (partial captions, templates without the size) keep the scene's label:
the model can only learn the prior there, which is the right answer for a prompt that does not
say. Measured (docs/demo-model.md): followed by a joint stage that trains the encoder too,
neither objective makes positions come sooner (the joint stage pulls the code apart); with the
"targets" encoder frozen there (`LDMTrainConfig.text_lr_scale=0`), a UNet from random weights
put 99% of shapes in the prompt's position within 10 minutes, and whole 85- and 88-minute runs
that way (3- and 6-minute text stages; the longer one lifted colour and shape by 9 and 11 points)
met the position and background bars but not colour and shape, so the stage stays off by default.

Only the text encoder's weights leave this stage; the heads or the code are thrown away.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.config import TextEncoderConfig
from ldm_core.nn.text_encoders import TextEncoder
from ldm_core.tokenizer import EOS_ID
from ldm_core.training import world
from ldm_core.training.autoencoder import StopFlag, time_cosine_lr
from ldm_core.training.captions import training_caption
from ldm_core.training.checkpoints import save_atomic
from ldm_core.training.ldm import DEMO_TEXT_CONFIG, tokenize
from ldm_core.training.optim import adamw

log = logging.getLogger(__name__)

NONE = "none"
# attribute -> class names; the second object's attributes have a "none" class.
PRETRAIN_LABELS: dict[str, tuple[str, ...]] = {
    **world.LABELS,
    "colour2": (*world.COLOUR_NAMES, NONE),
    "shape2": (*world.SHAPES, NONE),
    "size2": (*world.SIZES, NONE),
    "position2": (*world.POSITION_NAMES, NONE),
}


@dataclass
class TextPretrainConfig:
    minutes: float = 3.0
    # The run's length in steps, its cosine over them (`minutes` is then only a ceiling): the same
    # text stage on any machine. None: as many steps as `minutes` allow, the cosine over time.
    steps: int | None = None
    batch_size: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0
    # Token positions the heads see. Training captions are at most 31 tokens long with BOS and
    # EOS, so 40 keeps every caption and some EOS padding; the encoder is causal, so those
    # states are the ones it gives in the full 77, and a step costs half of what 77 would.
    tokens: int = 40
    # "targets": the EOS and padding states regress onto a fixed code of the scene's labels
    # (`LabelTargets`); "heads": attention- or mean-pooled classifier heads (`CaptionHeads`).
    objective: str = "heads"
    pool: str = "attention"
    # "targets": each attribute's share of the code (`LabelTargets`); None: `TARGET_WEIGHTS`
    target_weights: dict[str, float] | None = None
    # "targets": the code's rows drawn at random ("gaussian") or all at right angles ("orthogonal")
    code: str = "gaussian"
    eval_prompts: int = 224
    log_every: int = 50
    max_steps: int | None = None  # tests: stop after this many steps whatever the time


class CaptionHeads(nn.Module):
    """Attention-pooled classifiers over a text encoder's token states [B, T, D]."""

    def __init__(
        self,
        dim: int,
        labels: dict[str, tuple[str, ...]] = PRETRAIN_LABELS,
        pool: str = "attention",
    ):
        super().__init__()
        if pool not in ("attention", "mean"):
            raise ValueError(f"pool must be 'attention' or 'mean', not {pool!r}")
        self.pool = pool
        self.names = tuple(labels)
        self.queries = nn.Parameter(torch.randn(len(labels), dim) * dim**-0.5)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.heads = nn.ModuleDict({a: nn.Linear(dim, len(v)) for a, v in labels.items()})

    def forward(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        k, v = self.key(states), self.value(states)  # [B, T, D]
        if self.pool == "mean":  # what cross-attention with untrained queries reads: the average
            pooled = v.mean(dim=1)
            return {a: self.heads[a](pooled) for a in self.names}
        attn = torch.einsum("ad,btd->bat", self.queries, k) * states.shape[-1] ** -0.5
        pooled = torch.einsum("bat,btd->bad", attn.softmax(dim=-1), v)  # [B, A, D]
        return {a: self.heads[a](pooled[:, i]) for i, a in enumerate(self.names)}


# Share of each attribute in the target code's variance (`LabelTargets`). Position dominates, as
# it does in the EOS and padding states of the shipped file's text encoder (trained jointly for
# hours): there 55% of a padding state's variance is the position, 4% the colour.
TARGET_WEIGHTS: dict[str, float] = {
    "position": 0.4,
    "colour": 0.1,
    "shape": 0.1,
    "background": 0.1,
    "size": 0.05,
    "position2": 0.1,
    "colour2": 0.05,
    "shape2": 0.05,
    "size2": 0.05,
}


def parse_target_weights(text: str) -> dict[str, float]:
    """`TARGET_WEIGHTS` with the attributes named in "colour=0.25,position=0.3" set to those
    values, then all scaled to sum to 1 (each is a share of the code's variance). Unknown
    attributes, negative or non-numeric values and an all-zero code raise ValueError."""
    weights = dict(TARGET_WEIGHTS)
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        name = name.strip()
        if not sep or name not in weights:
            known = ", ".join(TARGET_WEIGHTS)
            raise ValueError(f"{item.strip()!r}: expected attribute=weight with one of {known}")
        try:
            weights[name] = float(value)
        except ValueError:
            raise ValueError(f"{item.strip()!r}: the weight is not a number") from None
        if not (math.isfinite(weights[name]) and weights[name] >= 0):
            raise ValueError(f"{item.strip()!r}: a weight must be finite and >= 0")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"{text!r}: every weight is 0, the code would be empty")
    return {a: w / total for a, w in weights.items()}


class LabelTargets(nn.Module):
    """A fixed random code of a scene's labels that the EOS and padding states regress onto.

    Each attribute has a codebook of unit-variance Gaussian rows, one per class, scaled by the
    square root of its weight (`orthogonal`: rows of the same norm, all at right angles, so no
    two classes are closer than any other two); a scene's code is the sum of its classes' rows,
    so a state has unit variance per channel (what the final layer norm gives) and each
    attribute's share of it is its weight. With the squared error, a caption that leaves an
    attribute out learns the mean of that attribute's rows: the prior. `decode` reads the labels
    back by dot products.
    """

    def __init__(
        self,
        dim: int,
        weights: dict[str, float] = TARGET_WEIGHTS,
        labels: dict[str, tuple[str, ...]] = PRETRAIN_LABELS,
        seed: int = 0,
        orthogonal: bool = False,
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.names = tuple(weights)
        if orthogonal:  # every row of every codebook at right angles, each of norm sqrt(dim)
            total = sum(len(labels[a]) for a in self.names)
            if total > dim:
                raise ValueError(f"{total} orthogonal rows do not fit in {dim} dimensions")
            q, _ = torch.linalg.qr(torch.randn(dim, total, generator=gen))
            all_rows = (q.T * dim**0.5).split([len(labels[a]) for a in self.names])
        else:
            all_rows = [torch.randn(len(labels[a]), dim, generator=gen) for a in self.names]
        for a, rows in zip(self.names, all_rows, strict=True):
            self.register_buffer(f"code_{a}", rows.contiguous() * weights[a] ** 0.5)

    def codebook(self, attr: str) -> torch.Tensor:
        return getattr(self, f"code_{attr}")

    def forward(self, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.codebook(a)[targets[a]] for a in self.names)  # [B, D]

    def decode(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        return {a: states @ self.codebook(a).T for a in self.names}


def _check_same_code(code: LabelTargets, saved: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse to resume a run whose checkpoint was trained on another code (other weights or
    seed): the encoder would be pulled towards two codes in one run."""
    for name, rows in code.state_dict().items():
        if name not in saved or not torch.equal(saved[name], rows):
            raise ValueError(
                f"{path} was trained on another label code (target weights or seed differ); "
                "start it again with --no-resume or use another workdir"
            )


def padding_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """True from each caption's EOS token on (EOS and the EOS padding after it): [B, T]."""
    first_eos = (input_ids == EOS_ID).int().argmax(dim=1, keepdim=True)
    return torch.arange(input_ids.shape[1]).unsqueeze(0) >= first_eos


def masked_mean(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `states` [B, T, D] over the tokens where `mask` [B, T] is True: [B, D]."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1)


def scene_targets(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Class indices of `PRETRAIN_LABELS` for each scene: attribute -> int64 [B]."""
    rows = []
    for s in scenes:
        row = s.label_indices()
        second = s.objects[1] if len(s.objects) == 2 else None
        for attr in ("colour", "shape", "size", "position"):
            classes = PRETRAIN_LABELS[attr + "2"]
            row[attr + "2"] = classes.index(getattr(second, attr) if second else NONE)
        rows.append(row)
    return {a: torch.tensor([r[a] for r in rows], dtype=torch.long) for a in PRETRAIN_LABELS}


@torch.no_grad()
def heldout_accuracy(
    text_encoder: TextEncoder,
    heads: CaptionHeads | LabelTargets,
    num_prompts: int = 224,
    seed: int = 4242,
) -> dict[str, float]:
    """Accuracy of the main object's attributes on the benchmark's held-out prompts (wordings
    that training never uses), the prompts `evaluate_adherence` generates from."""
    pairs = world.benchmark_prompts(num_prompts, seed)
    input_ids = tokenize([p for p, _ in pairs])
    states = text_encoder(input_ids)
    if isinstance(heads, LabelTargets):
        logits = heads.decode(masked_mean(states, padding_mask(input_ids)))
    else:
        logits = heads(states)
    labels = world.label_tensors([s for _, s in pairs])
    return {a: float((logits[a].argmax(-1) == labels[a]).float().mean()) for a in labels}


def pretrain_text_encoder(
    workdir: str | Path,
    text_config: TextEncoderConfig,
    cfg: TextPretrainConfig,
    *,
    resume: bool = True,
    state_file: str = "text_state.pt",
) -> tuple[TextEncoder, dict[str, float]]:
    """Train a text encoder from random weights on caption -> scene labels; checkpoints to
    `workdir/state_file` and resumes from it. Returns the encoder and its held-out accuracy."""
    state_path = Path(workdir) / state_file
    torch.manual_seed(cfg.seed)
    text_encoder = TextEncoder(text_config)
    if cfg.objective == "targets":
        weights = cfg.target_weights or TARGET_WEIGHTS
        if cfg.code not in ("gaussian", "orthogonal"):
            raise ValueError(f"code must be 'gaussian' or 'orthogonal', not {cfg.code!r}")
        heads = LabelTargets(
            text_config.hidden_size, weights, seed=cfg.seed, orthogonal=cfg.code == "orthogonal"
        )
    elif cfg.objective == "heads":
        heads = CaptionHeads(text_config.hidden_size, pool=cfg.pool)
    else:
        raise ValueError(f"objective must be 'targets' or 'heads', not {cfg.objective!r}")
    params = list(text_encoder.parameters()) + list(heads.parameters())
    opt = adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, elapsed = 0, 0.0
    if resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        text_encoder.load_state_dict(state["text_encoder"])
        if isinstance(heads, LabelTargets):
            _check_same_code(heads, state["heads"], state_path)
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        log.info("text: resumed at step %d (%.1f min done)", step, elapsed / 60)
    log.info("text: pre-training the text encoder on captions, config %s", asdict(cfg))
    budget = cfg.minutes * 60.0
    start = time.monotonic() - elapsed
    stop = StopFlag()
    text_encoder.train()
    loss_sum, correct, seen = 0.0, 0.0, 0

    def checkpoint() -> None:
        payload = {
            "text_encoder": text_encoder.state_dict(),
            "heads": heads.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "elapsed": time.monotonic() - start,
        }
        save_atomic(state_path, payload)

    while True:
        elapsed = time.monotonic() - start
        progress = elapsed / budget
        if cfg.steps is not None:
            progress = max(progress, step / cfg.steps)
        if progress >= 1 or (cfg.max_steps is not None and step >= cfg.max_steps):
            break
        if stop.stop:
            checkpoint()
            raise SystemExit("text: interrupted, checkpoint saved")
        # everything random in a step is a function of (seed, step), so resuming is exact
        rng = np.random.default_rng([cfg.seed, 0x7E47, step])
        scenes = [world.sample_scene(rng) for _ in range(cfg.batch_size)]
        input_ids = tokenize([training_caption(s, rng) for s in scenes])[:, : cfg.tokens]
        input_ids[:, -1] = EOS_ID  # as the tokenizer truncates: a cut caption still ends
        targets = scene_targets(scenes)
        states = text_encoder(input_ids)
        if isinstance(heads, LabelTargets):
            mask = padding_mask(input_ids)
            error = (states - heads(targets).unsqueeze(1)).pow(2).mean(-1)  # [B, T]
            loss = (error * mask).sum() / mask.sum()
            logits = heads.decode(masked_mean(states.detach(), mask))
        else:
            logits = heads(states)
            loss = sum(F.cross_entropy(logits[a], targets[a]) for a in logits) / len(logits)
        lr = time_cosine_lr(cfg.lr, step, progress, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        loss_sum += loss.item()
        correct += float((logits["position"].argmax(-1) == targets["position"]).float().sum())
        seen += cfg.batch_size
        if step % cfg.log_every == 0:
            log.info(
                "text step %d  loss=%.4f  position(train captions)=%.3f  lr=%.2e  %.1f/%.0f min",
                step,
                loss_sum / cfg.log_every,
                correct / seen,
                lr,
                (time.monotonic() - start) / 60,
                cfg.minutes,
            )
            loss_sum, correct, seen = 0.0, 0.0, 0
    checkpoint()
    text_encoder.eval()
    acc = heldout_accuracy(text_encoder, heads.eval(), cfg.eval_prompts)
    log.info(
        "text: done, %d steps (%d captions) in %.1f min; held-out prompts: %s",
        step,
        step * cfg.batch_size,
        (time.monotonic() - start) / 60,
        " ".join(f"{k}={v:.3f}" for k, v in acc.items()),
    )
    return text_encoder, acc


# The text stage's held-out decode below which `heldout_warning` speaks. Measured on 90-minute
# runs: r115 to r118 and r121 decoded 100% and r120 (seed 1) 99.6%, all met every bar; r119 (seed 1,
# before the training wordings that put the colour after the noun) decoded colour 94.6% and
# background 92.9% and missed those two bars.
HELDOUT_WARN_BELOW = 0.98


def heldout_warning(acc: dict[str, float]) -> str | None:
    """A warning when the text stage reads an attribute of the held-out prompts below
    `HELDOUT_WARN_BELOW` (docs/demo-model.md, "Another master seed")."""
    low = {a: v for a, v in acc.items() if v < HELDOUT_WARN_BELOW}
    if not low:
        return None
    read = ", ".join(f"{a} {v:.1%}" for a, v in low.items())
    return (
        f"text stage: the held-out prompts decode {read}, below {HELDOUT_WARN_BELOW:.0%}; the one "
        "90-minute run measured with this missed the benchmark's colour and background bars 55 "
        "minutes later. Consider stopping and starting again with another --seed "
        "(docs/demo-model.md, 'Another master seed')"
    )


def stage_text(args, workdir: Path) -> dict | None:
    """train_demo's text stage: the pre-trained encoder as an `init` for `train_ldm`, or None
    when `--text-minutes` is 0 (the joint stage then starts the text encoder from random)."""
    minutes = getattr(args, "text_minutes", 0.0)
    if minutes <= 0:
        return None
    final = workdir / "text_final.pt"
    if final.exists() and not args.no_resume:
        state = torch.load(final, map_location="cpu", weights_only=True)
        saved = state.get("config", {})
        code = (saved.get("target_weights"), saved.get("code", "gaussian"))
        if code != (
            getattr(args, "text_target_weights", None),
            getattr(args, "text_code", "gaussian"),
        ):
            raise ValueError(
                f"{final} was trained on another label code (target weights {code[0]}, "
                f"{code[1]} rows); start it again with --no-resume or use another workdir"
            )
        log.info("text: loaded %s", final)
        if warning := heldout_warning(state.get("heldout", {})):
            log.warning(warning)
        return {"text_encoder": state["text_encoder"]}
    cfg = TextPretrainConfig(
        minutes=minutes,
        steps=getattr(args, "text_steps", None),
        seed=args.seed,
        objective="targets",
        tokens=77,
        batch_size=128,
        target_weights=getattr(args, "text_target_weights", None),
        code=getattr(args, "text_code", "gaussian"),
    )
    text_encoder, acc = pretrain_text_encoder(
        workdir, DEMO_TEXT_CONFIG, cfg, resume=not args.no_resume
    )
    state = text_encoder.state_dict()
    torch.save({"text_encoder": state, "heldout": acc, "config": asdict(cfg)}, final)
    if warning := heldout_warning(acc):
        log.warning(warning)
    return {"text_encoder": state}
