"""`TrigFlowScheduler`: consistency sampling (SPEC.md section 4), diffusers' `SCMScheduler` as oracle, API contracts."""

import math
import tempfile

import pytest
import torch
from conftest import tiny_unet
from diffusers import SCMScheduler

from diffusers_scm import TrigFlowODEScheduler, TrigFlowScheduler, get_parameterization


def _velocity_model(net, sd):
    """A fixed network whose output is v_t = sd F, the convention of SCMScheduler.step."""

    def model(x, t):
        with torch.no_grad():
            return sd * net(x / sd, t.expand(x.shape[0])).sample

    return model


@pytest.mark.parametrize("times", [[1.5, 1.1, 0.6, 0.2, 0.0], [1.57080, 1.3, 0.0], [1.2, 0.0]])
def test_equals_diffusers_scm_scheduler_sample_for_sample(times):
    net, sd = tiny_unet(), 0.5
    model = _velocity_model(net, sd)
    native = SCMScheduler(sigma_data=sd)
    native.set_timesteps(len(times) - 1, timesteps=times, max_timesteps=None, intermediate_timesteps=None)
    ours = TrigFlowScheduler.from_config(native.config)
    ours.set_timesteps(timesteps=times)
    assert len(ours.timesteps) == len(times) - 1  # no terminal 0: only the times the network is called at
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x_a, x_b = noise * sd, noise * sd
    g_a, g_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for t_a, t_b in zip(native.timesteps[:-1], ours.timesteps):
        out_a = native.step(model(x_a, t_a), t_a, x_a, generator=g_a)
        out_b = ours.step(model(x_b, t_b), t_b, x_b, generator=g_b)
        torch.testing.assert_close(out_b.pred_original_sample, out_a.pred_original_sample, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out_b.prev_sample, out_a.prev_sample, rtol=1e-6, atol=1e-6)
        x_a, x_b = out_a.prev_sample, out_b.prev_sample


def test_scm_config_defaults_reproduce_scm_two_step_times():
    native = SCMScheduler()
    native.set_timesteps(2)
    ours = TrigFlowScheduler.from_config(native.config)
    ours.set_timesteps(2)
    torch.testing.assert_close(ours.timesteps, native.timesteps[:-1])


def test_default_times():
    sch = TrigFlowScheduler(sigma_data=0.5)
    t_max = math.atan(80 / 0.5)
    assert abs(t_max - 1.56454) < 1e-5
    sch.set_timesteps(1)
    torch.testing.assert_close(sch.timesteps, torch.tensor([t_max]))
    sch.set_timesteps(2)
    torch.testing.assert_close(sch.timesteps, torch.tensor([t_max, 1.1]))
    sch.set_timesteps(4)  # even split in angle
    torch.testing.assert_close(sch.timesteps, torch.tensor([t_max, 0.75 * t_max, 0.5 * t_max, 0.25 * t_max]))
    sch = TrigFlowScheduler(intermediate_timesteps=[1.3, 0.8])
    sch.set_timesteps(3)
    torch.testing.assert_close(sch.timesteps, torch.tensor([t_max, 1.3, 0.8]))
    sch.set_timesteps(timesteps=[1.4, 0.9, 0.0])
    torch.testing.assert_close(sch.timesteps, torch.tensor([1.4, 0.9]))


