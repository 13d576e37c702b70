"""CLIP text encoders: a transformers `CLIPTextModel` plus OpenCLIP key conversion.

Both storage layouts (ldm-formats.md §1.5, §2.1) load into the same module:

- CLIP_HF (SD1, SDXL CLIP-L): transformers naming, `text_model.` optional (very old SD1 files
  lack it); a stored `embeddings.position_ids` is ignored.
- OPEN_CLIP (SD2 ViT-H, SDXL bigG): `transformer.resblocks.i.*` with fused `attn.in_proj_*`,
  a bare `positional_embedding`, `ln_final` and a bare `text_projection [W, E]` used as
  `x @ P`; `logit_scale` and `attn_mask` are dropped.

The module's own parameter names are the transformers ones (`text_model.encoder.layers.0.
self_attn.q_proj.weight`, `text_projection.weight`), which are also the names kohya-style LoRA
files use for both layouts.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm_core.config import TextEncoderConfig, TextEncoderKind
from ldm_core.tokenizer import BOS_ID, EOS_ID

Tensor = torch.Tensor

__all__ = ["TextEncoder"]

_HF_PREFIX = "text_model."
_PROJECTION_KEY = "text_projection.weight"
_MAX_LISTED = 10

# Keys that may be stored but carry nothing we load (values re-created or unused).
_IGNORED_HF = ("embeddings.position_ids",)
_IGNORED_OPEN_CLIP = ("logit_scale", "attn_mask")

# (transformers name inside a layer, OpenCLIP name inside a resblock) for 1:1 tensors.
_LAYER_RENAMES = (
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
    ("self_attn.out_proj.", "attn.out_proj."),
)
_TOP_RENAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_HF_LAYER_RE = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_OC_LAYER_RE = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def _hf_to_open_clip(flat: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers names (no `text_model.`) -> OpenCLIP names; q/k/v fused into in_proj."""
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, Tensor]] = {}
    for key, value in flat.items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
            continue
        if key == _PROJECTION_KEY:
            out["text_projection"] = value.T.contiguous()  # Linear [E, W] -> [W, E]
            continue
        match = _HF_LAYER_RE.fullmatch(key)
        if match is None:
            raise KeyError(f"no OpenCLIP name for text encoder parameter {key!r}")
        index, rest = int(match[1]), match[2]
        proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if proj is not None:
            qkv.setdefault((index, proj[2]), {})[proj[1]] = value
            continue
        for hf_name, oc_name in _LAYER_RENAMES:
            if rest.startswith(hf_name):
                out[f"transformer.resblocks.{index}.{oc_name}{rest[len(hf_name) :]}"] = value
                break
        else:
            raise KeyError(f"no OpenCLIP name for text encoder parameter {key!r}")
    for (index, kind), parts in qkv.items():
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = fused
    return out


def _open_clip_to_hf(sd: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    """OpenCLIP names -> transformers names (no `text_model.`); in_proj split into q/k/v.

    Expects keys already validated against `_hf_to_open_clip` of the target model.
    """
    top = {oc: hf for hf, oc in _TOP_RENAMES.items()}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        if key == "text_projection":
            out[_PROJECTION_KEY] = value.T.contiguous()  # [W, E] -> Linear weight [E, W]
            continue
        match = _OC_LAYER_RE.fullmatch(key)
        if match is None:
            raise KeyError(f"unexpected OpenCLIP text encoder key {key!r}")
        prefix, rest = f"encoder.layers.{match[1]}.", match[2]
        fused = re.fullmatch(r"attn\.in_proj_(weight|bias)", rest)
        if fused is not None:
            for i, name in enumerate("qkv"):
                out[f"{prefix}self_attn.{name}_proj.{fused[1]}"] = value[
                    i * width : (i + 1) * width
                ]
            continue
        for hf_name, oc_name in _LAYER_RENAMES:
            if rest.startswith(oc_name):
                out[prefix + hf_name + rest[len(oc_name) :]] = value
                break
        else:
            raise KeyError(f"unexpected OpenCLIP text encoder key {key!r}")
    return out


def _hf_config(config: TextEncoderConfig) -> CLIPTextConfig:
    hf = CLIPTextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        projection_dim=config.projection_dim or config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        hidden_act=config.hidden_act,
        layer_norm_eps=1e-5,
        attention_dropout=0.0,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=config.pad_token_id,
    )
    # We pass an explicit additive causal mask, which every attention backend honours.
    hf._attn_implementation = "sdpa"
    return hf


