"""EDM's SongUNet (DDPM++, NCSN++) and ADM, and EDM2's magnitude-preserving UNet as diffusers models (SPEC.md
section 10): forward-mode JVPs against float64 central differences (eval and training mode, tangents on the input
and the time), the published parameter counts, magnitude preservation, labels, safetensors round trips, the adapter
path."""

import math

import pytest
import torch

from diffusers_scm import TrigFlowDenoiser, call_network
from diffusers_scm.adapters import UNetAdapter, get_adapter
from diffusers_scm.jvp import jvp
from diffusers_scm.models import (
    ADM_IMAGENET64,
    DDPMPP_CIFAR10,
    EDM2_PRESETS,
    NCSNPP_CIFAR10,
    DhariwalUNet2DModel,
    EDM2UNet2DModel,
    SongUNet2DModel,
)
from diffusers_scm.models.unet_edm2 import EDM2Block, MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: one intra-op thread is fastest on a shared CPU

SONG_VARIANTS = {
    "ddpmpp": {},
    "ncsnpp": {
        "embedding_type": "fourier",
        "channel_mult_noise": 2,
        "encoder_type": "residual",
        "resample_filter": [1, 3, 3, 1],
    },
    "song-skip": {"encoder_type": "skip", "decoder_type": "skip", "resample_filter": [1, 3, 3, 1]},
}
NETWORKS = ["edm2", "ddpmpp", "ncsnpp", "song-skip", "adm"]


def tiny(kind: str, dropout: float = 0.0, seed: int = 0):
    """A tiny class-conditional network (2 channels, 8x8, two levels, attention at 4x4) with its zero-initialized
    gains and output layers made non-zero, so that the tests see a non-trivial function."""
    torch.manual_seed(seed)
    common = {"sample_size": 8, "in_channels": 2, "num_classes": 3, "channel_mult": [1, 2], "num_blocks": 1}
    common.update({"attention_resolutions": [4], "dropout": dropout})
    if kind == "edm2":
        model = EDM2UNet2DModel(**common, model_channels=16, channels_per_head=8, logvar_channels=8)
        for name, p in model.named_parameters():
            if name.endswith("gain"):  # emb_gain, out_gain start at 0
                p.data.uniform_(0.5, 1.5)
        return model
    if kind == "adm":
        model = DhariwalUNet2DModel(**common, model_channels=16, augment_dim=9)
    else:
        model = SongUNet2DModel(**common, model_channels=8, augment_dim=9, **SONG_VARIANTS[kind])
    for name, p in model.named_parameters():  # the layers that end a branch start at (almost) zero
        if any(key in name for key in ("conv1", "proj", "aux_conv", "out_conv", "map_augment")):
            p.data.normal_(0, 0.2)
    return model


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, 8, 8, generator=g, dtype=torch.float64)
    return x, torch.randn_like(x), g


# -- forward-mode derivatives -------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["forward_ad", "func"])
@pytest.mark.parametrize("kind", NETWORKS)
def test_jvp_through_the_edm_parameterization_matches_float64_finite_differences(kind, method):
    # the sCD JVP: F(x_t, t) = -net(x_t / sd, ln(sd tan t) / 4) through the adapter, tangents on x_t and on t
    model = tiny(kind).double().eval()
    den = TrigFlowDenoiser(model, "edm", sigma_data=0.5)
    x, dx, _ = inputs()
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    dt = torch.tensor([0.9, -0.6], dtype=torch.float64)
    labels = torch.tensor([0, 2])

    def f(a, b):
        return den(a, b, class_labels=labels)

    out, tangent = jvp(f, (x, t), (dx, dt), module=den, method=method)
    h = 1e-6
    with torch.no_grad():
        fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
        ref = f(x, t)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)  # the same primal, up to rounding
    assert relative_error(tangent, fd) < 1e-6


