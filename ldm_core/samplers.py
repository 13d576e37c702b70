"""Samplers over k-space noise levels and their registry (ldm-formats.md §4.3).

Every sampler has one signature, `sample_<name>(model, x, sigmas, *, extra_args=None,
callback=None, noise_sampler=None, **options)`, where `model(x, sigma, **extra_args)` returns the
denoised estimate D(x, sigma) for x = x0 + sigma*n ([B, C, H, W], sigma [B]) and `sigmas` are
descending noise levels (usually ending in 0). `noise_sampler(sigma, sigma_next)` returns standard
normal noise shaped like x; ancestral samplers default to `torch.randn_like`, SDE samplers to a
seeded Brownian tree (`rng.BrownianTreeNoiseSampler`). Update rules follow k-diffusion
(crowsonkb/k-diffusion, sampling.py) step for step, so equal noise gives equal results.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ldm_core.rng import BrownianTreeNoiseSampler
from ldm_core.schedules import (
    SCHEDULE_LABELS,
    ModelSampling,
    canonical_schedule_name,
    get_sigmas,
    schedule_label,
)

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


# --- helpers -------------------------------------------------------------------------------------


def _bcast(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device)
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim)) if sigma.ndim else sigma


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """Karras ODE derivative dx/dsigma = (x - D) / sigma."""
    return (x - denoised) / _bcast(sigma, x)


def get_ancestral_step(
    sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) splitting a step into a deterministic part and fresh noise."""
    if not eta:
        return sigma_to, torch.zeros_like(torch.as_tensor(sigma_to))
    sigma_up = torch.minimum(
        torch.as_tensor(sigma_to),
        eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5,
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def default_noise_sampler(x: torch.Tensor) -> NoiseSampler:
    """Fresh `torch.randn_like(x)` on every call (k-diffusion's default)."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def default_brownian_noise_sampler(x: torch.Tensor, sigmas: torch.Tensor) -> NoiseSampler:
    """Brownian-tree noise over the positive sigmas, seeded from torch's global generator."""
    positive = sigmas[sigmas > 0]
    return BrownianTreeNoiseSampler(x, float(positive.min()), float(sigmas.max()), seed=None)


def _setup(x, extra_args, noise_sampler):
    extra_args = {} if extra_args is None else extra_args
    noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
    return extra_args, noise_sampler, x.new_ones([x.shape[0]])


def _churn(x, sigma, num_sigmas, s_churn, s_tmin, s_tmax, s_noise, noise_sampler, sigma_next):
    """Karras et al. (2022) Alg. 2 noise increase to sigma_hat = sigma * (1 + gamma)."""
    gamma = min(s_churn / (num_sigmas - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        noise = noise_sampler(sigma, sigma_next) * s_noise
        x = x + noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def _report(callback, i, x, sigma, sigma_hat, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


# --- first-order and Karras samplers -------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    model,
    x,
    sigmas,
    *,
    extra_args=None,
    callback=None,
    noise_sampler=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """Euler steps, Algorithm 2 of Karras et al. (2022), arXiv:2206.00364."""
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(
            x,
            sigmas[i],
            len(sigmas),
            s_churn,
            s_tmin,
            s_tmax,
            s_noise,
            noise_sampler,
            sigmas[i + 1],
        )
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, i, x, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0
):
    """Ancestral Euler steps (Ho et al. 2020 sampling in k-space, arXiv:2006.11239)."""
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta=eta)
        _report(callback, i, x, sigma, sigma, denoised)
        d = to_d(x, sigma, denoised)
        dt = sigma_down - sigma
        x = x + d * dt
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    model,
    x,
    sigmas,
    *,
    extra_args=None,
    callback=None,
    noise_sampler=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """Heun steps, Algorithm 2 of Karras et al. (2022), arXiv:2206.00364."""
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma_next = sigmas[i + 1]
        x, sigma_hat = _churn(
            x, sigmas[i], len(sigmas), s_churn, s_tmin, s_tmax, s_noise, noise_sampler, sigma_next
        )
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, i, x, sigmas[i], sigma_hat, denoised)
        dt = sigma_next - sigma_hat
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigma_next * s_in, **extra_args)
            d_2 = to_d(x_2, sigma_next, denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(
    model,
    x,
    sigmas,
    *,
    extra_args=None,
    callback=None,
    noise_sampler=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """DPM-Solver-2 midpoint steps (Lu et al. 2022, arXiv:2206.00927) in Karras' Algorithm 2."""
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma_next = sigmas[i + 1]
        x, sigma_hat = _churn(
            x, sigmas[i], len(sigmas), s_churn, s_tmin, s_tmax, s_noise, noise_sampler, sigma_next
        )
        denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, i, x, sigmas[i], sigma_hat, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigma_next.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0
):
    """Ancestral DPM-Solver-2 steps (Lu et al. 2022, arXiv:2206.00927)."""
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta=eta)
        _report(callback, i, x, sigma, sigma, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma)
            denoised_2 = model(x_2, sigma_mid * s_in, **extra_args)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigma_down - sigma)
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


