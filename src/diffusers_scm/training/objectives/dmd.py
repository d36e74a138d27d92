"""Score regularization of a consistency student: the distribution-matching (reverse-KL) gradient of DMD, which rCM
adds to the sCM loss to sharpen one- and few-step samples (SPEC.md section 3 gives the sCM loss it is added to).

Per student update, with the student's one-step time T (`generator_timestep`, arctan(80 / sd) by default, the
sampler's t_max of SPEC.md section 4):

    x = f_theta(sd n_g, T),  n_g ~ N(0, I)                 the student's one-step sample, with gradients
    s ~ log-normal proposal (P_mean, P_std),  n ~ N(0, I)
    x_s = cos(s) sg(x) + sin(s) sd n                      (SPEC.md section 1)
    real = f_teacher(x_s, s)   (the teacher's data estimate, guided as in sCD: F_c + (w - 1)(F_c - F_u))
    fake = f_fake(x_s, s)      (the fake-score network: a diffusion model of the student's own samples)
    grad = (fake - real) / mean(|x - real|)              per sample (DMD's normalization)
    loss = 1/2 ||x - sg(x - grad)||^2 / D                so that d loss / d x = grad / D

`grad` estimates the gradient of KL(p_student || p_data) with respect to the sample: the student moves its samples
toward where the teacher's score says the data are and away from where its own are. The fake-score network starts as
a copy of the teacher and follows the student with the TrigFlow diffusion loss on the student's samples (no
gradients into the student):

    loss_fake = || F_fake(x_s, s) - (cos(s) sd n - sin(s) x) / sd ||^2 / D

D is the number of elements per sample, so both losses are on the per-element scale of `SCMLoss`.
"""

import math

import torch

from .common import _bcast, noised_batch, teacher_velocity
from .consistency import consistency_function
from .diffusion import TrigFlowDiffusionLoss


__all__ = ["DMDLoss"]


