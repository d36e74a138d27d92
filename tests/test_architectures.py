"""Every diffusers family through its adapter: the same prediction as the family pipeline's own call, a JVP through
any attention against float64 central differences, and the teacher ODE against the family's own scheduler."""

import functools

import pytest
import torch
from families import FAMILIES, B

from diffusers_scm import TrigFlowDenoiser, TrigFlowODEScheduler, call_network
from diffusers_scm.adapters import KeywordAdapter, get_adapter, pack_latents, unpack_latents
from diffusers_scm.jvp import float64_precision, jvp


NAMES = list(FAMILIES)
SD = 0.5


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(family, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(family.shape, generator=g, dtype=dtype)
    return x, family.conditioning(g, dtype)


@pytest.mark.parametrize("name", NAMES)
def test_adapter_prediction_equals_the_family_call(name):
    family = FAMILIES[name]
    model = family.make()
    x, cond = _inputs(family, torch.float32)
    timestep = torch.tensor(421.0)
    with torch.no_grad():
        ours = call_network(model, x, timestep, **cond)
        theirs = family.pipeline_call(model, x, timestep, cond)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_adapters_are_chosen_by_class_with_a_keyword_fallback():
    assert type(get_adapter(FAMILIES["flux"].make())).__name__ == "FluxAdapter"
    assert type(get_adapter(FAMILIES["sd15_unet"].make())).__name__ == "UNetAdapter"

    class Plain(torch.nn.Module):
        def forward(self, x, t):
            return x * t[:, None]

    class Keyword(torch.nn.Module):
        def forward(self, hidden_states, encoder_hidden_states, timestep):  # the time is not second
            return hidden_states * timestep[:, None] + encoder_hidden_states

    assert isinstance(get_adapter(Plain()), KeywordAdapter)
    x = torch.ones(2, 3)
    torch.testing.assert_close(call_network(Plain(), x, torch.tensor(2.0)), 2 * x)
    torch.testing.assert_close(call_network(Keyword(), x, torch.tensor(2.0), encoder_hidden_states=x), 3 * x)
    with pytest.raises(TypeError, match="Cannot call Keyword .*no adapter.*register_adapter"):
        call_network(Keyword(), x, torch.tensor(2.0), text=x)


def test_packing_round_trip_equals_flux_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 6, 10)
    torch.testing.assert_close(pack_latents(x), FluxPipeline._pack_latents(x, 2, 4, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(unpack_latents(pack_latents(x), 6, 10), x, rtol=0, atol=0)
    with pytest.raises(ValueError, match="even latent height and width"):
        pack_latents(torch.randn(1, 4, 5, 4))


def _fd(f, x, t, dx, dt, h=1e-6):
    with float64_precision(), torch.no_grad():
        return (f(x + h * dx, t + h * dt) - f(x - h * dx, t - h * dt)) / (2 * h)


@pytest.mark.parametrize("backend", ["math", "blocked"])
@pytest.mark.parametrize("name", NAMES)
def test_jvp_through_any_attention_matches_float64_finite_differences(name, backend):
    family = FAMILIES[name]
    den = TrigFlowDenoiser(family.make().double(), family.parameterization, sigma_data=SD)
    x, cond = _inputs(family)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    dx, dt = torch.randn_like(x), torch.tensor([0.7, -1.2], dtype=torch.float64)
    block = 3 if backend == "blocked" else None  # several key blocks even for these short sequences
    through_module = functools.partial(den, **cond)
    out, tangent = jvp(through_module, (x, t), (dx, dt), backend=backend, block_size=block)
    fd = _fd(through_module, x, t, dx, dt)
    assert ((tangent - fd).abs().max() / fd.abs().max()).item() < 1e-6
    with float64_precision(), torch.no_grad():
        torch.testing.assert_close(out, den(x, t, **cond), rtol=1e-10, atol=1e-12)
    _, closure_tangent = jvp(lambda a, b: den(a, b, **cond), (x, t), (dx, dt), backend=backend, block_size=block)
    torch.testing.assert_close(closure_tangent, tangent, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", [n for n, f in FAMILIES.items() if f.masked])
def test_padding_masks_change_the_prediction(name):
    """The masks in the conditioning are live: dropping them changes the padded sample only."""
    family = FAMILIES[name]
    model = family.make()
    x, cond = _inputs(family, torch.float32)
    mask_key = next(k for k in cond if "mask" in k)
    with torch.no_grad():
        masked = call_network(model, x, torch.tensor(300.0), **cond)
        unmasked = call_network(model, x, torch.tensor(300.0), **{k: v for k, v in cond.items() if k != mask_key})
    assert not torch.allclose(masked[0], unmasked[0], atol=1e-6)  # the first prompt has padding
    torch.testing.assert_close(masked[1], unmasked[1], rtol=1e-5, atol=1e-6)


def test_jvp_finite_difference_method_runs_without_any_of_it():
    family = FAMILIES["flux"]
    den = TrigFlowDenoiser(family.make().double(), "flow_matching", sigma_data=SD)
    x, cond = _inputs(family)
    t, dt = torch.tensor([0.4, 1.1], dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    _, exact = jvp(lambda a, b: den(a, b, **cond), (x, t), (x, dt))
    _, approx = jvp(lambda a, b: den(a, b, **cond), (x, t), (x, dt), method="finite_difference")
    assert ((exact - approx).abs().max() / exact.abs().max()).item() < 1e-6


def test_set_attention_backend_and_gradient_checkpointing_are_handled():
    """A per-module attention backend set by the user (here "_native_math") is routed through the JVP attention;
    gradient checkpointing of a diffusers transformer is off during the pass and restored."""
    family = FAMILIES["flux"]
    model = family.make().double()
    model.set_attention_backend("_native_math")
    model.enable_gradient_checkpointing()
    den = TrigFlowDenoiser(model, "flow_matching", sigma_data=SD)
    x, cond = _inputs(family)
    t, dt = torch.tensor([0.4, 1.1], dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    _, tangent = jvp(functools.partial(den, **cond), (x, t), (x, dt))
    fd = _fd(functools.partial(den, **cond), x, t, x, dt)
    assert ((tangent - fd).abs().max() / fd.abs().max()).item() < 1e-6
    assert model.gradient_checkpointing


# ---- the teacher ODE through the adapter equals the family's own scheduler ----------------------------------------
def _flow_scheduler(name):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if name == "flux":  # dynamic shift, as FluxPipeline sets it from the image size
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), {"mu": 0.8}
    return FlowMatchEulerDiscreteScheduler(shift=3.0), {}


@pytest.mark.parametrize(
    "name", ["sd3", "flux", "flux_guidance", "chroma", "sana", "qwenimage", "wan", "lumina2", "auraflow"]
)
def test_flow_teacher_ode_equals_flow_match_euler(name):
    family = FAMILIES[name]
    model = family.make()
    noise, cond = _inputs(family, torch.float32, seed=5)
    native, extra = _flow_scheduler(name)
    native.set_timesteps(8, **extra)
    x = noise.clone()
    with torch.no_grad():
        for t in native.timesteps:
            x = native.step(family.pipeline_call(model, x, t, cond), t, x).prev_sample
        s = native.sigmas[:-1].double()  # the same grid in TrigFlow angles: s = sd sin t / (cos t + sd sin t)
        ours = TrigFlowODEScheduler(sigma_data=SD, parameterization="flow_matching", solver="ddim")
        ours.set_timesteps(timesteps=torch.atan2(s, SD * (1 - s)))
        t0 = ours.timesteps[0]
        y = noise * (torch.cos(t0) + SD * torch.sin(t0))  # x_t = (cos t + sd sin t) x_s
        for t in ours.timesteps:
            sample, time = ours.model_inputs(y, t)
            y = ours.step(call_network(model, sample, time, **cond), t, y).prev_sample
    assert ((y - x).abs().max() / x.abs().max()).item() < 1e-4


@pytest.mark.parametrize("name", ["pixart", "sd15_unet", "sdxl_unet", "dit"])
def test_vp_teacher_ode_equals_ddim(name):
    from diffusers import DDIMScheduler

    from diffusers_scm import get_parameterization

    family = FAMILIES[name]
    prediction = "v_prediction" if family.parameterization == "vp_v" else "epsilon"
    betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    native = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, prediction_type=prediction, **betas)
    native.set_timesteps(8)
    model = family.make()
    noise, cond = _inputs(family, torch.float32, seed=6)
    x = noise.clone()
    p = get_parameterization(family.parameterization, sigma_data=SD, **betas)
    with torch.no_grad():
        for t in native.timesteps:
            x = native.step(family.pipeline_call(model, x, t, cond), t, x, eta=0.0).prev_sample
        ours = TrigFlowODEScheduler(sigma_data=SD, parameterization=family.parameterization, solver="ddim", **betas)
        ours.set_timesteps(timesteps=p.timestep_to_time(native.timesteps.double()))
        g0 = ours.grid[0]
        y = noise * torch.sqrt(torch.cos(g0) ** 2 + SD**2 * torch.sin(g0) ** 2).float()  # x_t = b(t) x_tau
        for t in ours.timesteps:
            sample, time = ours.model_inputs(y, t)
            y = ours.step(call_network(model, sample, time, **cond), t, y).prev_sample
    assert ((y - x).abs().max() / x.abs().max()).item() < 1e-4


def test_guidance_input_reaches_flux():
    family = FAMILIES["flux_guidance"]
    model = family.make()
    x, cond = _inputs(family, torch.float32)
    with torch.no_grad():
        a = call_network(model, x, torch.tensor(500.0), **cond)
        b = call_network(model, x, torch.tensor(500.0), **{**cond, "guidance": torch.tensor([1.0, 7.0])})
    assert not torch.allclose(a, b)
    assert B == x.shape[0]
