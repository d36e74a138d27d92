from .scheduling_trigflow import TrigFlowScheduler, TrigFlowSchedulerOutput
from .scheduling_trigflow_family import TrigFlowFamilyScheduler
from .scheduling_trigflow_ode import TrigFlowODEScheduler


__all__ = ["TrigFlowScheduler", "TrigFlowSchedulerOutput", "TrigFlowODEScheduler", "TrigFlowFamilyScheduler"]
