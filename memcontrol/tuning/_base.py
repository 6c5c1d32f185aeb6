"""What every method file provides: a config, a candidate list, and an injector."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from memcontrol.tuning.mask import MaskError


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One parameter a method would train, before anything is created.

    ``name`` is the parameter's name for a base parameter, or ``<module>.<local>`` for an adapter
    parameter that :func:`Method.inject` creates; block ownership and the reference-mode rules
    look only at this name. ``numel`` comes from shapes alone, so counting works on a meta-device
    model.
    """

    name: str
    numel: int
    kind: str  # "base", "delta", "delta_norm", "gamma", "lora"
    module: str = ""  # the module an adapter parameter is attached to


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered PEFT method.

    ``candidates(unet, cfg)`` lists everything the method can train on the whole UNet.
    ``inject(unet, chosen, cfg)`` creates the adapters of the chosen candidates (base parameters
    need nothing) and returns ``{group name: [parameter names]}`` of the real parameters to train.
    ``group_lrs(cfg, lr)`` maps each group name to its learning rate.
    ``reference_masked(candidate)`` says whether a 0-bit of the reference layout freezes the
    candidate when it lies under ``<block>.transformer_blocks.``; ``None`` means the reference never
    masks this method.
    ``merge(unet)`` folds the injected adapters into the base weights in place, so the UNet computes
    the same output with only its base parameters; ``None``: the method trains base parameters and
    adds nothing to fold.
    """

    name: str
    config_cls: type
    candidates: Callable[[nn.Module, Any], list[Candidate]]
    inject: Callable[[nn.Module, Sequence[Candidate], Any], dict[str, list[str]]]
    group_lrs: Callable[[Any, float], dict[str, float]]
    reference_masked: Callable[[Candidate], bool] | None = None
    merge: Callable[[nn.Module], None] | None = None

    def make_config(self, options: Mapping[str, Any]):
        """Build the method's config from mask options; unknown option names raise."""
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise MaskError(
                f"method {self.name!r} has no options {unknown} (known: {sorted(fields) or 'none'})"
            )
        return self.config_cls(**dict(options))


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Config of a method without options."""


def single_group(name: str) -> Callable[[Any, float], dict[str, float]]:
    return lambda cfg, lr: {name: lr}


def base_params(unet: nn.Module, keep: Callable[[str], bool]) -> list[Candidate]:
    """Base parameters whose name passes ``keep``, as candidates."""
    return [Candidate(n, p.numel(), "base") for n, p in unet.named_parameters() if keep(n)]


def inject_nothing(group: str):
    def inject(unet: nn.Module, chosen: Sequence[Candidate], cfg) -> dict[str, list[str]]:
        return {group: [c.name for c in chosen]}

    return inject