@pytest.mark.parametrize("method", ["forward_ad", "func"])
@pytest.mark.parametrize("kind", ["edm2", "ddpmpp", "adm"])
def test_jvp_in_training_mode_with_dropout_matches_float64_finite_differences(kind, method):
    # training mode: dropout (the same masks from the same seed) and, for EDM2, forced weight normalization, which
    # re-normalizes the stored weights in every pass; a few passes bring them to its fixed point first
    model = tiny(kind, dropout=0.25).double().train()
    x, dx, _ = inputs()
    c_noise = torch.tensor([-0.4, 0.7], dtype=torch.float64)  # the network's time input
    dc = torch.tensor([1.0, -0.5], dtype=torch.float64)
    labels = torch.tensor([1, 2])

    def f(a, b):
        torch.manual_seed(7)
        return model(a, b, class_labels=labels).sample

    with torch.no_grad():
        for _ in range(3):
            f(x, c_noise)
    out, tangent = jvp(f, (x, c_noise), (dx, dc), module=model, method=method)
    h = 1e-6
    with torch.no_grad():
        fd = (f(x + h * dx, c_noise + h * dc) - f(x - h * dx, c_noise - h * dc)) / (2 * h)
        ref = f(x, c_noise)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert relative_error(tangent, fd) < 1e-6
    with torch.no_grad():  # dropout is on: another seed gives another output
        torch.manual_seed(8)
        assert not torch.allclose(model(x, c_noise, class_labels=labels).sample, ref)


def test_edm2_forced_weight_normalization():
    model = tiny("edm2")
    x, _, _ = inputs()
    x, c_noise = x.float(), torch.tensor([0.1, -0.3])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(x, c_noise)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # eval: weights untouched
    layers = [m for m in model.modules() if isinstance(m, MPConv)]
    rms = [m.weight.pow(2).flatten(1).mean(1).sqrt() for m in layers]
    assert max((r - 1).abs().max().item() for r in rms) > 0.05  # random init: rows not at unit RMS

    model.train()
    out = model(x, c_noise, return_logvar=True).sample  # every layer used: each stored row w_i becomes
    # w_i / (eps + RMS(w_i)), of RMS r / (1e-4 + r)
    for m, r in zip(layers, rms):
        torch.testing.assert_close(m.weight.pow(2).flatten(1).mean(1).sqrt(), r / (1e-4 + r), rtol=1e-5, atol=0)
    # the output only sees the normalized weights: the eval pass on the re-normalized weights gives the same
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, c_noise).sample, out.detach(), rtol=1e-4, atol=1e-5)
    model.train()

    # two passes, then one backward (the in-place update must not trip autograd's version check); with gradient
    # checkpointing (which re-runs the forward in the backward pass) the gradients are the same
    def loss_of(out):
        return out.sample.square().sum() + out.logvar.sum()

    loss = loss_of(model(x, c_noise, return_logvar=True)) + loss_of(model(x, c_noise, return_logvar=True))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    model.enable_gradient_checkpointing()
    loss = 2 * loss_of(model(x, c_noise, return_logvar=True))
    grads_ckpt = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(grads, grads_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert any(g.abs().max() > 0 for g in grads)

    # inside torch.func transforms the stored weight is not mutated (they forbid it); the JVP still runs
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    torch.func.jvp(lambda a: model.emb_noise(a), (torch.randn(2, 16),), (torch.randn(2, 16),))
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


# -- magnitude preservation (EDM2) --------------------------------------------------------------------------------


def test_magnitude_preserving_operations():
    # MP-SiLU: E[silu(z)^2] = 0.596^2 for z ~ N(0, 1) (quadrature in float64)
    z = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    pdf = torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi)
    second_moment = torch.trapezoid(mp_silu(z) ** 2 * pdf, z).item()
    assert abs(second_moment - 1) < 2e-3
    # MP-sum of orthogonal unit-RMS signals has unit RMS for every t; MP-cat of unit-RMS pixels has unit-RMS pixels
    a, b = torch.linalg.qr(torch.randn(256, 2, dtype=torch.float64))[0].T * 16  # orthogonal, RMS 1
    for t in (0.0, 0.3, 0.5, 0.9):
        assert abs(mp_sum(a, b, t).pow(2).mean().sqrt().item() - 1) < 1e-12
        pixels_a = normalize(torch.randn(2, 3, 4, 4, dtype=torch.float64), dim=1, eps=0)
        pixels_b = normalize(torch.randn(2, 5, 4, 4, dtype=torch.float64), dim=1, eps=0)
        rms = mp_cat(pixels_a, pixels_b, t=t).pow(2).mean(1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-12, atol=1e-12)
    # MP layers: effective weights w_i / (eps + RMS(w_i)) * gain / sqrt(fan_in) have row norm gain r_i / (eps + r_i)
    layer = MPConv(40, 6, kernel=()).double().eval()  # eval: no forced normalization
    r = layer.weight.pow(2).mean(1).sqrt()
    effective = layer(torch.eye(40, dtype=torch.float64), gain=0.7).T  # (6, 40)
    torch.testing.assert_close(effective.norm(dim=1), 0.7 * r / (1e-4 + r), rtol=1e-12, atol=0)
    # MP-Fourier features: unit RMS over many channels
    torch.manual_seed(0)
    features = MPFourier(4096)(torch.tensor([-1.3, 0.0, 2.5]))
    torch.testing.assert_close(features.pow(2).mean(1), torch.ones(3), rtol=0.05, atol=0)


