"""`TrigFlowODEScheduler` against diffusers' own schedulers (as oracles) and against closed-form ODE solutions."""

import math

import pytest
import torch
from conftest import max_rel_err, tiny_unet
from diffusers import DDIMScheduler, EDMEulerScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_scm import TrigFlowODEScheduler, get_parameterization


SD = 0.5


def _run_trigflow(net, scheduler: TrigFlowODEScheduler, x: torch.Tensor) -> torch.Tensor:
    """The pipeline loop: network inputs from the parameterization, raw output into `step`."""
    for t in scheduler.timesteps:
        sample, time = scheduler.model_inputs(x, t)
        x = scheduler.step(net(sample, time.expand(x.shape[0])).sample, t, x).prev_sample
    return x


@pytest.mark.parametrize("sigma_schedule", ["exponential", "karras"])
def test_edm_matches_edm_euler_scheduler(sigma_schedule):
    net = tiny_unet()
    native = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=SD, sigma_schedule=sigma_schedule)
    native.set_timesteps(12)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = noise * native.sigmas[0]  # x_sigma_max = sigma_max n
    with torch.no_grad():
        for t in native.timesteps:
            out = net(native.scale_model_input(x, t), t).sample
            x = native.step(out, t, x).prev_sample
        ours = TrigFlowODEScheduler(sigma_data=SD, parameterization="edm", solver="ddim")
        ours.set_timesteps(timesteps=torch.atan(native.sigmas[:-1].double() / SD))
        y = _run_trigflow(net, ours, torch.cos(ours.timesteps[0]) * noise * native.sigmas[0])
    assert max_rel_err(y, x) < 2e-5


def test_edm_karras_grid_equals_diffusers_sigmas():
    native = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=SD, sigma_schedule="karras")
    native.set_timesteps(10)
    ours = TrigFlowODEScheduler(sigma_data=SD, parameterization="edm", timestep_spacing="karras")
    ours.set_timesteps(10)
    torch.testing.assert_close(SD * torch.tan(ours.grid[:-1]).float(), native.sigmas[:-1], rtol=1e-5, atol=1e-7)


