"""Infer a checkpoint's family and network configs from its keys and shapes (never its name).

Every rule reads the original single-file layout (ldm-formats.md §1.6): the UNet under
`model.diffusion_model.`, the VAE under `first_stage_model.`, the text encoder under
`cond_stage_model.transformer.` (SD1, transformers CLIP layout) or `cond_stage_model.model.`
(SD2, OpenCLIP layout). Smaller configurations of the same families are inferred the same way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping

import torch

from ldm_core.config import (
    Family,
    ModelSpec,
    Prediction,
    TextEncoderConfig,
    TextEncoderKind,
    UNetConfig,
    VAEConfig,
)
from ldm_core.weights import CheckpointError

Shapes = Mapping[str, tuple[int, ...]]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SD_SCALE_FACTOR = 0.18215


def _count(shapes: Shapes, pattern: str) -> int:
    """Number of distinct integers N for which some key matches `pattern` with {N}."""
    rx = re.compile(re.escape(pattern).replace(r"\{N\}", r"(\d+)"))
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def describe_foreign_file(shapes: Shapes) -> str | None:
    """If the keys belong to something other than a full checkpoint, say what it is."""
    keys = list(shapes)
    if any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys) or any(
        (
            ".lora_down." in k
            or ".lora_up." in k
            or ".lora_A." in k
            or ".hada_w1_a" in k
            or ".lokr_w1" in k
        )
        for k in keys
    ):
        return "this is a LoRA/LyCORIS file, not a checkpoint: put it in models/Lora"
    if any(k.startswith("control_model.") for k in keys) or "input_hint_block.0.weight" in shapes:
        return "this is a ControlNet model, not a checkpoint: put it in models/ControlNet"
    if any(k in shapes for k in ("string_to_param.*", "emb_params", "clip_l", "clip_g")) or (
        len(keys) <= 2 and all(len(s) in (1, 2) for s in shapes.values())
    ):
        return "this looks like a textual-inversion embedding: put it in models/embeddings"
    if not any(k.startswith(UNET_PREFIX) for k in keys) and (
        "encoder.conv_in.weight" in shapes
        or "first_stage_model.encoder.conv_in.weight" in shapes
        or "decoder.up_blocks.0.resnets.0.norm1.weight" in shapes
    ):
        return "this is a VAE file, not a checkpoint: put it in models/VAE"
    if any(k.startswith("down_blocks.") or k.startswith("unet.") for k in keys):
        return "this is a diffusers-format model part; single-file original-format checkpoints are expected"
    return None


def detect_unet_config(shapes: Shapes, prefix: str = UNET_PREFIX) -> UNetConfig:
    p = prefix
    conv_in = shapes.get(f"{p}input_blocks.0.0.weight")
    if conv_in is None:
        raise ValueError(f"no UNet found (missing {p}input_blocks.0.0.weight)")
    model_channels, in_channels = conv_in[0], conv_in[1]
    out_channels = shapes.get(f"{p}out.2.weight", (4,))[0]

    channel_mult: list[int] = []
    res_per_level: list[int] = []
    depth_per_level: list[int] = []
    context_dim = None
    linear = None
    n, res_in_level, depth_in_level = 1, 0, None
    while True:
        block = f"{p}input_blocks.{n}."
        if f"{block}0.op.weight" in shapes:  # downsample closes a level
            res_per_level.append(res_in_level)
            depth_per_level.append(depth_in_level or 0)
            res_in_level, depth_in_level = 0, None
        elif f"{block}0.in_layers.0.weight" in shapes:
            out_ch = shapes[f"{block}0.out_layers.3.weight"][0]
            if res_in_level == 0:
                channel_mult.append(out_ch // model_channels)
            res_in_level += 1
            depth = _count(shapes, f"{block}1.transformer_blocks.{{N}}.")
            if depth_in_level is None:
                depth_in_level = depth
            elif depth != depth_in_level:
                raise ValueError(
                    f"input block {n}: transformer depth {depth} differs within its level"
                )
            if depth and context_dim is None:
                context_dim = shapes[f"{block}1.transformer_blocks.0.attn2.to_k.weight"][1]
                linear = len(shapes[f"{block}1.proj_in.weight"]) == 2
        else:
            break
        n += 1
    res_per_level.append(res_in_level)
    depth_per_level.append(depth_in_level or 0)
    if len(set(res_per_level)) != 1 or len(channel_mult) != len(res_per_level):
        raise ValueError(f"irregular UNet: residual blocks per level {res_per_level}")

    middle_depth = _count(shapes, f"{p}middle_block.1.transformer_blocks.{{N}}.")
    if middle_depth == 0:
        middle_depth = -1
    elif context_dim is None:
        context_dim = shapes[f"{p}middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1]
        linear = len(shapes[f"{p}middle_block.1.proj_in.weight"]) == 2
    if context_dim is None:
        raise ValueError("UNet has no cross-attention layers")

    adm = shapes.get(f"{p}label_emb.0.0.weight")
    # Head counts leave no trace in weight shapes: the families fix them. Conv projections are
    # the SD1 family (8 heads per layer); Linear projections are SD2/SDXL (64-channel heads).
    if linear:
        num_heads, head_channels = -1, 64
    else:
        num_heads, head_channels = 8, -1
    return UNetConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=res_per_level[0],
        transformer_depth=tuple(depth_per_level),
        transformer_depth_middle=middle_depth,
        context_dim=context_dim,
        num_heads=num_heads,
        num_head_channels=head_channels,
        use_linear_in_transformer=bool(linear),
        adm_in_channels=adm[1] if adm else None,
    )


def detect_vae_config(
    shapes: Shapes, prefix: str = VAE_PREFIX, scale_factor: float = SD_SCALE_FACTOR
) -> VAEConfig:
    p = prefix
    conv_in = shapes.get(f"{p}encoder.conv_in.weight")
    if conv_in is None:
        raise ValueError(f"no VAE found (missing {p}encoder.conv_in.weight)")
    ch = conv_in[0]
    levels = _count(shapes, f"{p}encoder.down.{{N}}.block.0.conv1.weight")
    ch_mult = tuple(
        shapes[f"{p}encoder.down.{i}.block.0.conv2.weight"][0] // ch for i in range(levels)
    )
    return VAEConfig(
        in_channels=conv_in[1],
        out_ch=shapes[f"{p}decoder.conv_out.weight"][0],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=_count(shapes, f"{p}encoder.down.0.block.{{N}}.conv1.weight"),
        z_channels=shapes[f"{p}decoder.conv_in.weight"][1],
        embed_dim=shapes[f"{p}post_quant_conv.weight"][0],
        scale_factor=scale_factor,
    )


def _heads_for_width(width: int) -> int:
    # CLIP towers use 64-channel heads (ViT-L 768/12, ViT-H 1024/16, bigG 1280/20).
    return max(1, width // 64)


def detect_text_encoder_config(shapes: Shapes) -> TextEncoderConfig:
    if any(k.startswith(OPEN_CLIP_PREFIX) for k in shapes):
        p = OPEN_CLIP_PREFIX
        vocab, width = shapes[f"{p}token_embedding.weight"]
        proj = shapes.get(f"{p}text_projection")
        return TextEncoderConfig(
            kind=TextEncoderKind.OPEN_CLIP,
            prefix=p,
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=shapes[f"{p}transformer.resblocks.0.mlp.c_fc.weight"][0],
            num_layers=_count(shapes, f"{p}transformer.resblocks.{{N}}.ln_1.weight"),
            num_heads=_heads_for_width(width),
            max_positions=shapes[f"{p}positional_embedding"][0],
            hidden_act="gelu",
            projection_dim=proj[1] if proj else None,
            layer_from_end=2,
            final_norm=True,
            pad_token_id=0,
        )
    if any(k.startswith(CLIP_PREFIX) for k in shapes):
        p = CLIP_PREFIX
        inner = (
            f"{p}text_model." if f"{p}text_model.embeddings.token_embedding.weight" in shapes else p
        )
        vocab, width = shapes[f"{inner}embeddings.token_embedding.weight"]
        return TextEncoderConfig(
            kind=TextEncoderKind.CLIP_HF,
            prefix=p,
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=shapes[f"{inner}encoder.layers.0.mlp.fc1.weight"][0],
            num_layers=_count(shapes, f"{inner}encoder.layers.{{N}}.layer_norm1.weight"),
            num_heads=_heads_for_width(width),
            max_positions=shapes[f"{inner}embeddings.position_embedding.weight"][0],
            hidden_act="quick_gelu",
            layer_from_end=1,
            final_norm=True,
            pad_token_id=49407,
        )
    raise ValueError(
        "no text encoder found (expected cond_stage_model.transformer.* or cond_stage_model.model.*)"
    )


def detect_prediction(
    shapes: Shapes,
    family: Family,
    read: Callable[[str], torch.Tensor] | None,
    metadata: Mapping[str, str],
) -> tuple[Prediction, bool]:
    """(parameterisation, zero-terminal-SNR) from explicit markers, else the SD2 heuristic."""
    meta = {k.lower(): str(v).lower() for k, v in metadata.items()}
    ztsnr = "ztsnr" in shapes or meta.get("modelspec.ztsnr") == "true"
    if "v_pred" in shapes or meta.get("modelspec.prediction_type") in ("v", "v_prediction"):
        return Prediction.V, ztsnr
    if meta.get("modelspec.prediction_type") in ("epsilon", "eps"):
        return Prediction.EPS, ztsnr
    key = f"{UNET_PREFIX}output_blocks.11.1.transformer_blocks.0.norm1.bias"
    if family is Family.SD2 and read is not None and key in shapes:
        # SD2 768-v and 512-base have identical shapes; the spread of this bias tells them
        # apart (ComfyUI's heuristic). Inpainting SD2 models are eps.
        in_ch = shapes[f"{UNET_PREFIX}input_blocks.0.0.weight"][1]
        if in_ch == 4 and float(read(key).float().std(unbiased=False)) > 0.09:
            return Prediction.V, ztsnr
    return Prediction.EPS, ztsnr


def detect_model(
    shapes: Shapes,
    *,
    source: str | os.PathLike = "<state dict>",
    read: Callable[[str], torch.Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> ModelSpec:
    """Family and configs of a single-file checkpoint, or a `CheckpointError` saying why not."""
    metadata = metadata or {}
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in shapes:
        foreign = describe_foreign_file(shapes)
        raise CheckpointError(
            source,
            foreign
            or "not a Stable Diffusion checkpoint (no UNet weights under model.diffusion_model.)",
        )
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        raise CheckpointError(
            source, "SDXL checkpoints are recognised but not supported by this version yet"
        )
    try:
        unet = detect_unet_config(shapes)
        text = detect_text_encoder_config(shapes)
        scale = SD_SCALE_FACTOR
        if (
            "scale_factor" in shapes and read is not None
        ):  # LatentDiffusion(scale_by_std=True) buffer
            scale = float(read("scale_factor").float().reshape(-1)[0])
        vae = detect_vae_config(shapes, scale_factor=scale)
    except (KeyError, ValueError, IndexError) as exc:
        raise CheckpointError(source, f"unrecognised checkpoint layout: {exc}") from None
    family = Family.SD2 if text.kind is TextEncoderKind.OPEN_CLIP else Family.SD1
    if unet.context_dim != text.hidden_size:
        raise CheckpointError(
            source,
            f"UNet cross-attention expects {unet.context_dim}-wide text features but the text "
            f"encoder is {text.hidden_size} wide",
        )
    prediction, ztsnr = detect_prediction(shapes, family, read, metadata)
    return ModelSpec(family, unet, vae, (text,), prediction, ztsnr)


def detect_standalone_vae(
    shapes: Shapes, source: str | os.PathLike, scale_factor: float = SD_SCALE_FACTOR
) -> tuple[VAEConfig, str]:
    """Config and key prefix of a separate VAE file: bare original keys, `first_stage_model.`
    keys, or the diffusers layout (renamed by `normalize_vae_state_dict` before loading)."""
    from ldm_core.nn.autoencoder import normalize_vae_state_dict

    for prefix in ("", VAE_PREFIX, "vae."):
        if f"{prefix}encoder.conv_in.weight" not in shapes:
            continue
        sub = {
            k[len(prefix) :]: torch.empty(s, device="meta")
            for k, s in shapes.items()
            if k.startswith(prefix)
        }
        renamed = {k: tuple(v.shape) for k, v in normalize_vae_state_dict(sub).items()}
        try:
            return detect_vae_config(renamed, "", scale_factor), prefix
        except (KeyError, ValueError) as exc:
            raise CheckpointError(source, f"unrecognised VAE layout: {exc}") from None
    foreign = (
        describe_foreign_file(shapes)
        if f"{UNET_PREFIX}input_blocks.0.0.weight" not in shapes
        else None
    )
    if f"{UNET_PREFIX}input_blocks.0.0.weight" in shapes:
        foreign = "this is a full checkpoint, not a VAE: put it in models/Stable-diffusion"
    raise CheckpointError(
        source,
        foreign
        if foreign and "VAE" not in foreign
        else "not a VAE file (no encoder/decoder weights found)",
    )
