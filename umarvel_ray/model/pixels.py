"""Compact image inputs for Qwen2-VL-style vision towers: uint8 patches on the wire, floats on the device.

The HF processor turns a resized image into `pixel_values` of shape (patches, C * T * P * P) in
float32, with the still image repeated T (=2) times along the temporal axis: 4.5 MB for a
364x504 image, 8x the uint8 pixels it came from. Building it costs ~13 ms of CPU per such image
(twice its JPEG decode), and shipping it through the object store or over PCIe costs 8x the bytes.

Here the CPU side only permutes the uint8 pixels into the processor's patch order (`patchify`,
the same (merge window, channel, row, column) layout, one frame, ~1 ms per image), and the model
side rebuilds the exact `pixel_values` on its own device (`expand`): rescale, normalise, repeat
along T. The result equals the HF processor's output to float32 rounding (tested), so a model
sees the same inputs whichever path built them.

For inference the T copies need not exist at all: the vision tower's first op is a Conv3d whose
kernel spans the T frames, and on T equal frames it equals one frame times the kernel summed over
T. `use_frame_patch_embed` swaps in that form (same parameter, same state-dict key), and
`expand(..., one_frame=True)` then builds half the floats and the patch embedding does half the
multiply-adds (on CPU this cuts expand + forward of the tiny model from ~32 to ~23 ms per image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

PATCHES_KEY = "pixel_patches"  # batch key of the uint8 (N, C, P, P) form
VALUES_KEY = "pixel_values"  # batch key of the processor's float (N, C * T * P * P) form


@dataclass(frozen=True)
class PatchLayout:
    """The processor settings that define `pixel_values` for still images."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    rescale_factor: float
    do_rescale: bool = True
    do_normalize: bool = True
    channels: int = 3

    @property
    def factor(self) -> int:
        """Side lengths must be multiples of this (one merge window)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_processor(cls, image_processor: Any) -> PatchLayout | None:
        """The layout of a Qwen2-VL-family image processor; None for anything else (use the processor)."""
        names = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
        if any(getattr(image_processor, n, None) is None for n in names):
            return None
        mean, std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        if len(mean) != 3 or len(std) != 3:
            return None
        return cls(
            patch_size=int(image_processor.patch_size),
            temporal_patch_size=int(image_processor.temporal_patch_size),
            merge_size=int(image_processor.merge_size),
            image_mean=tuple(float(x) for x in mean),  # type: ignore[arg-type]
            image_std=tuple(float(x) for x in std),  # type: ignore[arg-type]
            rescale_factor=float(getattr(image_processor, "rescale_factor", 1 / 255)),
            do_rescale=bool(getattr(image_processor, "do_rescale", True)),
            do_normalize=bool(getattr(image_processor, "do_normalize", True)),
        )

    def patchify(self, image: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """uint8 HxWx3 (sides multiples of `factor`) -> uint8 (h*w, C, P, P) patches and grid (1, h, w).

        Rows follow the processor's order: merge windows row-major, then the M x M patches inside
        each window, so the rows of one merged token stay adjacent.
        """
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != self.channels:
            raise ValueError(
                f"patchify needs a uint8 HxWx{self.channels} array, got {image.dtype} {image.shape}"
            )
        h, w = image.shape[:2]
        p, m, f = self.patch_size, self.merge_size, self.factor
        if h % f or w % f:
            raise ValueError(f"image sides must be multiples of {f} (resize first), got {h}x{w}")
        gh, gw = h // p, w // p
        x = image.reshape(gh // m, m, p, gw // m, m, p, self.channels)
        # (gh/m, gw/m, m, m, C, P, P): window row, window col, row in window, col in window, ...
        x = x.transpose(0, 3, 1, 4, 6, 2, 5)
        return np.ascontiguousarray(x).reshape(gh * gw, self.channels, p, p), [1, gh, gw]

    def expand(self, patches: Any, dtype: Any = None, one_frame: bool = False) -> Any:
        """uint8 (N, C, P, P) torch tensor -> the processor's `pixel_values` (N, C*T*P*P), on its device;
        with `one_frame` (N, C*P*P), for a `FramePatchEmbed` vision tower.

        The arithmetic is the processor's: float32, times rescale_factor, minus mean, over std.
        """
        if patches.dtype != torch.uint8 or patches.dim() != 4:
            raise ValueError(
                f"expand needs uint8 (N, C, P, P) patches, got {patches.dtype} {tuple(patches.shape)}"
            )
        n, c, p, _ = patches.shape
        x = patches.to(torch.float32)
        if self.do_rescale:
            x = x.mul_(self.rescale_factor)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
            std = torch.tensor(self.image_std, dtype=torch.float32, device=x.device).view(1, c, 1, 1)
            x = x.sub_(mean).div_(std)
        if dtype is not None and dtype != torch.float32:
            x = x.to(dtype)
        if one_frame:
            return x.reshape(n, c * p * p)
        t = self.temporal_patch_size
        return x.unsqueeze(2).expand(n, c, t, p, p).reshape(n, c * t * p * p)


def model_pixel_values(
    batch: dict[str, Any], layout: PatchLayout | None, dtype: Any = None, one_frame: bool = False
) -> Any:
    """The `pixel_values` a Qwen2-VL forward takes, from either batch form (None without images)."""
    if batch.get(PATCHES_KEY) is not None:
        if layout is None:
            raise ValueError(f"batch has {PATCHES_KEY} but the model's processor has no patch layout")
        return layout.expand(batch[PATCHES_KEY], dtype, one_frame=one_frame)
    return batch.get(VALUES_KEY)


class FramePatchEmbed(nn.Module):
    """Qwen2-VL's PatchEmbed that also takes one frame per patch (N, C*P*P) for still images.

    Holds the original `proj` Conv3d, so parameters and state-dict keys are unchanged; full
    (N, C*T*P*P) inputs go through the Conv3d exactly as before.
    """

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.patch_size = int(inner.patch_size)
        self.temporal_patch_size = int(inner.temporal_patch_size)
        self.in_channels = int(inner.in_channels)
        self.embed_dim = int(inner.embed_dim)
        self.proj = inner.proj

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        c, t, p = self.in_channels, self.temporal_patch_size, self.patch_size
        weight = self.proj.weight
        if hidden_states.shape[-1] == c * p * p and t > 1:
            frame_weight = weight.float().sum(dim=2).to(weight.dtype).reshape(self.embed_dim, -1)
            return functional.linear(hidden_states.to(weight.dtype), frame_weight, self.proj.bias)
        x = hidden_states.view(-1, c, t, p, p).to(weight.dtype)
        return self.proj(x).view(-1, self.embed_dim)


def use_frame_patch_embed(model: Any) -> bool:
    """Swap the vision tower's patch embedding for `FramePatchEmbed` (inference); False if the
    model has no Qwen2-VL-style patch embedding (then keep feeding full `pixel_values`)."""
    for name, module in list(model.named_modules()):
        if not name.endswith("patch_embed") or isinstance(module, FramePatchEmbed):
            continue
        proj = getattr(module, "proj", None)
        t, p = getattr(module, "temporal_patch_size", None), getattr(module, "patch_size", None)
        if (
            not isinstance(proj, nn.Conv3d)
            or tuple(proj.kernel_size) != (t, p, p)
            or proj.stride != proj.kernel_size
        ):
            return False
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], FramePatchEmbed(module))
        return True
    return any(isinstance(m, FramePatchEmbed) for m in model.modules())