@pytest.mark.parametrize(
    "block",
    [
        {"in_channels": 256, "out_channels": 256, "flavor": "enc"},
        {"in_channels": 128, "out_channels": 256, "flavor": "enc"},
        {"in_channels": 256, "out_channels": 256, "flavor": "enc", "resample_mode": "down"},
        {"in_channels": 512, "out_channels": 256, "flavor": "dec"},
        {"in_channels": 256, "out_channels": 256, "flavor": "dec", "resample_mode": "up"},
    ],
)
def test_edm2_block_keeps_unit_variance_at_initialization(block):
    # unit-variance inputs give unit-variance activations at every stage of the residual branch and at the output;
    # measured away from the border, where the 3x3 convolutions' zero padding removes energy
    torch.manual_seed(0)
    layer = EDM2Block(emb_channels=128, **block)
    seen = {}
    for name in ("conv_res0", "conv_res1"):
        getattr(layer, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    x, emb = torch.randn(4, block["in_channels"], 16, 16), mp_silu(torch.randn(4, 128))
    with torch.no_grad():
        seen["output"] = layer(x, emb)

    def interior_rms(y):
        return y[..., 2:-2, 2:-2].pow(2).mean().sqrt().item()

    assert abs(interior_rms(seen["conv_res0"]) - 1) < 0.05
    assert abs(interior_rms(seen["conv_res1"]) - 1) < 0.05
    assert abs(interior_rms(seen["output"]) - 1) < 0.02


def test_edm2_attention_block_is_an_mp_sum_of_unit_and_attention_branches():
    # cosine attention averages unit-RMS values, so its branch has RMS r < 1; the block output is then the MP-sum
    # sqrt(0.7^2 + 0.3^2 r^2) / sqrt(0.7^2 + 0.3^2) of a unit-RMS main path and that branch
    torch.manual_seed(0)
    layer = EDM2Block(256, 256, 128, "enc", attention=True, channels_per_head=64)
    seen = {}
    layer.attn_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("attention", o))
    with torch.no_grad():
        out = layer(torch.randn(4, 256, 16, 16), mp_silu(torch.randn(4, 128)))
    r = seen["attention"].pow(2).mean().sqrt().item()
    assert 0.05 < r < 1
    expected = math.sqrt((0.49 + 0.09 * r**2) / 0.58)
    assert abs(out[..., 2:-2, 2:-2].pow(2).mean().sqrt().item() - expected) < 0.02


# -- parameter counts ---------------------------------------------------------------------------------------------


