"""Full fine-tuning: every parameter of the enabled blocks (the whole UNet for the baseline)."""

from memcontrol.tuning._base import Method, NoOptions, base_params, inject_nothing, single_group

METHOD = Method(
    name="full",
    config_cls=NoOptions,
    candidates=lambda unet, cfg: base_params(unet, lambda n: True),
    inject=inject_nothing("full"),
    group_lrs=single_group("full"),
)
