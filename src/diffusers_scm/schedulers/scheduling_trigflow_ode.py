"""`TrigFlowODEScheduler`: deterministic PF-ODE sampling of a diffusion model in TrigFlow coordinates (SPEC.md 1-2).

Every solver works on the data estimate x0_hat of the configured parameterization, in the exponential-integrator
form (DPM-Solver++ with alpha_t = cos t, sigma_t = sigma_data sin t, lambda = -log(sigma_data tan t)):

    DDIM (exact first-order step, SPEC.md section 1):
        x_t = (sin t / sin s) x_s + (sin(s - t) / sin s) x0_hat(x_s, s)  =  cos(s - t) x_s - sin(s - t) sigma_data F
    Heun: the same step with x0_hat averaged over s and the predicted point at t (two evaluations per step).
    DPM-Solver++(2M): the same step with D = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}, r = h_{i-1} / h_i.

The step to t = 0 is always the first-order one (it returns x0_hat).
"""

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .scheduling_trigflow import TrigFlowSchedulerMixin, TrigFlowSchedulerOutput, _to_time_tensor


SOLVERS = ("ddim", "heun", "dpmsolver++")
SPACINGS = ("log_sigma", "angle", "karras")


class TrigFlowODEScheduler(TrigFlowSchedulerMixin, SchedulerMixin, ConfigMixin):
    """
    Deterministic ODE sampler for diffusion models of any parameterization, in TrigFlow coordinates.

    Args:
        sigma_data (`float`, defaults to 0.5): standard deviation of the data.
        parameterization (`str`, defaults to `"trigflow"`): the network's family (see `get_parameterization`).
        prediction_type, timestep_scale, num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas:
            the family's own settings, as for `TrigFlowScheduler`.
        preconditioning, vp_beta_d, vp_beta_min, iddpm_c1, iddpm_c2 (*optional*): for "edm", which of NVlabs'
            wrappers the network was trained in ("edm", "vp", "ve", "iddpm") and its constants, i.e. its c_noise map
            (see `EDMParameterization`; SPEC.md section 10). `None` keeps the parameterization's default.
        solver (`str`, defaults to `"ddim"`): "ddim" (first order), "heun" or "dpmsolver++" (second order).
        timestep_spacing (`str`, defaults to `"log_sigma"`): "log_sigma" (even in log(sigma_data tan t)), "angle"
            (even in t) or "karras" (EDM's rho schedule).
        sigma_min (`float`, defaults to 0.002), sigma_max (`float`, defaults to 80.0): the grid's ends in EDM units
            (sigma = sigma_data tan t).
        max_timesteps (`float`, *optional*): first time for the "angle" grid; defaults to arctan(80 / sigma_data).
        rho (`float`, defaults to 7.0): exponent of the "karras" grid.
    """

    _compatibles = []

    @register_to_config
    def __init__(
        self,
        sigma_data: float = 0.5,
        parameterization: str = "trigflow",
        prediction_type: str | None = None,
        timestep_scale: float | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        preconditioning: str | None = None,
        vp_beta_d: float | None = None,
        vp_beta_min: float | None = None,
        iddpm_c1: float | None = None,
        iddpm_c2: float | None = None,
        solver: str = "ddim",
        timestep_spacing: str = "log_sigma",
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        max_timesteps: float | None = None,
        rho: float = 7.0,
    ):
        if solver not in SOLVERS:
            raise ValueError(f"Unknown solver {solver!r}: choose one of {SOLVERS}.")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"Unknown timestep_spacing {timestep_spacing!r}: choose one of {SPACINGS}.")
        self._parameterization = None
        _ = self.parameterization  # validates the parameterization keys now
        self.num_inference_steps = None
        self.grid = None
        self.timesteps = torch.tensor([self._default_max_timesteps()], dtype=torch.float32)
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    @property
    def order(self) -> int:
        return 2 if self.config.solver == "heun" else 1

    def _reset_state(self):
        self._prev_x0 = None  # dpmsolver++: x0 estimate of the previous step
        self._heun_x0 = None  # heun: x0 estimate at the start of the current step
        self._heun_sample = None  # heun: sample at the start of the current step

    def time_grid(self, num_inference_steps: int) -> torch.Tensor:
        """The decreasing grid t_0 > ... > t_{N-1} > t_N = 0 of `num_inference_steps` steps (float64)."""
        n, sd = int(num_inference_steps), self.config.sigma_data
        if self.config.timestep_spacing == "angle":
            return torch.linspace(self._default_max_timesteps(), 0, n + 1, dtype=torch.float64)
        lo, hi = self.config.sigma_min, self.config.sigma_max
        if self.config.timestep_spacing == "log_sigma":
            sigmas = torch.exp(torch.linspace(math.log(hi), math.log(lo), n, dtype=torch.float64))
        else:  # karras: (hi^(1/rho) + i/(n-1) (lo^(1/rho) - hi^(1/rho)))^rho
            ramp = torch.linspace(0, 1, n, dtype=torch.float64)
            r = 1.0 / self.config.rho
            sigmas = (hi**r + ramp * (lo**r - hi**r)) ** self.config.rho
        if n == 1:
            sigmas = torch.tensor([hi], dtype=torch.float64)
        return torch.cat([torch.atan(sigmas / sd), torch.zeros(1, dtype=torch.float64)])

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        timesteps: list[float] | torch.Tensor | None = None,
        device: str | torch.device | None = None,
    ):
        """
        Set the solver's time grid.

        Args:
            num_inference_steps (`int`, *optional*): number of solver steps (Heun calls the network about twice
                per step).
            timesteps (`list[float]` or `torch.Tensor`, *optional*): explicit decreasing grid in (0, pi/2]; the
                terminal 0 is appended when missing.
            device (`str` or `torch.device`, *optional*): where to put `timesteps`.
        """
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of `num_inference_steps` and `timesteps`.")
        if timesteps is not None:
            grid = timesteps.detach().double().flatten().cpu() if torch.is_tensor(timesteps) else None
            grid = torch.tensor(timesteps, dtype=torch.float64).flatten() if grid is None else grid
            if grid.numel() and float(grid[-1]) != 0.0:
                grid = torch.cat([grid, torch.zeros(1, dtype=torch.float64)])
        else:
            if int(num_inference_steps) < 1:
                raise ValueError(f"`num_inference_steps` must be at least 1, got {num_inference_steps}.")
            grid = self.time_grid(num_inference_steps)
        self._check_timesteps(grid[:-1])
        self.grid = grid  # t_0 > ... > t_N = 0, float64
        n = len(grid) - 1
        self.num_inference_steps = n
        calls = grid[:-1]
        if self.config.solver == "heun" and n > 1:  # [t0, t1, t1, t2, t2, ..., t_{N-1}, t_{N-1}]
            calls = torch.cat([grid[:1], grid[1:-1].repeat_interleave(2)])
        self.timesteps = _to_time_tensor(calls, device=device)
        self._step_index = None
        self._begin_index = None
        self._reset_state()

    def _grid_step(self, i: int) -> tuple[int, bool]:
        """For call number i: the grid step it belongs to and whether it is a Heun correction."""
        if self.config.solver != "heun":
            return i, False
        return (i + 1) // 2, i % 2 == 1

    @staticmethod
    def _ddim(x: torch.Tensor, x0: torch.Tensor, s: float, t: float) -> torch.Tensor:
        # x_t = (sin t / sin s) x_s + (sin(s - t) / sin s) x0   (exact first-order step, SPEC.md section 1)
        return (math.sin(t) / math.sin(s)) * x + (math.sin(s - t) / math.sin(s)) * x0

    def _lambda(self, t: float) -> float:
        return -math.log(self.config.sigma_data * math.tan(t))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator=None,
        return_dict: bool = True,
    ) -> TrigFlowSchedulerOutput | tuple:
        """
        Advance the ODE from `timestep` to the next time of the grid.

        Args:
            model_output (`torch.Tensor`): the network's raw output at `(sample, timestep)`.
            timestep (`float` or `torch.Tensor`): the current time, an entry of `timesteps`.
            sample (`torch.Tensor`): the current x_t.
            generator: unused (the sampler is deterministic); accepted for API compatibility.
            return_dict (`bool`, defaults to `True`): return a `TrigFlowSchedulerOutput` or a tuple.
        """
        if self.num_inference_steps is None:
            raise ValueError("Call `set_timesteps` before `step`.")
        if self.step_index is None:
            self._init_step_index(timestep)
        j, correction = self._grid_step(self.step_index)
        x = sample.float()
        if correction:  # Heun: average the x0 estimates at both ends, restart from the step's first sample
            s, t = float(self.grid[j - 1]), float(self.grid[j])
            x0 = self.model_output_to_x0(model_output.float(), self.grid[j], x)
            prev = self._ddim(self._heun_sample, 0.5 * (self._heun_x0 + x0), s, t)
            self._heun_x0 = self._heun_sample = None
        else:
            s, t = float(self.grid[j]), float(self.grid[j + 1])
            x0 = self.model_output_to_x0(model_output.float(), self.grid[j], x)
            d = x0
            if self.config.solver == "dpmsolver++" and self._prev_x0 is not None and t > 0:
                h = self._lambda(t) - self._lambda(s)
                h_prev = self._lambda(s) - self._lambda(float(self.grid[j - 1]))
                r = h_prev / h
                d = (1 + 0.5 / r) * x0 - (0.5 / r) * self._prev_x0
            prev = self._ddim(x, d, s, t) if t > 0 else x0
            self._prev_x0 = x0
            if self.config.solver == "heun" and t > 0:
                self._heun_x0, self._heun_sample = x0, x
        self._step_index += 1
        prev, x0 = prev.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return (prev, x0)
        return TrigFlowSchedulerOutput(prev_sample=prev, pred_original_sample=x0)
