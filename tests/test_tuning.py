"""PEFT methods, masks and adapters on diffusers' test-size UNet2DConditionModel (CPU, ms each),
plus the exact parameter counts on an SD-1.5 UNet built on the meta device."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from memcontrol.tuning import (
    ADAPTER_FILE,
    MASK_FILE,
    METHODS,
    Mask,
    MaskError,
    apply,
    block_layout,
    count_parameters,
    enumerate_blocks,
    load_adapter,
    mask_for_model,
    merge,
    reference_layout,
    register,
    save_adapter,
    trainable_state_dict,
)
from memcontrol.tuning import svdiff
from memcontrol.models import sd15

TINY = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    cross_attention_dim=32,
    norm_num_groups=8,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_BLOCKS = ("down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1")

# The published SD-1.5 unet/config.json (runwayml/stable-diffusion-v1-5).
SD15 = sd15.UNET


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Milliseconds-sized ops: one thread avoids OpenMP stalls on a shared, loaded CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    c = torch.randn(2, 5, 32, generator=g)
    return x, t, c


@pytest.fixture(scope="module")
def base_out(inputs):
    with torch.no_grad():
        return make_unet()(*inputs).sample


# (id, method, mode, bits or None for the reference-mode unmasked baseline, granularity, options)
CASES = [
    ("full", "full", "full", [1, 0, 0, 1], "transformer", {}),
    ("full-baseline", "full", "reference", None, "transformer", {}),
    ("attention", "attention", "full", [0, 1, 1, 0], "transformer", {}),
    ("attention-ref", "attention", "reference", [0, 1, 0, 1], "transformer", {}),
    ("bias", "bias", "full", [0, 1, 1, 0], "transformer", {}),
    ("bias-baseline", "bias", "reference", None, "transformer", {}),
    ("norm", "norm", "full", [1, 0, 0, 1], "transformer", {}),
    ("lora", "lora", "full", [0, 0, 1, 1], "transformer", {"rank": 2, "alpha": 4}),
    ("lora-baseline", "lora", "reference", None, "transformer", {}),
    ("svdiff", "svdiff", "full", [1, 0, 1, 0], "transformer", {}),
    ("svdiff-ref", "svdiff", "reference", [0, 1, 0], "transformer", {"norm_lr": 1e-3}),
    ("svdiff-resnet", "svdiff", "full", [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1], "resnet", {}),
    ("difffit", "difffit", "full", [0, 1, 0, 1], "transformer", {}),
    ("difffit-ref", "difffit", "reference", [1, 0, 0], "transformer", {}),
    ("difffit-sublayer", "difffit", "full", [1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0], "sublayer", {}),
]


def case_mask(case, unet=None, lr=1e-2) -> Mask:
    _, method, mode, bits, granularity, options = case
    if bits is None:
        return Mask(method, (), (), lr, mode=mode, options=options)
    return mask_for_model(unet or make_unet(), method, lr, bits, mode=mode, granularity=granularity, options=options)


def train(unet, prepared, inputs, steps=3):
    opt = torch.optim.AdamW(prepared.groups, weight_decay=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        unet(*inputs).sample.square().mean().backward()
        opt.step()


def trainable_names(unet) -> set[str]:
    return {n for n, p in unet.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_init_is_identity(case, inputs, base_out):
    unet = make_unet()
    mask = case_mask(case, unet)
    prepared = apply(unet, mask)
    with torch.no_grad():
        out = unet(*inputs).sample
    assert torch.equal(out, base_out)
    assert prepared.trainable == count_parameters(make_unet(), mask) > 0
    assert prepared.total == sum(p.numel() for p in make_unet().parameters())
    assert prepared.trainable == sum(p.numel() for g in prepared.groups for p in g["params"])


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_only_masked_blocks_get_grads(case, inputs):
    unet = make_unet()
    mask = case_mask(case, unet)
    prepared = apply(unet, mask)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    opt = torch.optim.SGD(prepared.groups, lr=1e-2)
    unet(*inputs).sample.square().mean().backward()
    trainable = trainable_names(unet)
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    assert with_grad == trainable

    if mask.mode == "full":
        enabled = tuple(b + "." for b in mask.enabled())
        assert all(n.startswith(enabled) for n in trainable)
    elif mask.blocks:
        frozen = tuple(b + ".transformer_blocks." for b in mask.disabled())
        in_frozen = {n for n in trainable if n.startswith(frozen)}
        if mask.method == "svdiff":
            assert not in_frozen
        elif mask.method == "difffit":
            assert in_frozen and not any("difffit_gamma" in n for n in in_frozen)
        else:  # attention: only attn1/attn2 are frozen, ff and norms stay on
            assert in_frozen and not any(".attn" in n for n in in_frozen)
        if mask.method != "attention":  # always-on parameters outside the 13-bit layout's blocks
            assert any(not n.startswith(tuple(b + "." for b in mask.blocks)) for n in trainable)

    opt.step()
    after = dict(unet.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before if n not in trainable)
    assert any(not torch.equal(before[n], after[n]) for n in trainable)


def seeded_image(unet, cond, steps=3):
    """A short seeded DDIM loop on latents: what the sampler does, without the VAE."""
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False)
    sched.set_timesteps(steps)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(unet(z, t, cond[:1]).sample, t, z).prev_sample
    return z


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_adapter_roundtrip(case, inputs, tmp_path):
    unet = make_unet()
    mask = case_mask(case, unet)
    prepared = apply(unet, mask)
    train(unet, prepared, inputs)
    saved = save_adapter(tmp_path, unet, mask)
    assert saved.trainable_params == prepared.trainable
    assert Mask.load(tmp_path / MASK_FILE) == saved

    fresh = make_unet()
    loaded = load_adapter(tmp_path, fresh)
    assert loaded == saved
    with torch.no_grad():
        assert torch.equal(unet(*inputs).sample, fresh(*inputs).sample)
    assert torch.equal(seeded_image(unet, inputs[2]), seeded_image(fresh, inputs[2]))

    tensors = load_file(tmp_path / ADAPTER_FILE)
    assert set(tensors) == set(trainable_state_dict(unet, mask))
    if mask.method == "difffit":  # the reference drops these on reload (docs/paper.md §6)
        gammas = [t for n, t in tensors.items() if n.endswith("difffit_gamma")]
        assert gammas and all(not torch.all(g == 1) for g in gammas)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_merge_gives_a_plain_unet_with_the_same_output(case, inputs):
    """Each method's merge (LoRA: W + BA; SV-Diff: U diag(relu(S + delta)) V^T; DiffFit: gammas
    folded into the Linear before them) loads strictly into a fresh base UNet and computes what the
    adapted UNet computes. Random adapter values, far from the identity init, so every fold matters
    (SV-Diff shifts below -S exercise the relu)."""
    unet = make_unet()
    mask = case_mask(case, unet)
    apply(unet, mask)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in trainable_state_dict(unet, mask).values():
            p.add_(torch.randn(p.shape, generator=g) * (p.abs().mean() + 0.1))
        adapted = unet(*inputs).sample
    state = merge(unet)
    plain = make_unet(seed=1)
    plain.load_state_dict(state, strict=True)  # only base names, every one of them
    with torch.no_grad():
        merged = plain(*inputs).sample
    assert not torch.allclose(adapted, make_unet()(*inputs).sample, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)
    with pytest.raises(MaskError, match="no adapter to merge"):
        merge(unet)


def test_unknown_block_raises():
    unet = make_unet()
    good = mask_for_model(unet, "svdiff", 1e-3)
    blocks = list(good.blocks)
    blocks[1] = "mid_block.attentions.7"
    bad = Mask("svdiff", tuple(blocks), good.bits, 1e-3)
    with pytest.raises(MaskError, match=r"mid_block\.attentions\.7"):
        apply(unet, bad)
    with pytest.raises(MaskError, match=r"mid_block\.attentions\.7"):
        count_parameters(unet, bad)
    assert trainable_names(unet) == {n for n, _ in unet.named_parameters()}  # failed before any change
    # a mask that skips one of the model's blocks is an error too
    partial = Mask("svdiff", good.blocks[:-1], good.bits[:-1], 1e-3)
    with pytest.raises(MaskError, match=r"up_blocks\.1\.attentions\.1"):
        apply(make_unet(), partial)
    # a mask from SD-1.5 onto the tiny model names blocks it lacks
    with torch.device("meta"):
        big = UNet2DConditionModel.from_config(SD15)
    with pytest.raises(MaskError, match=r"down_blocks\.0\.attentions\.1"):
        apply(make_unet(), mask_for_model(big, "difffit", 1e-4))


def test_mask_errors():
    unet = make_unet()
    with pytest.raises(MaskError, match="nothing trainable"):
        apply(unet, mask_for_model(unet, "lora", 1e-3, [0, 0, 0, 0]))
    with pytest.raises(MaskError, match="no reference bit layout"):
        mask_for_model(unet, "bias", 1e-3, mode="reference")
    with pytest.raises(MaskError, match="no reference bit layout"):
        apply(unet, Mask("lora", TINY_BLOCKS, (1, 1, 1, 1), 1e-3, mode="reference"))
    with pytest.raises(MaskError, match=r"unknown method 'ia3'.*'svdiff'"):
        apply(unet, Mask("ia3", TINY_BLOCKS, (1, 1, 1, 1), 1e-3))
    with pytest.raises(MaskError, match=r"no options \['ranks'\]"):
        apply(unet, mask_for_model(unet, "lora", 1e-3, options={"ranks": 4}))
    with pytest.raises(MaskError, match="rank"):
        apply(unet, mask_for_model(unet, "lora", 1e-3, options={"rank": 0}))
    with pytest.raises(ValueError, match="already registered"):
        register(METHODS["bias"])
    apply(unet, mask_for_model(unet, "bias", 1e-3))
    with pytest.raises(MaskError, match="already has an adapter"):
        apply(unet, mask_for_model(unet, "norm", 1e-3))


def test_mask_json_roundtrip_and_digest(tmp_path):
    mask = Mask("lora", TINY_BLOCKS, (1, 0, 1, 1), 3e-4, options={"rank": 4, "targets": ["to_q", "to_v"]})
    assert Mask.from_json(mask.to_json()) == mask
    assert hash(Mask.from_json(mask.to_json())) == hash(mask)
    mask.save(tmp_path / "m.json")
    assert Mask.load(tmp_path / "m.json") == mask
    d = json.loads((tmp_path / "m.json").read_text())
    assert list(d) == sorted(d) and d["options"] == {"rank": 4, "targets": ["to_q", "to_v"]}
    assert mask.enabled() == (TINY_BLOCKS[0], TINY_BLOCKS[2], TINY_BLOCKS[3])

    digest = mask.digest()
    assert len(digest) == 12 and digest == Mask.from_json(mask.to_json()).digest()
    import dataclasses

    assert dataclasses.replace(mask, trainable_params=123).digest() == digest
    assert mask.with_bits((1, 1, 1, 1)).digest() != digest
    assert dataclasses.replace(mask, lr=1e-4).digest() != digest
    assert dataclasses.replace(mask, options={"rank": 8}).digest() != digest

    for bad, match in [
        ({**d, "colour": 1}, "unknown keys"),
        ({k: v for k, v in d.items() if k != "lr"}, "missing keys"),
        ({**d, "bits": [1, 0, 1]}, "3 `bits` for 4"),
        ({**d, "bits": [1, 0, 2, 1]}, "0 or 1"),
        ({**d, "lr": -1}, "`lr`"),
        ({**d, "mode": "partial"}, "`mode`"),
        ({**d, "blocks": [TINY_BLOCKS[0]] * 4}, "twice"),
    ]:
        with pytest.raises(MaskError, match=match):
            Mask.from_dict(bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(MaskError, match="broken.json"):
        Mask.load(tmp_path / "broken.json")


def test_transfer(inputs, tmp_path):
    """A mask found on one model applies to another model of the same architecture (paper's transfer)."""
    source = make_unet(seed=0)
    mask = mask_for_model(source, "svdiff", 1e-3, [0, 1, 1, 0])
    train(source, apply(source, mask), inputs, steps=1)
    saved = save_adapter(tmp_path, source, mask)

    target = make_unet(seed=1)  # other weights, e.g. the other dataset's base model
    loaded = Mask.load(tmp_path / MASK_FILE)
    prepared = apply(target, loaded)
    assert prepared.trainable == saved.trainable_params
    train(target, prepared, inputs, steps=1)
    assert trainable_state_dict(target, loaded).keys() == trainable_state_dict(source, mask).keys()


def test_load_adapter_is_strict(inputs, tmp_path):
    unet = make_unet()
    mask = mask_for_model(unet, "difffit", 1e-3, [1, 1, 0, 0])
    train(unet, apply(unet, mask), inputs, steps=1)
    save_adapter(tmp_path, unet, mask)
    tensors = load_file(tmp_path / ADAPTER_FILE)
    metadata = {"mask_digest": mask.digest(), "format": "memcontrol-adapter"}

    dropped = dict(tensors)
    gamma = next(n for n in dropped if n.endswith("difffit_gamma"))
    del dropped[gamma]
    save_file(dropped, tmp_path / ADAPTER_FILE, metadata=metadata)
    with pytest.raises(MaskError, match="missing tensors"):
        load_adapter(tmp_path, make_unet())

    save_file({**tensors, "conv_in.extra": torch.zeros(1)}, tmp_path / ADAPTER_FILE, metadata=metadata)
    with pytest.raises(MaskError, match=r"unexpected tensors \['conv_in.extra'\]"):
        load_adapter(tmp_path, make_unet())

    save_file(tensors, tmp_path / ADAPTER_FILE, metadata=metadata)
    mask.with_bits([1, 1, 1, 0]).save(tmp_path / MASK_FILE)
    with pytest.raises(MaskError, match="saved for mask"):
        load_adapter(tmp_path, make_unet())


def test_svdiff_rebuilds_once_per_update(inputs):
    unet = make_unet()
    prepared = apply(unet, mask_for_model(unet, "svdiff", 1e-3))
    layers = svdiff.shifts(unet)
    count = lambda: sum(s.rebuilds for s in layers)  # noqa: E731
    start = count()
    with torch.no_grad():
        for _ in range(3):
            unet(*inputs)
    assert count() == start  # delta == 0 since registration: W itself, nothing rebuilt

    opt = torch.optim.AdamW(prepared.groups)
    updates = 3
    for _ in range(updates):
        opt.zero_grad()
        for _ in range(2):  # gradient accumulation: two forwards per update
            unet(*inputs).sample.square().mean().backward()
        opt.step()
    with torch.no_grad():
        for _ in range(5):  # sampling: many forwards, no update
            unet(*inputs)
    # the first forward after each update rebuilds every shifted weight once
    assert count() == start + updates * len(layers)


def test_svdiff_gradient_matches_the_formula():
    """The cached path's d/d delta equals autograd through U diag(relu(S + delta)) V^T."""
    F = torch.nn.functional
    torch.manual_seed(0)
    for layer, x, run in [
        (torch.nn.Linear(6, 4), torch.randn(3, 6), lambda m, w, x: F.linear(x, w, m.bias)),
        (torch.nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 6, 6), lambda m, w, x: F.conv2d(x, w, m.bias, padding=1)),
        (torch.nn.GroupNorm(2, 4), torch.randn(2, 4, 3, 3), lambda m, w, x: F.group_norm(x, 2, w, m.bias, m.eps)),
    ]:
        w = layer.weight.detach().clone()
        shift = svdiff.SpectralShift(w)
        with torch.no_grad():
            shift.delta.copy_(torch.randn_like(shift.delta) * 0.3)
            shift.delta[0] = -shift.S[0] - 1.0  # relu clips this one: zero gradient
        delta = shift.delta.detach().clone().requires_grad_(True)
        naive = ((shift.U * torch.relu(shift.S + delta)) @ shift.Vh).reshape(w.shape)
        run(layer, naive, x).square().sum().backward()

        layer.weight.requires_grad_(False)
        torch.nn.utils.parametrize.register_parametrization(layer, "weight", shift)
        out = layer(x)
        torch.testing.assert_close(out, run(layer, naive.detach(), x), rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        torch.testing.assert_close(shift.delta.grad, delta.grad, rtol=1e-4, atol=1e-5)
        assert shift.delta.grad[0] == 0


@pytest.mark.parametrize("method", ["svdiff", "difffit", "lora"])
def test_adapters_run_under_autocast(method, inputs):
    unet = make_unet()
    prepared = apply(unet, mask_for_model(unet, method, 1e-3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(*inputs).sample
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    params = [p for g in prepared.groups for p in g["params"]]
    assert all(p.dtype == torch.float32 and p.grad is not None for p in params)
    assert all(torch.isfinite(p.grad).all() for p in params)


def test_granularity_options():
    unet = make_unet()
    assert enumerate_blocks(unet) == TINY_BLOCKS
    resnet = enumerate_blocks(unet, "resnet")
    assert resnet == (
        "down_blocks.0.attentions.0", "down_blocks.0.resnets.0", "down_blocks.1.resnets.0",
        "mid_block.attentions.0", "mid_block.resnets.0", "mid_block.resnets.1",
        "up_blocks.0.resnets.0", "up_blocks.0.resnets.1",
        "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "up_blocks.1.resnets.0", "up_blocks.1.resnets.1",
    )  # fmt: skip
    sub = enumerate_blocks(unet, "sublayer")
    assert len(sub) == 3 * len(TINY_BLOCKS)
    assert sub[:3] == tuple(f"down_blocks.0.attentions.0.transformer_blocks.0.{s}" for s in ("attn1", "attn2", "ff"))
    with pytest.raises(MaskError, match="granularity"):
        enumerate_blocks(unet, "layer")
    # the reference's 13-bit layout skips the last attention of each up block
    assert reference_layout(unet, "svdiff") == TINY_BLOCKS[:3]
    assert block_layout(unet, "attention", "reference") == TINY_BLOCKS
    # finer granularity splits the same parameters: all sublayers on = attn1/attn2/ff of every block
    full_on = count_parameters(unet, mask_for_model(unet, "full", 1e-3, granularity="sublayer"))
    expect = sum(p.numel() for n, p in unet.named_parameters() if any(f".{s}." in n for s in ("attn1", "attn2", "ff")))
    assert full_on == expect


# --- parity with the reference's counts on SD-1.5 (docs/paper.md §3) ----------------------------------
SD15_REFERENCE_LAYOUT_13 = (
    "down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "down_blocks.1.attentions.0",
    "down_blocks.1.attentions.1", "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
    "mid_block.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
    "up_blocks.2.attentions.0", "up_blocks.2.attentions.1", "up_blocks.3.attentions.0", "up_blocks.3.attentions.1",
)  # fmt: skip

# (method, mode, bits: None = unmasked baseline / "ones" / "zeros", options, exact count)
PARITY = [
    ("full", "reference", None, {}, 859_520_964),
    ("svdiff", "reference", None, {}, 222_805),
    ("difffit", "reference", None, {}, 581_124),
    ("bias", "reference", None, {}, 343_684),
    ("norm", "reference", None, {}, 200_320),
    ("attention", "reference", None, {}, 267_239_360),  # the "267.24M" of docs/paper.md §3.5
    ("lora", "reference", None, {"rank": 4}, 797_184),
    ("lora", "reference", None, {"rank": 16}, 3_188_736),
    ("svdiff", "reference", "zeros", {}, 125_486),
    ("svdiff", "reference", "ones", {}, 222_805),
    ("difffit", "reference", "zeros", {}, 468_484),
    ("difffit", "reference", "ones", {}, 581_124),
    ("attention", "reference", "zeros", {}, 173_702_720),  # "173.70M"
    ("attention", "reference", "ones", {}, 267_239_360),
    # full mode: only inside the 16 Transformer2DModels (docs/methods.md)
    ("svdiff", "full", "ones", {}, 143_680),
    ("difffit", "full", "ones", {}, 399_360),
    ("bias", "full", "ones", {}, 212_160),
    ("norm", "full", "ones", {}, 99_840),
    ("attention", "full", "ones", {}, 267_239_360),
    ("full", "full", "ones", {}, 267_239_360),
    ("lora", "full", "ones", {"rank": 4}, 797_184),
]


@pytest.fixture(scope="module")
def sd15():
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(SD15)


def test_sd15_unet_size_and_layouts(sd15):
    assert sum(p.numel() for p in sd15.parameters()) == 859_520_964
    assert len(enumerate_blocks(sd15)) == 16
    assert reference_layout(sd15, "svdiff") == SD15_REFERENCE_LAYOUT_13
    assert reference_layout(sd15, "difffit") == SD15_REFERENCE_LAYOUT_13
    assert reference_layout(sd15, "attention") == enumerate_blocks(sd15)


@pytest.mark.parametrize("method,mode,bits,options,expected", PARITY)
def test_sd15_parameter_count_parity(sd15, method, mode, bits, options, expected):
    if bits is None:
        mask = Mask(method, (), (), 1e-4, mode="reference", options=options)
    else:
        mask = mask_for_model(sd15, method, 1e-4, mode=mode, options=options)
        mask = mask.with_bits([1 if bits == "ones" else 0] * len(mask.bits))
    assert count_parameters(sd15, mask) == expected


def test_sd15_count_from_config_dict():
    bits = (0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0)
    mask = Mask("svdiff", SD15_REFERENCE_LAYOUT_13, bits, 1e-4, mode="reference")
    # 125,486 always on + 2 x 11,779 + 2 x 6,403 (docs/paper.md §3.2) = 0.0188%, rounds to the paper's 0.019%.
    # 165,053 (a figure quoted for this mask, docs/paper.md §3.4) is indices 7-11: one more 3,203 block.
    assert count_parameters(SD15, mask) == 161_850
    assert count_parameters(SD15, mask.with_bits(bits[:11] + (1, 0))) == 165_053
