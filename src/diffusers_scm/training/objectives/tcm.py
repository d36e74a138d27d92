"""Truncated consistency models, Stage 2 (SPEC.md section 5): the student trains on t >= t' only, with the frozen
Stage-1 model as the consistency function below t' and a boundary term at t'."""

import math

import torch

from .common import _per_sample_sq, gradient_pass, nan_loss, noised_batch
from .consistency import ConsistencyLoss
from .scm import SCMLoss
from .time_proposals import clamp_times, student_t_times, truncated_lognormal_times


__all__ = ["TCMLoss"]


OBJECTIVES = ("discrete", "continuous")


PROPOSALS = ("student_t", "lognormal")


class TCMLoss:
    """
    Stage 2 of truncated consistency models (SPEC.md section 5). The student trains only on t in [t', t_max]; the
    truncated consistency function is the frozen Stage-1 model below t' and the student at and above it:

        f_trunc(x, t) = f_stage1(x, t) for t < t',   f_theta(x, t) for t >= t'

    Every batch holds exactly floor(boundary_prob * batch) boundary samples at t = t'; the others come from the
    Stage-2 proposal truncated to [t', t_max] (`student_t_times` or `truncated_lognormal_times`). The loss is

        mean over non-boundary samples of the consistency loss + boundary_weight * mean over boundary samples of
        the boundary loss  d(f_theta(x_t', t'), f_stage1(x_t', t'))

    Objectives:
        "discrete" (the paper's): `ConsistencyLoss` with r = t - dt from its schedule; the target f^-(x_r, r) comes
            from the live student under stop-gradient when r >= t' and from the Stage-1 model when r < t'. The
            boundary loss is w(t', r(t')) d(f_theta(x_t', t'), f_stage1(x_t', t')) with the same distance and
            weighting.
        "continuous": `SCMLoss` (sCD with a teacher, sCT without) on t > t'. The boundary loss has the sCM loss's
            form, ||F_theta - F_minus - p||^2 / D at (x_t', t'), with the pull p = F_stage1 - F_minus normalized as
            the tangent is (p / (||p|| + c)), divided by exp(logvar(t')) (detached) with adaptive weighting. Its
            gradient is a push of the same scale as the consistency term's towards the Stage-1 model; it vanishes
            when F_theta = F_stage1 (F = (cos t x - f) / (sigma_data sin t), so this is f_theta = f_stage1).

    Boundary weight: the paper's 0.1 is the default of the discrete objective, where it multiplies w(t', r(t')) (about
    300 for 1 / (sigma_t - sigma_r) at sigma' = 1 and ratio 0.999), and where steps that cross t' add Stage-1 targets
    near t'. The continuous objective has neither, and its consistency push is normalized: with 0.1 the 2-D student of
    `examples/toy_2d.py` drifted away from the Stage-1 model within a few hundred steps (1-step MMD 1.8x -> 20x the
    teacher's), with 1.0 it stayed anchored and improved, so 1.0 is its default.

    The official implementation compares f_theta(x_t', t') with the Stage-1 model one discrete step below t'; the
    form above (the same point, SPEC.md section 5) is its limit for a vanishing step and vanishes exactly when the
    student equals the Stage-1 model at t'. The Stage-1 model only ever runs under `torch.no_grad`.

    Args:
        objective (`str`, defaults to "discrete"): "discrete" or "continuous".
        consistency_loss (`ConsistencyLoss` or `SCMLoss`, *optional*): the configured consistency loss of the
            objective; a default one is built when not given.
        sigma_data (`float`, defaults to 0.5): standard deviation of the data.
        dividing_timestep (`float`, *optional*): t'; defaults to arctan(1 / sigma_data) (sigma' = 1 in EDM units).
        boundary_prob (`float`, defaults to 0.25): fraction of each batch placed at t'.
        boundary_weight (`float`, *optional*): weight of the boundary loss; defaults to 0.1 (discrete, the paper's)
            or 1.0 (continuous).
        time_proposal (`str`, defaults to "student_t"): "student_t" or "lognormal" on ln(sigma), truncated to
            [ln(sigma_data tan t'), ln sigma_max].
        proposal_loc (`float`, defaults to 0.0), proposal_scale (`float`, defaults to 0.2): location and scale of
            ln(sigma) (the log-normal's P_mean and P_std).
        proposal_df (`float`, defaults to 0.01): degrees of freedom of the Student-t.
        sigma_max (`float`, defaults to 80.0): upper end of the proposal in EDM units.
    """

    def __init__(
        self,
        objective: str = "discrete",
        consistency_loss=None,
        sigma_data: float = 0.5,
        dividing_timestep: float | None = None,
        boundary_prob: float = 0.25,
        boundary_weight: float | None = None,
        time_proposal: str = "student_t",
        proposal_loc: float = 0.0,
        proposal_scale: float = 0.2,
        proposal_df: float = 0.01,
        sigma_max: float = 80.0,
    ):
        if objective not in OBJECTIVES:
            raise ValueError(f"Unknown objective {objective!r}: choose one of {OBJECTIVES}.")
        if time_proposal not in PROPOSALS:
            raise ValueError(f"Unknown time_proposal {time_proposal!r}: choose one of {PROPOSALS}.")
        expected = ConsistencyLoss if objective == "discrete" else SCMLoss
        if consistency_loss is None:
            consistency_loss = expected(sigma_data=sigma_data)
        if not isinstance(consistency_loss, expected):
            raise TypeError(
                f"objective={objective!r} needs a {expected.__name__}, got {type(consistency_loss).__name__}."
            )
        if abs(consistency_loss.sigma_data - sigma_data) > 1e-12:
            raise ValueError(
                f"sigma_data={sigma_data} differs from the consistency loss's {consistency_loss.sigma_data}."
            )
        if not 0 <= boundary_prob < 1:
            raise ValueError(f"boundary_prob must lie in [0, 1), got {boundary_prob}.")
        self.objective = objective
        self.consistency_loss = consistency_loss
        self.sigma_data = float(sigma_data)
        t_max = math.atan(sigma_max / sigma_data)
        self.dividing_timestep = math.atan(1.0 / sigma_data) if dividing_timestep is None else float(dividing_timestep)
        if not 0 < self.dividing_timestep < t_max:
            raise ValueError(f"dividing_timestep must lie in (0, {t_max:.4f}), got {self.dividing_timestep}.")
        self.max_timestep = t_max
        if boundary_weight is None:
            boundary_weight = 0.1 if objective == "discrete" else 1.0
        self.boundary_prob, self.boundary_weight = float(boundary_prob), float(boundary_weight)
        self.time_proposal = time_proposal
        self.proposal_loc, self.proposal_scale, self.proposal_df = (
            float(proposal_loc),
            float(proposal_scale),
            proposal_df,
        )
        self.sigma_max = float(sigma_max)

    def num_boundary(self, batch_size: int) -> int:
        """floor(boundary_prob * batch_size)."""
        return int(math.floor(self.boundary_prob * batch_size + 1e-9))

    def sample_times(self, batch_size: int, device=None, generator: torch.Generator | None = None):
        """`(t, is_boundary)`: floor(boundary_prob * batch) samples at exactly t' (random positions), the others from
        the proposal truncated to [t', t_max] (float32)."""
        sigma_min = self.sigma_data * math.tan(self.dividing_timestep)
        kwargs = {"sigma_min": sigma_min, "sigma_max": self.sigma_max, "sigma_data": self.sigma_data}
        kwargs["generator"] = generator
        if self.time_proposal == "student_t":
            t = student_t_times(batch_size, self.proposal_df, self.proposal_loc, self.proposal_scale, **kwargs)
        else:
            t = truncated_lognormal_times(batch_size, self.proposal_loc, self.proposal_scale, **kwargs)
        t_div = torch.tensor(self.dividing_timestep, dtype=torch.float32)
        t = clamp_times(torch.maximum(t, t_div))
        perm = torch.randperm(batch_size, generator=generator, device=None if generator is None else generator.device)
        is_boundary = torch.zeros(batch_size, dtype=torch.bool)
        is_boundary[perm[: self.num_boundary(batch_size)].cpu()] = True
        t = torch.where(is_boundary, t_div, t)
        return t.to(device), is_boundary.to(device)

    def __call__(
        self,
        student,
        stage1,
        x0: torch.Tensor,
        teacher=None,
        step: int = 0,
        t: torch.Tensor | None = None,
        is_boundary: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        logvar_head=None,
        uncond_conditioning: dict | None = None,
        generator: torch.Generator | None = None,
        **conditioning,
    ):
        """
        Loss for one batch. Returns `(loss, logs)`.

        Args:
            student (`TrigFlowDenoiser`, possibly DDP-wrapped): the Stage-2 network being trained.
            stage1 (`TrigFlowDenoiser`): the frozen Stage-1 model (never receives gradients).
            x0 (`torch.Tensor`): a batch of data.
            teacher (`TrigFlowDenoiser`, *optional*): the teacher (CD / sCD); `None` means CT / sCT.
            step (`int`): Stage-2 training step (step schedule or tangent warmup).
            t (`torch.Tensor`, *optional*): times (batch,) in [t', t_max]; drawn with `sample_times` when not given.
            is_boundary (`torch.Tensor`, *optional*): boolean mask of the boundary samples; with `t` given it
                defaults to the samples within 1e-6 of t'.
            noise (`torch.Tensor`, *optional*): unit Gaussian noise n (z = sigma_data n).
            logvar_head (`LogVarHead`, *optional*): adaptive weighting of the continuous objective.
            uncond_conditioning (`dict`, *optional*): the teacher's unconditional inputs for guidance.
            generator (`torch.Generator`, *optional*): for drawing t and noise.
            conditioning: passed to student, Stage-1 model and teacher.
        """
        t_div = self.dividing_timestep
        if t is None:
            t, is_boundary = self.sample_times(x0.shape[0], device=x0.device, generator=generator)
        elif is_boundary is None:
            is_boundary = (t.double() - t_div).abs() < 1e-6
        if (t.double() < t_div - 1e-6).any():
            raise ValueError(
                f"Stage-2 times must lie in [t', t_max] with t' = {t_div:.6f}: below t' the Stage-1 model "
                "is the consistency function."
            )
        is_boundary = is_boundary.to(x0.device)
        if self.objective == "discrete":
            per_sample, boundary, logs = self._discrete(
                student, stage1, x0, teacher, step, t, is_boundary, noise, uncond_conditioning, generator, conditioning
            )
        else:
            per_sample, boundary, logs = self._continuous(
                student,
                stage1,
                x0,
                teacher,
                step,
                t,
                is_boundary,
                noise,
                logvar_head,
                uncond_conditioning,
                generator,
                conditioning,
            )
        target_ok = logs.pop("target_ok")
        inside, on_boundary = ~is_boundary & target_ok, is_boundary & target_ok
        loss = torch.where(inside, per_sample, torch.zeros_like(per_sample)).sum() / inside.sum().clamp_min(1)
        if on_boundary.any():
            boundary_mean = torch.where(on_boundary, boundary, torch.zeros_like(boundary)).sum() / on_boundary.sum()
            loss = loss + self.boundary_weight * boundary_mean
        if not target_ok.any():  # no finite sample: the loop skips the step (pitfall 9)
            loss = nan_loss(loss)
        logs["boundary_loss"] = (
            logs.pop("boundary_distance")[is_boundary].mean().detach()
            if is_boundary.any()
            else (torch.zeros((), device=x0.device))
        )
        logs["t"], logs["loss"] = logs["t"][~is_boundary], logs["loss"][~is_boundary]
        logs["num_boundary"] = int(is_boundary.sum())
        return loss, logs

    def _discrete(self, student, stage1, x0, teacher, step, t, is_b, noise, uncond, generator, conditioning):
        cl = self.consistency_loss
        x0, t, z, x_t = noised_batch(x0, t, noise, self.sigma_data, cl.P_mean, cl.P_std, generator)
        r_schedule = cl.previous_times(t, step)
        r = torch.where(is_b, t, r_schedule)  # boundary: the Stage-1 model at the same point (x_t', t')
        use_frozen = is_b | (r < self.dividing_timestep)
        distance, target_ok = cl.pair_terms(
            student, x0, t, r, z, x_t, teacher, conditioning, uncond, frozen=stage1, use_frozen=use_frozen
        )
        weight = cl.weight(t, r_schedule)
        per_sample = weight * distance
        logs = {
            "t": t.detach(),
            "loss": distance.detach(),
            "boundary_distance": distance.detach(),
            "weight": weight.detach(),
            "stage1_targets": int((use_frozen & ~is_b).sum()),
            "nonfinite": (~target_ok).sum().detach(),
            "discretization_ratio": cl.ratio(step),
            "target_ok": target_ok,
        }
        return per_sample, per_sample, logs

    def _continuous(self, student, stage1, x0, teacher, step, t, is_b, noise, logvar_head, uncond, generator, cond):
        scm = self.consistency_loss
        targets = scm.tangent_targets(student, x0, teacher, step, t, noise, uncond, generator, **cond)
        x_t, t = targets["x_t"], targets["t"]
        with torch.no_grad():
            F_stage1 = stage1(x_t, t, **cond).to(x_t.dtype)
        targets["target_ok"] = targets["target_ok"] & torch.isfinite(F_stage1.flatten(1)).all(1)
        # gradient pass on the samples with finite targets only (pitfall 9); zeros in the others
        F_theta = gradient_pass(student, x_t, t, targets["target_ok"], cond)
        F_theta = torch.zeros_like(x_t) if F_theta is None else F_theta.to(x_t.dtype)
        per_sample, scm_distance, logvar, _ = scm.per_sample_loss(F_theta, targets, logvar_head)
        D = x_t[0].numel()
        boundary_distance = _per_sample_sq(F_theta.detach() - F_stage1) / D  # ||F_theta - F_stage1||^2 / D (logged)
        # the pull towards the Stage-1 model, normalized as the tangent is: ||F_theta - F_minus - pull||^2 / D
        pull, _ = scm.normalize(F_stage1 - targets["F_minus"])
        boundary = _per_sample_sq(F_theta - targets["F_minus"] - pull) / D
        if scm.adaptive_weighting:
            boundary = boundary / torch.exp(logvar.detach())
        logs = {
            "t": t.detach(),
            "loss": scm_distance.detach(),
            "boundary_distance": boundary_distance.detach(),
            "tangent_norm": targets["g_norm"][~is_b].detach(),
            "logvar": logvar[~is_b].detach(),
            "nonfinite": (~targets["target_ok"]).sum().detach(),
            "warmup_ratio": targets["warmup_ratio"],
            "target_ok": targets["target_ok"],
        }
        return per_sample, boundary, logs
