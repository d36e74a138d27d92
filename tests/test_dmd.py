"""DMDLoss (score regularization): its gradient in the sample, the fake-score loss by hand, and reverse-KL descent
to a Gaussian whose denoisers are known in closed form."""

import math

import pytest
import torch
from torch import nn

from diffusers_scm.training.objectives.dmd import DMDLoss


SD = 0.5


class GaussianDenoiser(nn.Module):
    """The exact TrigFlow denoiser of data N(mean, std^2) per element: E[x0 | x_t] in closed form."""

    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(std, dtype=torch.float64)

    def denoise(self, x_t, t, **_):
        c, s = torch.cos(t).view(-1, 1).double(), torch.sin(t).view(-1, 1).double()
        var = self.std**2
        gain = c * var / (c**2 * var + s**2 * SD**2)
        return self.mean + gain * (x_t.double() - c * self.mean)

    def forward(self, x_t, t, **_):  # F = (cos t x_t - x0) / (sin t sd)
        c, s = torch.cos(t).view(-1, 1).double(), torch.sin(t).view(-1, 1).double()
        return (c * x_t.double() - self.denoise(x_t, t)) / (s * SD)


class AffineStudent(nn.Module):
    """A one-step generator x = b + a n from the noise sd n it is given at time T (answering in F, as a denoiser
    does: x = cos(T) x_T - sin(T) sd F)."""

    def __init__(self, dim):
        super().__init__()
        self.a = nn.Parameter(torch.full((dim,), 1.5, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    def denoise(self, x, t, **_):
        return self.b + self.a * x.double() / SD

    def forward(self, x, t, **_):
        c, s = torch.cos(t).view(-1, 1).double(), torch.sin(t).view(-1, 1).double()
        return (c * x.double() - self.denoise(x, t)) / (s * SD)


def test_gradient_in_the_sample_is_the_normalized_score_difference():
    torch.manual_seed(0)
    loss_fn = DMDLoss(sigma_data=SD)
    student, teacher, fake = AffineStudent(6), GaussianDenoiser(0.3, 0.4), GaussianDenoiser(-0.2, 0.9)
    noise, t, n = torch.randn(5, 6), torch.rand(5) * 1.4 + 0.1, torch.randn(5, 6)
    x = student.denoise(SD * noise, None).detach().requires_grad_(True)

    def fixed(x_t, t, **_):  # the sample x itself as the leaf, answering in F
        c, s = torch.cos(t).view(-1, 1).double(), torch.sin(t).view(-1, 1).double()
        return (c * x_t.double() - x) / (s * SD)

    student_x = fixed
    loss, logs = loss_fn(student_x, teacher, fake, noise, t=t, diffusion_noise=n)
    loss.backward()
    x_s = torch.cos(t).view(-1, 1) * x.detach() + torch.sin(t).view(-1, 1) * SD * n
    real, fake_x0 = teacher.denoise(x_s, t), fake.denoise(x_s, t)
    expected = (fake_x0 - real) / (x.detach() - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(x.grad, expected / (5 * 6), rtol=1e-5, atol=1e-9)
    assert float(loss.detach()) == pytest.approx(0.5 * expected.pow(2).mean().item(), rel=1e-5)
    torch.testing.assert_close(logs["dmd_grad_norm"].double(), expected.norm(dim=1), rtol=1e-5, atol=1e-6)


def test_fake_score_loss_equals_a_hand_computation():
    torch.manual_seed(1)
    loss_fn = DMDLoss(sigma_data=SD, generator_timestep=1.5)
    student, fake = AffineStudent(4), GaussianDenoiser(0.1, 0.7)
    noise, t, n = torch.randn(3, 4), torch.tensor([0.2, 0.9, 1.4]), torch.randn(3, 4)
    loss, _ = loss_fn.fake_score_loss(fake, student, noise, t=t, diffusion_noise=n)
    x = (student.b + student.a * noise.double()).detach()
    c, s = torch.cos(t).view(-1, 1).double(), torch.sin(t).view(-1, 1).double()
    x_s = c * x + s * SD * n
    target = (c * SD * n - s * x) / SD
    assert float(loss) == pytest.approx((fake(x_s, t) - target).pow(2).mean().item(), rel=1e-6)
    assert not any(p.grad is not None for p in student.parameters())


def test_dmd_descends_to_the_teachers_gaussian():
    """A Gaussian student x = b + a n with its exact fake score, and the exact score of N(mu, s^2): the reverse-KL
    gradient takes (a, b) to (s, mu)."""
    torch.manual_seed(2)
    mu, s = torch.tensor([0.4, -0.3, 0.1]), torch.tensor([0.3, 0.6, 0.2])
    teacher = GaussianDenoiser(mu, s)
    student = AffineStudent(3)
    loss_fn = DMDLoss(sigma_data=SD, P_mean=-0.5, P_std=1.2)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.01)
    for _ in range(1500):
        fake = GaussianDenoiser(student.b.detach(), student.a.detach().abs())  # the student's own distribution
        loss, _ = loss_fn(student, teacher, fake, torch.randn(256, 3))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.testing.assert_close(student.b.detach().float(), mu, atol=0.04, rtol=0)
    torch.testing.assert_close(student.a.detach().abs().float(), s, atol=0.04, rtol=0)


def test_two_step_samples_follow_the_sampler_with_gradients_through_the_last_step():
    """steps=2: x1 = f(sd n, T), then x = f(cos(t1) x1 + sin(t1) sd n1, t1) with n1 from the generator (SPEC.md
    section 4); only the last call carries gradients."""
    torch.manual_seed(3)
    loss_fn = DMDLoss(sigma_data=SD, intermediate_timesteps=(0.9,))
    student, noise = AffineStudent(4), torch.randn(5, 4)
    x = loss_fn.student_sample(student, noise, steps=2, generator=torch.Generator().manual_seed(7))
    fresh = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))
    x1 = student.b + student.a * noise.double()
    x_t = math.cos(0.9) * x1 + math.sin(0.9) * SD * fresh
    torch.testing.assert_close(x.double(), (student.b + student.a * x_t / SD).double(), rtol=1e-5, atol=1e-6)
    x.sum().backward()  # d/da through the last step only: x_t / sd, x1 held fixed
    torch.testing.assert_close(student.a.grad, (x_t.detach() / SD).sum(0), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs 2 intermediate time"):
        loss_fn.student_sample(student, noise, steps=3)
    with pytest.raises(ValueError, match="intermediate_timesteps"):
        DMDLoss(sigma_data=SD, intermediate_timesteps=(1.6,))


def test_bad_settings_name_the_problem():
    with pytest.raises(ValueError, match="P_std must be positive"):
        DMDLoss(P_std=0)
    with pytest.raises(ValueError, match="generator_timestep"):
        DMDLoss(generator_timestep=math.pi)
