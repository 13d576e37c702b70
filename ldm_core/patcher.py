"""Model handles that extensions clone and patch, instead of monkeypatching anything.

A `ModelHandle` shares the networks of a loaded checkpoint and owns a `Patches` record: typed
lists of functions the sampling loop and the UNet call at fixed points. `clone()` copies the lists
(not the weights), so patches added to a clone never reach its parent, and two extensions working
on their own clones cannot collide. Weight patches (LoRA-style deltas) are applied for the
duration of a `with handle.weights_patched():` block and restored bit-identically after it.

Order: list-valued patch points run in the order patches were added; when a clone is made from a
handle that already has patches, the clone's new patches run after the inherited ones.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ldm_core.nn.hooks import (
    AttentionInputPatch,
    AttentionOutputPatch,
    AttentionReplace,
    BlockPatch,
    ControlResiduals,
    OutputBlockPatch,
    UNetHooks,
)

Tensor = torch.Tensor


@dataclass
class CFGArgs:
    """What a CFG function sees at one step (denoised estimates, not noise predictions)."""

    cond_denoised: Tensor
    uncond_denoised: Tensor | None
    guidance_scale: float
    x: Tensor
    sigma: Tensor
    step: int
    total_steps: int


@dataclass
class PostCFGArgs(CFGArgs):
    denoised: Tensor = None  # type: ignore[assignment]  # result of the CFG function


@dataclass
class PreCFGArgs:
    """Model inputs before the cond/uncond batch is evaluated; functions may replace fields."""

    x: Tensor
    sigma: Tensor
    cond: Any
    uncond: Any
    guidance_scale: float
    step: int
    total_steps: int


@dataclass
class UNetCall:
    """One UNet evaluation: the scaled input, timesteps and keyword arguments."""

    x: Tensor  # [B, C, H, W], already multiplied by c_in (concat channels appended)
    timesteps: Tensor  # [B]
    context: Tensor | None
    y: Tensor | None
    hooks: UNetHooks
    cond_or_uncond: list[int]  # per batch row: 0 = cond, 1 = uncond
    sigma: Tensor


# fn(cfg args) -> denoised
CFGFunction = Callable[[CFGArgs], Tensor]
# fn(post-cfg args) -> denoised
PostCFGFunction = Callable[[PostCFGArgs], Tensor]
# fn(pre-cfg args) -> pre-cfg args
PreCFGFunction = Callable[[PreCFGArgs], PreCFGArgs]
# fn(pre-cfg args) -> pre-cfg args, run once per step before pre-CFG functions
ConditioningModifier = Callable[[PreCFGArgs], PreCFGArgs]
# fn(apply, call) -> UNet output; `apply(call)` runs the next wrapper or the UNet
UNetWrapper = Callable[[Callable[[UNetCall], Tensor], UNetCall], Tensor]
# fn(step, total, sigma, x, denoised)
StepCallback = Callable[[int, int, Tensor, Tensor, Tensor], None]


class Control(Protocol):
    """A residual source such as a ControlNet: called on every UNet evaluation."""

    def residuals(self, call: UNetCall) -> ControlResiduals | None: ...


@dataclass
class WeightPatch:
    """`weight += strength * delta()` for one parameter while patches are applied."""

    delta: Callable[[Tensor], Tensor]  # fn(current weight) -> delta of the same shape
    strength: float = 1.0
    source: str = ""


@dataclass
class Patches:
    conditioning_modifiers: list[ConditioningModifier] = field(default_factory=list)
    pre_cfg: list[PreCFGFunction] = field(default_factory=list)
    cfg_function: CFGFunction | None = None
    cfg_function_needs_uncond: bool = True
    post_cfg: list[PostCFGFunction] = field(default_factory=list)
    unet_wrappers: list[UNetWrapper] = field(default_factory=list)
    attn1_patches: list[AttentionInputPatch] = field(default_factory=list)
    attn2_patches: list[AttentionInputPatch] = field(default_factory=list)
    attn1_replace: dict[tuple[str, int, int], AttentionReplace] = field(default_factory=dict)
    attn2_replace: dict[tuple[str, int, int], AttentionReplace] = field(default_factory=dict)
    attn1_output_patches: list[AttentionOutputPatch] = field(default_factory=list)
    attn2_output_patches: list[AttentionOutputPatch] = field(default_factory=list)
    input_block_patches: list[BlockPatch] = field(default_factory=list)
    middle_block_patches: list[BlockPatch] = field(default_factory=list)
    output_block_patches: list[OutputBlockPatch] = field(default_factory=list)
    controls: list[Control] = field(default_factory=list)
    weight_patches: dict[str, list[WeightPatch]] = field(default_factory=dict)
    step_callbacks: list[StepCallback] = field(default_factory=list)

    def copy(self) -> Patches:
        """Copies of every list/dict; the patch functions themselves are shared."""
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, list):
                setattr(new, name, list(value))
            elif isinstance(value, dict):
                setattr(
                    new, name, {k: list(v) if isinstance(v, list) else v for k, v in value.items()}
                )
        return new

    def unet_hooks(self, options: dict[str, Any] | None = None) -> UNetHooks:
        return UNetHooks(
            attn1_patches=self.attn1_patches,
            attn2_patches=self.attn2_patches,
            attn1_replace=self.attn1_replace,
            attn2_replace=self.attn2_replace,
            attn1_output_patches=self.attn1_output_patches,
            attn2_output_patches=self.attn2_output_patches,
            input_block_patches=self.input_block_patches,
            middle_block_patches=self.middle_block_patches,
            output_block_patches=self.output_block_patches,
            options=dict(options or {}),
        )


class ModelHandle:
    """A checkpoint's networks plus the patches one generation will use."""

    def __init__(self, checkpoint, model_sampling, patches: Patches | None = None):
        self.checkpoint = checkpoint
        self.model_sampling = model_sampling
        self.patches = patches or Patches()

    @property
    def unet(self) -> torch.nn.Module:
        return self.checkpoint.unet

    def clone(self) -> ModelHandle:
        """Shares weights; copies patch lists so the parent never sees the clone's patches."""
        return ModelHandle(self.checkpoint, self.model_sampling, self.patches.copy())

    # -- sampler / CFG level ---------------------------------------------------------------
    def add_conditioning_modifier(self, fn: ConditioningModifier) -> None:
        self.patches.conditioning_modifiers.append(fn)

    def add_pre_cfg_function(self, fn: PreCFGFunction) -> None:
        self.patches.pre_cfg.append(fn)

    def set_cfg_function(self, fn: CFGFunction, *, needs_uncond: bool = True) -> None:
        """Replace the CFG combine. With `needs_uncond=False` the uncond pass may be skipped
        at guidance scale 1, as it is for the default combine."""
        self.patches.cfg_function = fn
        self.patches.cfg_function_needs_uncond = needs_uncond

    def add_post_cfg_function(self, fn: PostCFGFunction) -> None:
        self.patches.post_cfg.append(fn)

    def add_unet_wrapper(self, fn: UNetWrapper) -> None:
        """Wrappers nest: the first added is outermost."""
        self.patches.unet_wrappers.append(fn)

    def add_step_callback(self, fn: StepCallback) -> None:
        self.patches.step_callbacks.append(fn)

    # -- inside the UNet -------------------------------------------------------------------
    def add_attention_patch(self, fn: AttentionInputPatch, *, self_attention: bool) -> None:
        (self.patches.attn1_patches if self_attention else self.patches.attn2_patches).append(fn)

    def set_attention_replace(
        self,
        fn: AttentionReplace,
        block_kind: str,
        block_index: int,
        transformer_index: int = 0,
        *,
        self_attention: bool,
    ) -> None:
        target = self.patches.attn1_replace if self_attention else self.patches.attn2_replace
        target[(block_kind, block_index, transformer_index)] = fn

    def add_attention_output_patch(self, fn: AttentionOutputPatch, *, self_attention: bool) -> None:
        (
            self.patches.attn1_output_patches
            if self_attention
            else self.patches.attn2_output_patches
        ).append(fn)

    def add_input_block_patch(self, fn: BlockPatch) -> None:
        self.patches.input_block_patches.append(fn)

    def add_middle_block_patch(self, fn: BlockPatch) -> None:
        self.patches.middle_block_patches.append(fn)

    def add_output_block_patch(self, fn: OutputBlockPatch) -> None:
        self.patches.output_block_patches.append(fn)

    def add_control(self, control: Control) -> None:
        """Residuals of all controls are summed at each injection point."""
        self.patches.controls.append(control)

    # -- weights ---------------------------------------------------------------------------
    def add_weight_patch(self, param_name: str, patch: WeightPatch, module: str = "unet") -> None:
        """`param_name` is a state-dict key of `module` ("unet", "vae" or "text_encoder.0")."""
        self._resolve_param(module, param_name)  # fail now, not mid-generation
        self.patches.weight_patches.setdefault(f"{module}:{param_name}", []).append(patch)

    def _resolve_param(self, module: str, name: str) -> Tensor:
        if module == "unet":
            root = self.checkpoint.unet
        elif module == "vae":
            root = self.checkpoint.vae
        elif module.startswith("text_encoder."):
            root = self.checkpoint.text_encoders[int(module.split(".")[1])]
        else:
            raise KeyError(f"unknown module {module!r}")
        tensors = dict(root.named_parameters())
        tensors.update(dict(root.named_buffers()))
        if name not in tensors:
            raise KeyError(f"{module} has no parameter {name!r}")
        return tensors[name]

    @contextlib.contextmanager
    def weights_patched(self) -> Iterator[ModelHandle]:
        """Apply weight patches in place; restore the exact original bits on exit."""
        backups: list[tuple[Tensor, Tensor]] = []
        try:
            with torch.no_grad():
                for key, patch_list in self.patches.weight_patches.items():
                    module, name = key.split(":", 1)
                    param = self._resolve_param(module, name)
                    backups.append((param, param.detach().clone()))
                    merged = param.detach().float()
                    for patch in patch_list:
                        delta = patch.delta(param.detach())
                        if delta.shape != param.shape:
                            raise ValueError(
                                f"{patch.source or 'weight patch'}: delta for {module} {name} has shape "
                                f"{list(delta.shape)}, the weight has {list(param.shape)}"
                            )
                        merged = merged + patch.strength * delta.to(merged)
                    param.copy_(merged.to(param.dtype))
            yield self
        finally:
            with torch.no_grad():
                for param, original in reversed(backups):
                    param.copy_(original)

    # -- building one UNet call's hooks ----------------------------------------------------
    def control_residuals(self, call: UNetCall) -> ControlResiduals | None:
        total: ControlResiduals | None = None
        for control in self.patches.controls:
            r = control.residuals(call)
            if r is None:
                continue
            total = r if total is None else _sum_residuals(total, r)
        return total


def _sum_residuals(a: ControlResiduals, b: ControlResiduals) -> ControlResiduals:
    def add(xs: list, ys: list) -> list:
        n = max(len(xs), len(ys))
        out = []
        for i in range(n):
            x = xs[i] if i < len(xs) else None
            y = ys[i] if i < len(ys) else None
            out.append(y if x is None else x if y is None else x + y)
        return out

    return ControlResiduals(add(a.input, b.input), add(a.middle, b.middle), add(a.output, b.output))
