"""Mitigations on real components: the packaged MiniLM text encoder, a test-size diffusers UNet and
the real training loop (no mocks)."""

import pandas as pd
import pytest
import torch
from diffusers import UNet2DConditionModel

from memcontrol import mitigations as M
from memcontrol.models.bundle import Bundle
from memcontrol.models.tiny import sd_scheduler, text_encoder
from memcontrol.train import TrainData, finetune

PROMPTS = ["Heart size is normal. The lungs are clear.", "Right lower lobe consolidation.", "Small left pleural effusion."]


@pytest.fixture(scope="module")
def text():
    enc, tok = text_encoder(16)
    b = Bundle(vae=None, unet=None, text_encoder=enc, tokenizer=tok, scheduler=None)
    return b, M.vocabulary_words(tok)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=384, attention_head_dim=4, norm_num_groups=4,
    )


def _data(b: Bundle, n_items: int = 6) -> TrainData:
    g = torch.Generator().manual_seed(0)
    return TrainData(
        latent_mean=torch.randn(3, 4, 8, 8, generator=g), latent_std=torch.full((3, 4, 8, 8), 0.1),
        text=b.encode_prompts(PROMPTS), null_text=b.encode_prompts([""]),
        image_idx=torch.arange(n_items) % 3, prompt_idx=torch.arange(n_items) % 3, prompts=list(PROMPTS),
    )


def test_parse_arm_splits_base_and_mitigations_and_rejects_bad_names():
    assert M.parse_arm("selected+rwa+wen") == ("selected", ("rwa", "wen"))
    assert M.parse_arm("lora") == ("lora", ())
    for bad in ("rwa", "full+foo", "full+gn+gn", "+wen"):
        with pytest.raises(M.MitigationError):
            M.parse_arm(bad)


def test_vocabulary_words_are_whole_alphabetic_words(text):
    _, words = text
    assert len(words) > 10_000 and words == sorted(words)
    assert all(w.isalpha() and w.islower() and len(w) >= 3 for w in words)


def test_add_random_words_inserts_k_words_and_keeps_the_caption_in_order(text):
    _, words = text
    cap = "Right lower lobe consolidation seen"
    out = M.add_random_words(cap, words, 4, torch.Generator().manual_seed(1))
    toks = out.split()
    assert len(toks) == len(cap.split()) + 4
    # removing the inserted words, in order, gives the caption back
    it = iter(toks)
    assert all(any(w == t for t in it) for w in cap.split())
    same = M.add_random_words(cap, words, 4, torch.Generator().manual_seed(1))
    assert same == out


def test_rwa_resamples_every_time_a_caption_is_used(text):
    b, words = text
    rwa = M.RandomWordAddition(PROMPTS, words, b.encode_prompts, k=4)
    cached = b.encode_prompts(PROMPTS)
    gen = torch.Generator().manual_seed(0)
    pidx = torch.tensor([0, 0, 1])
    first = rwa(cached[pidx], pidx, gen)
    second = rwa(cached[pidx], pidx, gen)
    assert first.shape == cached[pidx].shape
    assert not torch.allclose(first[0], first[1])       # the same caption twice in one batch: two draws
    assert not torch.allclose(first[0], second[0])      # and again at the next use
    assert not torch.allclose(first[0], cached[0])
    assert rwa.calls == 2 and all(len(e.split()) > 4 for e in rwa.examples)
    # the states are the encoder's states of the augmented caption, nothing else
    gen = torch.Generator().manual_seed(5)
    state = gen.get_state()
    out = rwa(cached[pidx[:1]], pidx[:1], gen)
    gen.set_state(state)
    cap = M.add_random_words(PROMPTS[0], words, 4, gen)
    torch.testing.assert_close(out, b.encode_prompts([cap]))