def _describe_mismatch(
    source: str,
    config: TextEncoderConfig,
    missing: list[str],
    unexpected: list[str],
    misshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
) -> str:
    def listing(keys: list[str]) -> str:
        shown = ", ".join(config.prefix + k for k in keys[:_MAX_LISTED])
        return shown + (", ..." if len(keys) > _MAX_LISTED else "")

    lines = [
        f"{source}: text encoder weights under {config.prefix!r} do not fit a "
        f"{config.kind.value} CLIP text model (width {config.hidden_size}, "
        f"{config.num_layers} layers, {config.num_heads} heads, mlp {config.intermediate_size}, "
        f"projection {config.projection_dim})."
    ]
    if missing:
        lines.append(f"  {len(missing)} missing: {listing(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected: {listing(unexpected)}")
    if misshaped:
        shown = ", ".join(
            f"{config.prefix}{k} {tuple(got)} (expected {tuple(want)})"
            for k, got, want in misshaped[:_MAX_LISTED]
        )
        more = ", ..." if len(misshaped) > _MAX_LISTED else ""
        lines.append(f"  {len(misshaped)} with wrong shape: {shown}{more}")
    return "\n".join(lines)


class TextEncoder(nn.Module):
    """A CLIP text transformer returning the hidden state a model family uses as context.

    Constructible under `with torch.device("meta"):`; load weights with
    `load_original_state_dict(..., device=...)` or build and load in one go with
    `TextEncoder.from_state_dict`.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextModel(_hf_config(config))
        self.text_projection = (
            nn.Linear(config.hidden_size, config.projection_dim, bias=False)
            if config.projection_dim is not None
            else None
        )

    # -- properties -------------------------------------------------------------------------

    @property
    def pad_token_id(self) -> int:
        """Id written after EOS up to 77 tokens (49407 for CLIP-L, 0 for OpenCLIP)."""
        return self.config.pad_token_id

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def _core(self) -> nn.Module:
        # transformers < 5.6 wraps the transformer in `.text_model`; newer versions are flat.
        return getattr(self.text_model, "text_model", self.text_model)

    # -- weights ----------------------------------------------------------------------------

    def _flat_state_dict(self) -> dict[str, Tensor]:
        """Parameters in transformers naming without `text_model.` (plus the projection)."""
        flat = dict(self._core.state_dict())
        if self.text_projection is not None:
            flat[_PROJECTION_KEY] = self.text_projection.weight
        return flat

    def to_original_state_dict(self) -> dict[str, Tensor]:
        """Weights in the checkpoint's naming (without `config.prefix`), ready to save."""
        flat = {k: v.detach() for k, v in self._flat_state_dict().items()}
        if self.config.kind is TextEncoderKind.OPEN_CLIP:
            return _hf_to_open_clip(flat)
        return {(k if k == _PROJECTION_KEY else _HF_PREFIX + k): v for k, v in flat.items()}

    def _expected_shapes(self, hf_layout_prefix: str) -> dict[str, torch.Size]:
        # Shapes only: convert meta stand-ins, so no weights are touched or copied.
        flat = {k: torch.empty(v.shape, device="meta") for k, v in self._flat_state_dict().items()}
        if self.config.kind is TextEncoderKind.OPEN_CLIP:
            return {k: v.shape for k, v in _hf_to_open_clip(flat).items()}
        return {
            (k if k == _PROJECTION_KEY else hf_layout_prefix + k): v.shape for k, v in flat.items()
        }

    def load_original_state_dict(
        self,
        sd: dict[str, Tensor],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str = "state dict",
    ) -> None:
        """Strictly load checkpoint-named weights (prefix stripped), assigning the tensors.

        Works on a module built on the meta device. Raises ValueError naming `source` and the
        missing, unexpected and mis-shaped keys.
        """
        config = self.config
        if config.kind is TextEncoderKind.OPEN_CLIP:
            layout, ignored = "", _IGNORED_OPEN_CLIP
        else:
            layout = _HF_PREFIX if any(k.startswith(_HF_PREFIX) for k in sd) else ""
            ignored = tuple(layout + k for k in _IGNORED_HF)
        given = {k: v for k, v in sd.items() if k not in ignored}
        expected = self._expected_shapes(layout)
        missing = [k for k in expected if k not in given]
        unexpected = [k for k in given if k not in expected]
        misshaped = [
            (k, tuple(given[k].shape), tuple(shape))
            for k, shape in expected.items()
            if k in given and given[k].shape != shape
        ]
        if missing or unexpected or misshaped:
            raise ValueError(_describe_mismatch(source, config, missing, unexpected, misshaped))

        if config.kind is TextEncoderKind.OPEN_CLIP:
            flat = _open_clip_to_hf(given, config.hidden_size)
        else:
            flat = {
                k.removeprefix(layout) if k != _PROJECTION_KEY else k: v for k, v in given.items()
            }
        flat = {k: v.to(device=device, dtype=dtype) for k, v in flat.items()}
        projection = flat.pop(_PROJECTION_KEY, None)
        self._core.load_state_dict(flat, strict=True, assign=True)
        if self.text_projection is not None:
            self.text_projection.load_state_dict({"weight": projection}, strict=True, assign=True)
        # Non-persistent buffer: not in any file, so it is still on meta after assign.
        embeddings = self._core.embeddings
        embeddings.position_ids = torch.arange(config.max_positions, device=device).expand(1, -1)
        self.eval()

    @classmethod
    def from_state_dict(
        cls,
        config: TextEncoderConfig,
        sd: dict[str, Tensor],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        source: str = "state dict",
    ) -> TextEncoder:
        """Build on meta (no random init) and load `sd` (checkpoint naming, prefix stripped)."""
        with torch.device("meta"):
            model = cls(config)
        model.load_original_state_dict(sd, device=device, dtype=dtype, source=source)
        return model

    # -- inference --------------------------------------------------------------------------

    def _layers_for(self, clip_skip: int) -> int:
        """How many transformer layers produce the context for `clip_skip`."""
        from_end = self.config.layer_from_end + clip_skip - 1
        count = self.config.num_layers - from_end + 1
        if clip_skip < 1 or count < 1:
            raise ValueError(
                f"clip_skip={clip_skip} is outside 1..{self.config.num_layers - self.config.layer_from_end + 1} "
                f"for a {self.config.num_layers}-layer text encoder"
            )
        return count

    def _run(
        self,
        input_ids: Tensor | None,
        num_layers: int,
        keep: int | None = None,
        *,
        inputs_embeds: Tensor | None = None,
    ):
        """Embeddings + the first `num_layers` layers; also returns the output after `keep`.

        Token embeddings come from `input_ids`, or are given directly as `inputs_embeds`
        [B, T, D]; position embeddings are added either way.
        """
        core = self._core
        if inputs_embeds is None:
            x = core.embeddings(input_ids=input_ids)  # [B, T, D]
        else:
            x = core.embeddings(inputs_embeds=inputs_embeds)
        length = x.shape[1]
        mask = torch.full(
            (length, length), torch.finfo(x.dtype).min, dtype=x.dtype, device=x.device
        )
        mask = mask.triu(1)[None, None]  # [1, 1, T, T] additive causal mask
        kept = x if keep == 0 else None
        for index, layer in enumerate(core.encoder.layers[:num_layers]):
            x = layer(x, mask)
            if isinstance(x, tuple):
                x = x[0]
            if keep == index + 1:
                kept = x
        return x, kept

    def forward(self, input_ids: Tensor, clip_skip: int = 1) -> Tensor:
        """input_ids [B, T] -> context [B, T, D] (layer chosen by config and clip skip)."""
        x, _ = self._run(input_ids, self._layers_for(clip_skip))
        if self.config.final_norm:
            x = self._core.final_layer_norm(x)
        return x

    def token_embeddings(self, input_ids: Tensor) -> Tensor:
        """input_ids [B, T] -> token embeddings [B, T, D] (no position embeddings)."""
        return self._core.embeddings.token_embedding(input_ids)

    def forward_embeds(self, inputs_embeds: Tensor, clip_skip: int = 1) -> Tensor:
        """Like `forward`, from token embeddings [B, T, D] instead of ids.

        Textual-inversion vectors are inserted this way: `token_embeddings(ids)` with some rows
        replaced. `forward_embeds(token_embeddings(ids))` equals `forward(ids)`.
        """
        x, _ = self._run(None, self._layers_for(clip_skip), inputs_embeds=inputs_embeds)
        if self.config.final_norm:
            x = self._core.final_layer_norm(x)
        return x

    def _pool(self, input_ids: Tensor, last: Tensor) -> Tensor:
        is_eos = input_ids == EOS_ID
        if not bool(is_eos.any(dim=1).all()):
            raise ValueError(f"every sequence needs an EOS token ({EOS_ID}) to pool")
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooled = self._core.final_layer_norm(last[rows, is_eos.int().argmax(dim=1)])  # [B, D]
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return pooled

    def pooled(self, input_ids: Tensor) -> Tensor:
        """Final-LN'd last layer at the first EOS, through `text_projection` if present: [B, E]."""
        last, _ = self._run(input_ids, self.config.num_layers)
        return self._pool(input_ids, last)

    def encode(self, input_ids: Tensor, clip_skip: int = 1) -> tuple[Tensor, Tensor]:
        """(context [B, T, D], pooled [B, E]) from one pass through all layers."""
        count = self._layers_for(clip_skip)
        last, context = self._run(input_ids, self.config.num_layers, keep=count)
        if self.config.final_norm:
            context = self._core.final_layer_norm(context)
        return context, self._pool(input_ids, last)