def linear_multistep_coeff(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the j-th Lagrange basis polynomial on t_i, ..., t_{i-order+1}."""
    if order - 1 > i:
        raise ValueError(f"order {order} too high for step {i}")
    nodes = [t[i - k] for k in range(order) if k != j]
    poly = np.atleast_1d(np.poly(nodes)) / np.prod([t[i - j] - node for node in nodes])
    antiderivative = np.polyint(poly)
    return float(np.polyval(antiderivative, t[i + 1]) - np.polyval(antiderivative, t[i]))


@torch.no_grad()
def sample_lms(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, order=4):
    """Linear multistep (Adams–Bashforth in sigma) as in k-diffusion, Karras et al. (2022)."""
    extra_args, _, s_in = _setup(x, extra_args, noise_sampler)
    sigmas_np = sigmas.detach().cpu().to(torch.float64).numpy()
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
        cur_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(cur_order, sigmas_np, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
    return x


@torch.no_grad()
def sample_ddim(
    model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=0.0, s_noise=1.0
):
    """DDIM (Song et al. 2021, arXiv:2010.02502) in k-space.

    With alpha = 1/(1+sigma^2), the DDIM update with eta is exactly an ancestral Euler step whose
    sigma_up = eta*sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2); eta = 0 is plain Euler.
    """
    if not eta:
        return sample_euler(
            model, x, sigmas, extra_args=extra_args, callback=callback, noise_sampler=noise_sampler
        )
    return sample_euler_ancestral(
        model,
        x,
        sigmas,
        extra_args=extra_args,
        callback=callback,
        noise_sampler=noise_sampler,
        eta=eta,
        s_noise=s_noise,
    )


@torch.no_grad()
def sample_lcm(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """Latent Consistency Model multistep sampling (Luo et al. 2023, arXiv:2310.04378)."""
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


# --- DPM-Solver++ family (Lu et al. 2022, arXiv:2211.01095); t = -log(sigma) -----------------------


def _t(sigma):
    return sigma.log().neg()


def _sigma(t):
    return t.neg().exp()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0
):
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022, arXiv:2211.01095)."""
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta=eta)
        _report(callback, i, x, sigma, sigma, denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            t, t_next = _t(sigma), _t(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma(s) * s_in, **extra_args)
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigma_next > 0:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model,
    x,
    sigmas,
    *,
    extra_args=None,
    callback=None,
    noise_sampler=None,
    eta=1.0,
    s_noise=1.0,
    r=0.5,
):
    """Stochastic DPM-Solver++ with a midpoint at ratio r (Lu et al. 2022, arXiv:2211.01095)."""
    if noise_sampler is None:
        noise_sampler = default_brownian_noise_sampler(x, sigmas)
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    fac = 1 / (2 * r)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, sigma, denoised)
        if sigma_next == 0:
            x = x + to_d(x, sigma, denoised) * (sigma_next - sigma)
            continue
        t, t_next = _t(sigma), _t(sigma_next)
        h = t_next - t
        s = t + h * r
        # substep 1: to sigma(s) with noise
        sd, su = get_ancestral_step(_sigma(t), _sigma(s), eta)
        s_ = _t(sd)
        x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise_sampler(_sigma(t), _sigma(s)) * s_noise * su
        denoised_2 = model(x_2, _sigma(s) * s_in, **extra_args)
        # substep 2: full step with the mixed estimate
        sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_next_ = _t(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise_sampler(_sigma(t), _sigma(t_next)) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None):
    """DPM-Solver++(2M) multistep (Lu et al. 2022, arXiv:2211.01095)."""
    extra_args, _, s_in = _setup(x, extra_args, noise_sampler)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, sigma, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            t, t_next = _t(sigma), _t(sigma_next)
            h = t_next - t
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = (t - _t(sigmas[i - 1])) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model,
    x,
    sigmas,
    *,
    extra_args=None,
    callback=None,
    noise_sampler=None,
    eta=1.0,
    s_noise=1.0,
    solver_type="midpoint",
):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, arXiv:2211.01095), midpoint or Heun correction."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    if noise_sampler is None:
        noise_sampler = default_brownian_noise_sampler(x, sigmas)
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, sigma, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = _t(sigma_next) - _t(sigma)
            eta_h = eta * h
            x = sigma_next / sigma * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    coeff = (-h - eta_h).expm1().neg() / (-h - eta_h) + 1
                else:
                    coeff = 0.5 * (-h - eta_h).expm1().neg()
                x = x + coeff * (1 / r) * (denoised - old_denoised)
            if eta:
                noise = noise_sampler(sigma, sigma_next)
                x = x + noise * sigma_next * (-2 * eta_h).expm1().neg().sqrt() * s_noise
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model, x, sigmas, *, extra_args=None, callback=None, noise_sampler=None, eta=1.0, s_noise=1.0
):
    """DPM-Solver++(3M) SDE (Lu et al. 2022, arXiv:2211.01095; k-diffusion's third-order variant)."""
    if noise_sampler is None:
        noise_sampler = default_brownian_noise_sampler(x, sigmas)
    extra_args, noise_sampler, s_in = _setup(x, extra_args, noise_sampler)
    denoised_1, denoised_2 = None, None
    h_1, h_2 = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, sigma, denoised)
        if sigma_next == 0:
            x = denoised
        else:
            h = _t(sigma_next) - _t(sigma)
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
            if eta:
                noise = noise_sampler(sigma, sigma_next)
                x = x + noise * sigma_next * (-2 * h * eta).expm1().neg().sqrt() * s_noise
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
    return x


