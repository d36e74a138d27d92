"""Parameterizations against closed forms (SPEC.md section 2): inverses, ideal Gaussian denoisers, time maps, d/dt."""

import math

import pytest
import torch

from diffusers_scm import TrigFlowDenoiser, get_parameterization
from diffusers_scm.parameterizations import PARAMETERIZATIONS, make_alphas_cumprod


NAMES = list(PARAMETERIZATIONS)
# Times from near 0 to t_max = arctan(80 / 0.5) (where every family is well conditioned).
TIMES = torch.tensor([1e-3, 0.05, 0.4, 0.9, 1.3, 1.55, math.atan(80 / 0.5)], dtype=torch.float64)


def _batch(sigma_data, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(len(TIMES), 3, 4, 4, generator=g, dtype=torch.float64)
    raw = torch.randn(len(TIMES), 3, 4, 4, generator=g, dtype=torch.float64)
    return x_t, raw


@pytest.mark.parametrize("sigma_data", [0.5, 1.3])
@pytest.mark.parametrize("name", NAMES)
def test_from_trigflow_inverts_to_trigflow(name, sigma_data):
    p = get_parameterization(name, sigma_data=sigma_data)
    x_t, raw = _batch(sigma_data)
    F = p.to_trigflow(raw, x_t, TIMES)
    assert torch.isfinite(F).all()
    torch.testing.assert_close(p.from_trigflow(F, x_t, TIMES), raw, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(p.to_trigflow(p.from_trigflow(raw, x_t, TIMES), x_t, TIMES), raw, rtol=1e-10, atol=1e-9)


# ---- ideal denoisers of Gaussian data, each written in the family's own coordinates --------------------------------
MU, S0 = 0.3, 0.8  # data x0 ~ N(MU, S0^2) per element


def _ideal_trigflow_F(x_t, t, sd):
    # x_t = cos t x0 + sin t sd n;  v_t = sd cos t n - sin t x0;  F = E[v_t | x_t] / sd  (SPEC.md section 1)
    c, s = torch.cos(t), torch.sin(t)
    var = c**2 * S0**2 + s**2 * sd**2
    r = x_t - c * MU
    x0_hat = MU + c * S0**2 / var * r
    n_hat = s * sd / var * r
    return (sd * c * n_hat - s * x0_hat) / sd


def _ideal_native(name, x_t, t, sd, p):
    """(network sample, network time, ideal raw output) computed in the family's own coordinates."""
    c, s = torch.cos(t), torch.sin(t)
    if name == "trigflow":
        return x_t / sd, t, _ideal_trigflow_F(x_t, t, sd)
    if name == "edm":  # x_sigma = x0 + sigma n;  D = E[x0 | x_sigma];  D = c_skip x + c_out raw
        sigma = sd * s / c
        x_sig = x_t / c
        D = MU + S0**2 / (S0**2 + sigma**2) * (x_sig - MU)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / torch.sqrt(sigma**2 + sd**2)
        c_in = 1 / torch.sqrt(sigma**2 + sd**2)
        return c_in * x_sig, torch.log(sigma) / 4, (D - c_skip * x_sig) / c_out
    if name == "flow_matching":  # x_s = (1 - s) x0 + s n;  u = E[n - x0 | x_s]
        fs = sd * s / (c + sd * s)
        x_s = x_t / (c + sd * s)
        var = (1 - fs) ** 2 * S0**2 + fs**2
        r = x_s - (1 - fs) * MU
        x0_hat = MU + (1 - fs) * S0**2 / var * r
        n_hat = fs / var * r
        return x_s, 1000 * fs, n_hat - x0_hat
    # VP: x_tau = sqrt(abar) x0 + sqrt(1 - abar) n with sigma_vp = sqrt((1 - abar) / abar) = sd tan t
    abar = 1 / (1 + (sd * s / c) ** 2)
    a, b = torch.sqrt(abar), torch.sqrt(1 - abar)
    x_tau = x_t / torch.sqrt(c**2 + sd**2 * s**2)
    var = abar * S0**2 + 1 - abar
    r = x_tau - a * MU
    x0_hat = MU + a * S0**2 / var * r
    n_hat = b / var * r
    raw = n_hat if name == "vp_epsilon" else a * n_hat - b * x0_hat
    return x_tau, None, raw


@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
@pytest.mark.parametrize("name", NAMES)
def test_ideal_gaussian_networks_agree_in_trigflow(name, sigma_data):
    p = get_parameterization(name, sigma_data=sigma_data)
    x_t, _ = _batch(sigma_data, seed=1)
    t = TIMES.reshape(-1, 1, 1, 1)
    sample, time, raw = _ideal_native(name, x_t, t, sigma_data, p)
    net_sample, net_time = p.model_inputs(x_t, TIMES)
    torch.testing.assert_close(net_sample, sample, rtol=1e-10, atol=1e-12)
    if time is not None:
        torch.testing.assert_close(net_time, time.flatten(), rtol=1e-10, atol=1e-12)
    F = p.to_trigflow(raw, x_t, TIMES)
    torch.testing.assert_close(F, _ideal_trigflow_F(x_t, t, sigma_data), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_vp_time_map_hits_table_indices(beta_schedule):
    from diffusers import DDPMScheduler

    p = get_parameterization("vp_epsilon", sigma_data=0.5, beta_schedule=beta_schedule, beta_end=0.012)
    oracle = DDPMScheduler(beta_schedule=beta_schedule, beta_end=0.012).alphas_cumprod
    torch.testing.assert_close(p.alphas_cumprod, oracle, rtol=0, atol=0)
    taus = torch.tensor([0.0, 1.0, 17.0, 250.0, 500.5, 998.0, 999.0], dtype=torch.float64)
    t = p.timestep_to_time(taus)
    _, net_time = p.model_inputs(torch.zeros(len(taus), 1, dtype=torch.float64), t)
    torch.testing.assert_close(net_time, taus, rtol=0, atol=1e-6)
    abar = oracle.double()[taus[[0, 1, 2, 3, 5, 6]].long()]
    torch.testing.assert_close(torch.tan(t[[0, 1, 2, 3, 5, 6]]) * 0.5, torch.sqrt((1 - abar) / abar))


@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_derivative_in_t_matches_finite_differences(name):
    p = get_parameterization(name, sigma_data=0.5)
    x_t, raw = _batch(0.5, seed=2)
    # keep away from the VP table's ends and EDM's clamp, where the time map is flat by design
    t0 = torch.tensor([0.05, 0.4, 0.9, 1.3, 1.45, 1.5, 1.52], dtype=torch.float64)

    def outputs(t):
        sample, time = p.model_inputs(x_t, t)
        return p.to_trigflow(raw, x_t, t), sample, time

    tangent = torch.ones_like(t0)
    _, jvps = torch.func.jvp(outputs, (t0,), (tangent,))
    h = 1e-6
    fd = [(a - b) / (2 * h) for a, b in zip(outputs(t0 + h), outputs(t0 - h))]
    for got, ref in zip(jvps, fd):
        assert ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item() < 1e-6


class _TimeConditionedNet(torch.nn.Module):
    """A small float64 network with a sinusoidal time embedding, called as diffusers networks are."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 1, 3, padding=1)
        self.emb = torch.nn.Linear(8, 8)

    def forward(self, sample, timestep, return_dict=True):
        freqs = torch.exp(torch.linspace(-4, 0, 4, dtype=sample.dtype))
        arg = timestep[:, None] * freqs
        emb = self.emb(torch.cat([torch.sin(arg), torch.cos(arg)], dim=1))
        h = torch.nn.functional.silu(self.conv1(sample) * (1 + emb[:, :, None, None]))
        out = self.conv2(h)
        return (out,) if not return_dict else type("Out", (), {"sample": out})()


@pytest.mark.parametrize("name", NAMES)
def test_forward_ad_through_denoiser_matches_finite_differences(name):
    den = TrigFlowDenoiser(_TimeConditionedNet().double(), name, sigma_data=0.5)
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.tensor([1.0, -0.5], dtype=torch.float64)
    with torch.no_grad():
        _, jvp_out = torch.func.jvp(den, (x, t), (dx, dt))
        h = 1e-6
        fd = (den(x + h * dx, t + h * dt) - den(x - h * dx, t - h * dt)) / (2 * h)
    assert ((jvp_out - fd).abs().max() / fd.abs().max()).item() < 1e-6


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown parameterization 'ddpm'.*trigflow"):
        get_parameterization("ddpm")
    with pytest.raises(TypeError, match="does not take.*beta_end"):
        get_parameterization("edm", beta_end=0.02)
    with pytest.raises(ValueError, match="fixes prediction_type"):
        get_parameterization("vp_v", prediction_type="epsilon")
    with pytest.raises(ValueError, match="beta_schedule"):
        make_alphas_cumprod(beta_schedule="sigmoidish")
    p = get_parameterization("edm")
    with pytest.raises(ValueError, match="one time per sample"):
        p.to_trigflow(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))


def test_config_rebuilds_the_same_object():
    for name in NAMES:
        p = get_parameterization(name, sigma_data=0.7)
        q = get_parameterization(p.name, **p.config())
        assert type(q) is type(p) and q.config() == p.config()
