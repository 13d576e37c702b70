"""The model function samplers call: parameterisation, guidance and every sampling hook point.

`GuidedDenoiser(handle, cond, uncond, guidance_scale, sigmas)` is a callable
`(x, sigma) -> denoised` in k-diffusion's convention. Per call it: picks each prompt's
conditioning for the current step (prompt editing), runs conditioning modifiers and pre-CFG
functions, evaluates the UNet on the cond and uncond rows in one batch (the uncond rows are
skipped at guidance scale 1), converts outputs to denoised estimates (eps or v), combines them
with the CFG function (default: classifier-free guidance with AND weights, as in A1111's
composable diffusion), and runs post-CFG functions (CFG rescale is one of them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ldm_core.patcher import (
    CFGArgs,
    ModelHandle,
    PostCFGArgs,
    PostCFGFunction,
    PreCFGArgs,
    UNetCall,
)

Tensor = torch.Tensor


@dataclass
class ScheduledCond:
    """Text context that may change with the step (prompt editing, alternation).

    `schedule` holds (end_step, context [T, D]) pairs in order; an entry is used while
    `step <= end_step` (A1111's rule), the last one for any later step.
    """

    schedule: list[tuple[int, Tensor]]
    weight: float = 1.0

    def at(self, step: int) -> Tensor:
        for end_step, context in self.schedule:
            if step <= end_step:
                return context
        return self.schedule[-1][1]


@dataclass
class Conditioning:
    """A prompt: one or more AND-parts, each with its own weight and step schedule."""

    parts: list[ScheduledCond]
    extra: dict = field(default_factory=dict)

    @classmethod
    def constant(cls, context: Tensor, weight: float = 1.0) -> Conditioning:
        """One context [T, D] (or [1, T, D]) for every step."""
        return cls([ScheduledCond([(1 << 30, context.reshape(context.shape[-2:]))], weight)])


def step_index(sigma: float, sigmas: Tensor) -> int:
    """Index of the step that evaluates at `sigma`: evaluations between two sigmas (2nd-order
    samplers) count towards the step they are heading for."""
    s = sigmas[:-1]
    return int((s > sigma * (1 + 1e-5)).sum())


class GuidedDenoiser:
    def __init__(
        self,
        handle: ModelHandle,
        cond: list[Conditioning],
        uncond: list[Conditioning] | None,
        guidance_scale: float,
        sigmas: Tensor,
        *,
        concat: Tensor | None = None,
        y: Tensor | None = None,
        y_uncond: Tensor | None = None,
    ):
        """`cond`/`uncond` hold one `Conditioning` per batch row; `concat` ([B, 5, h, w]) is
        appended to the UNet input for 9-channel inpainting models (not scaled by c_in)."""
        self.handle = handle
        self.cond = cond
        self.uncond = uncond
        self.guidance_scale = float(guidance_scale)
        self.sigmas = sigmas.detach().cpu()
        self.total_steps = len(sigmas) - 1
        self.concat = concat
        self.y = y
        self.y_uncond = y_uncond
        unet = handle.unet
        p = next(unet.parameters())
        self.dtype, self.device = p.dtype, p.device

    # -- one evaluation ----------------------------------------------------------------------
    def __call__(self, x: Tensor, sigma: Tensor, **_: object) -> Tensor:
        sigma = sigma.reshape(-1).to(x.device, torch.float32).expand(x.shape[0])  # [B]
        patches = self.handle.patches
        step = step_index(float(sigma[0]), self.sigmas)
        args = PreCFGArgs(
            x, sigma, self.cond, self.uncond, self.guidance_scale, step, self.total_steps
        )
        for fn in patches.conditioning_modifiers:
            args = fn(args)
        for fn in patches.pre_cfg:
            args = fn(args)
        x, sigma = args.x, args.sigma
        default_cfg = patches.cfg_function is None
        needs_uncond = args.uncond is not None and (
            args.guidance_scale != 1.0 or (not default_cfg and patches.cfg_function_needs_uncond)
        )
        cond_parts, uncond_d = self._evaluate(
            x, sigma, args.cond, args.uncond if needs_uncond else None, step
        )
        cond_d = _compose(cond_parts, uncond_d)
        cfg_args = CFGArgs(cond_d, uncond_d, args.guidance_scale, x, sigma, step, self.total_steps)
        cfg = patches.cfg_function or classifier_free_guidance
        denoised = cfg(cfg_args)
        for fn in patches.post_cfg:
            denoised = fn(PostCFGArgs(**vars(cfg_args), denoised=denoised))
        return denoised

    def _evaluate(
        self,
        x: Tensor,
        sigma: Tensor,
        cond: list[Conditioning],
        uncond: list[Conditioning] | None,
        step: int,
    ) -> tuple[list[list[tuple[float, Tensor]]], Tensor | None]:
        """Denoised estimates: per batch row, (weight, D) for each AND part; and the uncond D."""
        b = x.shape[0]
        rows: list[
            tuple[int, int, float, Tensor, int]
        ] = []  # (row, part, weight, context, 0=cond/1=uncond)
        for i in range(b):
            for j, part in enumerate(cond[i].parts):
                rows.append((i, j, part.weight, part.at(step), 0))
        if uncond is not None:
            for i in range(b):
                rows.append((i, 0, 1.0, uncond[i].parts[0].at(step), 1))
        outputs: list[Tensor | None] = [None] * len(rows)
        # Rows whose contexts have the same length go through the UNet together.
        by_len: dict[int, list[int]] = {}
        for n, row in enumerate(rows):
            by_len.setdefault(row[3].shape[0], []).append(n)
        ms = self.handle.model_sampling
        for idxs in by_len.values():
            sel = [rows[n][0] for n in idxs]
            xs, ss = x[sel], sigma[sel]
            x_in = ms.calculate_input(ss, xs)
            if self.concat is not None:
                x_in = torch.cat([x_in, self.concat[sel].to(x_in)], dim=1)
            y = None
            if self.y is not None:
                y = torch.stack(
                    [(self.y_uncond if rows[n][4] else self.y)[rows[n][0]] for n in idxs]
                )
            call = UNetCall(
                x=x_in.to(self.dtype),
                timesteps=ms.sigma_to_t(ss).to(self.device),
                context=torch.stack([rows[n][3] for n in idxs]).to(self.device, self.dtype),
                y=None if y is None else y.to(self.device, self.dtype),
                hooks=None,  # type: ignore[arg-type]  # filled below
                cond_or_uncond=[rows[n][4] for n in idxs],
                sigma=ss,
            )
            call.hooks = self.handle.patches.unet_hooks(
                {
                    "cond_or_uncond": call.cond_or_uncond,
                    "sigmas": ss,
                    "step": step,
                    "total_steps": self.total_steps,
                }
            )
            out = self._run_unet(call).to(torch.float32)
            denoised = ms.calculate_denoised(ss, out, xs)
            for k, n in enumerate(idxs):
                outputs[n] = denoised[k]
        cond_parts: list[list[tuple[float, Tensor]]] = [[] for _ in range(b)]
        uncond_d = torch.empty_like(x) if uncond is not None else None
        for n, (i, _j, w, _ctx, is_uncond) in enumerate(rows):
            if is_uncond:
                uncond_d[i] = outputs[n]  # type: ignore[index]
            else:
                cond_parts[i].append((w, outputs[n]))  # type: ignore[arg-type]
        return cond_parts, uncond_d

    def _run_unet(self, call: UNetCall) -> Tensor:
        handle = self.handle

        def innermost(c: UNetCall) -> Tensor:
            c.hooks.control = handle.control_residuals(c)
            return handle.unet(c.x, c.timesteps, context=c.context, y=c.y, hooks=c.hooks)

        apply = innermost
        for wrapper in reversed(handle.patches.unet_wrappers):
            apply = _bind(wrapper, apply)
        return apply(call)


def _bind(wrapper, inner):
    return lambda call: wrapper(inner, call)


def _compose(cond_parts: list[list[tuple[float, Tensor]]], uncond: Tensor | None) -> Tensor:
    """One cond estimate per row from its AND parts: u + Σ w_i (c_i − u), so that CFG gives
    A1111's composable-diffusion result u + s·Σ w_i (c_i − u). Without an uncond pass, the
    weighted mean of the parts."""
    rows = []
    for i, parts in enumerate(cond_parts):
        if len(parts) == 1 and (uncond is None or parts[0][0] == 1.0):
            rows.append(parts[0][1])
        elif uncond is None:
            total = sum(w for w, _ in parts) or 1.0
            rows.append(sum(w * d for w, d in parts) / total)
        else:
            u = uncond[i]
            rows.append(u + sum(w * (d - u) for w, d in parts))
    return torch.stack(rows)


def classifier_free_guidance(args: CFGArgs) -> Tensor:
    """D = D_u + s·(D_c − D_u) (Ho & Salimans 2022), on denoised estimates."""
    if args.uncond_denoised is None:
        return args.cond_denoised
    return args.uncond_denoised + args.guidance_scale * (args.cond_denoised - args.uncond_denoised)


def cfg_rescale(phi: float) -> PostCFGFunction:
    """CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed" §3.4): match the std of the guided v-prediction to the conditional one, mixed by φ."""

    def rescale(args: PostCFGArgs) -> Tensor:
        if args.uncond_denoised is None or phi == 0:
            return args.denoised
        sigma = args.sigma.reshape(-1, *([1] * (args.x.dim() - 1))).to(args.x)
        x = args.x
        a = sigma**2 + 1

        def to_v(d: Tensor) -> Tensor:
            return (x / a - d) * a.sqrt() / sigma

        v_cfg = to_v(args.denoised)
        v_pos = to_v(args.cond_denoised)
        dims = tuple(range(1, x.dim()))
        rescaled = v_cfg * (v_pos.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True))
        v = phi * rescaled + (1 - phi) * v_cfg
        return x / a - v * sigma / a.sqrt()

    return rescale
