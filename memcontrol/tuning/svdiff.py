"""SV-Diff (Han et al., ICCV 2023): learn shifts of the singular values of frozen weights.

Every Linear/Conv weight W (a conv as ``out x in*kh*kw``) is decomposed once, W = U diag(S) V^T,
and only a zero-initialised shift ``delta`` (``min(out, in*kh*kw)`` values) is learned; the layer
uses W_delta = U diag(relu(S + delta)) V^T. GroupNorm/LayerNorm weights are ``1 x C`` matrices (one
shift each) and train in their own group at ``norm_lr`` (1e-6 in the reference, docs/paper.md §3.5).
SD-1.5: 222,805 shifts (docs/paper.md §3.5).

Implementation (one ``torch.nn.utils.parametrize`` parametrization per weight):

* W_delta is computed as ``W + U diag(relu(S + delta) - S) V^T``, equal to the formula above since
  W = U diag(S) V^T, but exactly W (bit for bit) while delta = 0, where the reference's form carries
  the SVD's rounding error. With delta = 0 no copy is made at all.
* W_delta is cached and rebuilt only when delta (or W) changed: the cache key is the tensors'
  ``_version`` counters (bumped by every in-place update, e.g. ``optimizer.step()`` or
  ``load_state_dict``) and ``data_ptr``. A custom autograd function returns the cached W_delta and
  computes d loss / d delta = 1[S + delta > 0] * diag(U^T G V) from the weight gradient G, so the
  cache also serves training forwards (gradient accumulation, the reward's two passes): the
  reconstruction runs once per parameter update, not once per forward.
* Extra memory per wrapped weight (fp32): U (out x k) + S (k) + V^T (k x n) + delta (k), plus the
  cached W_delta (out x n) once delta is non-zero; k = min(out, n), n = in*kh*kw.
  docs/methods.md gives the SD-1.5 totals.
* The factors are computed in fp32 and are not saved (buffers with ``persistent=False``):
  :func:`memcontrol.tuning.load_adapter` recomputes them from the same base weights, as the
  reference's ``perform_svd`` does. The rebuild runs with autocast off and returns W's dtype, so the
  layer works under fp16/bf16 autocast and with a half-precision frozen UNet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from memcontrol.tuning._base import Candidate, Method
from memcontrol.tuning.mask import MaskError

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


@dataclasses.dataclass(frozen=True)
class SVDiffOptions:
    norm_lr: float = 1e-6  # learning rate of the norm shifts (docs/paper.md §3.5)

    def __post_init__(self) -> None:
        lr = self.norm_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr > 0):
            raise MaskError(f"svdiff option `norm_lr` must be a number > 0, got {lr!r}")


def _matrix_shape(weight: Tensor) -> tuple[int, int]:
    """(rows, cols) of the matrix SV-Diff decomposes: (out, in*kh*kw), or (1, C) for a norm."""
    if weight.dim() == 1:
        return 1, weight.shape[0]
    return weight.shape[0], weight[0].numel()


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run CPU LAPACK single-threaded: on a loaded 2-core box MKL's threaded SVD of a 64 x 576
    UNet conv took ~1 s against 2 ms on one thread (benchmarks/methods.py reports apply time)."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _ShiftedWeight(torch.autograd.Function):
    """Forward: the (cached) W_delta. Backward: d loss / d delta from d loss / d W_delta."""

    @staticmethod
    def forward(ctx, delta: Tensor, original: Tensor, shift: SpectralShift) -> Tensor:
        weight = shift.shifted_weight(delta, original)
        ctx.shift = shift
        ctx.save_for_backward(delta)
        return weight.view_as(weight)  # a fresh alias: autograd attaches this call's node to it

    @staticmethod
    def backward(ctx, grad: Tensor):
        (delta,) = ctx.saved_tensors
        shift: SpectralShift = ctx.shift
        with torch.autocast(device_type=grad.device.type, enabled=False):
            g = grad.reshape(shift.U.shape[0], -1).float()
            s = shift.S.float()
            # d/d delta_i of sum(G * U diag(relu(S+delta)) V^T) = 1[S_i+delta_i > 0] u_i^T G v_i
            gd = ((shift.U.float().T @ g) * shift.Vh.float()).sum(dim=1)
            gd = gd * (s + delta.float() > 0)
        return gd.to(delta.dtype), None, None


class SpectralShift(nn.Module):
    """Parametrization ``W -> W + U diag(relu(S + delta) - S) V^T`` with a version-keyed cache.

    ``weight``: the frozen weight, (out, in), (out, in, *k) or (C,) for a norm; any float dtype.
    ``rebuilds`` counts the reconstructions (a test checks it is once per update).
    """

    def __init__(self, weight: Tensor):
        super().__init__()
        rows, cols = _matrix_shape(weight)
        with torch.no_grad(), _one_cpu_thread(weight.device):
            u, s, vh = torch.linalg.svd(weight.detach().reshape(rows, cols).float(), full_matrices=False)
        self.register_buffer("U", u, persistent=False)
        self.register_buffer("S", s, persistent=False)
        self.register_buffer("Vh", vh, persistent=False)
        self.delta = nn.Parameter(torch.zeros_like(s))
        self.rebuilds = 0
        # [key, W_delta] in a list: assigning a Parameter (W itself) to a Module attribute would
        # register it as a parameter of this module.
        self._cache: list = [None, None]

    def forward(self, original: Tensor) -> Tensor:
        if original.requires_grad:
            raise RuntimeError("SV-Diff needs the wrapped weight frozen (requires_grad=False)")
        return _ShiftedWeight.apply(self.delta, original, self)

    def shifted_weight(self, delta: Tensor, original: Tensor) -> Tensor:
        """W_delta, same shape and dtype as ``original``; rebuilt only if delta or W changed."""
        key = (delta._version, delta.data_ptr(), original._version, original.data_ptr(), original.dtype)
        if key != self._cache[0]:
            self._cache[:] = [None, None]  # free the old copy before building the new one
            self._cache[:] = [key, self._rebuild(delta, original)]
            self.rebuilds += 1
        return self._cache[1]

    @torch.no_grad()
    def _rebuild(self, delta: Tensor, original: Tensor) -> Tensor:
        with torch.autocast(device_type=original.device.type, enabled=False):
            d = delta.detach().float()
            if not bool(torch.any(d != 0)):
                return original  # relu(S) - S == 0 exactly: W_delta is W itself
            s = self.S.float()
            update = (self.U.float() * (F.relu(s + d) - s)) @ self.Vh.float()
            return (original.float() + update.reshape(original.shape)).to(original.dtype)


def _candidates(unet: nn.Module, cfg: SVDiffOptions) -> list[Candidate]:
    out = []
    for name, module in unet.named_modules():
        if isinstance(module, LINEAR_TYPES):
            rows, cols = _matrix_shape(module.weight)
            out.append(Candidate(f"{name}.svdiff_delta", min(rows, cols), "delta", module=name))
        elif isinstance(module, NORM_TYPES) and getattr(module, "weight", None) is not None:
            out.append(Candidate(f"{name}.svdiff_delta", 1, "delta_norm", module=name))
    return out


def _inject(unet: nn.Module, chosen: Sequence[Candidate], cfg: SVDiffOptions) -> dict[str, list[str]]:
    modules = dict(unet.named_modules())
    groups: dict[str, list[str]] = {"svdiff": [], "svdiff_norm": []}
    for c in chosen:
        module = modules[c.module]
        module.weight.requires_grad_(False)
        parametrize.register_parametrization(module, "weight", SpectralShift(module.weight))
        group = "svdiff_norm" if c.kind == "delta_norm" else "svdiff"
        groups[group].append(f"{c.module}.parametrizations.weight.0.delta")
    return groups


def shifts(unet: nn.Module) -> list[SpectralShift]:
    """Every SpectralShift parametrization in ``unet`` (e.g. to read ``rebuilds``)."""
    return [m for m in unet.modules() if isinstance(m, SpectralShift)]


def extra_numel(unet: nn.Module, chosen: Sequence[Candidate] | None = None) -> dict[str, int]:
    """Extra elements SV-Diff holds for ``chosen`` (default: every weight), from shapes alone.

    Returns ``{"factors": U + S + V^T, "delta": shifts, "cache": W_delta copies once delta != 0}``.
    """
    modules = dict(unet.named_modules())
    chosen = _candidates(unet, SVDiffOptions()) if chosen is None else chosen
    tally = {"factors": 0, "delta": 0, "cache": 0}
    for c in chosen:
        rows, cols = _matrix_shape(modules[c.module].weight)
        k = min(rows, cols)
        tally["factors"] += rows * k + k + k * cols
        tally["delta"] += k
        tally["cache"] += rows * cols
    return tally


@torch.no_grad()
def _merge(unet: nn.Module) -> None:
    """Replace each parametrized weight by the W_delta the layer computes (the same cached tensor the
    forward uses, so the merged UNet's weights are bit-identical to the adapted one's) and drop the
    parametrization with its factors."""
    for module in list(unet.modules()):
        if not parametrize.is_parametrized(module, "weight"):
            continue
        merged = module.weight.detach().clone()
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        module.weight.copy_(merged)


def _reference_masked(c: Candidate) -> bool:
    return True  # a 0-bit freezes every shift in the block's transformer_blocks (docs/paper.md §3.3)


METHOD = Method(
    name="svdiff",
    config_cls=SVDiffOptions,
    candidates=_candidates,
    inject=_inject,
    group_lrs=lambda cfg, lr: {"svdiff": lr, "svdiff_norm": cfg.norm_lr},
    reference_masked=_reference_masked,
    merge=_merge,
)
