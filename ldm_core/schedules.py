"""Noise schedules, the eps/v parameterisation in k-space, and sigma spacings.

Facts from ldm-formats.md §4.1 (schedule), §4.2 (denoiser scalings) and §4.4 (spacings); names and
spacings follow A1111's `modules/sd_schedulers.py` so its infotext reproduces here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ldm_core.config import Family, ModelSpec, Prediction

NUM_TIMESTEPS = 1000
LINEAR_START = 0.00085
LINEAR_END = 0.012
# Last alpha_cumprod after the zero-terminal-SNR rescale, kept > 0 so sigma stays finite (Forge/ComfyUI).
ZTSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08
LCM_ORIGINAL_STEPS = 50
LCM_SIGMA_DATA = 0.5

# Align Your Steps 10-step schedules (11 sigmas) from NVIDIA's how-to, as shipped by A1111.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)

# canonical name -> A1111 display label ("Automatic" is resolved per sampler in samplers.py)
SCHEDULE_LABELS: dict[str, str] = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    "simple": "Simple",
    "normal": "Normal",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
}
_SCHEDULE_ALIASES = {"ddim": "ddim_uniform", "sgmuniform": "sgm_uniform", "ays": "align_your_steps"}


# --- the discrete DDPM schedule ------------------------------------------------------------------


def scaled_linear_betas(
    num_timesteps: int = NUM_TIMESTEPS,
    linear_start: float = LINEAR_START,
    linear_end: float = LINEAR_END,
) -> torch.Tensor:
    """LDM "linear" (diffusers "scaled_linear") betas in float64: [T]."""
    return (
        torch.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    )


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{i<=t} (1 - beta_i)."""
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), the k-space noise level of timestep t."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5