def test_gaussian_noise_has_the_requested_std_and_is_fresh_each_use(text):
    b, _ = text
    x = b.encode_prompts(PROMPTS)
    gn = M.GaussianTextNoise(0.2)
    gen = torch.Generator().manual_seed(0)
    a, c = gn(x, torch.arange(3), gen), gn(x, torch.arange(3), gen)
    assert (a - x).std().item() == pytest.approx(0.2, rel=0.05)
    assert not torch.allclose(a, c)
    with pytest.raises(M.MitigationError):
        M.GaussianTextNoise(0.0)


def test_wen_filter_drops_exactly_the_high_magnitude_samples(text, unet):
    b, _ = text
    g = torch.Generator().manual_seed(3)
    zt = torch.randn(10, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (10,), generator=g)
    cond = b.encode_prompts([PROMPTS[i % 3] for i in range(10)])
    null = b.encode_prompts([""])
    cond[0] = null[0]  # a CFG-dropped caption: g = 0, always kept
    f = M.WenFilter("auto", 0.9)
    mag = f.magnitudes(unet, zt, t, cond, null)
    with torch.no_grad():
        ref = (unet(zt, t, encoder_hidden_states=cond).sample - unet(zt, t, encoder_hidden_states=null.expand(10, -1, -1)).sample)
    torch.testing.assert_close(mag, ref.flatten(1).norm(dim=1))
    assert mag[0] == 0
    w = f(unet=unet, zt=zt, t=t, text=cond, null_text=null, per_sample=torch.ones(10))
    tau = torch.quantile(mag, 0.9)
    assert torch.equal(w == 0, mag >= tau) and int((w == 0).sum()) >= 1 and w[0] == 1
    fixed = M.WenFilter(float(mag.median()))
    w2 = fixed(unet=unet, zt=zt, t=t, text=cond, null_text=null, per_sample=torch.ones(10))
    assert torch.equal(w2 == 0, mag >= mag.median())
    assert f.stats()["wen.dropped"] == int((w == 0).sum()) and f.stats()["wen.seen"] == 10


def test_stacked_hooks_run_inside_the_real_training_loop(text, unet):
    b, words = text
    data = _data(b)
    hooks = M.train_hooks(["rwa", "gn", "wen"], M.Settings(rwa_k=3, gn_sigma=0.05), prompts=data.prompts,
                          encode=b.encode_prompts, words=words)
    assert isinstance(hooks["text_transform"], M.Compose)
    assert [type(x) for x in hooks["text_transform"].transforms] == [M.RandomWordAddition, M.GaussianTextNoise]
    import copy

    net = copy.deepcopy(unet)
    params = [p for p in net.parameters()]
    res = finetune(net, [{"params": params, "lr": 1e-3, "name": "all"}], data, sd_scheduler(), steps=3,
                   batch_size=4, seed=0, cfg_dropout=0.0, device="cpu", **hooks)
    stats = M.hook_stats(hooks)
    assert stats["rwa.calls"] == 3 and stats["wen.seen"] == 12
    assert res.dropped == stats["wen.dropped"] >= 3  # auto drops at least the batch max at every step


def test_train_hooks_check_their_inputs():
    with pytest.raises(M.MitigationError):
        M.train_hooks(["rwa"], M.Settings())  # no encoder / words
    with pytest.raises(M.MitigationError):
        M.train_hooks(["blur"], M.Settings())
    assert M.train_hooks([], M.Settings()) == {}
    with pytest.raises(M.MitigationError):
        M.WenFilter("median")


def test_deduplicate_collapses_repeated_ids_and_identical_bytes():
    rows = pd.DataFrame({"id": ["a", "b", "m", "m", "m", "c"], "sha256": ["1", "2", "3", "3", "3", "2"],
                         "prompt": list("abmmmc")})
    out = M.deduplicate(rows)
    assert out["id"].tolist() == ["a", "b", "m"]
    with pytest.raises(M.MitigationError):
        M.deduplicate(rows.drop(columns="sha256"))