# --- UniPC (Zhao et al. 2023, arXiv:2302.04867), data prediction, in k-space ----------------------


def _unipc_coefficients(h: float, rks: list[float], order: int, variant: str):
    """B(h), h*phi_1 and the order conditions (R, b) of UniPC with hh = -h (data prediction)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    factorial = 1
    rows, b = [], []
    rks_np = np.asarray(rks + [1.0], dtype=np.float64)
    for k in range(1, order + 1):
        rows.append(rks_np ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b_h, h_phi_1, np.stack(rows), np.asarray(b)


def _unipc_differences(lambdas, outputs, idx_s0, h):
    """rk and D1_k = (m_k - m0)/rk for the earlier model outputs (newest first)."""
    rks, d1s = [], []
    for k in range(1, len(outputs)):
        rk = (lambdas[idx_s0 - k] - lambdas[idx_s0]) / h
        rks.append(rk)
        d1s.append((outputs[-(k + 1)] - outputs[-1]) / rk)
    return rks, d1s


@torch.no_grad()
def sample_unipc(
    model,
    x,
    sigmas,
    *,
    extra_args=None,
    callback=None,
    noise_sampler=None,
    order=3,
    variant="bh1",
    lower_order_final=True,
):
    """UniPC multistep predictor-corrector (Zhao et al. 2023, arXiv:2302.04867).

    Data prediction with B(h) variant bh1 (A1111's default) or bh2, the corrector after every
    step but the last, lower orders for warm-up and (lower_order_final) the last steps, like
    A1111's uni_pc and diffusers' UniPCMultistepScheduler. A step to sigma = 0 returns the
    last denoised estimate (the first-order limit).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    extra_args, _, s_in = _setup(x, extra_args, noise_sampler)
    num_steps = len(sigmas) - 1
    lambdas = [-math.log(float(s)) if s > 0 else math.inf for s in sigmas]
    outputs: list[torch.Tensor] = []  # the last `order` denoised estimates, oldest first
    last_x, last_order = None, 0
    for i in range(num_steps):
        sigma = sigmas[i]
        denoised = model(x, sigma * s_in, **extra_args)
        _report(callback, i, x, sigma, sigma, denoised)
        if last_x is not None:
            x = _unic(last_x, denoised, outputs[-last_order:], lambdas, sigmas, i, variant)
        outputs = (outputs + [denoised])[-order:]
        this_order = min(order, num_steps - i) if lower_order_final else order
        this_order = min(this_order, len(outputs))
        last_x, last_order = x, this_order
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = _unip(x, outputs[-this_order:], lambdas, sigmas, i, variant)
    return x


def _unip(x, outputs, lambdas, sigmas, i, variant):
    """UniP-p predictor from sigma_i to sigma_{i+1} with p = len(outputs)."""
    p = len(outputs)
    h = lambdas[i + 1] - lambdas[i]
    rks, d1s = _unipc_differences(lambdas, outputs, i, h)
    b_h, h_phi_1, rows, b = _unipc_coefficients(h, rks, p, variant)
    x_next = (sigmas[i + 1] / sigmas[i]) * x - h_phi_1 * outputs[-1]
    if d1s:
        rhos = [0.5] if p == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1]).tolist()
        x_next = x_next - b_h * sum(rho * d1 for rho, d1 in zip(rhos, d1s, strict=True))
    return x_next