def rescale_zero_terminal_snr_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Zero-terminal-SNR rescale (Lin et al. 2023) applied to a sigma table, as Forge/ComfyUI do."""
    alphas_bar_sqrt = (1.0 / (sigmas.to(torch.float64) ** 2 + 1.0)).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas_bar[-1] = ZTSNR_LAST_ALPHA_CUMPROD
    return ((1.0 - alphas_bar) / alphas_bar) ** 0.5


def _as_tensor(value: torch.Tensor | float) -> torch.Tensor:
    """Python numbers become float64 tensors, so timestep round trips stay exact."""
    return value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=torch.float64)


def _bcast(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """sigma as a tensor broadcastable against `like` ([B] -> [B, 1, 1, 1])."""
    sigma = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    return sigma.reshape(sigma.shape + (1,) * (like.ndim - sigma.ndim)) if sigma.ndim else sigma


@dataclass(frozen=True, eq=False)
class ModelSampling:
    """A discrete-time model's noise levels and its eps/v scalings in k-space (x = x0 + sigma*n).

    `sigmas[k]` is the noise level of table entry k (ascending). For ordinary models entry k is
    timestep k; the LCM variant keeps every `timestep_stride`-th level and maps entry k to timestep
    k*stride + stride - 1. `quantize=False` gives A1111's fractional timesteps (log-sigma
    interpolation); ComfyUI always quantizes to the nearest entry.
    """

    sigmas: torch.Tensor  # [T] float64, ascending
    prediction: Prediction = Prediction.EPS
    quantize: bool = False
    timestep_stride: int = 1
    lcm_boundary: bool = False

    @classmethod
    def discrete(
        cls,
        prediction: Prediction | str = Prediction.EPS,
        *,
        zero_terminal_snr: bool = False,
        quantize: bool = False,
        num_timesteps: int = NUM_TIMESTEPS,
        linear_start: float = LINEAR_START,
        linear_end: float = LINEAR_END,
    ) -> ModelSampling:
        """The SD1/SD2/SDXL schedule (scaled-linear betas, 1000 steps)."""
        betas = scaled_linear_betas(num_timesteps, linear_start, linear_end)
        sigmas = sigmas_from_alphas_cumprod(alphas_cumprod_from_betas(betas))
        if zero_terminal_snr:
            sigmas = rescale_zero_terminal_snr_sigmas(sigmas)
        return cls(sigmas=sigmas, prediction=Prediction(prediction), quantize=quantize)

    @classmethod
    def from_spec(cls, spec: ModelSpec, *, quantize: bool = False) -> ModelSampling:
        """Model sampling for a detected checkpoint (`config.ModelSpec`)."""
        return cls.discrete(
            spec.prediction, zero_terminal_snr=spec.zero_terminal_snr, quantize=quantize
        )

    def lcm(self, original_steps: int = LCM_ORIGINAL_STEPS) -> ModelSampling:
        """LCM model sampling: `original_steps` levels and the consistency boundary condition.

        Entries are timesteps 999, 979, ..., 19 for 50 steps (A1111 `LCMCompVisDenoiser`,
        ComfyUI `ModelSamplingDiscreteDistilled`); timesteps are always quantized.
        """
        if self.timestep_stride != 1:
            raise ValueError("model sampling is already distilled (LCM)")
        stride = len(self.sigmas) // original_steps
        return replace(
            self,
            sigmas=self.sigmas[stride - 1 :: stride][:original_steps].clone(),
            quantize=True,
            timestep_stride=stride,
            lcm_boundary=True,
        )

    # --- sigma <-> timestep --------------------------------------------------------------------

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def log_sigmas(self) -> torch.Tensor:
        return self.sigmas.log()

    def sigma_to_t(self, sigma: torch.Tensor | float, quantize: bool | None = None) -> torch.Tensor:
        """Timestep of a noise level: log-sigma interpolation (fractional) or nearest entry."""
        quantize = self.quantize if quantize is None else quantize
        sigma = _as_tensor(sigma)
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float64).log()
        if quantize:
            idx = (log_sigma.reshape(-1, 1) - log_sigmas).abs().argmin(dim=1).to(torch.float64)
        else:
            # the last table entry <= sigma, clamped so [low, low + 1] is a valid segment
            low = torch.searchsorted(log_sigmas, log_sigma.reshape(-1).contiguous(), right=True) - 1
            low = low.clamp(0, len(log_sigmas) - 2)
            lo, hi = log_sigmas[low], log_sigmas[low + 1]
            w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
            idx = low.to(torch.float64) + w
        t = idx * self.timestep_stride + (self.timestep_stride - 1)
        return t.reshape(sigma.shape).to(
            sigma.dtype if sigma.is_floating_point() else torch.float64
        )

    def t_to_sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """Noise level of a (fractional) timestep, interpolating log sigma between entries."""
        t = _as_tensor(t)
        idx = (t.to(torch.float64) - (self.timestep_stride - 1)) / self.timestep_stride
        idx = idx.clamp(0, len(self.sigmas) - 1)
        log_sigmas = self.log_sigmas.to(t.device)
        low, high = idx.floor().long(), idx.ceil().long()
        w = idx - idx.floor()
        sigma = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
        return sigma.to(t.dtype if t.is_floating_point() else torch.float64)

    # --- denoiser scalings -----------------------------------------------------------------------

    def scalings(
        self, sigma: torch.Tensor | float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) with D = c_skip*x + c_out*F(c_in*x, t(sigma)); sigma_data = 1."""
        sigma = torch.as_tensor(sigma)
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        if self.prediction == Prediction.V:
            return 1.0 / (sigma**2 + 1.0), -sigma * c_in, c_in
        return torch.ones_like(sigma), -sigma, c_in

    def c_skip(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return self.scalings(sigma)[0]

    def c_out(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return self.scalings(sigma)[1]

    def c_in(self, sigma: torch.Tensor | float) -> torch.Tensor:
        return self.scalings(sigma)[2]

    def calculate_input(self, sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
        """Network input c_in*x for k-space x at level sigma ([B] or scalar)."""
        return x * _bcast(self.c_in(torch.as_tensor(sigma)), x)

    def calculate_denoised(
        self, sigma: torch.Tensor | float, model_output: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """Denoised estimate D(x, sigma) from the network output (eps or v)."""
        c_skip, c_out, _ = self.scalings(torch.as_tensor(sigma))
        denoised = x * _bcast(c_skip, x) + model_output * _bcast(c_out, x)
        if self.lcm_boundary:
            ts = self.sigma_to_t(torch.as_tensor(sigma, dtype=torch.float64)) * 10.0
            b_skip = LCM_SIGMA_DATA**2 / (ts**2 + LCM_SIGMA_DATA**2)
            b_out = ts / (ts**2 + LCM_SIGMA_DATA**2) ** 0.5
            denoised = denoised * _bcast(b_out, x) + x * _bcast(b_skip, x)
        return denoised

    def timestep(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """Network timestep input for a noise level (alias of `sigma_to_t`)."""
        return self.sigma_to_t(sigma)


# --- sigma spacings ------------------------------------------------------------------------------


def canonical_schedule_name(name: str) -> str:
    """Our name for a schedule given its name, A1111 label or alias ("SGM Uniform" -> "sgm_uniform")."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    key = _SCHEDULE_ALIASES.get(key, key)
    if key not in SCHEDULE_LABELS:
        known = ", ".join(sorted(set(SCHEDULE_LABELS.values())))
        raise ValueError(f"unknown schedule {name!r}; expected one of: {known}")
    return key


def schedule_label(name: str) -> str:
    """A1111 display label of a schedule ("karras" -> "Karras")."""
    return SCHEDULE_LABELS[canonical_schedule_name(name)]


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _from_timesteps(ms: ModelSampling, t: torch.Tensor) -> torch.Tensor:
    return _append_zero(ms.t_to_sigma(t.to(torch.float64)))


def sigmas_uniform(n: int, ms: ModelSampling) -> torch.Tensor:
    """A1111 "Uniform"/"Normal": n timesteps evenly spaced from t(sigma_max) to t(sigma_min)."""
    start, end = ms.sigma_to_t(ms.sigma_max), ms.sigma_to_t(ms.sigma_min)
    return _from_timesteps(ms, torch.linspace(float(start), float(end), n, dtype=torch.float64))


def sigmas_sgm_uniform(n: int, ms: ModelSampling) -> torch.Tensor:
    """SGM Uniform: n + 1 evenly spaced timesteps, dropping the last (sigma_min)."""
    start, end = ms.sigma_to_t(ms.sigma_max), ms.sigma_to_t(ms.sigma_min)
    t = torch.linspace(float(start), float(end), n + 1, dtype=torch.float64)[:-1]
    return _from_timesteps(ms, t)


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 spacing, rho = 7."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv + ramp * (min_inv - max_inv)) ** rho)


def sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    log_sigma = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _append_zero(log_sigma.exp())


def sigmas_polyexponential(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0
) -> torch.Tensor:
    """Polynomial in log sigma (k-diffusion `get_sigmas_polyexponential`)."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return _append_zero((ramp * (log_max - log_min) + log_min).exp())


def sigmas_simple(n: int, ms: ModelSampling) -> torch.Tensor:
    """Simple: every len(table)/n-th table entry from the top."""
    stride = len(ms.sigmas) / n
    idx = [len(ms.sigmas) - 1 - int(k * stride) for k in range(n)]
    return _append_zero(ms.sigmas[idx].clone())


def sigmas_ddim_uniform(n: int, ms: ModelSampling) -> torch.Tensor:
    """DDIM: entries 1, 1+s, 1+2s, ... (s = len // n), reversed; A1111's DDIM timestep grid.

    Like A1111 and ComfyUI this gives more than n steps when len/n is not an integer
    (e.g. 31 steps for n = 30).
    """
    stride = max(len(ms.sigmas) // n, 1)
    idx = list(range(1, len(ms.sigmas), stride))[::-1]
    return _append_zero(ms.sigmas[idx].clone())


def sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """KL-optimal spacing (Sabour et al. 2024): tan of evenly spaced atan(sigma), then 0.

    ComfyUI's variant (n sigmas + 0). A1111/Forge instead return n + 1 sigmas ending at
    sigma_min, i.e. leave sigma_min of noise in the result.
    """
    if n == 1:
        return _append_zero(torch.tensor([sigma_max], dtype=torch.float64))
    w = torch.arange(n, dtype=torch.float64) / (n - 1)
    sigmas = torch.tan(w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max))
    return _append_zero(sigmas)


def loglinear_interp(values: tuple[float, ...] | list[float], num: int) -> np.ndarray:
    """Resample a decreasing sequence to `num` points, linearly in log space."""
    xs = np.linspace(0, 1, len(values))
    ys = np.log(np.asarray(values, dtype=np.float64)[::-1])
    return np.exp(np.interp(np.linspace(0, 1, num), xs, ys))[::-1].copy()


def sigmas_align_your_steps(n: int, family: Family | str | None = None) -> torch.Tensor:
    """Align Your Steps (Sabour et al. 2024): NVIDIA's 10-step list, log-linearly resampled."""
    sdxl = family is not None and Family(family) in (Family.SDXL, Family.SDXL_REFINER)
    base = AYS_SDXL if sdxl else AYS_SD15
    sigmas = np.asarray(base, dtype=np.float64) if n == len(base) else loglinear_interp(base, n)
    return _append_zero(torch.from_numpy(sigmas))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def beta_ppf(p: float, a: float, b: float) -> float:
    """Inverse of `beta_cdf` by bisection (monotone, to double precision)."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if beta_cdf(mid, a, b) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-16:
            break
    return 0.5 * (lo + hi)


def sigmas_beta(
    n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta: float = 0.6
) -> torch.Tensor:
    """Beta schedule (Lee et al. 2024) as A1111 1.10 computes it: beta quantiles mapped linearly
    onto [sigma_min, sigma_max]. (ComfyUI maps them onto timesteps instead.)"""
    u = 1.0 - np.linspace(0, 1, n)
    q = torch.tensor([beta_ppf(float(p), alpha, beta) for p in u], dtype=torch.float64)
    return _append_zero(sigma_min + q * (sigma_max - sigma_min))


def get_sigmas(
    schedule_name: str,
    num_steps: int,
    model_sampling: ModelSampling,
    *,
    family: Family | str | None = None,
    rho: float | None = None,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Descending noise levels for `num_steps` steps, ending in 0: [num_steps + 1].

    `schedule_name` is our name or A1111's label. "Automatic" here means A1111's fallback
    (Uniform); the per-sampler automatic choice is `samplers.sampling_sigmas`. `sigma_min`,
    `sigma_max` override the model's range for Karras/Exponential/Polyexponential/KL Optimal/Beta
    (A1111's old Karras used 0.1 and 10); `family` picks the SDXL Align-Your-Steps list.
    "DDIM" can return more steps than asked (see `sigmas_ddim_uniform`).
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    name = canonical_schedule_name(schedule_name)
    ms = model_sampling
    lo = ms.sigma_min if sigma_min is None else float(sigma_min)
    hi = ms.sigma_max if sigma_max is None else float(sigma_max)
    n = num_steps
    if name in ("automatic", "uniform", "normal"):
        sigmas = sigmas_uniform(n, ms)
    elif name == "karras":
        sigmas = sigmas_karras(n, lo, hi, 7.0 if rho is None else rho)
    elif name == "exponential":
        sigmas = sigmas_exponential(n, lo, hi)
    elif name == "polyexponential":
        sigmas = sigmas_polyexponential(n, lo, hi, 1.0 if rho is None else rho)
    elif name == "sgm_uniform":
        sigmas = sigmas_sgm_uniform(n, ms)
    elif name == "simple":
        sigmas = sigmas_simple(n, ms)
    elif name == "ddim_uniform":
        sigmas = sigmas_ddim_uniform(n, ms)
    elif name == "kl_optimal":
        sigmas = sigmas_kl_optimal(n, lo, hi)
    elif name == "align_your_steps":
        sigmas = sigmas_align_your_steps(n, family)
    elif name == "beta":
        sigmas = sigmas_beta(n, lo, hi)
    else:  # pragma: no cover - canonical_schedule_name guards this
        raise AssertionError(name)
    return sigmas.to(dtype=dtype, device=device)