def test_flow_matching_matches_flow_match_euler_scheduler():
    net = tiny_unet()
    native = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    native.set_timesteps(10)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = noise.clone()  # x_{s=1} = n
    with torch.no_grad():
        for t in native.timesteps:
            x = native.step(net(x, t.expand(2)).sample, t, x).prev_sample
        s = native.sigmas[:-1].double()
        grid = torch.atan2(s, SD * (1 - s))  # s = sd sin t / (cos t + sd sin t)
        ours = TrigFlowODEScheduler(sigma_data=SD, parameterization="flow_matching", solver="ddim")
        ours.set_timesteps(timesteps=grid)
        t0 = ours.timesteps[0]
        y = _run_trigflow(net, ours, noise * (torch.cos(t0) + SD * torch.sin(t0)))
    assert max_rel_err(y, x) < 2e-5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_vp_matches_ddim_scheduler(prediction_type, spacing):
    net = tiny_unet()
    native = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=True,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
    )
    native.set_timesteps(10)
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    x = noise.clone()
    name = "vp_epsilon" if prediction_type == "epsilon" else "vp_v"
    p = get_parameterization(name, sigma_data=SD, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with torch.no_grad():
        for t in native.timesteps:
            x = native.step(net(x, t.expand(2)).sample, t, x, eta=0.0).prev_sample
        ours = TrigFlowODEScheduler(
            sigma_data=SD, parameterization=name, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
        )
        ours.set_timesteps(timesteps=p.timestep_to_time(native.timesteps.double()))
        b0 = torch.sqrt(torch.cos(ours.grid[0]) ** 2 + SD**2 * torch.sin(ours.grid[0]) ** 2).float()
        y = _run_trigflow(net, ours, noise * b0)  # x_t = b(t) x_tau
    assert max_rel_err(y, x) < 1e-4


# ---- convergence order -------------------------------------------------------------------------------------------
def _errors(step_fn, counts, reference):
    return [(step_fn(n) - reference).abs().max().item() for n in counts]


def _solve(solver, n, F_fn, x, spacing="angle"):
    sch = TrigFlowODEScheduler(
        sigma_data=SD, parameterization="trigflow", solver=solver, timestep_spacing=spacing, sigma_min=1e-4
    )
    sch.set_timesteps(n)
    for t in sch.timesteps:
        x = sch.step(F_fn(x, t.double()), t, x).prev_sample
    return x


def _orders(errors):
    return [math.log2(a / b) for a, b in zip(errors[:-1], errors[1:])]


@pytest.mark.parametrize("solver,order", [("ddim", 1), ("heun", 2), ("dpmsolver++", 2)])
def test_gaussian_data_converges_to_closed_form_with_expected_order(solver, order):
    spacing = "log_sigma"  # even steps in lambda = -log(sigma), the exponential integrator's own variable
    mu, s0 = 0.4, 1.3  # x0 ~ N(mu, s0^2) per element; the PF-ODE is linear in x

    def ideal_F(x, t):  # F = E[v_t | x_t] / sd (SPEC.md section 1)
        c, s = torch.cos(t), torch.sin(t)
        var = c**2 * s0**2 + s**2 * SD**2
        r = x - c * mu
        return (SD * c * (s * SD / var * r) - s * (mu + c * s0**2 / var * r)) / SD

    t_max = math.atan(80 / SD)
    x_T = torch.randn(4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    std_T = math.sqrt(math.cos(t_max) ** 2 * s0**2 + math.sin(t_max) ** 2 * SD**2)
    exact = mu + s0 * (x_T - math.cos(t_max) * mu) / std_T  # x0 at the same ODE trajectory
    errors = _errors(lambda n: _solve(solver, n, ideal_F, x_T, spacing), [8, 16, 32, 64], exact)
    orders = _orders(errors)
    assert all(abs(o - order) < 0.35 for o in orders[1:]), (errors, orders)


@pytest.mark.parametrize("solver", ["heun", "dpmsolver++"])
def test_second_order_on_random_unet_teacher(solver):
    net = tiny_unet().double()
    p = get_parameterization("trigflow", sigma_data=SD)

    def F_fn(x, t):
        sample, time = p.model_inputs(x, t)
        with torch.no_grad():
            return net(sample, time.expand(x.shape[0])).sample

    x_T = SD * torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    reference = _solve("heun", 512, F_fn, x_T)
    errors = _errors(lambda n: _solve(solver, n, F_fn, x_T), [8, 16, 32], reference)
    orders = _orders(errors)
    assert min(orders) > 1.6, (errors, orders)
    ddim_errors = _errors(lambda n: _solve("ddim", n, F_fn, x_T), [16, 32], reference)
    assert 0.7 < _orders(ddim_errors)[0] < 1.4 and errors[-1] < ddim_errors[-1] / 5


def test_heun_calls_and_grid_layout():
    sch = TrigFlowODEScheduler(solver="heun", timestep_spacing="angle")
    sch.set_timesteps(4)
    g = sch.grid.float()
    torch.testing.assert_close(sch.timesteps, torch.stack([g[0], g[1], g[1], g[2], g[2], g[3], g[3]]))
    assert sch.order == 2 and len(sch.timesteps) == 7 and float(sch.grid[-1]) == 0.0


def test_log_sigma_grid_is_even_in_log_sigma():
    sch = TrigFlowODEScheduler(sigma_data=SD, timestep_spacing="log_sigma", sigma_min=0.002, sigma_max=80.0)
    sch.set_timesteps(6)
    log_sigma = torch.log(SD * torch.tan(sch.grid[:-1]))
    torch.testing.assert_close(
        log_sigma[[0, -1]], torch.tensor([math.log(80.0), math.log(0.002)], dtype=torch.float64)
    )
    steps = log_sigma[:-1] - log_sigma[1:]
    torch.testing.assert_close(steps, steps[:1].expand_as(steps))


def test_bad_config_errors():
    with pytest.raises(ValueError, match="Unknown solver"):
        TrigFlowODEScheduler(solver="rk4")
    with pytest.raises(ValueError, match="Unknown parameterization"):
        TrigFlowODEScheduler(parameterization="sde")
    sch = TrigFlowODEScheduler()
    with pytest.raises(ValueError, match="strictly decreasing"):
        sch.set_timesteps(timesteps=[0.5, 1.0])
    with pytest.raises(ValueError, match=r"\(0, pi/2\]"):
        sch.set_timesteps(timesteps=[2.0, 1.0])
    with pytest.raises(ValueError, match="set_timesteps"):
        TrigFlowODEScheduler().step(torch.zeros(1), 1.0, torch.zeros(1))