def test_one_and_two_step_closed_form():
    """x0 = cos(t) x - sin(t) sd F (SPEC.md section 4), for an EDM-parameterized network (F = -raw)."""
    sd = 0.5
    sch = TrigFlowScheduler(sigma_data=sd, parameterization="edm")
    sch.set_timesteps(2)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)) * sd
    raw1, raw2 = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(5)
    out1 = sch.step(raw1, sch.timesteps[0], x, generator=g)
    t0, t1 = sch.timesteps.double()
    x0 = torch.cos(t0) * x.double() + torch.sin(t0) * sd * raw1.double()
    torch.testing.assert_close(out1.pred_original_sample, x0.float())
    n1 = torch.randn(2, 3, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(out1.prev_sample, (torch.cos(t1) * x0 + torch.sin(t1) * sd * n1).float())
    state = g.get_state()
    out2 = sch.step(raw2, sch.timesteps[1], out1.prev_sample, generator=g)
    assert torch.equal(g.get_state(), state)  # no noise drawn after the last step
    assert torch.equal(out2.prev_sample, out2.pred_original_sample)


def test_batch_of_generators_draws_per_sample_noise():
    sch = TrigFlowScheduler()
    x = torch.randn(3, 2, 4, 4)
    raw = torch.randn(3, 2, 4, 4)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    sch.set_timesteps(2)
    batched = sch.step(raw, sch.timesteps[0], x, generator=gens).prev_sample
    for i in range(3):
        sch.set_timesteps(2)
        single = sch.step(raw[i : i + 1], sch.timesteps[0], x[i : i + 1], generator=torch.Generator().manual_seed(i))
        torch.testing.assert_close(batched[i : i + 1], single.prev_sample)


@pytest.mark.parametrize("cls", [TrigFlowScheduler, TrigFlowODEScheduler])
def test_return_dict_equivalence_and_step_index(cls):
    sch = cls(parameterization="vp_v")
    sch.set_timesteps(3)
    x, raw = torch.randn(2, 4), torch.randn(2, 4)
    a = sch.step(raw, sch.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert sch.step_index == 1
    sch.set_timesteps(3)
    b = sch.step(raw, sch.timesteps[0], x, generator=torch.Generator().manual_seed(0), return_dict=False)
    assert isinstance(b, tuple) and torch.equal(a.prev_sample, b[0]) and torch.equal(a.pred_original_sample, b[1])


@pytest.mark.parametrize("cls", [TrigFlowScheduler, TrigFlowODEScheduler])
def test_save_load_round_trip(cls):
    sch = cls(sigma_data=0.7, parameterization="vp_epsilon", beta_schedule="squaredcos_cap_v2", max_timesteps=1.5)
    with tempfile.TemporaryDirectory() as d:
        sch.save_pretrained(d)
        loaded = cls.from_pretrained(d)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(sch.config)
    assert loaded.parameterization.config() == sch.parameterization.config()
    sch.set_timesteps(2)
    loaded.set_timesteps(2)
    torch.testing.assert_close(loaded.timesteps, sch.timesteps)
    x, raw = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(
        loaded.step(raw, loaded.timesteps[0], x, generator=torch.Generator().manual_seed(1)).prev_sample,
        sch.step(raw, sch.timesteps[0], x, generator=torch.Generator().manual_seed(1)).prev_sample,
    )


@pytest.mark.parametrize("cls", [TrigFlowScheduler, TrigFlowODEScheduler])
def test_add_noise_and_scale_model_input(cls):
    sd = 0.5
    sch = cls(sigma_data=sd, parameterization="edm")
    x0, n = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    assert sch.init_noise_sigma == sd
    scaled = sch.scale_model_input(x0, torch.tensor(0.7))  # before set_timesteps
    torch.testing.assert_close(scaled, x0 / sd)
    assert torch.equal(sch.scale_model_input(x0), x0)
    t = torch.tensor([0.1, 0.8, 1.5])
    x_t = sch.add_noise(x0, n, t)
    ref = torch.stack([math.cos(ti) * x0[i] + math.sin(ti) * sd * n[i] for i, ti in enumerate(t.tolist())])
    torch.testing.assert_close(x_t, ref)
    sample, time = sch.model_inputs(x_t, t)
    torch.testing.assert_close(time, torch.log(sd * torch.tan(t)) / 4)
    torch.testing.assert_close(sample, x_t / sd)


def test_model_output_to_x0_uses_parameterization():
    sch = TrigFlowScheduler(parameterization="flow_matching", sigma_data=1.0)
    p = get_parameterization("flow_matching", sigma_data=1.0)
    x_t, u = torch.randn(2, 5), torch.randn(2, 5)
    t = 0.9
    # flow matching: x0_hat = x_s - s u
    s = math.sin(t) / (math.cos(t) + math.sin(t))
    x_s = x_t / (math.cos(t) + math.sin(t))
    torch.testing.assert_close(sch.model_output_to_x0(u, t, x_t), x_s - s * u)
    torch.testing.assert_close(p.predict_x0(u, x_t, t), x_s - s * u)


def test_errors():
    with pytest.raises(ValueError, match="Unknown parameterization 'eps'"):
        TrigFlowScheduler(parameterization="eps")
    with pytest.raises(ValueError, match="prediction_type"):
        TrigFlowScheduler(parameterization="edm", prediction_type="sample")
    sch = TrigFlowScheduler()
    with pytest.raises(ValueError, match="exactly one"):
        sch.set_timesteps()
    with pytest.raises(ValueError, match="strictly decreasing"):
        sch.set_timesteps(timesteps=[1.0, 1.2])
    with pytest.raises(ValueError, match="set_timesteps"):
        TrigFlowScheduler().step(torch.zeros(1), 1.0, torch.zeros(1))
    sch.set_timesteps(2)
    with pytest.raises(ValueError, match="not in the schedule"):
        sch.step(torch.zeros(1), 0.3, torch.zeros(1))
