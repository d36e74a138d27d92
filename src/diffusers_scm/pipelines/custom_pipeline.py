"""diffusers' custom-pipeline entry point for `SCMPipeline`.

`DiffusionPipeline.from_pretrained` builds only the pipeline classes that diffusers defines, unless it is given the
code of another one. With diffusers-scm installed, this file is that code:

    from diffusers import DiffusionPipeline
    from huggingface_hub import snapshot_download
    from diffusers_scm.hub import CUSTOM_PIPELINE

    pipe = DiffusionPipeline.from_pretrained(
        snapshot_download("org/name"), custom_pipeline=CUSTOM_PIPELINE, trust_remote_code=True
    )
"""

from diffusers_scm import SCMPipeline


__all__ = ["SCMPipeline"]
