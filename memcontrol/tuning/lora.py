"""LoRA on the attention projections, through the peft library (no reimplementation).

``peft.LoraConfig(target_modules=<exact module names inside the enabled blocks>)`` is injected with
the UNet's own ``add_adapter``. peft zero-initialises ``lora_B``, so the adapted UNet computes the
base output exactly at step 0. r = 4 on q/k/v/out of every attention of SD-1.5: 797,184 parameters
(docs/paper.md §3.5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from diffusers.models.attention_processor import Attention
from torch import nn

from memcontrol.tuning._base import Candidate, Method, single_group
from memcontrol.tuning.mask import MaskError

ADAPTER_NAME = "default"


@dataclasses.dataclass(frozen=True)
class LoraOptions:
    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # inside each Attention

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise MaskError(f"lora option `rank` must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0):
            raise MaskError(f"lora option `alpha` must be a number > 0, got {self.alpha!r}")
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise MaskError(f"lora option `targets` must be non-empty module names, got {self.targets!r}")
        object.__setattr__(self, "targets", targets)


def _candidates(unet: nn.Module, cfg: LoraOptions) -> list[Candidate]:
    modules = dict(unet.named_modules())
    out = []
    for name, module in modules.items():
        if not isinstance(module, Attention):
            continue
        for target in cfg.targets:
            full = f"{name}.{target}"
            layer = modules.get(full)
            if layer is None:
                continue
            if not isinstance(layer, nn.Linear):
                raise MaskError(f"lora target {full!r} is a {type(layer).__name__}, not a Linear")
            numel = cfg.rank * (layer.in_features + layer.out_features)
            out.append(Candidate(f"{full}.lora", numel, "lora", module=full))
    return out


def _inject(unet: nn.Module, chosen: Sequence[Candidate], cfg: LoraOptions) -> dict[str, list[str]]:
    from peft import LoraConfig

    targets = sorted({c.module for c in chosen})
    config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.rank if cfg.alpha is None else cfg.alpha,
        target_modules=targets,  # exact names: peft matches an entry by full name or "."-suffix
        lora_dropout=0.0,
        init_lora_weights=True,  # A kaiming, B zeros: identity at init
    )
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    names = []
    for t in targets:
        names += [f"{t}.lora_A.{ADAPTER_NAME}.weight", f"{t}.lora_B.{ADAPTER_NAME}.weight"]
    return {"lora": names}


def _merge(unet: nn.Module) -> None:
    """W <- W + (alpha / r) B A in every LoRA layer (peft's merge via diffusers' fuse_lora), then the
    peft wrappers are replaced by their merged base layers."""
    unet.fuse_lora(lora_scale=1.0, safe_fusing=True)
    unet.unload_lora()


METHOD = Method(
    name="lora",
    config_cls=LoraOptions,
    candidates=_candidates,
    inject=_inject,
    group_lrs=single_group("lora"),
    merge=_merge,
)
