"""Image-side helpers of the pipelines: tensors <-> PIL, A1111's resize modes, masks,
outpainting canvases and paste-back."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter


class ImageInputError(ValueError):
    """A bad image or mask, with a message meant for the user."""


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB PIL images."""
    arr = (
        ((images.float().clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )
    return [Image.fromarray(a) for a in arr]


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's resize modes: stretch, cover + centre crop, contain + fill the bars."""
    image = image.convert("RGB")
    lanczos = Image.Resampling.LANCZOS
    if mode in (0, 3):
        return image.resize((width, height), lanczos)
    src_ratio = image.width / image.height
    ratio = width / height
    if mode == 1:
        scale = width / image.width if ratio > src_ratio else height / image.height
        w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
        resized = image.resize((w, h), lanczos)
        left, top = (w - width) // 2, (h - height) // 2
        return resized.crop((left, top, left + width, top + height))
    scale = width / image.width if ratio < src_ratio else height / image.height
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    resized = image.resize((w, h), lanczos)
    out = Image.new("RGB", (width, height))
    left, top = (width - w) // 2, (height - h) // 2
    out.paste(resized, (left, top))
    # Fill the bars by stretching the outermost rows/columns, as A1111 does.
    if top > 0:
        out.paste(resized.crop((0, 0, w, 1)).resize((w, top)), (left, 0))
        out.paste(resized.crop((0, h - 1, w, h)).resize((w, height - top - h)), (left, top + h))
    if left > 0:
        out.paste(resized.crop((0, 0, 1, h)).resize((left, h)), (0, top))
        out.paste(resized.crop((w - 1, 0, w, h)).resize((width - left - w, h)), (left + w, top))
    return out


def outpaint_pad(
    image: Image.Image, *, left: int = 0, right: int = 0, top: int = 0, bottom: int = 0
) -> tuple[Image.Image, Image.Image]:
    """Extend the canvas for outpainting: new borders continue the edge pixels, and the
    returned mask is white exactly over the new area (inpaint it with masked content "fill")."""
    if min(left, right, top, bottom) < 0:
        raise ImageInputError("outpainting amounts must not be negative")
    image = image.convert("RGB")
    w, h = image.width + left + right, image.height + top + bottom
    arr = np.asarray(image)
    padded = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full((h, w), 255, dtype=np.uint8)
    mask[top : top + image.height, left : left + image.width] = 0
    return Image.fromarray(padded), Image.fromarray(mask, "L")


def mask_bbox(
    mask: np.ndarray, pad: int, width: int, height: int
) -> tuple[int, int, int, int] | None:
    """Padded box around the mask, grown to the target aspect ratio (A1111's "only masked")."""
    ys, xs = np.nonzero(mask > 0)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    x1, y1, x2, y2 = (
        max(xs.min() - pad, 0),
        max(ys.min() - pad, 0),
        min(xs.max() + 1 + pad, w),
        min(ys.max() + 1 + pad, h),
    )
    ratio = width / height
    bw, bh = x2 - x1, y2 - y1
    if bw / bh < ratio:
        grow = round(bh * ratio) - bw
        x1, x2 = x1 - grow // 2, x2 + grow - grow // 2
    else:
        grow = round(bw / ratio) - bh
        y1, y2 = y1 - grow // 2, y2 + grow - grow // 2
    # shift back inside the image, then clip
    if x1 < 0:
        x2, x1 = x2 - x1, 0
    if y1 < 0:
        y2, y1 = y2 - y1, 0
    if x2 > w:
        x1, x2 = max(x1 - (x2 - w), 0), w
    if y2 > h:
        y1, y2 = max(y1 - (y2 - h), 0), h
    return int(x1), int(y1), int(x2), int(y2)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": replace the masked area with blurred colours from around it."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    m = (np.asarray(mask) > 127)[..., None]
    if not m.any():
        return image.convert("RGB")
    keep = (~m).astype(np.float32)
    acc, weight = rgb * keep, keep.copy()
    out = rgb * keep
    known = ~m[..., 0]
    for radius in (256, 64, 16, 4, 2, 1):
        blurred_acc = np.asarray(
            Image.fromarray(np.clip(acc, 0, 255).astype(np.uint8)).filter(
                ImageFilter.BoxBlur(radius)
            ),
            dtype=np.float32,
        )
        blurred_w = (
            np.asarray(
                Image.fromarray((weight[..., 0] * 255).astype(np.uint8)).filter(
                    ImageFilter.BoxBlur(radius)
                ),
                dtype=np.float32,
            )[..., None]
            / 255
        )
        est = blurred_acc / np.maximum(blurred_w, 1e-3)
        fill = (~known)[..., None] & (blurred_w > 1e-3)
        out = np.where(fill, est, out)
    out = np.where(m, out, rgb)
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def paste_back(
    generated: Image.Image, source: Image.Image, alpha: np.ndarray, crop_box
) -> Image.Image:
    """Composite the generated pixels over the source with `alpha` (0 outside the mask)."""
    if crop_box is not None:
        x1, y1, x2, y2 = crop_box
        full = source.copy()
        full.paste(generated.resize((x2 - x1, y2 - y1), Image.Resampling.LANCZOS), (x1, y1))
        generated = full
    else:
        generated = generated.resize(source.size, Image.Resampling.LANCZOS)
    g = np.asarray(generated, dtype=np.float32)
    s = np.asarray(source, dtype=np.float32)
    a = alpha[..., None]
    out = np.where(a > 0, g * a + s * (1 - a), s)
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))