class DMDLoss:
    """
    The distribution-matching regularizer of a consistency student and the loss of its fake-score network.

    Args:
        sigma_data (`float`, defaults to 0.5): standard deviation of the data.
        P_mean (`float`, defaults to 0.0), P_std (`float`, defaults to 1.6): log-normal proposal of the times s at
            which the student's samples are noised (ln(sd tan s) ~ N(P_mean, P_std^2), SPEC.md section 3).
        generator_timestep (`float`, *optional*): the time T of the student's one-step sample; default
            arctan(80 / sigma_data).
        guidance_scale (`float`, defaults to 1.0): classifier-free guidance of the teacher's estimate, as in sCD.
        intermediate_timesteps (`tuple[float]`, defaults to `()`): the student's multistep times after T (SPEC.md
            section 4). A sample of k steps (`steps=k`, k <= 1 + their number) is drawn as the sampler draws it, the
            first k - 1 steps without gradients; the regularizer then acts on the student's k-step samples, as rCM
            applies it along the student's own trajectory.
    """

    def __init__(
        self,
        sigma_data: float = 0.5,
        P_mean: float = 0.0,
        P_std: float = 1.6,
        generator_timestep: float | None = None,
        guidance_scale: float = 1.0,
        intermediate_timesteps: tuple = (),
    ):
        if P_std <= 0:
            raise ValueError(f"P_std must be positive, got {P_std}.")
        self.sigma_data = sigma_data
        self.P_mean, self.P_std = P_mean, P_std
        self.generator_timestep = (
            math.atan(80.0 / sigma_data) if generator_timestep is None else float(generator_timestep)
        )
        if not 0 < self.generator_timestep <= math.pi / 2:
            raise ValueError(f"generator_timestep must lie in (0, pi/2], got {self.generator_timestep}.")
        self.guidance_scale = guidance_scale
        self.diffusion_loss = TrigFlowDiffusionLoss(sigma_data, P_mean, P_std)  # the fake score's, on student samples
        self.intermediate_timesteps = tuple(float(t) for t in intermediate_timesteps)
        if any(not 0 < t < self.generator_timestep for t in self.intermediate_timesteps):
            raise ValueError(
                f"intermediate_timesteps {self.intermediate_timesteps} must lie in (0, {self.generator_timestep:.6f})."
            )

    def data_estimate(self, denoiser, x_t: torch.Tensor, t: torch.Tensor, **conditioning) -> torch.Tensor:
        """f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t, t) (SPEC.md section 1), through the module's forward, so that a
        DDP-wrapped network works too."""
        return consistency_function(denoiser(x_t, t, **conditioning).float(), x_t, t, self.sigma_data)

    def student_sample(
        self, student, noise: torch.Tensor, steps: int = 1, generator: torch.Generator | None = None, **conditioning
    ) -> torch.Tensor:
        """The student's `steps`-step sample from unit Gaussian `noise` (SPEC.md section 4): x = f_theta(sd n, T), then
        per further step x = f_theta(cos(t_i) x + sin(t_i) sd n_i, t_i) with fresh noise n_i from `generator`.
        Gradients flow (when enabled) through the last step only."""
        if not 1 <= steps <= 1 + len(self.intermediate_timesteps):
            raise ValueError(
                f"A {steps}-step sample needs {steps - 1} intermediate time(s); there are "
                f"{len(self.intermediate_timesteps)}: pass intermediate_timesteps."
            )
        grad = torch.is_grad_enabled()

        def step(x_t, time, last):
            t = torch.full((noise.shape[0],), time, device=noise.device, dtype=torch.float32)
            with torch.set_grad_enabled(grad and last):
                return self.data_estimate(student, x_t, t, **conditioning)

        x = step(self.sigma_data * noise.float(), self.generator_timestep, steps == 1)
        for i, time in enumerate(self.intermediate_timesteps[: steps - 1]):
            device = noise.device if generator is None else generator.device
            fresh = torch.randn(noise.shape, generator=generator, device=device).to(noise.device)
            x = step(math.cos(time) * x + math.sin(time) * self.sigma_data * fresh, time, i == steps - 2)
        return x

    def __call__(
        self,
        student,
        teacher,
        fake_score,
        noise: torch.Tensor,
        t: torch.Tensor | None = None,
        diffusion_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        uncond_conditioning: dict | None = None,
        teacher_guidance=None,
        steps: int = 1,
        **conditioning,
    ):
        """The student's regularization loss from generator noise `noise` (unit Gaussian, the sample's shape), on its
        `steps`-step samples. `t`, `diffusion_noise`: the noising times and unit noise (drawn when not given). Returns
        `(loss, logs)`."""
        x = self.student_sample(student, noise, steps, generator, **conditioning)
        _, t, _, x_s = noised_batch(
            x.detach(), t, diffusion_noise, self.sigma_data, self.P_mean, self.P_std, generator
        )
        tb = _bcast(t, x)
        w = self.guidance_scale if teacher_guidance is None else teacher_guidance
        with torch.no_grad():
            velocity = teacher_velocity(
                teacher, x_s, t, None, None, self.sigma_data, w, conditioning, uncond_conditioning
            ).float()
            real = torch.cos(tb) * x_s - torch.sin(tb) * velocity
            fake = self.data_estimate(fake_score, x_s, t, **conditioning)
            scale = (x - real).abs().flatten(1).mean(1).clamp_min(1e-5)
            grad = (fake - real) / _bcast(scale, x)
        per_sample = 0.5 * (x - (x - grad).detach()).pow(2).flatten(1).mean(1)
        logs = {"t": t.detach(), "dmd_loss": per_sample.detach(), "dmd_grad_norm": grad.flatten(1).norm(dim=1)}
        return per_sample.mean(), logs

    def fake_score_loss(
        self,
        fake_score,
        student,
        noise: torch.Tensor,
        t: torch.Tensor | None = None,
        diffusion_noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        steps: int = 1,
        **conditioning,
    ):
        """The fake-score network's TrigFlow diffusion loss on the student's `steps`-step samples from `noise` (no
        gradients into the student). Returns `(loss, logs)`."""
        with torch.no_grad():
            x = self.student_sample(student, noise, steps, generator, **conditioning)
        loss, logs = self.diffusion_loss(fake_score, x, t, diffusion_noise, generator=generator, **conditioning)
        return loss, {"t": logs["t"], "fake_score_loss": logs["loss"]}
