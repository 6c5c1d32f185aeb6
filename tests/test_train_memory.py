"""finetune releases its optimizer when it returns. With fp16 on a GPU, accelerate's optimizer
wrapper holds itself in a reference cycle (its patched step method); before the fix the AdamW state
and the trained parameters outlived finetune until Python's cyclic GC ran, which put earlier
runs' memory into later measurements (docs/performance.md "Memory"). Needs CUDA: the cycle only
exists with a GradScaler, which accelerate creates for fp16 on an accelerator, never on CPU."""

import gc

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from memcontrol.train import TrainData, finetune

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp16 GradScaler path needs CUDA")


def test_fp16_finetune_frees_optimizer_state():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=16).cuda()
    data = TrainData(latent_mean=torch.randn(8, 4, 8, 8), latent_std=torch.full((8, 4, 8, 8), 0.1),
                     text=torch.randn(4, 8, 32), null_text=torch.zeros(1, 8, 32),
                     image_idx=torch.arange(8), prompt_idx=torch.arange(8) % 4)
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    gc.collect()
    gc.disable()  # what finetune leaves behind must be freed by finetune itself, not by a later GC pass
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        finetune(unet, [{"params": list(unet.parameters()), "lr": 1e-4}], data, DDPMScheduler(), steps=3,
                 batch_size=4, seed=0, mixed_precision="fp16", device="cuda")
        torch.cuda.synchronize()
        left = torch.cuda.memory_allocated() - before
    finally:
        gc.enable()
    # AdamW's two moments alone are 2x the weights; gradients are set to None
    assert left < 0.5 * weights, f"{left} bytes still allocated after finetune (weights: {weights})"
