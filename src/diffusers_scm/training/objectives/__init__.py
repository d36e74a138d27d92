"""What a training step minimizes: one module per objective (SPEC.md sections 1, 3 and 5), each called the same way
through `objective.py`'s `loss, logs = objective(batch, step)`; the objectives do no I/O."""

from .consistency import ConsistencyLoss, consistency_function
from .diffusion import TrigFlowDiffusionLoss
from .dmd import DMDLoss
from .flow_matching import FlowMatchingLoss, FlowMatchingModel
from .logvar import LogVarHead
from .objective import (
    OBJECTIVES,
    ConsistencyObjective,
    DiffusionObjective,
    FlowMatchingObjective,
    Objective,
    SCMObjective,
    TCMObjective,
)
from .scm import SCMLoss
from .tcm import TCMLoss


__all__ = [
    "Objective",
    "OBJECTIVES",
    "SCMObjective",
    "ConsistencyObjective",
    "TCMObjective",
    "DiffusionObjective",
    "FlowMatchingObjective",
    "SCMLoss",
    "ConsistencyLoss",
    "TCMLoss",
    "DMDLoss",
    "TrigFlowDiffusionLoss",
    "FlowMatchingLoss",
    "FlowMatchingModel",
    "LogVarHead",
    "consistency_function",
]
