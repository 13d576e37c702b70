"""A1111-compatible seeds and noise (ldm-formats.md §8.1) and the Brownian-tree noise sampler."""

from __future__ import annotations

import math
import random

import pytest
import torch

from ldm_core.rng import (
    BrownianPath,
    BrownianTreeNoiseSampler,
    ImageRNG,
    noise_sampler_from_rng,
    randn,
    resolve_seed,
    seeds_for_batch,
    slerp,
    subseeds_for_batch,
)

SHAPE = (4, 8, 8)


def cpu_randn(seed, shape, draws=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(draws)]


def test_first_noise_is_cpu_generator_stream_per_image():
    rng = ImageRNG(SHAPE, [1234, 99])
    noise = rng.next()
    assert noise.shape == (2, *SHAPE) and noise.dtype == torch.float32
    assert torch.equal(noise[0], cpu_randn(1234, SHAPE)[0])
    assert torch.equal(noise[1], cpu_randn(99, SHAPE)[0])
    # the sampler stream continues each image's own generator
    second = rng.next()
    assert torch.equal(second[0], cpu_randn(1234, SHAPE, 2)[1])
    assert torch.equal(ImageRNG(SHAPE, [1234, 99]).next(), noise)  # same seed -> same noise


def test_noise_is_batch_size_independent():
    batch = ImageRNG(SHAPE, [5, 6, 7])
    alone = ImageRNG(SHAPE, [6])
    for _ in range(3):
        assert torch.equal(batch.next()[1], alone.next()[0])


def test_seed_matches_comfyui_style_single_draw_for_image_zero():
    # ComfyUI: torch.manual_seed(seed); torch.randn([B, C, H, W]) -> image 0 equals ours
    torch.manual_seed(42)
    comfy = torch.randn(2, *SHAPE)
    assert torch.equal(ImageRNG(SHAPE, [42]).next()[0], comfy[0])


def test_variation_strength_endpoints_and_slerp():
    base = ImageRNG(SHAPE, [10]).next()
    variation = ImageRNG(SHAPE, [77]).next()
    zero = ImageRNG(SHAPE, [10], subseeds=[77], subseed_strength=0.0).next()
    assert torch.equal(zero, base)
    one = ImageRNG(SHAPE, [10], subseeds=[77], subseed_strength=1.0).next()
    assert torch.allclose(one, variation, atol=1e-5)
    half = ImageRNG(SHAPE, [10], subseeds=[77], subseed_strength=0.5).next()
    assert torch.allclose(half[0], slerp(0.5, base[0], variation[0]))
    assert not torch.allclose(half, base) and not torch.allclose(half, variation)
    # A1111 normalises along dim 1 of [C, H, W]; the slerp keeps those column norms ~ constant
    assert half[0].norm(dim=1).mean() == pytest.approx(float(base[0].norm(dim=1).mean()), rel=0.1)
    # nearly parallel inputs fall back to A1111's (swapped-weight) linear mix
    a = torch.randn(SHAPE)
    assert torch.allclose(slerp(0.3, a, a * 1.0000001), a * 0.3 + a * 1.0000001 * 0.7)


def test_resize_seed_pastes_centered():
    # target latent 8x8; noise seeded as if the image were 32x32 px (4x4 latent)
    rng = ImageRNG(SHAPE, [3], seed_resize_from_h=32, seed_resize_from_w=32)
    noise = rng.next()[0]
    small = cpu_randn(3, (4, 4, 4))[0]
    full = cpu_randn(3, SHAPE)[0]
    assert noise.shape == SHAPE
    assert torch.equal(noise[:, 2:6, 2:6], small)
    mask = torch.ones(SHAPE, dtype=torch.bool)
    mask[:, 2:6, 2:6] = False
    assert torch.equal(noise[mask], full[mask])
    # larger source: its centre is cropped into the target
    big = ImageRNG(SHAPE, [3], seed_resize_from_h=128, seed_resize_from_w=96).next()[0]
    src = cpu_randn(3, (4, 16, 12))[0]
    assert torch.equal(big, src[:, 4:12, 2:10])
    # the following stream is unaffected by the resize
    assert torch.equal(rng.next()[0], cpu_randn(3, SHAPE, 2)[1])


def test_eta_noise_seed_delta_reseeds_after_initial_noise():
    rng = ImageRNG(SHAPE, [100], eta_noise_seed_delta=31337)
    assert torch.equal(rng.next()[0], cpu_randn(100, SHAPE)[0])
    assert torch.equal(rng.next()[0], cpu_randn(100 + 31337, SHAPE)[0])


