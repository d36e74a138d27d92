"""`SCMLoss` (SPEC.md section 3) against the theory and against references computed inside the tests."""

import math

import pytest
import torch
from conftest import TimeConditionedNet, ToyMLP

import diffusers_scm.jvp.functional as jvp_functional
import diffusers_scm.training.objectives.scm as losses_module
from diffusers_scm import TrigFlowDenoiser
from diffusers_scm.training import LogVarHead, SCMLoss, lognormal_times


SD = 0.5


def _nets(parameterization="trigflow", dropout=0.0):
    student = TrigFlowDenoiser(TimeConditionedNet(dropout=dropout, seed=0).double(), parameterization, sigma_data=SD)
    teacher = TrigFlowDenoiser(TimeConditionedNet(seed=1).double(), "edm", sigma_data=SD)
    return student, teacher


def _flat_grad(loss, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def _ode_step(teacher, x, t, dt, substeps=4):
    """RK4 of dx/dt = sd F_teacher(x, t) from t to t - dt (an accurate teacher ODE step)."""
    h = -dt / substeps

    def vel(y, s):
        return SD * teacher(y, torch.full((y.shape[0],), s, dtype=y.dtype))

    with torch.no_grad():
        for i in range(substeps):
            s = t + i * h
            k1 = vel(x, s)
            k2 = vel(x + h / 2 * k1, s + h / 2)
            k3 = vel(x + h / 2 * k2, s + h / 2)
            k4 = vel(x + h * k3, s + h)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def _discrete_gradient(student, teacher, x_t, t, dt, params):
    """Gradient of ||f_theta(x_t, t) - f_theta^-(x_{t-dt}, t - dt)||^2 / dt with f^- under stop-gradient."""
    x_prev = _ode_step(teacher, x_t, t, dt)
    with torch.no_grad():
        f_minus = student.denoise(x_prev, torch.tensor([t - dt], dtype=torch.float64))
    f = student.denoise(x_t, torch.tensor([t], dtype=torch.float64))
    return _flat_grad((f - f_minus).pow(2).sum() / dt, params)


def _scm_gradient(student, teacher, x0, noise, t, params):
    loss_fn = SCMLoss(sigma_data=SD, tangent_warmup_steps=0, tangent_norm_c=None, adaptive_weighting=False)
    loss, _ = loss_fn(student, x0, teacher=teacher, step=1, t=torch.tensor([t], dtype=torch.float64), noise=noise)
    return _flat_grad(loss, params)


@pytest.mark.parametrize("t", [0.3, 0.9, 1.35])
def test_gradient_equals_continuous_limit_of_discrete_consistency_distillation(t, monkeypatch):
    """
    Theory: f(x, t) = cos t x - sin t sd F(x, t), so df/dtheta = -sin t sd dF/dtheta. When the warmup is over,
    g = -cos^2 t (sd F^- - dx/dt) - (cos t sin t x_t + sd cos t sin t dF/dt) = cos t df/dt, the total derivative of f
    along the teacher's ODE. With F_theta = F^- at the evaluation point, the sCM loss (no normalization, no adaptive
    weighting, w = 1) has gradient (2 / D) (-g) . dF/dtheta = -(2 cos t / D) df/dt . dF/dtheta.
    The discrete loss ||f(x_t, t) - f^-(x_{t-dt}, t - dt)||^2 / dt has gradient (2 / dt)(f - f^-) . df/dtheta, which
    tends to 2 df/dt . (-sin t sd dF/dtheta) as dt -> 0. The ratio is cos t / (sin t sd D) = 1 / (sd tan t D).
    The limit is taken by Richardson extrapolation of dt = 2e-3 and 1e-3, in float64.
    """
    student, teacher = _nets()
    params = list(student.parameters())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64) * SD
    noise = torch.randn(1, 1, 8, 8, generator=g, dtype=torch.float64)
    x_t = math.cos(t) * x0 + math.sin(t) * SD * noise
    D = x0[0].numel()

    coarse = _discrete_gradient(student, teacher, x_t, t, 2e-3, params)
    fine = _discrete_gradient(student, teacher, x_t, t, 1e-3, params)
    limit = (2 * fine - coarse) / (SD * math.tan(t) * D)
    ours = _scm_gradient(student, teacher, x0, noise, t, params)
    rel = ((ours - limit).norm() / limit.norm()).item()
    print(f"t={t}: relative gradient error {rel:.2e}")
    assert rel < 3e-4, rel

    # The check has teeth: a flipped tangent or tangents without the cos t sin t factor do not match.
    real_jvp = jvp_functional.jvp

    def flipped(fn, primals, tangents, **kw):
        return real_jvp(fn, primals, tuple(-x for x in tangents), **kw)

    def unscaled(fn, primals, tangents, **kw):
        cs = torch.cos(primals[1]) * torch.sin(primals[1])
        return real_jvp(fn, primals, (tangents[0] / cs.reshape(-1, 1, 1, 1), tangents[1] / cs), **kw)

    for wrong in (flipped, unscaled):
        monkeypatch.setattr(losses_module, "jvp", wrong)
        bad = _scm_gradient(student, teacher, x0, noise, t, params)
        assert ((bad - limit).norm() / limit.norm()).item() > 1e-2
    monkeypatch.setattr(losses_module, "jvp", real_jvp)


