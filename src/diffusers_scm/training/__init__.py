"""Training, grouped by concern:

- `objectives`: what a step minimizes (sCD/sCT, discrete CD/CT, TCM, DMD, the TrigFlow diffusion, flow-matching and VAE
  losses, time proposals, the adaptive-weighting head), each called as `loss, logs = objective(batch, step)`;
- `data`: images, captions, text encoders, the latent cache;
- `machinery`: flags, accelerator setup, the loop, checkpoints, EMA, FSDP2, LoRA, publishing;
- `teacher`: loading teachers of every family.
"""

import sys

from .data import text_encoders
from .machinery import fsdp, lora
from .machinery.ema import ConstantDecayEMA, PowerFunctionEMA, make_ema, sigma_rel_to_gamma
from .objectives import flow_matching, vae
from .objectives.common import null_class_conditioning
from .objectives.consistency import ConsistencyLoss, consistency_function
from .objectives.diffusion import TrigFlowDiffusionLoss
from .objectives.dmd import DMDLoss
from .objectives.logvar import LogVarHead
from .objectives.scm import SCMLoss
from .objectives.tcm import TCMLoss
from .objectives.time_proposals import (
    clamp_times,
    lognormal_times,
    student_t_cdf,
    student_t_times,
    truncated_lognormal_times,
    truncated_student_t,
)
from .teacher import infer_parameterization, load_teacher


# Module paths of earlier releases (the README named them), still importable: `diffusers_scm.training.fsdp` is
# `diffusers_scm.training.machinery.fsdp`.
for _module in (text_encoders, fsdp, lora, flow_matching, vae):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module


__all__ = [
    "SCMLoss",
    "DMDLoss",
    "ConsistencyLoss",
    "TCMLoss",
    "consistency_function",
    "TrigFlowDiffusionLoss",
    "LogVarHead",
    "PowerFunctionEMA",
    "ConstantDecayEMA",
    "make_ema",
    "sigma_rel_to_gamma",
    "lognormal_times",
    "clamp_times",
    "student_t_times",
    "truncated_lognormal_times",
    "truncated_student_t",
    "student_t_cdf",
    "load_teacher",
    "infer_parameterization",
    "null_class_conditioning",
]
