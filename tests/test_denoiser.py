"""`TrigFlowDenoiser` and `call_network` on real diffusers networks."""

import math

import pytest
import torch
from conftest import tiny_cond_unet, tiny_dit, tiny_unet

from diffusers_scm import TrigFlowDenoiser, get_parameterization


def test_unet2d_trigflow_denoiser_equals_direct_call():
    net = tiny_unet()
    den = TrigFlowDenoiser(net, "trigflow", sigma_data=0.5)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 1.2])
    with torch.no_grad():
        torch.testing.assert_close(den(x, t), net(x / 0.5, t).sample)
        torch.testing.assert_close(den(x, 0.7), net(x / 0.5, torch.full((2,), 0.7)).sample)
        # f(x, t) = cos t x - sin t sd F, and f(x, 0) = x (the boundary condition, SPEC.md section 1)
        torch.testing.assert_close(
            den.denoise(x, t),
            torch.cos(t)[:, None, None, None] * x - torch.sin(t)[:, None, None, None] * 0.5 * den(x, t),
        )
        torch.testing.assert_close(den.denoise(x, torch.zeros(2)), x)


def test_dit_learned_variance_channels_are_stripped_and_labels_passed():
    dit = tiny_dit()
    den = TrigFlowDenoiser(dit, "vp_epsilon", sigma_data=1.0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 1.0])
    labels = torch.tensor([1, 9])
    p = get_parameterization("vp_epsilon", sigma_data=1.0)
    with torch.no_grad():
        F = den(x, t, class_labels=labels)
        sample, tau = p.model_inputs(x, t)
        eps = dit(sample, tau, class_labels=labels).sample[:, :4]
    assert F.shape == x.shape
    torch.testing.assert_close(F, p.to_trigflow(eps, x, t))
    with torch.no_grad():
        assert not torch.allclose(F, den(x, t, class_labels=torch.tensor([2, 3])))


def test_unet2d_condition_model_with_encoder_states():
    net = tiny_cond_unet()
    den = TrigFlowDenoiser(net, "edm", sigma_data=0.5)
    x, t, ctx = torch.randn(2, 2, 8, 8), torch.tensor([0.4, 1.4]), torch.randn(2, 3, 12)
    with torch.no_grad():
        F = den(x, t, encoder_hidden_states=ctx)
        raw = net(x / 0.5, torch.log(0.5 * torch.tan(t)) / 4, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(F, -raw)


def test_plain_module_and_sigma_data_mismatch():
    class Mlp(torch.nn.Module):
        def forward(self, sample, timestep):
            return sample * timestep[:, None]

    den = TrigFlowDenoiser(Mlp(), "trigflow", sigma_data=2.0)
    x = torch.randn(3, 2)
    torch.testing.assert_close(den(x, torch.tensor([1.0, 2.0, 3.0])), x / 2 * torch.tensor([[1.0], [2.0], [3.0]]))
    with pytest.raises(ValueError, match="sigma_data=0.5 differs"):
        TrigFlowDenoiser(Mlp(), get_parameterization("edm", sigma_data=1.0), sigma_data=0.5)
    with pytest.raises(ValueError, match="Unknown parameterization"):
        TrigFlowDenoiser(Mlp(), "rectified")
    assert math.isclose(den.sigma_data, 2.0)
