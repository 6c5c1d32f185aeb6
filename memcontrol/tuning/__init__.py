"""PEFT methods as maskable choices: which blocks of a UNet get which parameter-efficient updates.

``apply(unet, mask)`` turns a base ``UNet2DConditionModel`` into one whose only trainable
parameters are the mask's, and returns the optimizer groups. ``save_adapter``/``load_adapter``
round-trip exactly those tensors. ``count_parameters`` predicts the count from shapes alone (works on
a meta-device SD-1.5 UNet). docs/methods.md describes each method, both mask modes and the counts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from memcontrol import atomic
from memcontrol.tuning import attention, bias, difffit, full, lora, norm, svdiff
from memcontrol.tuning._base import Candidate, Method
from memcontrol.tuning.blocks import block_layout, check_blocks, enumerate_blocks, mask_for_model, reference_layout
from memcontrol.tuning.mask import GRANULARITIES, MODES, Mask, MaskError, Options

log = logging.getLogger(__name__)

__all__ = [
    "ADAPTER_FILE",
    "GRANULARITIES",
    "MASK_FILE",
    "METHODS",
    "MODES",
    "Mask",
    "MaskError",
    "Method",
    "Options",
    "Prepared",
    "adapted_mask",
    "apply",
    "block_layout",
    "count_parameters",
    "enumerate_blocks",
    "get_method",
    "load_adapter",
    "mask_for_model",
    "merge",
    "reference_layout",
    "register",
    "save_adapter",
    "trainable_state_dict",
]

ADAPTER_FILE = "adapter.safetensors"
MASK_FILE = "mask.json"
_STATE = "_memcontrol_adapter"

METHODS: dict[str, Method] = {}


def register(method: Method) -> None:
    """Add ``method`` to :data:`METHODS`; a duplicate or non-lower-case name raises ValueError."""
    if not method.name.isidentifier() or method.name != method.name.lower():
        raise ValueError(f"method name must be a lower-case identifier, got {method.name!r}")
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    METHODS[method.name] = method


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise MaskError(f"unknown method {name!r} (known: {sorted(METHODS)})") from None


for _module in (full, attention, bias, norm, lora, svdiff, difffit):
    register(_module.METHOD)


@dataclasses.dataclass
class Prepared:
    """What :func:`apply` returns.

    ``groups``: torch optimizer parameter groups ``{"params": [...], "lr": float, "name": str}``
    (SV-Diff has two: its norm shifts train at ``norm_lr``). ``trainable``: their parameter count.
    ``total``: parameters of the base UNet before any adapter was added, the denominator of
    :attr:`pct` (the reference's ``check_tunable_params`` also counts the added adapter
    parameters; the difference is in the 4th significant digit at most for SV-Diff/DiffFit/LoRA).
    """

    groups: list[dict]
    trainable: int
    total: int

    @property
    def pct(self) -> float:
        """Trainable share of the base UNet, in percent."""
        return 100.0 * self.trainable / self.total


@dataclasses.dataclass(frozen=True)
class _Adapted:
    mask: Mask
    names: tuple[str, ...]  # trainable parameter names, in group order


def _choose(unet: nn.Module, mask: Mask) -> list[Candidate]:
    """The candidates ``mask`` makes trainable on ``unet`` (no model change)."""
    method = get_method(mask.method)
    cfg = method.make_config(mask.options)
    check_blocks(unet, mask)
    candidates = method.candidates(unet, cfg)
    if mask.mode == "full":
        prefixes = tuple(b + "." for b in mask.enabled())
        chosen = [c for c in candidates if c.name.startswith(prefixes)]
    else:
        # docs/paper.md §3.3: a 0-bit freezes the method's maskable subset inside
        # <block>.transformer_blocks; everything else stays trainable.
        frozen = tuple(b + ".transformer_blocks." for b in mask.disabled())
        chosen = [
            c for c in candidates if not (frozen and c.name.startswith(frozen) and method.reference_masked(c))
        ]
    if not chosen:
        on = mask.enabled()
        shown = list(on) if len(on) <= 6 else [*on[:6], f"... {len(on) - 6} more"]
        raise MaskError(
            f"mask leaves nothing trainable: method {mask.method!r}, mode {mask.mode!r}, "
            f"granularity {mask.granularity!r}, enabled blocks {shown}"
        )
    return chosen


def count_parameters(unet_or_config: nn.Module | Mapping, mask: Mask) -> int:
    """Trainable parameters ``mask`` gives, computed from shapes without changing or training.

    ``unet_or_config``: a ``UNet2DConditionModel`` (any device, ``meta`` included) or its config
    dict, which is built on the meta device (no weights allocated).
    """
    unet = _meta_unet(unet_or_config) if isinstance(unet_or_config, Mapping) else unet_or_config
    return sum(c.numel for c in _choose(unet, mask))


def _meta_unet(config: Mapping) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def apply(unet: nn.Module, mask: Mask) -> Prepared:
    """Make ``mask``'s parameters of ``unet`` trainable, in place, and return the optimizer groups.

    Injects the method's adapters (LoRA, SV-Diff shifts, DiffFit gammas) into the enabled part only
    (an adapter of a 0-bit block would stay at its identity init, so it is not created), freezes
    every other parameter, and leaves the UNet computing exactly its base output. Raises
    :class:`MaskError` for a block the model lacks, an unknown method or option, a mask that leaves
    nothing trainable, or a UNet that was already adapted.
    """
    if getattr(unet, _STATE, None) is not None:
        raise MaskError("this UNet already has an adapter; apply masks to a fresh base UNet")
    chosen = _choose(unet, mask)
    method = get_method(mask.method)
    cfg = method.make_config(mask.options)
    total = sum(p.numel() for p in unet.parameters())
    unet.requires_grad_(False)
    by_group = method.inject(unet, chosen, cfg)
    lrs = method.group_lrs(cfg, mask.lr)
    params = dict(unet.named_parameters())
    groups, names = [], []
    for group, group_names in by_group.items():
        if not group_names:
            continue
        missing = [n for n in group_names if n not in params]
        if missing:
            raise RuntimeError(f"{mask.method}: injected parameters not found: {missing[:5]}")
        for n in group_names:
            params[n].requires_grad_(True)
        groups.append({"params": [params[n] for n in group_names], "lr": lrs[group], "name": group})
        names += group_names
    trainable = sum(params[n].numel() for n in names)
    planned = sum(c.numel for c in chosen)
    if trainable != planned:
        raise RuntimeError(f"{mask.method}: {trainable} trainable parameters, counted {planned} from shapes")
    setattr(unet, _STATE, _Adapted(mask, tuple(names)))
    prepared = Prepared(groups, trainable, total)
    log.info(
        "%s (%s mode, %d/%d blocks on): %d trainable parameters, %.4f%% of %d",
        mask.method, mask.mode, sum(mask.bits), len(mask.bits), trainable, prepared.pct, total,
    )
    return prepared


def adapted_mask(unet: nn.Module) -> Mask | None:
    """The mask ``unet`` was adapted with by :func:`apply`, or None."""
    state = getattr(unet, _STATE, None)
    return None if state is None else state.mask


def merge(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Fold the adapter of ``unet`` (adapted by :func:`apply` or :func:`load_adapter`) into its base
    weights, in place, with the method's own rule (``Method.merge``), and return the state dict of
    the plain UNet: the base UNet's parameter names, the adapted UNet's output. ``unet`` is no
    longer adapted afterwards."""
    state: _Adapted | None = getattr(unet, _STATE, None)
    if state is None:
        raise MaskError("this UNet has no adapter to merge: call apply(unet, mask) or load_adapter first")
    method = get_method(state.mask.method)
    if method.merge is not None:
        method.merge(unet)
    delattr(unet, _STATE)
    return {name: tensor.detach() for name, tensor in unet.state_dict().items()}


