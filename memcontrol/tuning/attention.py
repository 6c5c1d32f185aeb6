"""Attention-only fine-tuning (Touvron et al. 2022): every parameter of the Transformer2DModels.

As in the reference code, "attention" means the whole ``*.attentions.*`` unit (norm, proj_in,
attn1, attn2, FF, proj_out): 267,239,360 parameters on SD-1.5 (docs/paper.md §3.5). In reference mode
a 0-bit freezes only the names containing ``attn`` inside the block's transformer_blocks
(attn1 and attn2); FF, norms and proj_in/out stay on (docs/paper.md §3.3).
"""

from memcontrol.tuning._base import Candidate, Method, NoOptions, base_params, inject_nothing, single_group


def _reference_masked(c: Candidate) -> bool:
    return "attn" in c.name.split(".transformer_blocks.", 1)[1]


METHOD = Method(
    name="attention",
    config_cls=NoOptions,
    candidates=lambda unet, cfg: base_params(unet, lambda n: ".attentions." in n),
    inject=inject_nothing("attention"),
    group_lrs=single_group("attention"),
    reference_masked=_reference_masked,
)