def _unic(last_x, model_t, outputs, lambdas, sigmas, i, variant):
    """UniC-p corrector of the step sigma_{i-1} -> sigma_i, using the new estimate model_t."""
    p = len(outputs)
    h = lambdas[i] - lambdas[i - 1]
    rks, d1s = _unipc_differences(lambdas, outputs, i - 1, h)
    b_h, h_phi_1, rows, b = _unipc_coefficients(h, rks, p, variant)
    rhos = [0.5] if p == 1 else np.linalg.solve(rows, b).tolist()
    m0 = outputs[-1]
    x_t = (sigmas[i] / sigmas[i - 1]) * last_x - h_phi_1 * m0
    residual = rhos[-1] * (model_t - m0)
    if d1s:
        residual = residual + sum(rho * d1 for rho, d1 in zip(rhos[:-1], d1s, strict=True))
    return x_t - b_h * residual


# --- registry ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplerInfo:
    """A sampler and A1111's facts about it.

    `default_schedule` is what A1111's "Automatic" schedule means for it;
    `discard_penultimate_sigma`: request steps + 1 sigmas and drop the next-to-last one;
    `brownian_noise`: A1111 feeds it a per-image-seeded Brownian tree (not the ImageRNG stream);
    `uses_ensd`: consumes the ImageRNG stream (eta noise seed delta applies);
    `model_sampling`: "lcm" when the denoiser must use `ModelSampling.lcm()`.
    """

    name: str
    function: Callable[..., torch.Tensor]
    default_schedule: str = "uniform"
    discard_penultimate_sigma: bool = False
    aliases: tuple[str, ...] = ()
    brownian_noise: bool = False
    uses_ensd: bool = False
    second_order: bool = False
    model_sampling: str | None = None
    options: dict = field(default_factory=dict, compare=False)


