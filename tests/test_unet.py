"""UNetModel: parity with diffusers' UNet2DConditionModel, hook points, meta construction."""

from __future__ import annotations

import copy
import gc
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ldm_core.config import SD1_UNET, SD2_UNET, UNetConfig
from ldm_core.nn.attention import SpatialTransformer
from ldm_core.nn.hooks import AttentionInfo, BlockId, ControlResiduals, UNetHooks
from ldm_core.nn.unet import UNetModel

UNET_PREFIX = "model.diffusion_model."

# Shrunken configs of the same structure as the real families, for the default run.
SD1_SMALL = replace(SD1_UNET, model_channels=64, context_dim=64)
SD2_SMALL = replace(SD2_UNET, model_channels=64, context_dim=48, num_head_channels=16)
SDXL_SMALL = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 4),
    transformer_depth=(0, 1, 2),
    transformer_depth_middle=2,
    context_dim=64,
    num_heads=-1,
    num_head_channels=8,
    use_linear_in_transformer=True,
    adm_in_channels=40,
    norm_groups=8,
)
# A few hundred thousand parameters: for the hook and invariant tests.
TINY = UNetConfig(
    model_channels=16,
    channel_mult=(1, 2),
    transformer_depth=(1, 0),
    transformer_depth_middle=1,
    context_dim=32,
    num_heads=4,
    norm_groups=8,
)


