"""Samplers against k-diffusion / diffusers on the same denoiser, plus the registry and A1111 rules.

Two denoisers: an analytic one for Gaussian data N(mu, s^2) (exact ODE answer known) and a tiny
eps-predicting conv net wrapped by ModelSampling. Everything runs in float64 so parity is tight.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ldm_core.rng import ImageRNG
from ldm_core.samplers import (
    DEFAULT_REGISTRY,
    SAMPLER_INFO,
    SAMPLERS,
    register_sampler,
    resolve_sampler_name,
    sample_ddim,
    sample_euler,
    sample_lcm,
    sample_unipc,
    sampling_sigmas,
)
from ldm_core.schedules import ModelSampling, get_sigmas
from tests.reference import load_k_diffusion

MS = ModelSampling.discrete()
MU, S = 0.5, 0.8
SHAPE = (2, 4, 8, 8)


def gaussian_denoiser(x, sigma):
    """Exact D(x, sigma) = E[x0 | x] for x0 ~ N(MU, S^2)."""
    sigma = sigma.reshape(-1, 1, 1, 1)
    return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


def exact_ode_solution(x_t, sigma_max):
    return MU + S * (x_t - MU) / math.sqrt(S**2 + sigma_max**2)


class TinyEpsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 16, 3, padding=1)
        self.time = nn.Linear(2, 16)
        self.conv_out = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x, t):
        angle = t.to(x.dtype)[:, None] / 1000 * math.pi
        emb = self.time(torch.cat([angle.sin(), angle.cos()], dim=1))
        return self.conv_out(torch.tanh(self.conv_in(x) + emb[:, :, None, None]))


def tiny_net_denoiser():
    torch.manual_seed(1234)
    net = TinyEpsNet().double().eval().requires_grad_(False)

    def model(x, sigma):
        eps = net(MS.calculate_input(sigma, x), MS.sigma_to_t(sigma))
        return MS.calculate_denoised(sigma, eps, x)

    return model


def tiny_unet_denoiser():
    """Our real UNet class at a tiny config, with a fixed text context."""
    from ldm_core.config import UNetConfig
    from ldm_core.nn.unet import UNetModel

    torch.manual_seed(4321)
    cfg = UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        transformer_depth=(1, 0),
        context_dim=32,
    )
    unet = UNetModel(cfg).double().eval().requires_grad_(False)
    context = torch.randn(1, 7, 32, dtype=torch.float64)

    def model(x, sigma):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        eps = unet(
            MS.calculate_input(sigma, x),
            MS.sigma_to_t(sigma),
            context=context.expand(x.shape[0], -1, -1),
        )
        return MS.calculate_denoised(sigma, eps, x)

    return model


MODELS = {
    "gaussian": lambda: gaussian_denoiser,
    "tiny_net": tiny_net_denoiser,
    "tiny_unet": tiny_unet_denoiser,
}


def seeded_noise(seed, shape=SHAPE):
    generator = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=generator, dtype=torch.float64)


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


# name -> (k-diffusion function, extra kwargs, takes noise_sampler)
K_REFERENCE = {
    "Euler": ("sample_euler", {}, False),
    "Euler a": ("sample_euler_ancestral", {}, True),
    "Heun": ("sample_heun", {}, False),
    "DPM2": ("sample_dpm_2", {}, False),
    "DPM2 a": ("sample_dpm_2_ancestral", {}, True),
    "DPM++ 2M": ("sample_dpmpp_2m", {}, False),
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", {}, True),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}, True),
    "DPM++ SDE": ("sample_dpmpp_sde", {}, True),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", {}, True),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", {}, True),
    "LMS": ("sample_lms", {}, False),
}


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("sampler", list(K_REFERENCE))
def test_matches_k_diffusion(sampler, model_name):
    k_sampling = load_k_diffusion("sampling")
    fn_name, kwargs, takes_noise = K_REFERENCE[sampler]
    model = MODELS[model_name]()
    sigmas = sampling_sigmas(sampler, "Automatic", 8, MS, dtype=torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64) * sigmas[0]
    ref_kwargs = dict(kwargs, noise_sampler=seeded_noise(7)) if takes_noise else kwargs
    ref = getattr(k_sampling, fn_name)(model, x, sigmas, disable=True, **ref_kwargs)
    ours = SAMPLERS[sampler](model, x, sigmas, noise_sampler=seeded_noise(7))
    assert rel_err(ours, ref) < 1e-10


def test_churn_matches_k_diffusion():
    k_sampling = load_k_diffusion("sampling")
    sigmas = get_sigmas("karras", 6, MS, dtype=torch.float64)
    x = torch.randn(SHAPE, dtype=torch.float64) * sigmas[0]
    churn = {"s_churn": 1.0, "s_noise": 1.003}
    for ours_fn, ref_fn in [
        ("Euler", "sample_euler"),
        ("Heun", "sample_heun"),
        ("DPM2", "sample_dpm_2"),
    ]:
        torch.manual_seed(3)
        ref = getattr(k_sampling, ref_fn)(gaussian_denoiser, x, sigmas, disable=True, **churn)
        torch.manual_seed(3)
        ours = SAMPLERS[ours_fn](gaussian_denoiser, x, sigmas, **churn)
        assert rel_err(ours, ref) < 1e-10, ours_fn


def _diffusers_vp_loop(scheduler, sigmas, x_k, model, step_kwargs=lambda i: {}):
    """Run a diffusers scheduler on our denoiser: VP latents, eps computed from D."""
    sample = x_k / math.sqrt(1 + float(sigmas[0]) ** 2)
    for i, t in enumerate(scheduler.timesteps):
        sigma = sigmas[i]
        x = sample * (1 + sigma**2).sqrt()
        eps = (x - model(x, sigma.reshape(1).expand(x.shape[0]))) / sigma
        sample = scheduler.step(eps, t, sample, **step_kwargs(i)).prev_sample
    return sample


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_ddim_matches_diffusers(eta, model_name):
    from diffusers import DDIMScheduler

    model = MODELS[model_name]()
    sched = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )
    sched.set_timesteps(10)
    sched.alphas_cumprod = 1 / (1 + MS.sigmas**2)
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    # A1111's DDIM grid: t = 1, 101, ..., 901, ending at alpha_bar[0]
    assert sched.timesteps.tolist() == list(range(901, 0, -100))
    sigmas = torch.cat([MS.sigmas[sched.timesteps], MS.sigmas[:1]])
    x = torch.randn(SHAPE, dtype=torch.float64) * sigmas[0]
    noise = [torch.randn(SHAPE, dtype=torch.float64) for _ in range(10)]
    ref = _diffusers_vp_loop(
        sched, sigmas, x, model, lambda i: {"eta": eta, "variance_noise": noise[i]}
    )
    stream = iter(noise)
    ours = sample_ddim(model, x, sigmas, eta=eta, noise_sampler=lambda s, sn: next(stream))
    assert rel_err(ours / (1 + sigmas[-1] ** 2).sqrt(), ref) < 1e-10
    # ddim_uniform is the same grid (ending at sigma = 0 instead of sigma_min)
    assert torch.allclose(get_sigmas("DDIM", 10, MS, dtype=torch.float64)[:-1], sigmas[:-1])


@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_unipc_matches_diffusers(variant, model_name):
    from diffusers import UniPCMultistepScheduler

    model = MODELS[model_name]()
    sched = UniPCMultistepScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        solver_order=3,
        solver_type=variant,
        predict_x0=True,
        lower_order_final=True,
        use_karras_sigmas=True,
        final_sigmas_type="zero",
    )
    sched.set_timesteps(9)
    sigmas = sched.sigmas.double()
    if variant == "bh1":
        # diffusers' bh1 produces inf*0 on a step to sigma = 0; end just above 0 instead
        sigmas[-1] = 0.01
    sched.sigmas = sigmas.clone()
    x = torch.randn(SHAPE, dtype=torch.float64) * sigmas[0]
    ref = _diffusers_vp_loop(sched, sigmas, x, model)
    ours = sample_unipc(model, x, sigmas, variant=variant)
    assert rel_err(ours / (1 + sigmas[-1] ** 2).sqrt(), ref) < 1e-10


@pytest.mark.parametrize("model_name", list(MODELS))
def test_lcm_matches_diffusers(model_name):
    from diffusers import LCMScheduler

    model = MODELS[model_name]()
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(4)
    sched.alphas_cumprod = 1 / (1 + MS.sigmas**2)
    ts = sched.timesteps
    sigmas = torch.cat([MS.sigmas[ts], torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(SHAPE, dtype=torch.float64) * sigmas[0]
    gen = torch.Generator().manual_seed(11)

    # diffusers applies the boundary condition itself: give it the eps whose result is our D
    sample = x / math.sqrt(1 + float(sigmas[0]) ** 2)
    for i, t in enumerate(ts):
        sigma = sigmas[i]
        xk = sample * (1 + sigma**2).sqrt()
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        x0 = (model(xk, sigma.reshape(1).expand(2)) - c_skip * sample) / c_out
        eps = (xk - x0) / sigma
        sample = sched.step(eps, t, sample, generator=gen).prev_sample
    ours = sample_lcm(model, x, sigmas, noise_sampler=seeded_noise(11))
    assert rel_err(ours, sample) < 1e-10


DETERMINISTIC_BOUNDS = {  # max |x - exact| after 100 steps of the sampler's automatic schedule
    "Euler": 0.06,
    "DDIM": 0.06,
    "Heun": 2e-3,
    "DPM2": 3e-3,
    "DPM++ 2M": 2e-3,
    "LMS": 2e-3,
    "UniPC": 0.03,  # its automatic grid's last step jumps from sigma(t~10) straight to 0
}


@pytest.mark.parametrize("sampler", list(DETERMINISTIC_BOUNDS))
def test_deterministic_samplers_approach_exact_ode_solution(sampler):
    errors = []
    for steps in (25, 100):
        sigmas = sampling_sigmas(sampler, "Automatic", steps, MS, dtype=torch.float64)
        x = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x = x * sigmas[0]
        out = SAMPLERS[sampler](gaussian_denoiser, x, sigmas)
        errors.append(float((out - exact_ode_solution(x, float(sigmas[0]))).abs().max()))
    assert errors[1] < DETERMINISTIC_BOUNDS[sampler]
    assert errors[1] < errors[0]


@pytest.mark.parametrize(
    "sampler", ["Euler a", "DPM++ 2M SDE", "DPM++ SDE", "DPM++ 3M SDE", "DPM++ 2S a", "DPM2 a"]
)
def test_stochastic_samplers_sample_the_data_distribution(sampler):
    sigmas = sampling_sigmas(sampler, "Automatic", 30, MS, dtype=torch.float64)
    x = torch.randn(1, 1, 64, 64, dtype=torch.float64) * sigmas[0]
    out = SAMPLERS[sampler](gaussian_denoiser, x, sigmas)
    assert float(out.mean()) == pytest.approx(MU, abs=0.06)
    # first-order ancestral Euler is known to under-disperse at few steps (k-diffusion does too)
    assert float(out.std()) == pytest.approx(S, abs=0.1 if sampler == "Euler a" else 0.04)


@pytest.mark.parametrize("sampler", ["DPM++ 2M SDE", "DPM++ SDE", "DPM++ 3M SDE"])
def test_sde_samplers_reproducible_and_batch_independent(sampler):
    model = tiny_net_denoiser()
    sigmas = sampling_sigmas(sampler, "Automatic", 6, MS)
    rng = ImageRNG((4, 8, 8), [21, 22])
    x = rng.next() * sigmas[0]
    batch = SAMPLERS[sampler](
        model, x.double(), sigmas, noise_sampler=rng.brownian_noise_sampler(sigmas)
    )
    rng_alone = ImageRNG((4, 8, 8), [22])
    x_alone = rng_alone.next() * sigmas[0]
    alone = SAMPLERS[sampler](
        model, x_alone.double(), sigmas, noise_sampler=rng_alone.brownian_noise_sampler(sigmas)
    )
    assert torch.allclose(batch[1:], alone, atol=1e-12)
    # default Brownian noise is seeded from torch's generator
    torch.manual_seed(5)
    a = SAMPLERS[sampler](model, x.double(), sigmas)
    torch.manual_seed(5)
    b = SAMPLERS[sampler](model, x.double(), sigmas)
    torch.manual_seed(6)
    c = SAMPLERS[sampler](model, x.double(), sigmas)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_ancestral_sampler_uses_image_rng_stream():
    sigmas = sampling_sigmas("Euler a", "Automatic", 5, MS)
    rng = ImageRNG((4, 8, 8), [3, 4])
    x = rng.next() * sigmas[0]
    out = SAMPLERS["Euler a"](gaussian_denoiser, x, sigmas, noise_sampler=rng.noise_sampler())
    rng2 = ImageRNG((4, 8, 8), [4])
    x2 = rng2.next() * sigmas[0]
    out2 = SAMPLERS["Euler a"](gaussian_denoiser, x2, sigmas, noise_sampler=rng2.noise_sampler())
    assert torch.allclose(out[1:], out2, atol=1e-6)


def test_callback_reports_every_step():
    seen = []
    sigmas = get_sigmas("karras", 5, MS)
    x = torch.randn(1, 4, 4, 4) * sigmas[0]
    for name in SAMPLERS:
        seen.clear()
        SAMPLERS[name](gaussian_denoiser, x, sigmas, callback=seen.append)
        assert [d["i"] for d in seen] == list(range(5)), name
        assert set(seen[0]) == {"i", "x", "sigma", "sigma_hat", "denoised"}
        assert seen[0]["sigma"] == sigmas[0]


def test_registry_contents_and_a1111_facts():
    expected = {
        "Euler", "Euler a", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE",
        "DPM++ 2M SDE Heun", "DPM++ SDE", "DPM++ 2S a", "DPM++ 3M SDE", "LMS", "DDIM", "UniPC",
        "LCM",
    }  # fmt: skip
    assert expected <= set(SAMPLERS)
    automatic = {
        "DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2S a": "karras", "DPM2": "karras",
        "DPM2 a": "karras", "DPM++ 2M SDE": "exponential", "DPM++ 3M SDE": "exponential",
        "Euler": "uniform", "Euler a": "uniform", "LMS": "uniform", "Heun": "uniform",
    }  # fmt: skip
    for name, schedule in automatic.items():
        assert SAMPLER_INFO[name].default_schedule == schedule
    discard = {name for name, info in SAMPLER_INFO.items() if info.discard_penultimate_sigma}
    assert discard == {"DPM2", "DPM2 a", "DPM++ 3M SDE", "UniPC"}
    brownian = {name for name, info in SAMPLER_INFO.items() if info.brownian_noise}
    assert brownian == {"DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE"}


def test_resolve_sampler_name_splits_old_combined_names():
    assert resolve_sampler_name("DPM++ 2M Karras") == ("DPM++ 2M", "Automatic")
    assert resolve_sampler_name("DPM++ 2M SDE Exponential") == ("DPM++ 2M SDE", "Automatic")
    assert resolve_sampler_name("DPM++ 2M SDE Karras") == ("DPM++ 2M SDE", "Karras")
    assert resolve_sampler_name("DPM++ 2M SDE Heun Karras") == ("DPM++ 2M SDE Heun", "Karras")
    assert resolve_sampler_name("Euler a") == ("Euler a", "Automatic")
    assert resolve_sampler_name("LMS Karras") == ("LMS", "Karras")
    assert resolve_sampler_name("Euler SGMUniform") == ("Euler", "SGM Uniform")
    assert resolve_sampler_name("k_dpmpp_2m", "exponential") == ("DPM++ 2M", "Exponential")
    assert resolve_sampler_name("DDIM") == ("DDIM", "Automatic")
    assert resolve_sampler_name("Euler", "Karras") == ("Euler", "Karras")
    with pytest.raises(KeyError, match="unknown sampler"):
        resolve_sampler_name("Euler z")


def test_sampling_sigmas_apply_automatic_schedule_and_discard():
    n = 10
    karras = get_sigmas("karras", n + 1, MS)
    dpm2 = sampling_sigmas("DPM2", "Automatic", n, MS)
    assert len(dpm2) == n + 1 and torch.equal(dpm2, torch.cat([karras[:-2], karras[-1:]]))
    assert torch.equal(sampling_sigmas("DPM2 Karras", None, n, MS), dpm2)
    expo = get_sigmas("exponential", n + 1, MS)
    assert torch.equal(
        sampling_sigmas("DPM++ 3M SDE", "Automatic", n, MS), torch.cat([expo[:-2], expo[-1:]])
    )
    assert torch.equal(sampling_sigmas("DPM++ 2M", "Automatic", n, MS), get_sigmas("karras", n, MS))
    assert torch.equal(sampling_sigmas("Euler", "Automatic", n, MS), get_sigmas("uniform", n, MS))
    assert torch.equal(
        sampling_sigmas("DDIM", "Automatic", n, MS), get_sigmas("ddim_uniform", n, MS)
    )
    # A1111's UniPC time-uniform grid: t = linspace(999, 0, n + 1), here ending at 0
    assert torch.allclose(
        sampling_sigmas("UniPC", "Automatic", n, MS), get_sigmas("sgm_uniform", n, MS)
    )
    forced = sampling_sigmas("Euler", "Karras", n, MS, discard_penultimate_sigma=True)
    assert torch.equal(forced, dpm2)
    lcm = sampling_sigmas("LCM", "Automatic", 4, MS, dtype=torch.float64)
    assert float(lcm[-2]) == pytest.approx(float(MS.sigmas[19]))


def test_register_sampler():
    registry = DEFAULT_REGISTRY.copy()
    info = registry.register(
        "My Euler", sample_euler, default_schedule="Karras", aliases=("my_euler",)
    )
    assert info.default_schedule == "karras" and "My Euler" not in SAMPLERS
    assert registry.resolve("my_euler Exponential") == ("My Euler", "Exponential")
    assert torch.equal(
        registry.sampling_sigmas("My Euler", "Automatic", 7, MS), get_sigmas("karras", 7, MS)
    )
    with pytest.raises(ValueError, match="already registered"):
        registry.register("My Euler", sample_euler)
    try:
        register_sampler("Test Only Sampler", sample_euler, options={"s_churn": 0.0})
        assert "Test Only Sampler" in SAMPLERS and SAMPLER_INFO["Test Only Sampler"].options
    finally:
        SAMPLERS.pop("Test Only Sampler", None)
        SAMPLER_INFO.pop("Test Only Sampler", None)