class SamplerRegistry:
    """Name -> sampler table; `SamplerRegistry.with_builtins()` gives A1111's list."""

    def __init__(self) -> None:
        self.infos: dict[str, SamplerInfo] = {}
        self.functions: dict[str, Callable[..., torch.Tensor]] = {}

    @classmethod
    def with_builtins(cls) -> SamplerRegistry:
        registry = cls()
        for name, fn, schedule, discard, aliases, facts in _BUILTINS:
            registry.register(
                name,
                fn,
                default_schedule=schedule,
                discard_penultimate_sigma=discard,
                aliases=aliases,
                **facts,
            )
        return registry

    def copy(self) -> SamplerRegistry:
        other = SamplerRegistry()
        other.infos, other.functions = dict(self.infos), dict(self.functions)
        return other

    def register(
        self,
        name: str,
        fn: Callable[..., torch.Tensor],
        *,
        default_schedule: str = "uniform",
        discard_penultimate_sigma: bool = False,
        aliases: tuple[str, ...] | list[str] = (),
        brownian_noise: bool = False,
        uses_ensd: bool = False,
        second_order: bool = False,
        model_sampling: str | None = None,
        options: dict | None = None,
        replace: bool = False,
    ) -> SamplerInfo:
        """Add a sampler `fn(model, x, sigmas, *, extra_args, callback, noise_sampler, **options)`."""
        if name in self.infos and not replace:
            raise ValueError(f"sampler {name!r} is already registered (pass replace=True)")
        if model_sampling not in (None, "lcm"):
            raise ValueError(f"model_sampling must be None or 'lcm', got {model_sampling!r}")
        options = dict(options or {})
        info = SamplerInfo(
            name=name,
            function=fn,
            default_schedule=canonical_schedule_name(default_schedule),
            discard_penultimate_sigma=discard_penultimate_sigma,
            aliases=tuple(aliases),
            brownian_noise=brownian_noise,
            uses_ensd=uses_ensd,
            second_order=second_order,
            model_sampling=model_sampling,
            options=options,
        )
        self.infos[name] = info
        self.functions[name] = functools.partial(fn, **options) if options else fn
        return info

    def _lookup(self, name: str) -> str | None:
        if name in self.infos:
            return name
        folded = name.strip().casefold()
        for info in self.infos.values():
            if folded in (info.name.casefold(), *(a.casefold() for a in info.aliases)):
                return info.name
        return None

    def get(self, name: str) -> SamplerInfo:
        found = self._lookup(name)
        if found is None:
            raise KeyError(f"unknown sampler {name!r}; known: {', '.join(self.infos)}")
        return self.infos[found]

    def resolve(self, name: str, schedule_name: str | None = "Automatic") -> tuple[str, str]:
        """(sampler name, schedule label), splitting old combined names like "DPM++ 2M Karras".

        As in A1111's `get_sampler_and_scheduler`, a schedule equal to the sampler's automatic one
        is reported as "Automatic".
        """
        schedule = canonical_schedule_name(schedule_name or "Automatic")
        sampler = self._lookup(name)
        if sampler is None:
            for key, label in SCHEDULE_LABELS.items():
                for option in {label, key, "SGMUniform"} if key == "sgm_uniform" else {label, key}:
                    if name.casefold().endswith(" " + option.casefold()):
                        sampler = self._lookup(name[: -len(option) - 1])
                        if sampler is not None:
                            schedule = key
                            break
                if sampler is not None:
                    break
        if sampler is None:
            raise KeyError(f"unknown sampler {name!r}; known: {', '.join(self.infos)}")
        if self.infos[sampler].default_schedule == schedule:
            schedule = "automatic"
        return sampler, schedule_label(schedule)

    def sampling_sigmas(
        self,
        sampler_name: str,
        schedule_name: str | None,
        steps: int,
        model_sampling: ModelSampling,
        *,
        discard_penultimate_sigma: bool = False,
        **sigma_kwargs,
    ) -> torch.Tensor:
        """Sigmas for a sampler: its automatic schedule and A1111's special cases applied.

        `discard_penultimate_sigma=True` forces A1111's "always discard next-to-last sigma".
        """
        sampler, label = self.resolve(sampler_name, schedule_name)
        info = self.infos[sampler]
        schedule = canonical_schedule_name(label)
        if schedule == "automatic":
            schedule = info.default_schedule
        if info.model_sampling == "lcm" and not model_sampling.lcm_boundary:
            model_sampling = model_sampling.lcm()
        discard = info.discard_penultimate_sigma or discard_penultimate_sigma
        sigmas = get_sigmas(
            schedule, steps + 1 if discard else steps, model_sampling, **sigma_kwargs
        )
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas


