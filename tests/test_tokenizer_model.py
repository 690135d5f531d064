"""Tokenizer model: official weight compatibility, quantizer invariants, hybrid freeze, perceptual loss, metrics
(the training losses as the stage runs them: test_tokenizer_losses.py).

The official key/shape list below is written from the official code (VAR/HART basic_vae.py, var_quantize_multiple_res.py,
taming's NLayerDiscriminator) and was checked against a state-dict dump of the official HARTAutoEncoderWithDisc
(346 entries). Everything runs on CPU with the tiny preset, except the full-size builds on the meta device.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenizer.autoencoder import (
    PATCH_NUMS_BY_RESOLUTION,
    HARTAutoEncoder,
    HARTAutoEncoderWithDisc,
    TokenizerConfig,
    config_from_official,
    config_to_dict,
    load_weights_file,
    tokenizer_config,
    vae_state_dict,
)
from tokenizer.discriminator import NLayerDiscriminator
from tokenizer.losses import PerceptualLoss, TokenizerCriterion, TokenizerLossConfig
from tokenizer.metrics import psnr, ssim
from tokenizer.quantizer import MultiScaleQuantizer, phi_index

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "tokenizer"


# ----------------------------------------------------------------------------- helpers


pytestmark = pytest.mark.usefixtures("one_torch_thread")



def official_state_dict_shapes(num_scales: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official HARTAutoEncoderWithDisc (ch 160, ch_mult (1,1,2,2,4), z 32, V 4096)."""
    sd: dict[str, tuple[int, ...]] = {}

    def conv(p, c_out, c_in, k, bias=True):
        sd[p + ".weight"] = (c_out, c_in, k, k)
        if bias:
            sd[p + ".bias"] = (c_out,)

    def norm(p, c):
        sd[p + ".weight"] = (c,)
        sd[p + ".bias"] = (c,)

    def resblock(p, c_in, c_out):
        norm(p + ".norm1", c_in)
        conv(p + ".conv1", c_out, c_in, 3)
        norm(p + ".norm2", c_out)
        conv(p + ".conv2", c_out, c_out, 3)
        if c_in != c_out:
            conv(p + ".nin_shortcut", c_out, c_in, 1)

    def attn(p, c):
        norm(p + ".norm", c)
        conv(p + ".qkv", 3 * c, c, 1)
        conv(p + ".proj_out", c, c, 1)

    def mid(p, c):
        resblock(p + ".block_1", c, c)
        attn(p + ".attn_1", c)
        resblock(p + ".block_2", c, c)

    widths = [160, 160, 320, 320, 640]
    conv("vae.encoder.conv_in", 160, 3, 3)
    c_in = 160
    for i, w in enumerate(widths):
        for j in range(2):
            resblock(f"vae.encoder.down.{i}.block.{j}", c_in, w)
            c_in = w
            if i == 4:
                attn(f"vae.encoder.down.{i}.attn.{j}", w)
        if i != 4:
            conv(f"vae.encoder.down.{i}.downsample.conv", w, w, 3)
    mid("vae.encoder.mid", 640)
    norm("vae.encoder.norm_out", 640)
    conv("vae.encoder.conv_out", 32, 640, 3)

    conv("vae.decoder.conv_in", 640, 32, 3)
    mid("vae.decoder.mid", 640)
    c_in = 640
    for i in reversed(range(5)):
        w = widths[i]
        for j in range(3):
            resblock(f"vae.decoder.up.{i}.block.{j}", c_in, w)
            c_in = w
            if i == 4:
                attn(f"vae.decoder.up.{i}.attn.{j}", w)
        if i != 0:
            conv(f"vae.decoder.up.{i}.upsample.conv", w, w, 3)
    norm("vae.decoder.norm_out", 160)
    conv("vae.decoder.conv_out", 3, 160, 3)

    conv("vae.quant_conv", 32, 32, 3)
    conv("vae.post_quant_conv", 32, 32, 3)
    sd["vae.quantize.embedding.weight"] = (4096, 32)
    for k in range(4):
        conv(f"vae.quantize.quant_resi.qresi_ls.{k}", 32, 32, 3)
    sd["vae.quantize.ema_vocab_hit_SV"] = (num_scales, 4096)

    conv("disc.main.0", 64, 3, 4)
    for idx, (c_out, c_in) in zip((2, 5, 8), ((128, 64), (256, 128), (512, 256))):
        conv(f"disc.main.{idx}", c_out, c_in, 4, bias=False)
        bn = f"disc.main.{idx + 1}"
        for name in ("weight", "bias", "running_mean", "running_var"):
            sd[f"{bn}.{name}"] = (c_out,)
        sd[f"{bn}.num_batches_tracked"] = ()
    conv("disc.main.11", 1, 512, 4)
    return sd