def edm2_count(in_channels, num_classes, model_channels, mult=(1, 2, 3, 4), blocks=3, attn=(16, 8), res=64) -> int:
    """EDM2's parameter count in closed form (Figure 21), independent of the module code."""
    cblock = [model_channels * m for m in mult]
    cemb, cnoise = max(cblock), cblock[0]

    def block(cin, cout, flavor, attention):
        n = 1 + (cout if flavor == "enc" else cin) * cout * 9 + cemb * cout + cout * cout * 9
        n += cin * cout if cin != cout else 0
        return n + (4 * cout * cout if attention else 0)

    total = 1 + cnoise * cemb + num_classes * cemb + (in_channels + 1) * cblock[0] * 9 + 128  # + uncertainty head
    skips, cout = [cblock[0]], cblock[0]
    for level, c in enumerate(cblock):
        r = res >> level
        if level:
            total += block(cout, cout, "enc", False)
            skips.append(cout)
        for _ in range(blocks):
            total += block(cout, c, "enc", r in attn)
            cout = c
            skips.append(cout)
    for level, c in reversed(list(enumerate(cblock))):
        r = res >> level
        if level == len(cblock) - 1:
            total += block(cout, cout, "dec", True) + block(cout, cout, "dec", False)
        else:
            total += block(cout, cout, "dec", False)
        for _ in range(blocks + 1):
            total += block(cout + skips.pop(), c, "dec", r in attn)
            cout = c
    return total + cout * in_channels * 9


# measured on the meta device; SPEC.md section 10 gives them rounded to 0.1M
EDM2_COUNTS = {
    "img512-xs": (124_713_253, 124.7),
    "img512-s": (280_212_837, 280.2),
    "img512-m": (497_807_781, 497.8),
    "img512-l": (777_498_085, 777.5),
    "img512-xl": (1_119_283_749, 1119.3),
    "img512-xxl": (1_523_164_773, 1523.2),
    "img64-s": (280_209_381, 280.2),
    "img64-m": (497_803_173, 497.8),
    "img64-l": (777_492_325, 777.5),
    "img64-xl": (1_119_276_837, 1119.3),
}


def test_parameter_counts_of_the_edm2_presets():
    assert set(EDM2_PRESETS) == set(EDM2_COUNTS)
    for name, (exact, millions) in EDM2_COUNTS.items():
        with torch.device("meta"):
            model = EDM2UNet2DModel.from_preset(name)
        count = sum(p.numel() for p in model.parameters())
        preset = EDM2_PRESETS[name]
        assert count == exact == edm2_count(preset["in_channels"], 1000, preset["model_channels"]), name
        assert round(count / 1e6, 1) == millions, name
        if name.startswith("img64"):  # 3 instead of 4 channels: 9 fewer weights per width unit at input and output
            assert EDM2_COUNTS["img512" + name[5:]][0] - count == 18 * preset["model_channels"]


def test_parameter_counts_of_the_edm_presets():
    # EDM's CIFAR-10 networks (56M) and its ImageNet 64 ADM (296M)
    expected = [
        (SongUNet2DModel, DDPMPP_CIFAR10, {}, 55_733_891),
        (SongUNet2DModel, NCSNPP_CIFAR10, {}, 56_397_827),
        (SongUNet2DModel, DDPMPP_CIFAR10, {"num_classes": 10}, 55_735_299),
        (DhariwalUNet2DModel, ADM_IMAGENET64, {}, 295_899_267),
    ]
    for cls, preset, overrides, count in expected:
        with torch.device("meta"):
            model = cls(**{**preset, **overrides})
        assert sum(p.numel() for p in model.parameters()) == count
    # conditional DDPM++: + a 10 -> 128 label layer with its bias
    assert expected[2][3] - expected[0][3] == 10 * 128 + 128
    with torch.device("meta"):
        assert SongUNet2DModel.from_preset("ncsnpp-cifar10").config.resample_filter == [1, 3, 3, 1]
        assert DhariwalUNet2DModel.from_preset("adm-imagenet64").config.num_classes == 1000
    with pytest.raises(ValueError, match="ddpmpp-cifar10"):
        SongUNet2DModel.from_preset("cifar")


