"""`SCMUNet2DModel` (SPEC.md section 7)."""

import pytest
import torch

from diffusers_scm import SCMPipeline, SCMUNet2DModel, TrigFlowDenoiser, TrigFlowScheduler
from diffusers_scm.jvp import jvp, jvp_mode
from diffusers_scm.models.unet_scm import ResBlock, pixel_norm


def tiny(**kw):
    torch.manual_seed(0)
    model = SCMUNet2DModel.from_preset("tiny", in_channels=1, sample_size=8, attention_resolutions=(4,), **kw)
    for p in model.conv_out.parameters():  # the output layer starts at zero; give the tests a non-trivial network
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def test_time_embedding_is_float32_under_bf16_autocast():
    model = tiny(num_classes=3)
    t = torch.tensor([0.1, 1.2])
    ref = model.embedding(t, torch.tensor([0, 2]), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model.embedding(t, torch.tensor([0, 2]), 2)
        out = model(torch.randn(2, 1, 8, 8), t).sample
    assert emb.dtype == torch.float32 and out.dtype == torch.bfloat16
    torch.testing.assert_close(emb, ref)


def test_adaptive_double_normalization_has_unit_rms():
    v = torch.randn(5, 32) * torch.logspace(-2, 2, 5)[:, None]
    rms = pixel_norm(v).pow(2).mean(1).sqrt()
    torch.testing.assert_close(rms, torch.ones(5), rtol=1e-4, atol=1e-4)  # up to eps = 1e-8 against RMS^2 >= 1e-4
    block = ResBlock(8, 16, 12, 0.0, 4)
    seen = {}
    block.scale.register_forward_hook(lambda m, i, o: seen.setdefault("scale", o))
    block(torch.randn(3, 8, 4, 4), 100 * torch.randn(3, 12))  # a large embedding: the modulation stays RMS 1
    torch.testing.assert_close(pixel_norm(seen["scale"]).pow(2).mean(1).sqrt(), torch.ones(3), rtol=1e-5, atol=1e-5)


def test_jvp_matches_float64_finite_differences():
    model = tiny(num_classes=3).double()
    den = TrigFlowDenoiser(model, "trigflow", sigma_data=0.5)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.4, 1.3], dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.tensor([1.0, -0.7], dtype=torch.float64)
    labels = torch.tensor([1, 3])  # 3 = null class

    def f(a, b):
        return den(a, b, class_labels=labels)

    _, tangent = jvp(f, (x, t), (dx, dt), module=den, backend="blocked")
    h = 1e-6
    with jvp_mode(den), torch.no_grad():
        fd = (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)
    assert ((tangent - fd).abs().max() / fd.abs().max()).item() < 1e-6


def test_null_class_and_gradient_checkpointing():
    model = tiny(num_classes=3)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.9])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t).sample, model(x, t, class_labels=torch.tensor([3, 3])).sample)
        assert not torch.allclose(model(x, t).sample, model(x, t, class_labels=torch.tensor([0, 1])).sample)
    model.train()
    loss = model(x, t).sample.pow(2).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    loss_ckpt = model(x, t).sample.pow(2).sum()
    grads_ckpt = torch.autograd.grad(loss_ckpt, list(model.parameters()), allow_unused=True)
    for a, b in zip(grads, grads_ckpt):
        if a is not None:
            torch.testing.assert_close(a, b)


def test_save_load_and_pipeline_round_trip(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "net")
    loaded = SCMUNet2DModel.from_pretrained(tmp_path / "net")
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.9])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, model(x, t).sample)
    pipe = SCMPipeline(unet=model, scheduler=TrigFlowScheduler())
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        batch_size=2, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    pipe.save_pretrained(tmp_path / "pipe")
    again = SCMPipeline.from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    out = again(
        batch_size=2, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    assert torch.equal(out, ref) and isinstance(again.unet, SCMUNet2DModel)


def test_presets():
    with torch.device("meta"):
        sizes = {
            n: sum(p.numel() for p in SCMUNet2DModel.from_preset(n, num_classes=1000).parameters())
            for n in ("S", "XL")
        }
    assert 2.5e8 < sizes["S"] < 3.0e8 and 1.0e9 < sizes["XL"] < 1.2e9
    with pytest.raises(ValueError, match="Unknown preset"):
        SCMUNet2DModel.from_preset("XXL")
