"""Searching the PEFT method with the mask (`tuning.method` a list, e.g. [lora, svdiff, difffit]):
the trial's `method` parameter picks the method; these helpers check such a list and give each
method the `tuning.options` it knows. The chosen method travels in the mask (mask JSON, audit)."""

from __future__ import annotations

import dataclasses

from memcontrol import tuning
from memcontrol.base_model import load_base
from memcontrol.config import Params
from memcontrol.tuning import MaskError
from memcontrol.workdir import Layout


def _fields(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(tuning.get_method(method).config_cls)}


def options_for(method: str, options: dict, methods: tuple[str, ...]) -> dict:
    """`options` as `method` takes them: all of them for a single method (an unknown one then raises
    where the mask is applied), only the method's own when the search chooses among several."""
    if len(methods) <= 1:
        return dict(options)
    known = _fields(method)
    return {k: v for k, v in options.items() if k in known}


def check_methods(methods: tuple[str, ...], options: dict, layouts: dict[str, tuple[str, ...]]) -> None:
    """A method list names registered methods, every option belongs to one of them, and every method
    has the same blocks (`layouts`: method -> block list), so one bit string means one set of blocks."""
    unknown = [m for m in methods if m not in tuning.METHODS]
    if unknown:
        raise MaskError(f"tuning.method: unknown {unknown}; known: {sorted(tuning.METHODS)}")
    if len(methods) <= 1:
        return
    stray = sorted(set(options) - set().union(*(_fields(m) for m in methods)))
    if stray:
        raise MaskError(f"tuning.options {stray} belong to none of tuning.method {list(methods)}")
    if len({layouts[m] for m in methods}) > 1:
        sizes = {m: len(layouts[m]) for m in methods}
        raise MaskError(f"tuning.method {list(methods)}: the methods have different block layouts in tuning.mode "
                        f"`reference` ({sizes} blocks); search them together in mode `full`")


def search_blocks(params: Params, layout: Layout) -> tuple[str, ...]:
    """The search space's blocks for tuning.method (one method or a list, checked)."""
    unet = load_base(layout).unet
    t = params.tuning
    layouts = {m: tuning.block_layout(unet, m, t.mode, t.granularity) for m in t.methods if m in tuning.METHODS}
    check_methods(t.methods, dict(t.options), layouts)
    return layouts[t.methods[0]]
