"""Noise schedule, sigma spacings and eps/v scalings against k-diffusion, diffusers and §4.1 numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm_core.config import Family, Prediction
from ldm_core.schedules import (
    AYS_SD15,
    AYS_SDXL,
    SCHEDULE_LABELS,
    ModelSampling,
    beta_cdf,
    beta_ppf,
    canonical_schedule_name,
    get_sigmas,
    rescale_zero_terminal_snr_sigmas,
    schedule_label,
)
from tests.reference import load_k_diffusion

MS = ModelSampling.discrete()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_sigma_table_matches_reference_numbers():
    assert MS.sigmas.dtype == torch.float64 and len(MS.sigmas) == 1000
    assert MS.sigma_min == pytest.approx(0.0291672, abs=1e-7)
    assert MS.sigma_max == pytest.approx(14.61464, abs=1e-5)
    assert math.sqrt(1 + MS.sigma_max**2) == pytest.approx(14.64881, abs=1e-5)
    alphas = 1 / (1 + MS.sigmas**2)
    assert float(alphas[0]) == pytest.approx(0.99915, abs=1e-6)
    assert float(alphas[-1]) == pytest.approx(0.0046601, abs=1e-7)


def test_sigma_table_matches_diffusers_scaled_linear():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ref = ((1 - sched.alphas_cumprod.double()) / sched.alphas_cumprod.double()).sqrt()
    assert rel_err(MS.sigmas, ref) < 1e-5


def test_sigma_to_t_and_back_match_k_diffusion_discrete_schedule():
    external = load_k_diffusion("external")
    ref = external.DiscreteSchedule(MS.sigmas.float(), quantize=False)
    sig = torch.exp(torch.empty(200).uniform_(math.log(0.0292), math.log(14.6)))
    sig = torch.cat([sig, torch.tensor([MS.sigma_min, MS.sigma_max, 0.01, 20.0])])
    ours = MS.sigma_to_t(sig.double())
    assert float((ours - ref.sigma_to_t(sig).double()).abs().max()) < 1e-3
    assert torch.equal(MS.sigma_to_t(sig, quantize=True).long(), ref.sigma_to_t(sig, quantize=True))
    t = torch.empty(200).uniform_(0, 999)
    assert rel_err(MS.t_to_sigma(t.double()), ref.t_to_sigma(t)) < 1e-6
    # exact round trip in float64
    assert rel_err(MS.t_to_sigma(MS.sigma_to_t(sig[:200].double())), sig[:200].double()) < 1e-12
    # uniform = k-diffusion's DiscreteSchedule.get_sigmas (A1111 "Uniform" / "Automatic")
    for n in (1, 7, 20):
        assert rel_err(get_sigmas("Uniform", n, MS), ref.get_sigmas(n)) < 1e-6


@pytest.mark.parametrize("n", [1, 5, 20, 37])
def test_karras_exponential_polyexponential_match_k_diffusion(n):
    sampling = load_k_diffusion("sampling")
    lo, hi = MS.sigma_min, MS.sigma_max
    pairs = [
        ("Karras", sampling.get_sigmas_karras(n, lo, hi, rho=7.0)),
        ("exponential", sampling.get_sigmas_exponential(n, lo, hi)),
        ("Polyexponential", sampling.get_sigmas_polyexponential(n, lo, hi, rho=1.0)),
    ]
    for name, ref in pairs:
        ours = get_sigmas(name, n, MS)
        assert ours.dtype == torch.float32 and ours.shape == (n + 1,)
        assert rel_err(ours, ref) < 1e-6, name
    ours = get_sigmas("karras", n, MS, rho=3.0, sigma_min=0.1, sigma_max=10.0, dtype=torch.float64)
    assert rel_err(ours, sampling.get_sigmas_karras(n, 0.1, 10.0, rho=3.0)) < 1e-6


def test_sgm_uniform_simple_ddim_definitions():
    n = 10
    t = torch.linspace(999, 0, n + 1, dtype=torch.float64)[:-1]
    assert rel_err(get_sigmas("SGM Uniform", n, MS)[:-1], MS.t_to_sigma(t)) < 1e-6
    # uniform over n + 1 points without its penultimate sigma is exactly sgm_uniform
    u = get_sigmas("uniform", n + 1, MS)
    assert torch.allclose(torch.cat([u[:-2], u[-1:]]), get_sigmas("sgm_uniform", n, MS))
    simple = get_sigmas("Simple", n, MS, dtype=torch.float64)
    assert torch.equal(simple[:-1], MS.sigmas[[999 - int(k * 100) for k in range(n)]])
    ddim = get_sigmas("DDIM", 20, MS, dtype=torch.float64)
    assert torch.equal(ddim[:-1], MS.sigmas[list(range(1, 1000, 50))[::-1]])
    # A1111's DDIM grid has 31 steps for 30 (range(0, 1000, 33))
    assert len(get_sigmas("ddim_uniform", 30, MS)) == 32


def test_every_schedule_is_descending_and_ends_in_zero():
    for name in SCHEDULE_LABELS:
        for n in (1, 4, 11, 25):
            s = get_sigmas(name, n, MS)
            assert s[-1] == 0 and torch.all(s[:-1] > 0), (name, n)
            assert torch.all(s[:-1] >= s[1:]), (name, n)
            if name != "ddim_uniform":
                assert len(s) == n + 1, (name, n)


def test_schedule_names_accept_a1111_labels():
    labels = [
        "Automatic", "Uniform", "Karras", "Exponential", "Polyexponential", "SGM Uniform",
        "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta",
    ]  # fmt: skip
    for label in labels:
        assert schedule_label(canonical_schedule_name(label)) == label
    assert canonical_schedule_name("SGMUniform") == "sgm_uniform"
    assert canonical_schedule_name("ddim_uniform") == "ddim_uniform"
    assert torch.equal(get_sigmas("Automatic", 9, MS), get_sigmas("normal", 9, MS))
    with pytest.raises(ValueError, match="unknown schedule"):
        get_sigmas("cosine", 10, MS)
    with pytest.raises(ValueError, match="positive"):
        get_sigmas("karras", 0, MS)


def test_kl_optimal_is_uniform_in_arctan():
    s = get_sigmas("KL Optimal", 12, MS, dtype=torch.float64)[:-1]
    a = torch.atan(s)
    assert float(a[0]) == pytest.approx(math.atan(MS.sigma_max))
    assert float(a[-1]) == pytest.approx(math.atan(MS.sigma_min))
    assert torch.allclose(a[1:] - a[:-1], (a[1] - a[0]).expand(11), atol=1e-12)


def test_align_your_steps_lists_and_interpolation():
    sd15 = get_sigmas("Align Your Steps", 11, MS, dtype=torch.float64)
    assert sd15[:-1].tolist() == pytest.approx(list(AYS_SD15))
    sdxl = get_sigmas("align_your_steps", 11, MS, family=Family.SDXL, dtype=torch.float64)
    assert sdxl[:-1].tolist() == pytest.approx(list(AYS_SDXL))
    s = get_sigmas("align_your_steps", 21, MS, dtype=torch.float64)[:-1]
    # 21 points on the 11-point log-linear curve: every other point is an original knot
    assert s[::2].tolist() == pytest.approx(list(AYS_SD15))
    assert float(s[1]) == pytest.approx(math.sqrt(AYS_SD15[0] * AYS_SD15[1]))


def test_beta_schedule_matches_scipy_formula():
    stats = pytest.importorskip("scipy.stats")
    for p, a, b in [(0.1, 0.6, 0.6), (0.5, 0.6, 0.6), (0.93, 0.6, 0.6), (0.3, 2.0, 5.0)]:
        assert beta_cdf(stats.beta.ppf(p, a, b), a, b) == pytest.approx(p, abs=1e-12)
        assert beta_ppf(p, a, b) == pytest.approx(stats.beta.ppf(p, a, b), abs=1e-12)
    n = 15
    q = stats.beta.ppf(1 - np.linspace(0, 1, n), 0.6, 0.6)
    ref = MS.sigma_min + q * (MS.sigma_max - MS.sigma_min)
    ours = get_sigmas("Beta", n, MS, dtype=torch.float64)
    assert np.allclose(ours[:-1].numpy(), ref, rtol=1e-10)


def test_zero_terminal_snr_matches_diffusers_rescale():
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ref_alphas = torch.cumprod(1 - rescale_zero_terminal_snr(betas), 0)
    ms = ModelSampling.discrete(Prediction.V, zero_terminal_snr=True)
    ours_alphas = 1 / (1 + ms.sigmas**2)
    assert rel_err(ours_alphas[:-1], ref_alphas[:-1]) < 1e-9
    assert float(ours_alphas[-1]) == pytest.approx(4.8973451890853435e-08)
    assert ms.sigma_max == pytest.approx(
        math.sqrt((1 - 4.8973451890853435e-08) / 4.8973451890853435e-08)
    )
    assert float(rescale_zero_terminal_snr_sigmas(MS.sigmas)[0]) == pytest.approx(MS.sigma_min)


@pytest.mark.parametrize("prediction", [Prediction.EPS, Prediction.V])
def test_denoiser_scalings_recover_x0(prediction):
    ms = ModelSampling.discrete(prediction)
    x0 = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    noise = torch.randn_like(x0)
    sigma = torch.tensor([0.1, 1.0, 14.0], dtype=torch.float64)
    x = x0 + sigma.view(-1, 1, 1, 1) * noise  # k-space
    alpha = (1 / (1 + sigma**2)).sqrt().view(-1, 1, 1, 1)
    s = sigma.view(-1, 1, 1, 1) * alpha
    target = noise if prediction == Prediction.EPS else alpha * noise - s * x0
    x_in = ms.calculate_input(sigma, x)
    assert torch.allclose(x_in, alpha * x0 + s * noise)  # the VP latent
    assert torch.allclose(ms.calculate_denoised(sigma, target, x), x0, atol=1e-12)
    c_skip, c_out, c_in = ms.scalings(sigma)
    assert torch.allclose(c_in, alpha.flatten())
    assert torch.allclose(ms.c_skip(sigma), c_skip) and torch.allclose(ms.c_out(sigma), c_out)


def test_lcm_model_sampling_matches_diffusers_boundary_condition():
    from diffusers import LCMScheduler

    lcm = MS.lcm()
    assert len(lcm.sigmas) == 50 and lcm.lcm_boundary and lcm.quantize
    t = torch.arange(19, 1000, 20, dtype=torch.float64)
    assert torch.equal(lcm.sigma_to_t(MS.sigmas[t.long()]), t)
    assert rel_err(lcm.t_to_sigma(t), MS.sigmas[t.long()]) < 1e-12
    assert float(lcm.sigma_to_t(torch.tensor(5.0, dtype=torch.float64)) - 19) % 20 == 0
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for ti in (999, 499, 19):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(ti)
        sigma = MS.sigmas[ti].reshape(1)
        x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
        eps = torch.randn_like(x)
        x0 = x - sigma * eps
        expected = c_out * x0 + c_skip * x
        assert torch.allclose(lcm.calculate_denoised(sigma, eps, x), expected, atol=1e-12)
    # A1111's LCM "Uniform": timesteps 999 ... 19
    s = get_sigmas("uniform", 4, lcm, dtype=torch.float64)
    assert [float(s[0]), float(s[3]), float(s[4])] == pytest.approx(
        [MS.sigma_max, float(MS.sigmas[19]), 0]
    )


def test_model_sampling_from_spec():
    from ldm_core.config import OPEN_CLIP_H, SD2_UNET, SD_VAE, ModelSpec

    spec = ModelSpec(
        family=Family.SD2,
        unet=SD2_UNET,
        vae=SD_VAE,
        text_encoders=(OPEN_CLIP_H,),
        prediction=Prediction.V,
        zero_terminal_snr=True,
    )
    ms = ModelSampling.from_spec(spec)
    assert ms.prediction == Prediction.V and ms.sigma_max > 4000 and not ms.quantize
    assert ModelSampling.from_spec(spec, quantize=True).quantize
