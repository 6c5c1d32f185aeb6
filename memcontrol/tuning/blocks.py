"""Maskable blocks of a ``UNet2DConditionModel``, named from its module tree.

The same code serves the tiny default UNet and SD-1.5: block names are module paths
(``down_blocks.0.attentions.0``, ``mid_block.attentions.0``, ``up_blocks.1.attentions.2``), never a
hard-coded list. A block owns every parameter whose name starts with ``<block>.``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from memcontrol.tuning.mask import GRANULARITIES, MODES, Mask, MaskError, Options

_SECTION = r"(?:down_blocks\.\d+|mid_block|up_blocks\.\d+)"
_PATTERNS = {
    "transformer": re.compile(rf"^{_SECTION}\.attentions\.\d+$"),
    "resnet": re.compile(rf"^{_SECTION}\.(?:attentions|resnets)\.\d+$"),
    "sublayer": re.compile(rf"^{_SECTION}\.attentions\.\d+\.transformer_blocks\.\d+\.(?:attn1|attn2|ff)$"),
}

# Which methods the reference code masks, and over which layout (docs/paper.md §3.2):
# "skip_last_up" is the 13-bit layout of auto_svdiff/auto_difffit, which never addresses the last
# attention of each up block (up_blocks.*.attentions.2 on SD-1.5); "all" is auto_attention's 16 bits.
REFERENCE_LAYOUTS = {"svdiff": "skip_last_up", "difffit": "skip_last_up", "attention": "all"}


def _section_key(name: str) -> tuple[int, int]:
    parts = name.split(".")
    if parts[0] == "down_blocks":
        return (0, int(parts[1]))
    if parts[0] == "mid_block":
        return (1, 0)
    return (2, int(parts[1]))


def enumerate_blocks(unet: nn.Module, granularity: str = "transformer") -> tuple[str, ...]:
    """Names of the maskable blocks of ``unet``: down blocks, mid block, up blocks, in tree order.

    ``granularity``: ``"transformer"`` (each Transformer2DModel), ``"resnet"`` (those plus each
    ResnetBlock2D), or ``"sublayer"`` (``attn1``/``attn2``/``ff`` inside every transformer block;
    the norms and proj_in/proj_out of a Transformer2DModel then belong to no block).
    """
    if granularity not in GRANULARITIES:
        raise MaskError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    pattern = _PATTERNS[granularity]
    names = [n for n, m in unet.named_modules() if m is not None and pattern.match(n)]
    # sorted() is stable: tree order survives inside each section.
    return tuple(sorted(names, key=_section_key))


def reference_layout(unet: nn.Module, method: str) -> tuple[str, ...]:
    """The reference code's bit layout for ``method`` mapped onto ``unet``'s block names.

    On SD-1.5: 13 blocks for svdiff/difffit (index i of the reference mask is element i),
    16 for attention. Methods the reference never masks raise :class:`MaskError`.
    """
    kind = REFERENCE_LAYOUTS.get(method)
    if kind is None:
        raise MaskError(
            f"method {method!r} has no reference bit layout (only {sorted(REFERENCE_LAYOUTS)}); "
            "use mode 'full', or mode 'reference' with no blocks for the unmasked baseline"
        )
    blocks = enumerate_blocks(unet, "transformer")
    if kind == "all":
        return blocks
    last_up: dict[str, str] = {}
    for b in blocks:
        if b.startswith("up_blocks."):
            section = ".".join(b.split(".")[:2])
            last_up[section] = b  # tree order: the last one seen is the highest index
    skipped = set(last_up.values())
    return tuple(b for b in blocks if b not in skipped)


def block_layout(unet: nn.Module, method: str, mode: str = "full", granularity: str = "transformer") -> tuple[str, ...]:
    """The block list a mask for ``method`` in ``mode`` has one bit per (the search space)."""
    if mode not in MODES:
        raise MaskError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "reference":
        if granularity != "transformer":
            raise MaskError("mode 'reference' is defined on granularity 'transformer' only")
        return reference_layout(unet, method)
    return enumerate_blocks(unet, granularity)


def mask_for_model(
    unet: nn.Module,
    method: str,
    lr: float,
    bits=None,
    *,
    mode: str = "full",
    granularity: str = "transformer",
    options: Mapping[str, Any] | None = None,
) -> Mask:
    """A mask over ``unet``'s block layout for ``method``/``mode``; ``bits=None`` sets all to 1."""
    blocks = block_layout(unet, method, mode, granularity)
    bits = (1,) * len(blocks) if bits is None else tuple(bits)
    return Mask(method, blocks, bits, lr, mode, granularity, Options(options))


def check_blocks(unet: nn.Module, mask: Mask) -> None:
    """Raise :class:`MaskError` unless ``mask.blocks`` is exactly ``unet``'s layout for the mask.

    Names the model lacks are listed first (the transfer error); then layout blocks the mask
    does not cover.
    """
    if mask.mode == "reference" and not mask.blocks:
        return  # the unmasked whole-UNet baseline
    layout = block_layout(unet, mask.method, mask.mode, mask.granularity)
    have = set(layout)
    lacking = [b for b in mask.blocks if b not in have]
    if lacking:
        raise MaskError(
            f"mask names blocks this model lacks: {lacking} "
            f"(model's {mask.mode}/{mask.granularity} layout for {mask.method!r}: {list(layout)})"
        )
    given = set(mask.blocks)
    uncovered = [b for b in layout if b not in given]
    if uncovered:
        raise MaskError(f"mask has no bit for the model's blocks {uncovered}")
