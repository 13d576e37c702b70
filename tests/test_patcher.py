"""Patcher invariants: restore is bit-identical, clones are isolated, patches compose in order."""

from __future__ import annotations

import pytest
import torch

import ldm_core
from ldm_core.patcher import ModelHandle, WeightPatch
from ldm_core.schedules import ModelSampling
from tests.tiny import write_tiny


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tinyp") / "tiny.safetensors"
    write_tiny(path)
    return ldm_core.load_checkpoint(path, device="cpu")


def _handle(ckpt) -> ModelHandle:
    return ModelHandle(ckpt, ModelSampling.from_spec(ckpt.spec))


def _unet_out(handle: ModelHandle, hooks=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 64, generator=g)
    with torch.no_grad():
        return handle.unet(x, torch.tensor([10.0, 700.0]), context=ctx, hooks=hooks)


def test_weight_patch_then_restore_is_bit_identical(ckpt):
    handle = _handle(ckpt)
    before = {k: v.clone() for k, v in ckpt.unet.state_dict().items()}
    key = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    low_a, low_b = torch.randn(4, 64), torch.randn(32, 4)
    handle.add_weight_patch(key, WeightPatch(lambda w: low_b @ low_a / 3, strength=0.7))
    handle.add_weight_patch("out.2.bias", WeightPatch(lambda w: torch.ones_like(w), strength=0.1))
    plain = _unet_out(handle)
    with handle.weights_patched():
        w = ckpt.unet.state_dict()[key]
        assert torch.allclose(w, before[key] + 0.7 * (low_b @ low_a / 3), atol=1e-6)
        patched = _unet_out(handle)
    assert not torch.equal(plain, patched)
    for k, v in ckpt.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.equal(_unet_out(handle), plain)


def test_weights_restored_even_when_generation_fails(ckpt):
    handle = _handle(ckpt)
    before = ckpt.unet.out[2].bias.clone()
    handle.add_weight_patch("out.2.bias", WeightPatch(lambda w: torch.ones_like(w)))
    with pytest.raises(RuntimeError), handle.weights_patched():
        raise RuntimeError("boom")
    assert torch.equal(ckpt.unet.out[2].bias, before)


def test_misshaped_delta_is_named(ckpt):
    handle = _handle(ckpt)
    handle.add_weight_patch(
        "out.2.bias", WeightPatch(lambda w: torch.ones(3), source="bad.safetensors")
    )
    before = ckpt.unet.out[2].bias.clone()
    with pytest.raises(ValueError, match=r"bad.safetensors.*out.2.bias"), handle.weights_patched():
        pass
    assert torch.equal(ckpt.unet.out[2].bias, before)


def test_unknown_weight_name_fails_early(ckpt):
    with pytest.raises(KeyError, match="no parameter"):
        _handle(ckpt).add_weight_patch("nope.weight", WeightPatch(lambda w: w))


def test_clone_patches_never_reach_parent(ckpt):
    parent = _handle(ckpt)
    parent.add_post_cfg_function(lambda a: a.denoised)
    child = parent.clone()
    child.add_post_cfg_function(lambda a: a.denoised)
    child.set_cfg_function(lambda a: a.cond_denoised)
    child.add_attention_patch(lambda h, c, v, i: (h, c, v), self_attention=True)
    child.add_weight_patch("out.2.bias", WeightPatch(lambda w: torch.ones_like(w)))
    child.set_attention_replace(lambda q, k, v, i: q, "input", 1, self_attention=False)
    assert len(parent.patches.post_cfg) == 1 and len(child.patches.post_cfg) == 2
    assert parent.patches.cfg_function is None and not parent.patches.attn1_patches
    assert not parent.patches.weight_patches and not parent.patches.attn2_replace
    assert child.unet is parent.unet  # weights are shared, not copied


def test_two_extensions_compose_in_order(ckpt):
    base = _handle(ckpt)
    seen = []

    def ext_a(h, c, v, info):
        seen.append(("a", info.block.kind, info.transformer_index))
        return h * 2, c, v

    def ext_b(h, c, v, info):
        seen.append(("b", info.block.kind, info.transformer_index))
        return h + 1, c, v

    first = base.clone()
    first.add_attention_patch(ext_a, self_attention=True)
    second = first.clone()
    second.add_attention_patch(ext_b, self_attention=True)
    _unet_out(second, second.patches.unet_hooks())
    # inherited patch first, then the clone's own, at every self-attention layer
    assert seen[:2] == [("a", "input", 0), ("b", "input", 0)]
    assert [s[0] for s in seen] == ["a", "b"] * (len(seen) // 2)
    ab = _unet_out(second, second.patches.unet_hooks())
    swapped = base.clone()
    swapped.add_attention_patch(ext_b, self_attention=True)
    swapped.add_attention_patch(ext_a, self_attention=True)
    ba = _unet_out(swapped, swapped.patches.unet_hooks())
    assert not torch.equal(ab, ba)  # (2h)+1 != 2(h+1): the order is observable and defined