# ----------------------------------------------------------------------------- helpers


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Assign fresh random tensors to every parameter (works on a meta-built model).

    Weights ~ N(0, 1/fan_in), norm scales ~ 1 + 0.1 N(0, 1), biases ~ 0.05 N(0, 1): all of a
    size that matters, so a wrong connection shows up in the output.
    """
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            fan_in = math.prod(param.shape[1:])
            t = torch.randn(param.shape, generator=gen).mul_(fan_in**-0.5)
        elif name.endswith("weight"):
            t = torch.randn(param.shape, generator=gen).mul_(0.1).add_(1.0)
        else:
            t = torch.randn(param.shape, generator=gen).mul_(0.05)
        state[name] = t
    model.load_state_dict(state, strict=True, assign=True)
    return model


def random_unet(config: UNetConfig, seed: int = 0) -> UNetModel:
    with torch.device("meta"):
        model = UNetModel(config)
    return randomize_(model, seed).eval()


def inputs(config: UNetConfig, batch: int = 2, size: int = 8, tokens: int = 77, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, size, size, generator=gen)
    t = torch.linspace(999.0, 0.0, batch) if batch > 1 else torch.tensor([421.5])
    context = torch.randn(batch, tokens, config.context_dim, generator=gen)
    y = None
    if config.adm_in_channels is not None:
        y = torch.randn(batch, config.adm_in_channels, generator=gen)
    return x, t, context, y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def diffusers_config(cfg: UNetConfig) -> dict:
    """The UNet2DConditionModel config equivalent to `cfg` (written by hand, mirroring
    diffusers' `create_unet_diffusers_config_from_ldm`)."""
    attn = [d > 0 for d in cfg.transformer_depth]
    depths = list(cfg.transformer_depth)
    # diffusers' mid block takes the last level's depth; a level without attention ignores it.
    if depths[-1] == 0:
        depths[-1] = cfg.transformer_depth_middle
    assert depths[-1] == cfg.transformer_depth_middle > 0, "not expressible in diffusers"
    if cfg.num_head_channels == -1:
        heads = cfg.num_heads
    else:
        heads = [cfg.model_channels * m // cfg.num_head_channels for m in cfg.channel_mult]
    return {
        "sample_size": 8,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "cross_attention_dim": cfg.context_dim,
        "attention_head_dim": heads,  # diffusers' name for the number of heads
        "use_linear_projection": cfg.use_linear_in_transformer,
        "transformer_layers_per_block": depths,
        "norm_num_groups": cfg.norm_groups,
        "class_embed_type": "projection" if cfg.adm_in_channels is not None else None,
        "projection_class_embeddings_input_dim": cfg.adm_in_channels,
    }


def diffusers_twin(model: UNetModel):
    """A diffusers UNet sharing `model`'s tensors, converted by diffusers' own code."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = diffusers_config(model.config)
    checkpoint = {UNET_PREFIX + k: v for k, v in model.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(checkpoint, config)
    with torch.device("meta"):
        twin = diffusers.UNet2DConditionModel(**config)
    twin.load_state_dict(converted, strict=True, assign=True)
    return twin.eval()


def check_parity(config: UNetConfig, batch: int = 3) -> float:
    model = random_unet(config)
    twin = diffusers_twin(model)
    x, t, context, y = inputs(config, batch=batch)
    with torch.inference_mode():
        ours = model(x, t, context, y=y)
        ref = twin(x, t, context, class_labels=y).sample
    del model, twin
    gc.collect()
    assert ours.shape == ref.shape == (batch, config.out_channels, 8, 8)
    assert torch.isfinite(ref).all() and ref.abs().max() > 1e-2
    return rel_err(ours, ref)


def transformer_keys(model: UNetModel) -> set[tuple[str, int, int]]:
    """(block kind, block index, transformer index) of every transformer block."""
    keys = set()
    groups = [("input", model.input_blocks), ("middle", [model.middle_block])]
    groups.append(("output", model.output_blocks))
    for kind, blocks in groups:
        for i, block in enumerate(blocks):
            for layer in block:
                if isinstance(layer, SpatialTransformer):
                    keys.update((kind, i, m) for m in range(len(layer.transformer_blocks)))
    return keys


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return random_unet(TINY, seed=3)


@pytest.fixture(scope="module")
def tiny_inputs():
    return inputs(TINY, batch=2, size=8, tokens=7)


def run(model, data, hooks=None):
    x, t, context, y = data
    with torch.inference_mode():
        return model(x, t, context, y=y, hooks=hooks)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "config",
    [SD1_SMALL, SD2_SMALL, replace(SD1_SMALL, in_channels=9), SDXL_SMALL],
    ids=["sd1-small", "sd2-small", "sd1-inpaint-small", "sdxl-like-small"],
)
def test_parity_with_diffusers_small(config):
    assert check_parity(config) <= 1e-4


# ~55 s together on one thread (random init of 860M parameters dominates), peak RSS ~4 GB:
# under the 90 s budget, so part of the default run.
@pytest.mark.parametrize(
    "config",
    [SD1_UNET, SD2_UNET, replace(SD1_UNET, in_channels=9)],
    ids=["sd15", "sd21", "sd15-inpaint"],
)
def test_parity_with_diffusers_full_size(config):
    assert check_parity(config) <= 1e-4


def test_full_size_key_layout():
    with torch.device("meta"):
        sd1 = UNetModel(SD1_UNET).state_dict()
        sd2 = UNetModel(SD2_UNET).state_dict()
    assert len(sd1) == len(sd2) == 686
    assert sum(v.numel() for v in sd1.values()) == 859_520_964
    assert sd1["input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert sd2["input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    assert sd1["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert sd2["middle_block.1.transformer_blocks.0.attn2.to_v.weight"].shape == (1280, 1024)
    assert sd1["output_blocks.2.1.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd1["output_blocks.5.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert sd1["output_blocks.6.0.skip_connection.weight"].shape == (640, 1920, 1, 1)
    assert sd1["out.2.weight"].shape == (4, 320, 3, 3)
    assert "label_emb.0.0.weight" not in sd1


# ----------------------------------------------------------------------------- tiny model


def test_output_shape_and_odd_sizes(tiny):
    for size in (8, 9, 6):
        data = inputs(TINY, batch=2, size=size, tokens=5)
        out = run(tiny, data)
        assert out.shape == (2, 4, size, size)
        assert torch.isfinite(out).all()


def test_scalar_timestep_broadcasts(tiny, tiny_inputs):
    x, _, context, _ = tiny_inputs
    t = torch.tensor([500.0, 500.0])
    assert torch.equal(
        run(tiny, (x, t, context, None)), run(tiny, (x, torch.tensor(500.0), context, None))
    )


def test_bad_inputs_raise(tiny, tiny_inputs):
    x, t, context, _ = tiny_inputs
    with pytest.raises(ValueError, match="x must have shape"):
        run(tiny, (x[:, :3], t, context, None))
    with pytest.raises(ValueError, match="context"):
        run(tiny, (x, t, None, None))
    with pytest.raises(ValueError, match="context"):
        run(tiny, (x, t, context[..., :16], None))
    with pytest.raises(ValueError, match="no label_emb"):
        run(tiny, (x, t, context, torch.zeros(2, 8)))
    with pytest.raises(ValueError, match="timesteps"):
        run(tiny, (x, torch.zeros(3), context, None))
    with pytest.raises(ValueError, match="heads"):
        UNetModel(replace(TINY, num_heads=5))
    with pytest.raises(ValueError, match="transformer_depth"):
        UNetModel(replace(TINY, transformer_depth=(1,)))


def test_no_hooks_and_empty_hooks_are_bit_identical(tiny, tiny_inputs):
    plain = run(tiny, tiny_inputs)
    assert torch.equal(plain, run(tiny, tiny_inputs, UNetHooks()))
    assert torch.equal(plain, run(tiny, tiny_inputs, UNetHooks(control=ControlResiduals())))
    assert torch.equal(plain, run(tiny, tiny_inputs, UNetHooks(options={"sigmas": 1.0})))


def test_identity_patches_are_bit_identical(tiny, tiny_inputs):
    plain = run(tiny, tiny_inputs)
    hooks = UNetHooks(
        attn1_patches=[lambda h, c, v, info: (h, c, v)],
        attn2_patches=[lambda h, c, v, info: (h, c, v)],
        attn1_output_patches=[lambda out, info: out],
        attn2_output_patches=[lambda out, info: out],
        input_block_patches=[lambda h, block: h],
        middle_block_patches=[lambda h, block: h],
        output_block_patches=[lambda h, skip, block: (h, skip)],
    )
    assert torch.equal(plain, run(tiny, tiny_inputs, hooks))


def test_attention_replace_reimplementing_sdpa(tiny, tiny_inputs):
    calls = []

    def sdpa(q, k, v, info: AttentionInfo):
        calls.append(
            (info.block.kind, info.block.index, info.transformer_index, info.self_attention)
        )
        assert info.options == {"cond_or_uncond": [0, 1]}
        b, n, inner = q.shape
        d = inner // info.heads
        q, k, v = (t.reshape(b, -1, info.heads, d).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, n, inner)

    def manual(q, k, v, info: AttentionInfo):
        b, n, inner = q.shape
        d = inner // info.heads
        q, k, v = (t.reshape(b, -1, info.heads, d).transpose(1, 2) for t in (q, k, v))
        weights = (q @ k.transpose(-1, -2) * d**-0.5).softmax(dim=-1)
        return (weights @ v).transpose(1, 2).reshape(b, n, inner)

    keys = transformer_keys(tiny)
    assert {k[0] for k in keys} == {"input", "middle", "output"}
    plain = run(tiny, tiny_inputs)
    options = {"cond_or_uncond": [0, 1]}
    hooks = UNetHooks(
        attn1_replace=dict.fromkeys(keys, sdpa),
        attn2_replace=dict.fromkeys(keys, sdpa),
        options=options,
    )
    assert torch.equal(plain, run(tiny, tiny_inputs, hooks))
    assert sorted(calls) == sorted([(*k, s) for k in keys for s in (True, False)])

    hooks = UNetHooks(
        attn1_replace=dict.fromkeys(keys, manual), attn2_replace=dict.fromkeys(keys, manual)
    )
    assert rel_err(run(tiny, tiny_inputs, hooks), plain) < 1e-5

    # Replacing a single cross-attention by zeros changes the output: the key is honoured.
    hooks = UNetHooks(attn2_replace={("middle", 0, 0): lambda q, k, v, info: torch.zeros_like(q)})
    assert rel_err(run(tiny, tiny_inputs, hooks), plain) > 1e-3


def test_attention_input_patches(tiny, tiny_inputs):
    x, t, context, y = tiny_inputs
    plain = run(tiny, tiny_inputs)
    seen = []

    def double_context(h, c, v, info):
        assert not info.self_attention and c.shape == v.shape == context.shape
        seen.append(info.block)
        return h, 2 * c, 2 * v

    # attn2 is the only consumer of the context, so doubling it there == doubling the input.
    patched = run(tiny, tiny_inputs, UNetHooks(attn2_patches=[double_context]))
    assert torch.allclose(patched, run(tiny, (x, t, 2 * context, y)), rtol=0, atol=1e-6)
    assert BlockId("middle", 0) in seen and BlockId("input", 1) in seen

    def self_patch(h, c, v, info):
        assert info.self_attention and c is h and v is h  # self-attention: context = value = h
        return h, c, torch.zeros_like(v)

    assert rel_err(run(tiny, tiny_inputs, UNetHooks(attn1_patches=[self_patch])), plain) > 1e-3


def test_attention_output_patches(tiny, tiny_inputs):
    plain = run(tiny, tiny_inputs)
    for name, hooks in [
        ("attn1", UNetHooks(attn1_output_patches=[lambda out, info: out * 0])),
        ("attn2", UNetHooks(attn2_output_patches=[lambda out, info: out * 0])),
    ]:
        # Zeroing the output == a model whose to_out layer is zero.
        zeroed = copy.deepcopy(tiny)
        for module_name, module in zeroed.named_modules():
            if module_name.endswith(f"{name}.to_out.0"):
                torch.nn.init.zeros_(module.weight)
                torch.nn.init.zeros_(module.bias)
        expected = run(zeroed, tiny_inputs)
        assert rel_err(expected, plain) > 1e-3
        assert torch.allclose(run(tiny, tiny_inputs, hooks), expected, rtol=0, atol=1e-6)


def test_block_patches_order_ids_and_shapes(tiny, tiny_inputs):
    calls = []

    def on_input(h, block):
        calls.append((block, tuple(h.shape)))
        return h

    def on_middle(h, block):
        calls.append((block, tuple(h.shape)))
        return h

    def on_output(h, skip, block):
        assert h.shape[0] == skip.shape[0] and h.shape[-2:] == skip.shape[-2:]
        calls.append((block, tuple(skip.shape)))
        return h, skip

    hooks = UNetHooks(
        input_block_patches=[on_input],
        middle_block_patches=[on_middle],
        output_block_patches=[on_output],
    )
    run(tiny, tiny_inputs, hooks)
    n_in, n_out = len(tiny.input_blocks), len(tiny.output_blocks)
    expected_ids = [BlockId("input", i) for i in range(n_in)] + [BlockId("middle", 0)]
    expected_ids += [BlockId("output", j) for j in range(n_out)]
    assert [c[0] for c in calls] == expected_ids
    input_shapes = [c[1] for c in calls[:n_in]]
    skip_shapes = [c[1] for c in calls[n_in + 1 :]]
    assert skip_shapes == input_shapes[::-1]  # output block j sees the skip of input n-1-j

    plain = run(tiny, tiny_inputs)
    changed = UNetHooks(output_block_patches=[lambda h, skip, block: (h * 1.5, skip)])
    assert rel_err(run(tiny, tiny_inputs, changed), plain) > 1e-3


def _skip_shapes(model, data):
    shapes = []

    def record(h, block):
        shapes.append(h.shape)
        return h

    run(model, data, UNetHooks(input_block_patches=[record]))
    return shapes


def test_control_residuals(tiny, tiny_inputs):
    plain = run(tiny, tiny_inputs)
    shapes = _skip_shapes(tiny, tiny_inputs)
    n = len(shapes)
    middle_shape = shapes[-1]
    zeros = ControlResiduals(
        input=[torch.zeros(s) for s in shapes],
        middle=[torch.zeros(middle_shape)],
        output=[torch.zeros(s) for s in shapes],
    )
    assert torch.equal(plain, run(tiny, tiny_inputs, UNetHooks(control=zeros)))

    gen = torch.Generator().manual_seed(5)
    for i in (0, 2, n - 1):
        r = torch.randn(shapes[i], generator=gen)
        residuals = [None] * n
        residuals[i] = r

        def add_to_skip(h, skip, block, i=i, r=r):
            return (h, skip + r) if block.index == n - 1 - i else (h, skip)

        out = run(tiny, tiny_inputs, UNetHooks(control=ControlResiduals(output=residuals)))
        assert rel_err(out, plain) > 1e-4
        expected = run(tiny, tiny_inputs, UNetHooks(output_block_patches=[add_to_skip]))
        assert torch.equal(out, expected)

        def add_to_input(h, block, i=i, r=r):
            return h + r if block.index == i else h

        out = run(tiny, tiny_inputs, UNetHooks(control=ControlResiduals(input=residuals)))
        assert rel_err(out, plain) > 1e-4
        assert torch.equal(
            out, run(tiny, tiny_inputs, UNetHooks(input_block_patches=[add_to_input]))
        )

    r = torch.randn(middle_shape, generator=gen)
    out = run(tiny, tiny_inputs, UNetHooks(control=ControlResiduals(middle=[r])))
    assert rel_err(out, plain) > 1e-4
    assert torch.equal(
        out, run(tiny, tiny_inputs, UNetHooks(middle_block_patches=[lambda h, b: h + r]))
    )

    with pytest.raises(ValueError, match="per input block"):
        run(tiny, tiny_inputs, UNetHooks(control=ControlResiduals(output=[None] * (n - 1))))


def test_meta_construction_then_assign_reproduces_outputs(tiny_inputs):
    torch.manual_seed(7)
    original = UNetModel(TINY).eval()  # ordinary init on CPU
    with torch.device("meta"):
        rebuilt = UNetModel(TINY)
    assert all(p.is_meta for p in rebuilt.parameters())
    rebuilt.load_state_dict(original.state_dict(), strict=True, assign=True)
    assert not any(p.is_meta for p in rebuilt.parameters())
    assert torch.equal(run(rebuilt.eval(), tiny_inputs), run(original, tiny_inputs))
    assert 10_000 < sum(p.numel() for p in original.parameters()) < 1_000_000


def test_sdxl_label_emb_path():
    config = replace(
        TINY,
        adm_in_channels=16,
        num_heads=-1,
        num_head_channels=8,
        use_linear_in_transformer=True,
        transformer_depth=(0, 2),
        transformer_depth_middle=3,
    )
    model = random_unet(config, seed=4)
    sd = model.state_dict()
    assert sd["label_emb.0.0.weight"].shape == (64, 16)
    assert sd["label_emb.0.2.weight"].shape == (64, 64)
    assert "input_blocks.1.1.proj_in.weight" not in sd  # level 0 has no attention
    assert sd["input_blocks.4.1.proj_in.weight"].shape == (32, 32)
    assert "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight" in sd
    assert "middle_block.1.transformer_blocks.2.ff.net.2.weight" in sd
    x, t, context, y = inputs(config, batch=2, tokens=5)
    out = run(model, (x, t, context, y))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert rel_err(run(model, (x, t, context, 2 * y)), out) > 1e-3
    with pytest.raises(ValueError, match="y must have shape"):
        run(model, (x, t, context, None))


def test_reduced_precision_dtype(tiny, tiny_inputs):
    model = copy.deepcopy(tiny).to(torch.bfloat16)
    out = run(model, tiny_inputs)  # fp32 inputs are cast; output comes back in x's dtype
    assert out.dtype == torch.float32
    assert rel_err(out, run(tiny, tiny_inputs)) < 0.1


def test_no_transformer_config_runs_without_context():
    config = replace(TINY, transformer_depth=(0, 0), transformer_depth_middle=-1)
    model = random_unet(config)
    assert not any(isinstance(m, SpatialTransformer) for m in model.modules())
    x, t, _, _ = inputs(config)
    assert run(model, (x, t, None, None)).shape == x.shape


def test_bench_train_step_times_the_demo_unet_against_its_diffusers_twin(capsys):
    """bench/bench_train_step.py: both networks agree on the batch and both are timed."""
    pytest.importorskip("diffusers")
    from bench import bench_train_step

    threads = torch.get_num_threads()
    try:
        result = bench_train_step.main(["--batch", "2", "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    # main() exits before timing if the two networks disagree on the batch
    assert result["ours"] > 0 and result["diffusers"] > 0
    out = capsys.readouterr().out
    err = float(out.split("max |ours - diffusers| on the batch: ")[1].split()[0])
    assert err <= 1e-4 and "ratio ours/diffusers" in out
