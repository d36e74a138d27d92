from .pipeline_scm import SCMPipeline


__all__ = ["SCMPipeline"]
