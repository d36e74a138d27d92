"""Discrete-time consistency distillation and training (CD, CT; ECT-style, SPEC.md section 5): the baseline and a
TCM Stage-1 objective."""

import math

import torch

from ...jvp import unwrap_model
from .common import _bcast, _per_sample_sq, gradient_pass, nan_loss, noised_batch, teacher_velocity
from .time_proposals import TRAIN_TIME_EPS, clamp_times


__all__ = ["ConsistencyLoss", "consistency_function"]


DISTANCES = ("pseudo_huber", "squared_l2")


WEIGHTINGS = ("inverse_dsigma", "inverse_dt", "inverse_c_out_sq", "none")


def consistency_function(F: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_data F (SPEC.md section 1)."""
    tb = _bcast(t, x_t)
    return torch.cos(tb) * x_t - torch.sin(tb) * sigma_data * F.to(x_t.dtype)


def _cuda_devices(*tensors) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if torch.is_tensor(t) and t.device.type == "cuda"})


class ConsistencyLoss:
    """
    Discrete-time consistency distillation (CD, with a teacher) and consistency training (CT, without), in TrigFlow
    coordinates with ECT's shrinking step (the discrete loss of SPEC.md section 5):

        t ~ log-normal proposal,  sigma_t = sigma_data tan t
        sigma_r = max(0, sigma_t - sigma_t (1 - ratio) (1 + k sigmoid(-b sigma_t))),  r = arctan(sigma_r / sigma_data)
        ratio = min(1 - q^-(stage + 1), ratio_limit),  stage = start_stage + step // stage_steps
        x_r = cos(t - r) x_t - sin(t - r) dx_t/dt                     (exact DDIM step, SPEC.md section 1)
              dx_t/dt = sigma_data F_teacher(x_t, t) (CD), or cos t z - sin t x0 (CT: then x_r = cos r x0 + sin r z)
        loss = w(t, r) d(f_theta(x_t, t), stopgrad f_theta(x_r, r)),   f(x, 0) = x
        d(a, b) = sqrt(||a - b||^2 + c^2) - c    (pseudo-Huber) or ||a - b||^2

    The target pass runs on the unwrapped network without gradients and with the gradient pass's dropout masks.

    Continuous limit (checked in tests/test_tcm.py): with x_r on the ODE through x_t, f_theta(x_t, t) - f^-(x_r, r) =
    (t - r) df/dt + O((t - r)^2), where df/dt is the total derivative along the ODE, and the gradient of the
    pseudo-Huber loss tends to w(t, r) (t - r) / c * df/dt . df_theta/dtheta as r -> t. `SCMLoss` (warmup over, no
    tangent normalization, no adaptive or prior weighting) has the gradient (2 / D) (-g) . dF_theta/dtheta with
    g = cos(t) df/dt and df_theta/dtheta = -sin(t) sigma_data dF_theta/dtheta, i.e. 2 / (D sigma_data tan t)
    df/dt . df_theta/dtheta. So, per sample of D elements,

        grad SCMLoss = 4 c / (D sin 2t) * lim grad ConsistencyLoss     with weighting "inverse_dsigma"
                       (sigma_t - sigma_r = sigma_data (t - r) / cos^2 t + O((t - r)^2))
        grad SCMLoss = 2 c / (D sigma_data tan t) * lim grad ConsistencyLoss     with weighting "inverse_dt"

    Args:
        sigma_data (`float`, defaults to 0.5): standard deviation of the data.
        P_mean (`float`, defaults to -1.0), P_std (`float`, defaults to 1.4): log-normal time proposal.
        distance (`str`, defaults to "pseudo_huber"): "pseudo_huber" or "squared_l2" (per-sample sums, not means).
        huber_c (`float`, *optional*): c of the pseudo-Huber distance; defaults to 0.00054 sqrt(D) (iCT; 0.06 for
            64x64x3, the TCM ImageNet setting).
        weighting (`str`, defaults to "inverse_dsigma"): "inverse_dsigma" (1 / (sigma_t - sigma_r), the papers' 1/dt
            with EDM's time sigma), "inverse_dt" (1 / (t - r) in TrigFlow time), "inverse_c_out_sq"
            (1 / (sigma_data sin t)^2, EDM's 1 / c_out^2) or "none".
        q (`float`, defaults to 2.0): the step shrinks by this factor every `stage_steps` steps.
        stage_steps (`int`, defaults to 1000): steps per stage of the schedule.
        start_stage (`int`, defaults to 0): stage at step 0 (to continue a schedule in Stage 2).
        ratio_limit (`float`, defaults to 0.999): largest sigma_r / sigma_t ratio before the sigmoid adjustment.
        schedule_k (`float`, defaults to 8.0), schedule_b (`float`, defaults to 1.0): the adjustment
            1 + k sigmoid(-b sigma_t), which takes larger steps at low noise.
        guidance_scale (`float`, defaults to 1.0): classifier-free guidance of the teacher's velocity (CD).
    """

    def __init__(
        self,
        sigma_data: float = 0.5,
        P_mean: float = -1.0,
        P_std: float = 1.4,
        distance: str = "pseudo_huber",
        huber_c: float | None = None,
        weighting: str = "inverse_dsigma",
        q: float = 2.0,
        stage_steps: int = 1000,
        start_stage: int = 0,
        ratio_limit: float = 0.999,
        schedule_k: float = 8.0,
        schedule_b: float = 1.0,
        guidance_scale: float = 1.0,
    ):
        if distance not in DISTANCES:
            raise ValueError(f"Unknown distance {distance!r}: choose one of {DISTANCES}.")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"Unknown weighting {weighting!r}: choose one of {WEIGHTINGS}.")
        if huber_c is not None and huber_c <= 0:
            raise ValueError(
                f"huber_c must be positive (use a tiny value such as 1e-8 for an L2 norm), got {huber_c}."
            )
        if q <= 1 or stage_steps < 1:
            raise ValueError(f"Need q > 1 and stage_steps >= 1, got q={q}, stage_steps={stage_steps}.")
        self.sigma_data = float(sigma_data)
        self.P_mean, self.P_std = float(P_mean), float(P_std)
        self.distance = distance
        self.huber_c = huber_c
        self.weighting = weighting
        self.q, self.stage_steps, self.start_stage = float(q), int(stage_steps), int(start_stage)
        self.ratio_limit = float(ratio_limit)
        self.schedule_k, self.schedule_b = float(schedule_k), float(schedule_b)
        self.guidance_scale = float(guidance_scale)

    # -- the step schedule (SPEC.md section 5: ECT's shrinking dt) --------------------------------------------------

    def stage(self, step: int) -> int:
        return self.start_stage + int(step) // self.stage_steps

    def ratio(self, step: int) -> float:
        """ratio = min(1 - q^-(stage + 1), ratio_limit)."""
        return min(1.0 - self.q ** -(self.stage(step) + 1), self.ratio_limit)

    def stage_at_limit(self) -> int:
        """The first stage whose ratio reaches `ratio_limit` (where a Stage 2 after a finished Stage 1 can start)."""
        stage = 0
        while 1.0 - self.q ** -(stage + 1) < self.ratio_limit and stage < 200:
            stage += 1
        return stage

    def previous_times(self, t: torch.Tensor, step: int) -> torch.Tensor:
        """r for each t: sigma_r = max(0, sigma_t - sigma_t (1 - ratio)(1 + k sigmoid(-b sigma_t)))."""
        sigma_t = self.sigma_data * torch.tan(t)
        dsigma = (
            sigma_t * (1.0 - self.ratio(step)) * (1.0 + self.schedule_k * torch.sigmoid(-self.schedule_b * sigma_t))
        )
        return torch.atan((sigma_t - dsigma).clamp_min(0.0) / self.sigma_data)

    def weight(self, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """w(t, r) of the chosen weighting."""
        sd = self.sigma_data
        if self.weighting == "inverse_dsigma":
            return 1.0 / (sd * (torch.tan(t) - torch.tan(r)))
        if self.weighting == "inverse_dt":
            return 1.0 / (t - r)
        if self.weighting == "inverse_c_out_sq":
            return 1.0 / (sd * torch.sin(t)) ** 2
        return torch.ones_like(t)

    def distance_fn(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-sample d(a, b): sqrt(||a - b||^2 + c^2) - c or ||a - b||^2."""
        sq = _per_sample_sq(a - b)
        if self.distance == "squared_l2":
            return sq
        c = self.huber_c if self.huber_c is not None else 0.00054 * math.sqrt(a[0].numel())
        return torch.sqrt(sq + c * c) - c

    # -- the pair (x_t, t), (x_r, r) and the target ---------------------------------------------------------------

    def step_to(self, x_t, t, r, dxdt) -> torch.Tensor:
        """x_r = cos(t - r) x_t - sin(t - r) dx_t/dt (exact first-order ODE step, SPEC.md section 1)."""
        h = _bcast(t - r, x_t)
        return torch.cos(h) * x_t - torch.sin(h) * dxdt

    def targets(self, model, x_r, r, conditioning, frozen=None, use_frozen=None) -> torch.Tensor:
        """
        Stop-gradient consistency targets f^-(x_r, r), with f(x, r) = x where r <= TRAIN_TIME_EPS (boundary
        condition). `model` is the live network (unwrapped); where `use_frozen` is true the target comes from
        `frozen` instead (TCM: the Stage-1 model below t'). Runs under a forked RNG, so the gradient pass that follows
        draws the same dropout masks as the live target pass.
        """
        sd = self.sigma_data
        r_in = clamp_times(r)
        live = torch.ones_like(r, dtype=torch.bool) if use_frozen is None else ~use_frozen
        out = x_r.clone()
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(x_r)):
            if live.any():
                F = unwrap_model(model)(x_r, r_in, **conditioning)
                out = torch.where(_bcast(live, x_r), consistency_function(F, x_r, r_in, sd), out)
        if use_frozen is not None and use_frozen.any():
            if frozen is None:
                raise ValueError("Targets below the dividing time need the frozen Stage-1 model.")
            with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(x_r)):
                F = frozen(x_r, r_in, **conditioning)
                out = torch.where(_bcast(use_frozen, x_r), consistency_function(F, x_r, r_in, sd), out)
        return torch.where(_bcast(r > TRAIN_TIME_EPS, x_r), out, x_r)

    def pair_terms(
        self,
        student,
        x0,
        t,
        r,
        z,
        x_t,
        teacher=None,
        conditioning=None,
        uncond_conditioning=None,
        frozen=None,
        use_frozen=None,
    ):
        """
        The gradient pass and the per-sample distance d(f_theta(x_t, t), f^-(x_r, r)) for given times. Samples whose
        target is not finite get a zero distance with a zero gradient (pitfall 9). Returns `(distance, target_ok)`.
        """
        conditioning = conditioning or {}
        dxdt = teacher_velocity(
            teacher, x_t, t, x0, z, self.sigma_data, self.guidance_scale, conditioning, uncond_conditioning
        )
        x_r = self.step_to(x_t, t, r, dxdt)
        target = self.targets(student, x_r, r, conditioning, frozen, use_frozen).to(x_t.dtype)
        target_ok = torch.isfinite(target.flatten(1)).all(1)
        # gradient pass through the (possibly DDP-wrapped) student, on the samples with a finite target only
        F = gradient_pass(student, x_t, t, target_ok, conditioning)
        if F is None:  # no finite sample: NaN distances, and the loop skips the step
            return torch.full_like(t, float("nan")), target_ok
        f_theta = consistency_function(F, x_t, t, self.sigma_data)
        target = torch.where(_bcast(target_ok, target), target, f_theta.detach())
        return self.distance_fn(f_theta, target), target_ok

    def __call__(
        self,
        student,
        x0: torch.Tensor,
        teacher=None,
        step: int = 0,
        t: torch.Tensor | None = None,
        r: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        uncond_conditioning: dict | None = None,
        generator: torch.Generator | None = None,
        **conditioning,
    ):
        """
        Loss for one batch. Returns `(loss, logs)`: the mean weighted distance, and per-sample values for logging.

        Args:
            student (`TrigFlowDenoiser`, possibly DDP-wrapped): the network being trained.
            x0 (`torch.Tensor`): a batch of data.
            teacher (`TrigFlowDenoiser`, *optional*): the teacher (CD); `None` means CT.
            step (`int`): training step, for the step schedule.
            t, r (`torch.Tensor`, *optional*): times and earlier times (batch,); r defaults to the schedule's.
            noise (`torch.Tensor`, *optional*): unit Gaussian noise n (z = sigma_data n).
            uncond_conditioning (`dict`, *optional*): the teacher's unconditional inputs for guidance.
            generator (`torch.Generator`, *optional*): for drawing t and noise.
            conditioning: passed to student and teacher (class_labels, encoder_hidden_states, ...).
        """
        x0, t, z, x_t = noised_batch(x0, t, noise, self.sigma_data, self.P_mean, self.P_std, generator)
        r = self.previous_times(t, step) if r is None else r.to(t.device, t.dtype)
        if (r >= t).any():
            raise ValueError("Every r must be smaller than its t.")
        distance, target_ok = self.pair_terms(student, x0, t, r, z, x_t, teacher, conditioning, uncond_conditioning)
        weight = self.weight(t, r)
        per_sample = torch.where(target_ok, weight * distance, torch.zeros_like(distance))
        loss = per_sample.sum() / target_ok.sum() if target_ok.any() else nan_loss(per_sample)
        logs = {
            "t": t.detach(),
            "loss": distance.detach(),
            "weight": weight.detach(),
            "nonfinite": (~target_ok).sum().detach(),
            "discretization_ratio": self.ratio(step),
        }
        return loss, logs