def num_params(*modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def tiny_model(seed: int = 0, **overrides) -> HARTAutoEncoderWithDisc:
    torch.manual_seed(seed)
    model = HARTAutoEncoderWithDisc(tokenizer_config("tiny", **overrides))
    with torch.no_grad():  # spread the codebook like trained latents so every scale picks varied codes
        model.vae.quantize.embedding.weight.normal_(0, 0.5)
    return model


def tiny_images(batch: int = 2, seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- package boundary


def test_tokenizer_imports_neither_hart_train_nor_data_tools():
    for path in TOKENIZER_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in ("hart_train", "data_tools"), f"{path.name} imports {name}"


# ----------------------------------------------------------------------------- config


def test_config_presets_and_validation():
    for res, pn in PATCH_NUMS_BY_RESOLUTION.items():
        cfg = tokenizer_config(f"hart-{res}")
        assert cfg.patch_nums == pn and cfg.image_size == res and cfg.downsample == 16
    assert PATCH_NUMS_BY_RESOLUTION[1024] == (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
    cfg = TokenizerConfig(ch_mult=[1, 2], patch_nums=[1, 2, 4])  # YAML lists become tuples
    assert cfg.ch_mult == (1, 2) and cfg.patch_nums == (1, 2, 4)
    assert config_to_dict(cfg)["patch_nums"] == [1, 2, 4]
    assert TokenizerConfig(**config_to_dict(cfg)) == cfg
    bad = {
        "vocab_size": 0,
        "z_channels": -1,
        "ch_mult": (),
        "patch_nums": (1, 3, 2),
        "quant_conv_ks": 2,
        "dropout": 1.0,
        "beta": -0.1,
        "quant_resi": 1.5,
        "share_quant_resi": -1,
        "skip_continuous_prob": 1.2,
        "disc_n_layers": 0,
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=name):
            TokenizerConfig(**{name: value})
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        tokenizer_config("hart-2048")
    with pytest.raises(ValueError, match="recon_loss"):
        TokenizerLossConfig(recon_loss="l3")


# ----------------------------------------------------------------------------- official compatibility


def test_full_config_matches_official_keys_shapes_and_param_counts():
    with torch.device("meta"):
        model = HARTAutoEncoderWithDisc(tokenizer_config("hart-1024"))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_state_dict_shapes(num_scales=14)
    assert len(expected) == 346
    assert set(ours) == set(expected), (sorted(set(ours) - set(expected)), sorted(set(expected) - set(ours)))
    assert ours == expected
    # a state dict with every official key and shape loads strictly
    official_like = {k: torch.empty(shape, device="meta") for k, shape in expected.items()}
    result = model.load_state_dict(official_like, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys

    vae = model.vae
    assert num_params(vae.encoder, vae.quant_conv) == 44_117_120  # 44.12M
    assert num_params(vae.decoder, vae.post_quant_conv) == 64_663_171  # 64.66M
    assert num_params(vae.quantize) == 168_064  # 0.17M
    assert num_params(vae) == 108_948_355  # 109.0M
    assert num_params(model.disc) == 2_765_633  # 2.77M


def test_phi_index_mapping_and_sharing():
    assert [phi_index(si, 14, 4) for si in range(14)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    assert [phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # official, incl. its float tie at si=7
    q = MultiScaleQuantizer(16, 4, (1, 2, 4), share_quant_resi=1)
    assert {k for k in q.state_dict() if "quant_resi" in k} == {"quant_resi.qresi.weight", "quant_resi.qresi.bias"}
    q = MultiScaleQuantizer(16, 4, (1, 2, 4), share_quant_resi=0)
    assert {k.split(".")[1] for k in q.state_dict() if "quant_resi" in k} == {"0", "1", "2"}


def test_state_dict_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model(seed=0)
    img = tiny_images()
    model.train()
    model.vae(img)  # touch the EMA buffer and BatchNorm-free path so buffers are non-trivial
    model.disc(img)  # BatchNorm running stats
    torch.save(model.state_dict(), tmp_path / "tok.pt")

    other = tiny_model(seed=123)
    other.load_state_dict(torch.load(tmp_path / "tok.pt", weights_only=True), strict=True)
    for (k, a), (k2, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    model.eval(), other.eval()
    with torch.no_grad():
        for continuous in (False, True):
            assert torch.equal(model.vae.img_to_reconstructed_img(img, continuous), other.vae.img_to_reconstructed_img(img, continuous))
        assert torch.equal(model.disc(img), other.disc(img))


def test_official_config_and_with_disc_checkpoint_load_into_the_vae(tmp_path):
    official = {"vocab_size": 64, "z_channels": 8, "ch": 32, "ch_mult": [1, 2, 2], "v_patch_nums": [1, 2, 4],
                "quantizer_type": "var_hybrid", "levels": [8, 8, 8, 6, 5], "test_mode": False}
    cfg = config_from_official(official, disc_ndf=8, disc_n_layers=2)
    assert cfg == tokenizer_config("tiny")
    with pytest.raises(ValueError, match="double_decoder"):
        config_from_official({**official, "double_decoder": True})
    model = tiny_model()
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    vae = HARTAutoEncoder(cfg)
    vae.load_state_dict(vae_state_dict(load_weights_file(tmp_path / "model.safetensors")), strict=True)
    assert torch.equal(vae.quantize.embedding.weight, model.vae.quantize.embedding.weight)
    assert vae_state_dict(vae.state_dict()).keys() == vae.state_dict().keys()
    with pytest.raises(FileNotFoundError):
        load_weights_file(tmp_path / "nope.pt")


def test_ema_vocab_hit_buffer_is_replaced_when_scale_count_differs():
    model = tiny_model()
    f = torch.randn(2, 8, 4, 4)
    model.vae.quantize.eval()(f)
    assert model.vae.quantize.ema_vocab_hit_SV.sum() == 0  # eval: no update
    model.vae.quantize.train()(f)
    assert model.vae.quantize.ema_vocab_hit_SV.sum(dim=1).tolist() == [2.0 * pn * pn for pn in (1, 2, 4)]
    sd = model.state_dict()
    sd["vae.quantize.ema_vocab_hit_SV"] = torch.ones(7, 64)
    model.load_state_dict(sd, strict=True)
    assert model.vae.quantize.ema_vocab_hit_SV.shape == (3, 64)
    sd["vae.quantize.ema_vocab_hit_SV"] = torch.full((3, 64), 2.0)
    model.load_state_dict(sd, strict=True)
    assert torch.equal(model.vae.quantize.ema_vocab_hit_SV, torch.full((3, 64), 2.0))


# ----------------------------------------------------------------------------- quantizer invariants


@pytest.mark.parametrize("patch_nums", [(1, 2, 4), (1, 3, 4), (2, 4)])
def test_quantizer_invariants(patch_nums):
    model = tiny_model(patch_nums=patch_nums).vae.eval()
    q = model.quantize
    img = tiny_images(batch=3)
    B, C, S = 3, model.Cvae, len(patch_nums)
    with torch.no_grad():
        f = model.img_to_latent(img)
        idx = model.img_to_idxBl(img)
        assert [tuple(i.shape) for i in idx] == [(B, pn * pn) for pn in patch_nums]
        assert all(i.dtype == torch.long and 0 <= int(i.min()) and int(i.max()) < 64 for i in idx)

        # f_hat is the sum of the per-scale contributions; the training forward decodes the same f_hat
        contributions = [q.scale_contribution(idx[si], si) for si in range(S)]
        f_hat = q.idxBl_to_fhat(idx)
        torch.testing.assert_close(sum(contributions), f_hat, rtol=0, atol=1e-6)
        idx_again, f_hat_again = q.f_to_idxBl_and_fhat(f)
        assert all(torch.equal(a, b) for a, b in zip(idx_again, idx))
        torch.testing.assert_close(f_hat_again, f_hat, rtol=0, atol=1e-6)
        out = q(f, skip_continuous_prob=1.0)
        assert all(torch.equal(a, b) for a, b in zip(out.idx_Bl, idx)) and not out.used_continuous
        torch.testing.assert_close(out.f_hat, f_hat, rtol=0, atol=1e-5)
        # VQ loss = mean over scales of (1 + beta) * mse(f_hat_si, f)
        partial = torch.stack([F.mse_loss(sum(contributions[: si + 1]), f) for si in range(S)])
        torch.testing.assert_close(out.vq_loss, (1 + q.beta) * partial.mean(), rtol=1e-5, atol=1e-7)
        # continuous path: the decoder gets the exact latent
        cont = q(f, skip_continuous_prob=0.0)
        assert cont.used_continuous
        torch.testing.assert_close(cont.f_hat, f, rtol=0, atol=1e-5)

        # extractor: same indices; last-scale residual + f_hat of the first S-1 scales = the latent
        idx2, frest_BLC = model.img_to_idxBl_and_frest(img)
        assert all(torch.equal(a, b) for a, b in zip(idx, idx2))
        hw = patch_nums[-1]
        assert frest_BLC.shape == (B, hw * hw, C)
        f_hat_before_last = q.idxBl_to_fhat(idx2[:-1])
        frest_BChw = frest_BLC.transpose(1, 2).reshape(B, C, hw, hw)
        torch.testing.assert_close(f_hat_before_last + frest_BChw, f, rtol=0, atol=1e-5)

        # teacher forcing: (B, sum(pn^2) - pn0^2, C); block si is area-down(f_hat after si+1 scales)
        var_in = model.idxBl_to_var_input(idx)
        assert var_in.shape == (B, sum(pn * pn for pn in patch_nums) - patch_nums[0] ** 2, C)
        pn1 = patch_nums[1]
        first = F.interpolate(contributions[0], size=(pn1, pn1), mode="area").reshape(B, C, -1).transpose(1, 2)
        torch.testing.assert_close(var_in[:, : pn1 * pn1], first, rtol=0, atol=1e-6)

        # AR sampling with the same tokens reproduces f_hat without Phi at the last scale
        f_ar = torch.zeros(B, C, hw, hw)
        for si, pn in enumerate(patch_nums):
            h = q.embedding(idx[si]).transpose(1, 2).reshape(B, C, pn, pn)
            f_ar, nxt = model.get_next_autoregressive_input(si, S, f_ar, h)
            if si < S - 1:  # the next-scale input equals the teacher-forcing block of scale si+1
                offset = sum(p * p for p in patch_nums[1 : si + 1])
                block = var_in[:, offset : offset + patch_nums[si + 1] ** 2]
                torch.testing.assert_close(nxt.reshape(B, C, -1).transpose(1, 2), block, rtol=0, atol=1e-5)
        torch.testing.assert_close(f_ar, q.idxBl_to_fhat(idx, phi_at_last=False), rtol=0, atol=1e-5)
        img_dec = model.fhat_to_img(f_ar)
        assert img_dec.shape == img.shape and img_dec.min() >= -1 and img_dec.max() <= 1


def test_forward_rejects_wrong_image_size_and_runs_under_bf16_autocast():
    vae = tiny_model().vae
    with pytest.raises(ValueError, match="patch_nums"):
        vae(tiny_images(size=32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vae(tiny_images(), skip_continuous_prob=1.0)
    assert out["vq_loss"].dtype == torch.float32 and torch.isfinite(out["rec"]).all()


def test_continuous_coin_is_reproducible_with_a_generator():
    q = tiny_model().vae.quantize
    f = torch.randn(2, 8, 4, 4)
    gens = (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))
    draws = [[q(f, skip_continuous_prob=0.5, generator=g).used_continuous for _ in range(12)] for g in gens]
    assert draws[0] == draws[1] and len(set(draws[0])) == 2


def test_straight_through_gradients_reach_encoder_and_codebook():
    vae = tiny_model().vae
    out = vae(tiny_images(), skip_continuous_prob=1.0)
    (F.mse_loss(out["rec"], tiny_images()) + out["vq_loss"]).backward()
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "quantize.embedding.weight", "quantize.quant_resi.qresi_ls.0.weight", "decoder.conv_out.weight"):
        grad = dict(vae.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- hybrid stage


def test_freeze_for_hybrid_leaves_exactly_decoder_and_post_quant_conv_trainable():
    model = tiny_model()
    model.vae.freeze_for_hybrid()
    trainable = {n for n, p in model.vae.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))}
    assert trainable == expected and expected
    img = tiny_images()
    out = model.vae(img, skip_continuous_prob=0.0)
    (F.mse_loss(out["rec"], img) + out["vq_loss"]).backward()
    for n, p in model.vae.named_parameters():
        assert (p.grad is not None) == (n in expected), n


# ----------------------------------------------------------------------------- training and losses


def test_a_few_optimizer_steps_lower_the_reconstruction_loss():
    model = tiny_model()
    criterion = TokenizerCriterion(TokenizerLossConfig(disc_weight=0.0))
    img = tiny_images(batch=4)
    opt = torch.optim.Adam(model.vae.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    recon = []
    for _ in range(25):
        out = model.vae(img, skip_continuous_prob=0.5, generator=gen)
        terms = criterion(img, out["rec"], out["vq_loss"], model.disc, with_gan=False)
        opt.zero_grad()
        terms["loss"].backward()
        opt.step()
        recon.append(terms["recon"].item())
    assert recon[-1] < 0.7 * recon[0], recon


def _save_random_perceptual_weights(path: Path, widths, convs) -> None:
    """Random weights in the documented layout: torchvision-vgg `features.{i}` indices, LPIPS-style `lins.{k}`."""
    torch.manual_seed(0)
    state = {}
    c_in, idx = 3, 0
    for stage, (w, n) in enumerate(zip(widths, convs)):
        if stage > 0:
            idx += 1  # max-pool
        for _ in range(n):
            state[f"features.{idx}.weight"] = torch.randn(w, c_in, 3, 3) * (2 / (9 * c_in)) ** 0.5
            state[f"features.{idx}.bias"] = torch.zeros(w)
            c_in, idx = w, idx + 2  # conv, relu
    for k, w in enumerate(widths):
        state[f"lins.{k}.weight"] = torch.rand(1, w, 1, 1)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_perceptual_loss_loads_local_weights(tmp_path, suffix):
    widths, convs = (8, 16), (1, 2)
    path = tmp_path / f"percep{suffix}"
    _save_random_perceptual_weights(path, widths, convs)
    cfg = TokenizerLossConfig(perceptual_weights_path=str(path), perceptual_widths=widths, perceptual_convs=convs)
    criterion = TokenizerCriterion(cfg)
    net = criterion.perceptual
    assert net is not None and not any(p.requires_grad for p in net.parameters())
    x, y = tiny_images(seed=1), tiny_images(seed=2)
    assert torch.equal(net(x, x), torch.zeros(2))
    assert (net(x, y) > 0).all()
    net.train()
    assert not net.training  # a fixed metric net stays in eval mode
    assert not any(k.startswith("perceptual") for k in tiny_model().state_dict())

    with pytest.raises(FileNotFoundError):
        PerceptualLoss(tmp_path / "missing.pt", widths, convs)
    with pytest.raises(ValueError, match="do not match"):
        PerceptualLoss(path, (8, 32), convs)
    assert TokenizerCriterion(TokenizerLossConfig()).perceptual is None


# ----------------------------------------------------------------------------- discriminator and metrics


def test_discriminator_patch_output():
    disc = NLayerDiscriminator(ndf=8, n_layers=3)
    assert disc(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert [k for k in disc.state_dict() if k.endswith("weight")] == [f"main.{i}.weight" for i in (0, 2, 3, 5, 6, 8, 9, 11)]


def test_psnr_and_ssim_known_cases():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(2))
    flat = torch.full((1, 3, 16, 16), 0.5)
    torch.testing.assert_close(psnr(flat, flat + 0.1), torch.tensor([20.0]))  # mse 0.01 -> 20 dB
    # constant images: SSIM reduces to the luminance term (2 mx my + c1) / (mx^2 + my^2 + c1)
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.6 + c1) / (0.25 + 0.36 + c1)
    torch.testing.assert_close(ssim(flat, flat + 0.1), torch.tensor([expected]), rtol=1e-6, atol=1e-6)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    s = ssim(x, noisy)
    assert (s < 1).all() and (s > 0).all() and torch.allclose(s, ssim(noisy, x))
    with pytest.raises(ValueError, match="at least 11"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