# -- labels, saving, the adapter path -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", NETWORKS)
def test_class_and_augment_labels(kind):
    model = tiny(kind).eval()
    x = torch.randn(2, 2, 8, 8)
    c_noise = torch.tensor([0.2, -0.6])
    with torch.no_grad():
        by_index = model(x, c_noise, class_labels=torch.tensor([2, 0])).sample
        one_hot = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
        torch.testing.assert_close(model(x, c_noise, class_labels=one_hot).sample, by_index, rtol=0, atol=0)
        torch.testing.assert_close(
            model(x, c_noise).sample, model(x, c_noise, class_labels=torch.zeros(2, 3)).sample, rtol=0, atol=0
        )
        assert not torch.allclose(model(x, c_noise, class_labels=torch.tensor([1, 0])).sample, by_index)
        if kind != "edm2":  # absent augmentation labels are zeros
            zeros = model(x, c_noise, class_labels=torch.tensor([2, 0]), augment_labels=torch.zeros(2, 9)).sample
            torch.testing.assert_close(zeros, by_index, rtol=0, atol=0)
            aug = torch.randn(2, 9)
            assert not torch.allclose(model(x, c_noise, class_labels=[2, 0], augment_labels=aug).sample, by_index)
        # one time for all samples
        torch.testing.assert_close(
            model(x, 0.3, class_labels=torch.tensor([2, 0])).sample,
            model(x, torch.tensor([0.3, 0.3]), class_labels=torch.tensor([2, 0])).sample,
        )
    with pytest.raises(ValueError, match="Class indices"):
        model(x, c_noise, class_labels=torch.tensor([3, 0]))


@pytest.mark.parametrize("kind", NETWORKS)
def test_save_pretrained_from_pretrained_round_trip(kind, tmp_path):
    model = tiny(kind).eval()
    model.save_pretrained(tmp_path / "net")
    assert (tmp_path / "net" / "diffusion_pytorch_model.safetensors").exists()
    loaded = type(model).from_pretrained(tmp_path / "net").eval()

    def public(config):  # tuples are stored as JSON lists
        return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items() if not k.startswith("_")}

    assert public(loaded.config) == public(model.config)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)  # random Fourier buffers included
    x, c_noise, labels = torch.randn(2, 2, 8, 8), torch.tensor([0.4, -1.0]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(loaded(x, c_noise, labels).sample, model(x, c_noise, labels).sample)
        if kind == "edm2":
            a, b = loaded(x, c_noise, labels, return_logvar=True), model(x, c_noise, labels, return_logvar=True)
            assert a.logvar.shape == (2, 1, 1, 1) and torch.equal(a.logvar, b.logvar)


def test_edm2_gains_shard_and_load_from_their_0_dim_form(tmp_path):
    # the gains have shape (1,), which FSDP2 shards along its first dimension; 0-dim values (NVlabs' layout, and
    # folders saved when the gains were 0-dim) load through load_state_dict and from_pretrained alike
    from safetensors.torch import load_file, save_file

    model = tiny("edm2").eval()
    gains = [k for k in model.state_dict() if k.endswith(("emb_gain", "out_gain"))]
    assert len(gains) == 1 + len(model.enc) + len(model.dec) - 1 and all(
        model.state_dict()[k].shape == (1,) for k in gains
    )
    x, c_noise, labels = torch.randn(2, 2, 8, 8), torch.tensor([0.4, -1.0]), torch.tensor([1, 2])
    with torch.no_grad():
        expected = model(x, c_noise, labels).sample
    scalar = {k: v.reshape(()) if k in gains else v for k, v in model.state_dict().items()}
    fresh = tiny("edm2", seed=5).eval()
    fresh.load_state_dict(scalar)
    model.save_pretrained(tmp_path / "net")
    weights = tmp_path / "net" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.reshape(()) if k in gains else v for k, v in load_file(weights).items()}, weights)
    assert load_file(weights)["out_gain"].shape == ()
    loaded = EDM2UNet2DModel.from_pretrained(tmp_path / "net").eval()
    for net in (fresh, loaded):
        assert net.out_gain.shape == (1,) and net.enc["4x4_block0"].emb_gain.shape == (1,)
        with torch.no_grad():
            assert torch.equal(net(x, c_noise, labels).sample, expected)