_BROWNIAN = {"brownian_noise": True}
_ENSD = {"uses_ensd": True}
_TWO = {"second_order": True}

# A1111's table (sd_samplers_kdiffusion.py): name, function, "Automatic" schedule, discard the
# penultimate sigma, aliases, other facts. A1111 runs DDIM and UniPC on their own timestep grids;
# "ddim_uniform" and uniform-with-discard reproduce those grids (DDIM: t = 1, 1 + 1000//n, ...;
# UniPC: t = linspace(999, 0, n + 1)) but end at sigma = 0.
# fmt: off
_BUILTINS: list[tuple[str, Callable, str, bool, tuple[str, ...], dict]] = [
    ("DPM++ 2M", sample_dpmpp_2m, "karras", False, ("k_dpmpp_2m",), {}),
    ("DPM++ SDE", sample_dpmpp_sde, "karras", False, ("k_dpmpp_sde",), {**_BROWNIAN, **_TWO}),
    ("DPM++ 2M SDE", sample_dpmpp_2m_sde, "exponential", False, ("k_dpmpp_2m_sde",), _BROWNIAN),
    ("DPM++ 2M SDE Heun", sample_dpmpp_2m_sde, "exponential", False, ("k_dpmpp_2m_sde_heun",),
     {**_BROWNIAN, "options": {"solver_type": "heun"}}),
    ("DPM++ 2S a", sample_dpmpp_2s_ancestral, "karras", False, ("k_dpmpp_2s_a",), {**_ENSD, **_TWO}),
    ("DPM++ 3M SDE", sample_dpmpp_3m_sde, "exponential", True, ("k_dpmpp_3m_sde",), _BROWNIAN),
    ("Euler a", sample_euler_ancestral, "uniform", False, ("k_euler_a", "k_euler_ancestral"), _ENSD),
    ("Euler", sample_euler, "uniform", False, ("k_euler",), {}),
    ("LMS", sample_lms, "uniform", False, ("k_lms",), {}),
    ("Heun", sample_heun, "uniform", False, ("k_heun",), _TWO),
    ("DPM2", sample_dpm_2, "karras", True, ("k_dpm_2",), _TWO),
    ("DPM2 a", sample_dpm_2_ancestral, "karras", True, ("k_dpm_2_a",), {**_ENSD, **_TWO}),
    ("DDIM", sample_ddim, "ddim_uniform", False, ("ddim",), {}),
    ("UniPC", sample_unipc, "uniform", True, ("unipc", "uni_pc"), {}),
    ("LCM", sample_lcm, "uniform", False, ("k_lcm", "lcm"), {**_ENSD, "model_sampling": "lcm"}),
]
# fmt: on

DEFAULT_REGISTRY = SamplerRegistry.with_builtins()
# A1111 display name -> sampler function (the live table of DEFAULT_REGISTRY).
SAMPLERS = DEFAULT_REGISTRY.functions
SAMPLER_INFO = DEFAULT_REGISTRY.infos


def register_sampler(name: str, fn: Callable[..., torch.Tensor], **kwargs) -> SamplerInfo:
    """Register a sampler in the default registry (see `SamplerRegistry.register`)."""
    return DEFAULT_REGISTRY.register(name, fn, **kwargs)


def resolve_sampler_name(name: str, schedule_name: str | None = "Automatic") -> tuple[str, str]:
    """(sampler, schedule label) for a possibly combined name ("DPM++ 2M Karras")."""
    return DEFAULT_REGISTRY.resolve(name, schedule_name)


def sampling_sigmas(
    sampler_name: str,
    schedule_name: str | None,
    steps: int,
    model_sampling: ModelSampling,
    **kwargs,
) -> torch.Tensor:
    """Sigmas for `steps` steps of a sampler (automatic schedule, discarded penultimate sigma)."""
    return DEFAULT_REGISTRY.sampling_sigmas(
        sampler_name, schedule_name, steps, model_sampling, **kwargs
    )
