"""DiffFit (Xie et al., ICCV 2023) adapted to the SD UNet as the reference code does.

Trains every bias, every norm parameter (names containing ``bias`` or ``norm``) and learnable scale
factors gamma, initialised to 1, that multiply:

* the attn1, attn2 and FF residual branches of each transformer block (C values each), and
* the q, k, v and out projections of both attention layers (C values each),

so 11 * C gammas per SD transformer block. SD-1.5: 443,844 bias+norm + 137,280 gamma = 581,124
(docs/paper.md §3.5). A 0-bit of the reference layout freezes only the gammas (docs/paper.md §3.3).

Each gamma is a parameter ``difffit_gamma`` registered on the module whose output it scales,
applied by a forward hook, so base parameter names are unchanged. Unlike the reference, the gammas
are saved and reloaded (it loads DiffFit models into a vanilla UNet with ``strict=False``, which
drops them, docs/paper.md §6).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn

from memcontrol.tuning._base import Candidate, Method, NoOptions, single_group

GAMMA = "difffit_gamma"
_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def _out_features(module: nn.Module) -> int:
    """Width of the last dimension of ``module``'s output: its last Linear's out_features."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, Attention):
        return module.to_out[0].out_features
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1].out_features


def _gamma_targets(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose output a gamma scales: attn1/attn2/ff of each transformer block, then the
    q/k/v/out projections of its attention layers."""
    modules = dict(unet.named_modules())
    out = []
    for name, block in modules.items():
        if not isinstance(block, BasicTransformerBlock):
            continue
        for branch in ("attn1", "attn2", "ff"):
            if getattr(block, branch, None) is not None:
                out.append((f"{name}.{branch}", getattr(block, branch)))
        for branch in ("attn1", "attn2"):
            if getattr(block, branch, None) is None:
                continue
            for proj in _PROJECTIONS:
                full = f"{name}.{branch}.{proj}"
                if isinstance(modules.get(full), nn.Linear):
                    out.append((full, modules[full]))
    return out


def _candidates(unet: nn.Module, cfg: NoOptions) -> list[Candidate]:
    out = [Candidate(n, p.numel(), "base") for n, p in unet.named_parameters() if "bias" in n or "norm" in n]
    for name, module in _gamma_targets(unet):
        out.append(Candidate(f"{name}.{GAMMA}", _out_features(module), "gamma", module=name))
    return out


def _scale_output(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
    gamma = getattr(module, GAMMA)
    if output.shape[-1] != gamma.shape[0]:
        raise RuntimeError(
            f"DiffFit gamma of size {gamma.shape[0]} does not match the output's last dim {tuple(output.shape)}"
        )
    return output * gamma.to(output.dtype)


def _inject(unet: nn.Module, chosen: Sequence[Candidate], cfg: NoOptions) -> dict[str, list[str]]:
    modules = dict(unet.named_modules())
    names = []
    for c in chosen:
        if c.kind == "gamma":
            module = modules[c.module]
            ref = next(module.parameters())
            module.register_parameter(GAMMA, nn.Parameter(torch.ones(c.numel, device=ref.device, dtype=torch.float32)))
            module.register_forward_hook(_scale_output)
        names.append(c.name)
    return {"difffit": names}


def _folded_linear(module: nn.Module) -> nn.Linear:
    """The Linear whose output is ``module``'s output up to a per-channel-linear map, so a gamma on
    ``module``'s output folds exactly into that Linear's rows: the module itself, an attention's
    ``to_out[0]`` (then dropout and a division by ``rescale_output_factor``), or the last Linear
    of a feed-forward (only dropouts after it)."""
    if isinstance(module, nn.Linear):
        return module
    if isinstance(module, Attention):
        if module.residual_connection:
            raise RuntimeError("DiffFit: an attention with a residual connection cannot fold its gamma exactly")
        return module.to_out[0]
    net = list(getattr(module, "net", []))
    last = max((i for i, m in enumerate(net) if isinstance(m, nn.Linear)), default=None)
    if last is None or not all(isinstance(m, nn.Dropout) for m in net[last + 1:]):
        raise RuntimeError(f"DiffFit: cannot fold a gamma on a {type(module).__name__} exactly")
    return net[last]


@torch.no_grad()
def _merge(unet: nn.Module) -> None:
    """y * gamma = (diag(gamma) W) x + gamma * b: scale the rows (and bias) of the Linear that
    produces each scaled output, in fp32, then drop the gammas and their hooks."""
    for module in list(unet.modules()):
        gamma = module._parameters.get(GAMMA)
        if gamma is None:
            continue
        linear = _folded_linear(module)
        g = gamma.detach().float()
        linear.weight.copy_((linear.weight.float() * g[:, None]).to(linear.weight.dtype))
        if linear.bias is not None:
            linear.bias.copy_((linear.bias.float() * g).to(linear.bias.dtype))
        for key, hook in list(module._forward_hooks.items()):
            if hook is _scale_output:
                del module._forward_hooks[key]
        del module._parameters[GAMMA]


METHOD = Method(
    name="difffit",
    config_cls=NoOptions,
    candidates=_candidates,
    inject=_inject,
    group_lrs=single_group("difffit"),
    reference_masked=lambda c: c.kind == "gamma",
    merge=_merge,
)