def _reference_g(student, x0, noise, t, r, dxdt=None):
    """g of SPEC.md section 3 with dF/dt from float64 central differences (independent of the JVP code)."""
    tb = t.reshape(-1, 1, 1, 1)
    z = SD * noise
    x_t = torch.cos(tb) * x0 + torch.sin(tb) * z
    dxdt = torch.cos(tb) * z - torch.sin(tb) * x0 if dxdt is None else dxdt
    h = 1e-6
    cs = torch.cos(tb) * torch.sin(tb)
    with torch.no_grad():
        F = student(x_t, t)
        dF = student(x_t + h * cs * dxdt, t + h * cs.flatten()) - student(x_t - h * cs * dxdt, t - h * cs.flatten())
        dF = dF / (2 * h)
    return -(torch.cos(tb) ** 2) * (SD * F - dxdt) - r * (cs * x_t + SD * dF)


def _batch(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) * SD
    noise = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.2, 0.8, 1.4][:n], dtype=torch.float64)
    return x0, noise, t


@pytest.mark.parametrize("step,expected_r", [(0, 0.0), (50, 0.5), (100, 1.0), (500, 1.0)])
def test_tangent_warmup_ratio(step, expected_r):
    student, _ = _nets()
    x0, noise, t = _batch()
    loss_fn = SCMLoss(sigma_data=SD, tangent_warmup_steps=100, tangent_norm_c=None, adaptive_weighting=False)
    loss, logs = loss_fn(student, x0, step=step, t=t, noise=noise)
    g = _reference_g(student, x0, noise, t, expected_r)
    assert logs["warmup_ratio"] == expected_r
    D = x0[0].numel()
    torch.testing.assert_close(logs["loss"], g.flatten(1).pow(2).sum(1) / D, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(loss, (g.flatten(1).pow(2).sum(1) / D).mean(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("norm", ["l2", "rms"])
@pytest.mark.parametrize("c", [0.1, 2.0])
def test_tangent_normalization(norm, c):
    student, _ = _nets()
    x0, noise, t = _batch()
    loss_fn = SCMLoss(
        sigma_data=SD, tangent_warmup_steps=0, tangent_norm_c=c, tangent_norm=norm, adaptive_weighting=False
    )
    _, logs = loss_fn(student, x0, t=t, noise=noise)
    g = _reference_g(student, x0, noise, t, 1.0)
    D = x0[0].numel()
    g_norm = g.flatten(1).norm(dim=1) / (math.sqrt(D) if norm == "rms" else 1.0)
    torch.testing.assert_close(logs["tangent_norm"], g_norm, rtol=1e-6, atol=1e-12)
    expected = (g / (g_norm.reshape(-1, 1, 1, 1) + c)).flatten(1).pow(2).sum(1) / D
    torch.testing.assert_close(logs["loss"], expected, rtol=1e-6, atol=1e-12)


def test_prior_and_adaptive_weighting():
    student, _ = _nets()
    x0, noise, t = _batch()
    head = LogVarHead().double()
    torch.nn.init.constant_(head.linear.bias, 0.3)
    torch.nn.init.normal_(head.linear.weight, std=0.1)
    loss_fn = SCMLoss(
        sigma_data=SD,
        tangent_warmup_steps=0,
        tangent_norm_c=0.1,
        prior_weighting="inverse_sigma",
        adaptive_weighting=True,
    )
    loss, logs = loss_fn(student, x0, t=t, noise=noise, logvar_head=head)
    logvar = head(t)
    expected = (logs["loss"] / (SD * torch.tan(t)) / torch.exp(logvar) + logvar).mean()
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(logs["weight"], 1 / (SD * torch.tan(t)), rtol=1e-12, atol=0)
    loss.backward()
    assert head.linear.bias.grad.abs() > 0
    with pytest.raises(ValueError, match="logvar_head"):
        loss_fn(student, x0, t=t, noise=noise)


def test_guidance_uses_conditional_and_unconditional_teacher():
    class LabelNet(torch.nn.Module):  # F depends on the label: teacher velocity known in closed form
        def forward(self, sample, timestep, class_labels):
            return sample * 0 + class_labels.to(sample.dtype).reshape(-1, 1, 1, 1)

    teacher = TrigFlowDenoiser(LabelNet(), "trigflow", sigma_data=SD)
    student, _ = _nets()
    x0, noise, t = _batch()
    labels, null = torch.tensor([2, 2, 2]), torch.tensor([5, 5, 5])
    w = 3.0
    loss_fn = SCMLoss(
        sigma_data=SD, guidance_scale=w, tangent_warmup_steps=0, tangent_norm_c=None, adaptive_weighting=False
    )
    tb = t.reshape(-1, 1, 1, 1)
    x_t = torch.cos(tb) * x0 + torch.sin(tb) * SD * noise
    dxdt = loss_fn.teacher_velocity(teacher, x_t, t, x0, SD * noise, {"class_labels": labels}, {"class_labels": null})
    # F_c + (w - 1)(F_c - F_u) = 2 + 2 * (2 - 5) = -4
    torch.testing.assert_close(dxdt, torch.full_like(x0, SD * -4.0))

    student_cond = TrigFlowDenoiser(_LabelIgnoringNet(student.inner_model), "trigflow", sigma_data=SD)
    _, logs = loss_fn(
        student_cond,
        x0,
        teacher=teacher,
        t=t,
        noise=noise,
        class_labels=labels,
        uncond_conditioning={"class_labels": null},
    )
    g = _reference_g(student, x0, noise, t, 1.0, dxdt=dxdt)
    torch.testing.assert_close(logs["loss"], g.flatten(1).pow(2).sum(1) / x0[0].numel(), rtol=1e-6, atol=1e-12)


class _LabelIgnoringNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, sample, timestep, class_labels=None):
        return self.net(sample, timestep, return_dict=False)[0]


def test_dropout_masks_match_between_jvp_and_gradient_pass(monkeypatch):
    student, _ = _nets(dropout=0.3)
    student.train()
    x0, noise, t = _batch()
    loss_fn = SCMLoss(sigma_data=SD, tangent_warmup_steps=0, tangent_norm_c=None, adaptive_weighting=False)
    D = x0[0].numel()
    _, logs = loss_fn(student, x0, t=t, noise=noise)
    # F_theta equals F^- exactly (same weights, same dropout masks): the loss is ||g||^2 / D
    torch.testing.assert_close(logs["loss"], logs["tangent_norm"] ** 2 / D, rtol=1e-6, atol=1e-12)
    import contextlib

    monkeypatch.setattr(jvp_functional, "_fork_rng", lambda tensors: contextlib.nullcontext())
    _, logs = loss_fn(student, x0, t=t, noise=noise)
    assert not torch.allclose(logs["loss"], logs["tangent_norm"] ** 2 / D, rtol=1e-3)


def test_nonfinite_targets_are_masked_and_counted():
    class NaNTeacher(torch.nn.Module):
        def forward(self, sample, timestep):
            out = sample.clone()
            out[0] = float("nan")
            return out

    student, _ = _nets()
    x0, noise, t = _batch()
    loss_fn = SCMLoss(sigma_data=SD, adaptive_weighting=False)
    loss, logs = loss_fn(
        student, x0, teacher=TrigFlowDenoiser(NaNTeacher(), "trigflow", sigma_data=SD), t=t, noise=noise
    )
    assert int(logs["nonfinite"]) == 1 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters())


def test_lognormal_proposal():
    t = lognormal_times(200000, P_mean=-1.0, P_std=1.4, sigma_data=SD, generator=torch.Generator().manual_seed(0))
    log_sigma = torch.log(SD * torch.tan(t.double()))
    assert abs(log_sigma.mean().item() + 1.0) < 0.01 and abs(log_sigma.std().item() - 1.4) < 0.01
    assert t.dtype == torch.float32 and t.min() > 0 and t.max() < math.pi / 2


def _gaussian_teacher(mu=0.5, s0=0.3):
    """The exact TrigFlow denoiser of data N(mu, s0^2) per coordinate (SPEC.md section 1)."""

    class Ideal(torch.nn.Module):
        def forward(self, sample, timestep):
            x_t, t = sample * SD, timestep[:, None]
            c, s = torch.cos(t), torch.sin(t)
            var = c**2 * s0**2 + s**2 * SD**2
            r = x_t - c * mu
            return (SD * c * (s * SD / var * r) - s * (mu + c * s0**2 / var * r)) / SD

    return TrigFlowDenoiser(Ideal(), "trigflow", sigma_data=SD)


def test_tiny_student_becomes_consistent_on_a_tiny_problem():
    """sCD of a 2-D Gaussian teacher: the consistency residual ||g|| on a fixed batch shrinks as the loss trains."""
    torch.manual_seed(0)
    teacher = _gaussian_teacher()
    student = TrigFlowDenoiser(ToyMLP(width=64), "trigflow", sigma_data=SD)
    head = LogVarHead()
    opt = torch.optim.Adam(list(student.parameters()) + list(head.parameters()), lr=2e-3, betas=(0.9, 0.99))
    loss_fn = SCMLoss(sigma_data=SD, tangent_warmup_steps=100, P_mean=-0.4, P_std=1.0)
    probe = SCMLoss(sigma_data=SD, tangent_warmup_steps=0, tangent_norm_c=None, adaptive_weighting=False)
    g = torch.Generator().manual_seed(1)
    x_eval, n_eval = 0.5 + 0.3 * torch.randn(512, 2, generator=g), torch.randn(512, 2, generator=g)
    t_eval = lognormal_times(512, -0.4, 1.0, SD, generator=g)

    def residual():
        _, logs = probe(student, x_eval, teacher=teacher, t=t_eval, noise=n_eval)
        return logs["tangent_norm"].pow(2).mean().item()

    before = residual()
    for step in range(400):
        x0 = 0.5 + 0.3 * torch.randn(256, 2)
        loss, _ = loss_fn(student, x0, teacher=teacher, step=step, logvar_head=head)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = residual()
    assert after < 0.2 * before, (before, after)
