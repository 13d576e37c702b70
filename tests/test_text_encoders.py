"""TextEncoder: parity with diffusers' single-file CLIP converters, key layouts, errors.

diffusers is a test-only reference here. Random weights are scaled so attention is far from
uniform and every layer changes the residual stream, so a wrong q/k/v split, a missing
transpose or an off-by-one layer shows up as an O(1) difference.
"""

from __future__ import annotations

import dataclasses
import gc
import math

import pytest
import torch
import torch.nn.functional as F

from ldm_core.config import CLIP_L, OPEN_CLIP_H, TextEncoderConfig, TextEncoderKind
from ldm_core.nn.text_encoders import TextEncoder
from ldm_core.tokenizer import BOS_ID, EOS_ID, tokenize_ids

PROMPTS = ["a photo of a cat, highly detailed", "an oil painting of a lighthouse at dusk!"]
SD1_PREFIX = "cond_stage_model.transformer."
SD2_PREFIX = "cond_stage_model.model."

TINY_HF = dataclasses.replace(
    CLIP_L, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=2
)
TINY_OPEN_CLIP = dataclasses.replace(
    OPEN_CLIP_H, hidden_size=32, intermediate_size=128, num_layers=3, num_heads=2, projection_dim=24
)
# Reduced width, real depth: diffusers drops resblock 23 by name, so SD2 needs 24 layers.
SMALL_HF = dataclasses.replace(CLIP_L, hidden_size=64, intermediate_size=256, num_heads=4)
SMALL_OPEN_CLIP = dataclasses.replace(
    OPEN_CLIP_H, hidden_size=64, intermediate_size=256, num_heads=4, projection_dim=48
)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def token_ids(pad_id: int, prompts: list[str] = PROMPTS) -> torch.Tensor:
    rows = []
    for prompt in prompts:
        ids = [BOS_ID, *tokenize_ids(prompt), EOS_ID]
        rows.append(ids + [pad_id] * (77 - len(ids)))
    return torch.tensor(rows)


# -- random weights in the original layouts ---------------------------------------------------


def _param(gen: torch.Generator, shape: tuple[int, ...], kind: str) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen)
    if kind == "norm_weight":
        return 1.0 + 0.2 * noise
    if kind == "bias":
        return 0.1 * noise
    if kind == "embedding":
        return 0.5 * noise
    # Linear weight [out, in]; 1.5x the unit-variance scale gives peaked attention.
    return noise * (1.5 / math.sqrt(shape[-1]))


def random_hf_sd(cfg: TextEncoderConfig, seed: int = 1, layout: str = "text_model.") -> dict:
    gen = torch.Generator().manual_seed(seed)
    w, inner = cfg.hidden_size, cfg.intermediate_size
    sd = {
        "embeddings.token_embedding.weight": _param(gen, (cfg.vocab_size, w), "embedding"),
        "embeddings.position_embedding.weight": _param(gen, (cfg.max_positions, w), "embedding"),
        # Some SD1 files store position_ids, occasionally as float; the value is ignored.
        "embeddings.position_ids": torch.arange(cfg.max_positions, dtype=torch.float32)[None],
    }
    for i in range(cfg.num_layers):
        p = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{p}self_attn.{name}.weight"] = _param(gen, (w, w), "weight")
            sd[f"{p}self_attn.{name}.bias"] = _param(gen, (w,), "bias")
        for name in ("layer_norm1", "layer_norm2"):
            sd[f"{p}{name}.weight"] = _param(gen, (w,), "norm_weight")
            sd[f"{p}{name}.bias"] = _param(gen, (w,), "bias")
        sd[f"{p}mlp.fc1.weight"] = _param(gen, (inner, w), "weight")
        sd[f"{p}mlp.fc1.bias"] = _param(gen, (inner,), "bias")
        sd[f"{p}mlp.fc2.weight"] = _param(gen, (w, inner), "weight")
        sd[f"{p}mlp.fc2.bias"] = _param(gen, (w,), "bias")
    sd["final_layer_norm.weight"] = _param(gen, (w,), "norm_weight")
    sd["final_layer_norm.bias"] = _param(gen, (w,), "bias")
    sd = {layout + k: v for k, v in sd.items()}
    if cfg.projection_dim is not None:
        sd["text_projection.weight"] = _param(gen, (cfg.projection_dim, w), "weight")
    return sd


