"""Norm tuning: every parameter whose name contains ``norm`` (affine weight and bias of the
GroupNorm/LayerNorm layers), the reference's rule. 200,320 parameters on SD-1.5 (docs/paper.md §3.5).
"""

from memcontrol.tuning._base import Method, NoOptions, base_params, inject_nothing, single_group

METHOD = Method(
    name="norm",
    config_cls=NoOptions,
    candidates=lambda unet, cfg: base_params(unet, lambda n: "norm" in n),
    inject=inject_nothing("norm"),
    group_lrs=single_group("norm"),
)
