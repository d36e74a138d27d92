"""Training: sCD/sCT losses, discrete CD/CT and TCM losses, time proposals, EMA, the adaptive-weighting head, teacher
loading (SPEC.md sections 3 and 5)."""

from .dmd import DMDLoss
from .ema import ConstantDecayEMA, PowerFunctionEMA, make_ema, sigma_rel_to_gamma
from .logvar import LogVarHead
from .losses import SCMLoss, TrigFlowDiffusionLoss, null_class_conditioning
from .tcm import ConsistencyLoss, TCMLoss, consistency_function
from .teacher import infer_parameterization, load_teacher
from .time_proposals import (
    clamp_times,
    lognormal_times,
    student_t_cdf,
    student_t_times,
    truncated_lognormal_times,
    truncated_student_t,
)


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