def random_open_clip_sd(cfg: TextEncoderConfig, seed: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    w, inner = cfg.hidden_size, cfg.intermediate_size
    sd = {
        "token_embedding.weight": _param(gen, (cfg.vocab_size, w), "embedding"),
        "positional_embedding": _param(gen, (cfg.max_positions, w), "embedding"),
    }
    for i in range(cfg.num_layers):
        p = f"transformer.resblocks.{i}."
        sd[p + "attn.in_proj_weight"] = _param(gen, (3 * w, w), "weight")
        sd[p + "attn.in_proj_bias"] = _param(gen, (3 * w,), "bias")
        sd[p + "attn.out_proj.weight"] = _param(gen, (w, w), "weight")
        sd[p + "attn.out_proj.bias"] = _param(gen, (w,), "bias")
        for name in ("ln_1", "ln_2"):
            sd[f"{p}{name}.weight"] = _param(gen, (w,), "norm_weight")
            sd[f"{p}{name}.bias"] = _param(gen, (w,), "bias")
        sd[p + "mlp.c_fc.weight"] = _param(gen, (inner, w), "weight")
        sd[p + "mlp.c_fc.bias"] = _param(gen, (inner,), "bias")
        sd[p + "mlp.c_proj.weight"] = _param(gen, (w, inner), "weight")
        sd[p + "mlp.c_proj.bias"] = _param(gen, (w,), "bias")
    sd["ln_final.weight"] = _param(gen, (w,), "norm_weight")
    sd["ln_final.bias"] = _param(gen, (w,), "bias")
    sd["text_projection"] = _param(gen, (cfg.projection_dim, w), "weight").T.contiguous()  # [W, E]
    sd["logit_scale"] = torch.tensor(math.log(100.0))
    return sd


def open_clip_reference(sd: dict, ids: torch.Tensor, heads: int):
    """OpenCLIP's text tower written with torch's fused-in_proj attention (as open_clip runs it).

    Returns (hidden states after every resblock, ln_final of the last one, pooled @ projection).
    """
    w = sd["ln_final.weight"].shape[0]
    length = ids.shape[1]
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][:length]  # [B, T, W]
    mask = torch.full((length, length), float("-inf")).triu(1)
    states = []
    for i in range(len([k for k in sd if k.endswith("attn.in_proj_weight")])):
        p = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"]).transpose(0, 1)
        a, _ = F.multi_head_attention_forward(
            h, h, h, w, heads,
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"],
            None, None, False, 0.0,
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"],
            training=False, attn_mask=mask, need_weights=False,
        )  # fmt: skip
        x = x + a.transpose(0, 1)
        h = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])),
                     sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])  # fmt: skip
        x = x + h
        states.append(x)
    final = F.layer_norm(x, (w,), sd["ln_final.weight"], sd["ln_final.bias"])
    pooled = final[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]
    return states, final, pooled


# -- diffusers reference -------------------------------------------------------------------------