def test_state_dict_layout_follows_nvlabs():
    # the names a converter maps NVlabs' keys onto ("unet." / "model." stripped), see the module docstrings
    edm2 = tiny("edm2").state_dict()
    for key in (
        "out_gain",
        "emb_fourier.freqs",
        "emb_fourier.phases",
        "emb_noise.weight",
        "emb_label.weight",
        "enc.8x8_conv.weight",
        "enc.4x4_down.conv_res0.weight",
        "enc.4x4_block0.conv_skip.weight",
        "enc.4x4_block0.attn_qkv.weight",
        "dec.4x4_in0.attn_proj.weight",
        "dec.4x4_in1.emb_gain",
        "dec.8x8_up.emb_linear.weight",
        "dec.8x8_block1.conv_res1.weight",
        "out_conv.weight",
        "logvar_fourier.freqs",
        "logvar_linear.weight",
    ):
        assert key in edm2, key
    ncsnpp = tiny("ncsnpp").state_dict()
    for key in (
        "map_noise.freqs",
        "map_label.weight",
        "map_augment.weight",
        "map_layer0.bias",
        "enc.4x4_down.conv0.resample_filter",
        "enc.4x4_aux_residual.weight",
        "enc.4x4_block0.skip.weight",
        "dec.4x4_in0.qkv.weight",
        "dec.8x8_up.skip.resample_filter",
        "dec.8x8_aux_norm.weight",
        "dec.8x8_aux_conv.bias",
    ):
        assert key in ncsnpp, key
    torch.testing.assert_close(
        ncsnpp["enc.4x4_down.conv0.resample_filter"],
        torch.tensor([1.0, 3, 3, 1]).outer(torch.tensor([1.0, 3, 3, 1]))[None, None] / 64,
    )
    adm = tiny("adm").state_dict()
    assert {"map_label.weight", "out_norm.weight", "out_conv.weight", "enc.4x4_down.skip.resample_filter"} <= set(adm)
    assert "map_label.bias" not in adm and "map_augment.bias" not in adm


@pytest.mark.parametrize("kind", NETWORKS)
def test_networks_answer_through_the_adapter_path(kind):
    # the "edm" parameterization: network input x_t / sd, time ln(sd tan t) / 4, F = -raw (SPEC.md section 2)
    model = tiny(kind).eval()
    assert isinstance(get_adapter(model), UNetAdapter)
    x_t, t, labels = torch.randn(2, 2, 8, 8), torch.tensor([0.5, 1.1]), torch.tensor([0, 1])
    with torch.no_grad():
        raw = model(x_t / 0.5, torch.log(0.5 * torch.tan(t)) / 4, class_labels=labels).sample
        torch.testing.assert_close(
            call_network(model, x_t / 0.5, torch.log(0.5 * torch.tan(t)) / 4, class_labels=labels), raw
        )
        F = TrigFlowDenoiser(model, "edm", sigma_data=0.5)(x_t, t, class_labels=labels)
    torch.testing.assert_close(F, -raw)
    out = model(x_t, t, labels, return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    if kind == "edm2":
        out = model(x_t, t, labels, return_logvar=True, return_dict=False)
        assert len(out) == 2 and out[1].shape == (2, 1, 1, 1)


def test_bf16_autocast_keeps_the_embedding_and_the_log_variance_in_float32():
    for kind in ("edm2", "ddpmpp", "adm"):
        model = tiny(kind).eval()
        seen = {}
        layer = model.emb_noise if kind == "edm2" else model.map_layer1
        layer.register_forward_hook(lambda m, i, o: seen.__setitem__("emb", o))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.randn(2, 2, 8, 8), torch.tensor([0.1, 0.2]), class_labels=torch.tensor([0, 1]))
            assert out.sample.dtype == torch.bfloat16 and seen["emb"].dtype == torch.float32
            if kind == "edm2":
                assert model(torch.randn(2, 2, 8, 8), 0.1, return_logvar=True).logvar.dtype == torch.float32
