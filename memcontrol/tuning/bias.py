"""BitFit: every parameter named exactly ``bias`` (norm biases included), as the reference does.

343,684 parameters on SD-1.5 (docs/paper.md §3.5).
"""

from memcontrol.tuning._base import Method, NoOptions, base_params, inject_nothing, single_group

METHOD = Method(
    name="bias",
    config_cls=NoOptions,
    candidates=lambda unet, cfg: base_params(unet, lambda n: n.rsplit(".", 1)[-1] == "bias"),
    inject=inject_nothing("bias"),
    group_lrs=single_group("bias"),
)