def diffusers_clip(checkpoint: dict, cfg: TextEncoderConfig, num_layers: int, tmp_path):
    """transformers CLIPTextModel loaded by diffusers' single-file code, offline."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextConfig, CLIPTextModel

    CLIPTextConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        projection_dim=cfg.projection_dim or cfg.hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions,
        hidden_act=cfg.hidden_act,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=cfg.pad_token_id,
    ).save_pretrained(tmp_path)
    model = create_diffusers_clip_model_from_ldm(
        CLIPTextModel,
        checkpoint,
        config=str(tmp_path),
        local_files_only=True,
        torch_dtype=torch.float32,
    )
    assert not any(p.is_meta for p in model.parameters()), "diffusers left weights unloaded"
    return model


def check_sd1_parity(cfg: TextEncoderConfig, tmp_path) -> None:
    sd = random_hf_sd(cfg)
    ref = diffusers_clip({SD1_PREFIX + k: v for k, v in sd.items()}, cfg, cfg.num_layers, tmp_path)
    ours = TextEncoder.from_state_dict(cfg, sd, source="sd1.safetensors")
    ids = token_ids(cfg.pad_token_id)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hs = out.hidden_states
        cases = [
            (ours(ids), out.last_hidden_state),
            (ours(ids, clip_skip=2), ref.final_layer_norm(hs[-2])),
            (ours.pooled(ids), out.pooler_output),
        ]
        for got, want in cases:
            assert got.shape == want.shape
            assert rel_err(got, want) <= 1e-4
        # The comparison is meaningful: neighbouring layers differ at O(1).
        assert rel_err(ref.final_layer_norm(hs[-2]), out.last_hidden_state) > 0.1


def check_sd2_parity(cfg: TextEncoderConfig, tmp_path) -> None:
    sd = random_open_clip_sd(cfg)
    # diffusers builds SD2's ViT-H with 23 layers (it drops resblock 23, used by nothing).
    ref = diffusers_clip({SD2_PREFIX + k: v for k, v in sd.items()}, cfg, 23, tmp_path)
    ours = TextEncoder.from_state_dict(cfg, sd, source="sd2.safetensors")
    assert ours.config.num_layers == 24
    ids = token_ids(cfg.pad_token_id)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        hs = out.hidden_states
        context, ours_pooled = ours.encode(ids)  # clip skip 1 = penultimate + ln_final on SD2
        assert rel_err(context, out.last_hidden_state) <= 1e-4
        assert rel_err(ours(ids, clip_skip=2), ref.final_layer_norm(hs[-2])) <= 1e-4
        assert rel_err(ref.final_layer_norm(hs[-2]), out.last_hidden_state) > 0.1
        # The last layer, which diffusers drops, against OpenCLIP's own fused attention.
        states, final, pooled = open_clip_reference(sd, ids, cfg.num_heads)
        assert rel_err(states[22], hs[-1]) <= 1e-4
        assert rel_err(ours._core.final_layer_norm(ours._run(ids, 24)[0]), final) <= 1e-4
        assert rel_err(ours_pooled, pooled) <= 1e-4


def test_sd1_parity_reduced_width(tmp_path):
    check_sd1_parity(SMALL_HF, tmp_path)


def test_sd2_parity_reduced_width(tmp_path):
    check_sd2_parity(SMALL_OPEN_CLIP, tmp_path)


def test_sd1_parity_full_clip_l(tmp_path):
    check_sd1_parity(CLIP_L, tmp_path)
    gc.collect()


def test_sd2_parity_full_vit_h(tmp_path):
    check_sd2_parity(OPEN_CLIP_H, tmp_path)
    gc.collect()


# -- layouts, round trips, errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("cfg", "make_sd"), [(TINY_HF, random_hf_sd), (TINY_OPEN_CLIP, random_open_clip_sd)]
)
def test_save_load_round_trip(cfg, make_sd):
    sd = make_sd(cfg)
    model = TextEncoder.from_state_dict(cfg, sd)
    saved = model.to_original_state_dict()
    ignored = {"text_model.embeddings.position_ids", "logit_scale"}
    assert set(saved) == set(sd) - ignored
    assert all(torch.equal(saved[k], sd[k]) for k in saved)
    reloaded = TextEncoder.from_state_dict(cfg, saved)
    ids = token_ids(cfg.pad_token_id)
    with torch.no_grad():
        assert torch.equal(model(ids), reloaded(ids))
        assert torch.equal(model(ids, clip_skip=2), reloaded(ids, clip_skip=2))
        assert torch.equal(model.pooled(ids), reloaded.pooled(ids))


def test_old_sd1_layout_without_text_model_prefix():
    modern = random_hf_sd(TINY_HF)
    old = {k.removeprefix("text_model."): v for k, v in modern.items()}
    assert not any(k.startswith("text_model.") for k in old)
    ids = token_ids(49407)
    with torch.no_grad():
        a = TextEncoder.from_state_dict(TINY_HF, modern)(ids)
        b = TextEncoder.from_state_dict(TINY_HF, old)(ids)
    assert torch.equal(a, b)


def test_loaded_on_meta_then_assigned_and_cast():
    sd = random_open_clip_sd(TINY_OPEN_CLIP)
    model = TextEncoder.from_state_dict(TINY_OPEN_CLIP, sd, dtype=torch.bfloat16)
    tensors = list(model.parameters()) + list(model.buffers())
    assert not any(t.is_meta for t in tensors)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    position_ids = model._core.embeddings.position_ids
    assert position_ids.dtype == torch.long and torch.equal(position_ids[0], torch.arange(77))
    with torch.no_grad():
        assert model(token_ids(0)).dtype == torch.bfloat16
    assert not model.training


def test_tiny_demo_size_with_real_vocab():
    with torch.device("meta"):
        model = TextEncoder(TINY_HF)
    assert next(model.parameters()).is_meta
    model.load_original_state_dict(random_hf_sd(TINY_HF), source="demo")
    ids = token_ids(model.pad_token_id)
    with torch.no_grad():
        context, pooled = model.encode(ids)
    assert context.shape == (2, 77, 32) and pooled.shape == (2, 32)
    assert model.hidden_size == 32
    assert torch.isfinite(context).all()


def test_clip_skip_range():
    model = TextEncoder.from_state_dict(TINY_HF, random_hf_sd(TINY_HF))
    ids = token_ids(49407)
    with torch.no_grad():
        assert model(ids, clip_skip=3).shape == (2, 77, 32)  # after layer 1 of 3
        for bad in (0, 4):
            with pytest.raises(ValueError, match="clip_skip"):
                model(ids, clip_skip=bad)
        context, pooled = model.encode(ids, clip_skip=2)
        assert torch.equal(context, model(ids, clip_skip=2))
        assert torch.equal(pooled, model.pooled(ids))


def test_pad_ids_and_pooling_at_first_eos():
    hf = TextEncoder.from_state_dict(TINY_HF, random_hf_sd(TINY_HF))
    oc = TextEncoder.from_state_dict(TINY_OPEN_CLIP, random_open_clip_sd(TINY_OPEN_CLIP))
    assert (hf.pad_token_id, oc.pad_token_id) == (49407, 0)
    eos_at = len(tokenize_ids(PROMPTS[0])) + 1
    for model in (hf, oc):
        with torch.no_grad():
            a, b = token_ids(49407), token_ids(0)
            # Causal attention: nothing after the first EOS reaches it, whatever the padding.
            assert torch.equal(model.pooled(a), model.pooled(b))
            assert torch.equal(model(a)[0, : eos_at + 1], model(b)[0, : eos_at + 1])
            assert not torch.equal(model(a)[0, eos_at + 1 :], model(b)[0, eos_at + 1 :])
            with pytest.raises(ValueError, match="EOS"):
                model.pooled(torch.full((1, 77), 320))


def test_mis_shaped_key_named_with_source():
    sd = random_open_clip_sd(TINY_OPEN_CLIP)
    sd["transformer.resblocks.1.attn.in_proj_weight"] = torch.zeros(3 * 32, 31)
    with pytest.raises(ValueError) as info:
        TextEncoder.from_state_dict(TINY_OPEN_CLIP, sd, source="models/v2.safetensors")
    message = str(info.value)
    assert "models/v2.safetensors" in message
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in message
    assert "(96, 31) (expected (96, 32))" in message


def test_missing_and_unexpected_keys_listed():
    sd = random_hf_sd(TINY_HF)
    del sd["text_model.encoder.layers.2.mlp.fc1.bias"]
    sd["text_model.encoder.layers.3.mlp.fc1.bias"] = torch.zeros(64)
    with pytest.raises(ValueError) as info:
        TextEncoder.from_state_dict(TINY_HF, sd, source="sd15.ckpt")
    message = str(info.value)
    assert "sd15.ckpt" in message
    assert (
        "1 missing: cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.bias"
        in message
    )
    assert (
        "1 unexpected: cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.bias"
        in message
    )


def test_wrong_layout_lists_counts_and_truncates():
    sd = random_hf_sd(TINY_HF)
    with pytest.raises(ValueError) as info:
        TextEncoder.from_state_dict(TINY_OPEN_CLIP, sd, source="x.safetensors")
    message = str(info.value)
    n_open_clip = len(random_open_clip_sd(TINY_OPEN_CLIP)) - 1  # minus logit_scale
    assert f"{n_open_clip} missing" in message
    assert f"{len(sd)} unexpected" in message  # position_ids is not ignored here
    assert message.count("...") == 2


def test_projection_follows_config():
    with_proj = random_hf_sd(dataclasses.replace(TINY_HF, projection_dim=16))
    with pytest.raises(ValueError, match="1 unexpected: .*text_projection.weight"):
        TextEncoder.from_state_dict(TINY_HF, with_proj)
    cfg = dataclasses.replace(TINY_HF, projection_dim=16)
    model = TextEncoder.from_state_dict(cfg, with_proj)
    with torch.no_grad():
        assert model.pooled(token_ids(49407)).shape == (2, 16)
    sd = random_open_clip_sd(TINY_OPEN_CLIP)
    del sd["text_projection"]
    with pytest.raises(ValueError, match="1 missing: .*text_projection"):
        TextEncoder.from_state_dict(TINY_OPEN_CLIP, sd)
    assert TINY_OPEN_CLIP.kind is TextEncoderKind.OPEN_CLIP


@pytest.mark.parametrize(
    ("cfg", "make_sd"), [(TINY_HF, random_hf_sd), (TINY_OPEN_CLIP, random_open_clip_sd)]
)
def test_forward_embeds_equals_forward(cfg, make_sd):
    model = TextEncoder.from_state_dict(cfg, make_sd(cfg))
    ids = token_ids(cfg.pad_token_id)
    with torch.no_grad():
        embeds = model.token_embeddings(ids)
        assert embeds.shape == (2, 77, cfg.hidden_size)
        for clip_skip in (1, 2):
            assert torch.equal(model.forward_embeds(embeds, clip_skip), model(ids, clip_skip))
        changed = embeds.clone()
        changed[0, 3] += 1.0  # a replaced row (textual inversion) changes that row onwards only
        out, ref = model.forward_embeds(changed), model(ids)
        assert torch.equal(out[0, :3], ref[0, :3]) and not torch.equal(out[0, 3:], ref[0, 3:])
        assert torch.equal(out[1], ref[1])