def trainable_state_dict(unet: nn.Module, mask: Mask) -> dict[str, torch.Tensor]:
    """The tensors ``apply(unet, mask)`` made trainable, by parameter name (detached, not copied)."""
    state: _Adapted | None = getattr(unet, _STATE, None)
    if state is None:
        raise MaskError("this UNet has no adapter: call apply(unet, mask) first")
    if state.mask.digest() != mask.digest():
        raise MaskError(f"this UNet was adapted with mask {state.mask.digest()}, not {mask.digest()}")
    params = dict(unet.named_parameters())
    return {n: params[n].detach() for n in state.names}


def save_adapter(out_dir: str | os.PathLike, unet: nn.Module, mask: Mask) -> Mask:
    """Write ``adapter.safetensors`` (trainable tensors only) and ``mask.json`` into ``out_dir``.

    Each file is written atomically, the mask last, so a folder with ``mask.json`` is complete.
    ``mask.json`` records the trainable-parameter count. Returns the mask as saved.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.to("cpu").contiguous() for n, t in trainable_state_dict(unet, mask).items()}
    count = sum(t.numel() for t in tensors.values())
    if mask.trainable_params not in (None, count):
        raise MaskError(f"mask says {mask.trainable_params} trainable parameters, the UNet has {count}")
    mask = dataclasses.replace(mask, trainable_params=count)
    with atomic.atomic_path(out / ADAPTER_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"mask_digest": mask.digest(), "format": "memcontrol-adapter"})
    mask.save(out / MASK_FILE)
    return mask


def load_adapter(out_dir: str | os.PathLike, unet: nn.Module) -> Mask:
    """Apply ``out_dir/mask.json`` to the fresh base ``unet`` and load ``adapter.safetensors`` strictly.

    Missing or unexpected tensors, shape mismatches, and a mask/adapter pair from different saves
    raise :class:`MaskError` naming the file.
    """
    from safetensors import safe_open

    out = Path(out_dir)
    mask = Mask.load(out / MASK_FILE)
    path = out / ADAPTER_FILE
    if not path.is_file():
        raise MaskError(f"{path}: missing")
    apply(unet, mask)
    expected = trainable_state_dict(unet, mask)
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        digest = (fh.metadata() or {}).get("mask_digest")
        if digest != mask.digest():
            raise MaskError(f"{path}: saved for mask {digest}, but {out / MASK_FILE} is {mask.digest()}")
        keys = set(fh.keys())
        missing = sorted(set(expected) - keys)
        unexpected = sorted(keys - set(expected))
        if missing or unexpected:
            raise MaskError(f"{path}: missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}")
        with torch.no_grad():
            for name, target in expected.items():
                tensor = fh.get_tensor(name)
                if tensor.shape != target.shape:
                    raise MaskError(f"{path}: {name} has shape {tuple(tensor.shape)}, the model {tuple(target.shape)}")
                target.copy_(tensor)
    return mask