def test_batch_seeds_and_random_seed():
    assert seeds_for_batch(10, 3) == [10, 11, 12]
    assert seeds_for_batch(10, 3, subseed_strength=0.4) == [10, 10, 10]
    assert subseeds_for_batch(500, 3) == [500, 501, 502]
    assert resolve_seed(123) == 123 and resolve_seed("77") == 77
    for empty in (-1, None, ""):
        seed = resolve_seed(empty)
        assert 0 <= seed < 4294967294
    assert resolve_seed(-1, rng=random.Random(0)) == resolve_seed(-1, rng=random.Random(0))
    with pytest.raises(ValueError):
        resolve_seed("abc")


def test_output_dtype_device_and_shape_errors():
    rng = ImageRNG(SHAPE, [1], dtype=torch.float64, device="cpu")
    assert rng.next().dtype == torch.float64
    assert torch.equal(randn(9, SHAPE), cpu_randn(9, SHAPE)[0])
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        ImageRNG((1, 4, 8, 8), [1])


def test_noise_sampler_adapter_draws_the_stream():
    rng = ImageRNG(SHAPE, [8])
    rng.next()
    ns = noise_sampler_from_rng(rng)
    assert torch.equal(ns(torch.tensor(1.0), torch.tensor(0.5))[0], cpu_randn(8, SHAPE, 2)[1])


def test_brownian_path_is_a_brownian_motion():
    path = BrownianPath(0.03, 14.6, (20000,), seed=1)
    assert torch.equal(path(0.03), torch.zeros(20000, dtype=torch.float64))
    w = {t: path(t) for t in (0.5, 2.0, 2.0 + 1e-7, 9.0)}
    # deterministic: asking again gives the same value
    assert torch.equal(path(2.0), w[2.0])
    # W(t) - W(t0) ~ N(0, t - t0); disjoint increments uncorrelated
    assert float(w[9.0].var()) == pytest.approx(9.0 - 0.03, rel=0.05)
    inc1, inc2 = w[2.0] - w[0.5], w[9.0] - w[2.0]
    assert float(inc1.var()) == pytest.approx(1.5, rel=0.05)
    assert abs(float((inc1 * inc2).mean())) < 0.1
    # tiny intervals below the bisection depth still have the right variance
    assert float((w[2.0 + 1e-7] - w[2.0]).var()) == pytest.approx(1e-7, rel=0.1)
    assert not torch.equal(BrownianPath(0.03, 14.6, (20000,), seed=2)(2.0), w[2.0])


def test_brownian_noise_sampler_normalised_and_per_image_seeded():
    x = torch.zeros(2, 4, 32, 32)
    ns = BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=[5, 6])
    n = ns(torch.tensor(3.0), torch.tensor(2.5))
    assert n.shape == x.shape and n.dtype == torch.float32
    assert float(n.std()) == pytest.approx(1.0, rel=0.05)
    alone = BrownianTreeNoiseSampler(torch.zeros(1, 4, 32, 32), 0.03, 14.6, seed=[6])
    assert torch.equal(alone(3.0, 2.5)[0], n[1])
    # increments over a refinement add up: n(a,c)*sqrt(c-a) = n(a,b)*sqrt(b-a) + n(b,c)*sqrt(c-b)
    a, b, c = 3.0, 2.7, 2.5
    lhs = ns(a, c).double() * math.sqrt(a - c)
    rhs = ns(a, b).double() * math.sqrt(a - b) + ns(b, c).double() * math.sqrt(b - c)
    assert torch.allclose(lhs, rhs, atol=1e-5)
    with pytest.raises(ValueError, match="seeds for a batch"):
        BrownianTreeNoiseSampler(x, 0.03, 14.6, seed=[1])


def test_image_rng_brownian_sampler_uses_image_seeds():
    sigmas = torch.tensor([14.6, 3.0, 0.5, 0.0])
    rng = ImageRNG(SHAPE, [11, 12])
    ns = rng.brownian_noise_sampler(sigmas)
    lo, hi = float(sigmas[2]), float(sigmas[0])
    ref = BrownianTreeNoiseSampler((2, *SHAPE), lo, hi, seed=[11, 12])
    assert torch.equal(ns(3.0, 0.5), ref(3.0, 0.5))
