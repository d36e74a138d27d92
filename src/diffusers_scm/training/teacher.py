"""Load a pretrained diffusion model as a TrigFlow teacher, inferring its parameterization from its scheduler."""

import os

import torch

from ..denoiser import TrigFlowDenoiser
from ..parameterizations import PARAMETERIZATIONS, get_parameterization, parameterization_from_config
from ..utils import read_json


__all__ = [
    "load_teacher",
    "infer_parameterization",
    "NETWORK_COMPONENTS",
    "load_text_to_image_teacher",
    "teacher_from_pipeline",
    "TextToImageTeacher",
]

NETWORK_COMPONENTS = ("unet", "transformer")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
TRIGFLOW_SCHEDULERS = ("TrigFlowScheduler", "TrigFlowODEScheduler", "TrigFlowFamilyScheduler", "SCMScheduler")
VP_SCHEDULERS = (
    "DDPMScheduler",
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "KDPM2DiscreteScheduler",
    "DDIMInverseScheduler",
)
_VP_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def infer_parameterization(scheduler_config: dict, sigma_data: float | None = None):
    """`(name, params)` for `get_parameterization` from a diffusers scheduler config."""
    cls = scheduler_config.get("_class_name", "")
    if cls in TRIGFLOW_SCHEDULERS:
        if cls == "SCMScheduler":
            return "trigflow", {"sigma_data": scheduler_config.get("sigma_data", 0.5), "prediction_type": "velocity"}
        p = parameterization_from_config({"parameterization": "trigflow", **scheduler_config})
        return p.name, p.config()
    if cls in EDM_SCHEDULERS:
        return "edm", {
            "sigma_data": scheduler_config.get("sigma_data", 0.5),
            "prediction_type": scheduler_config.get("prediction_type", "epsilon"),
        }
    if cls in FLOW_SCHEDULERS:
        return "flow_matching", {
            "sigma_data": 0.5 if sigma_data is None else sigma_data,
            "timestep_scale": float(scheduler_config.get("num_train_timesteps", 1000)),
        }
    if cls in VP_SCHEDULERS and (
        scheduler_config.get("prediction_type") == "flow_prediction" or scheduler_config.get("use_flow_sigmas")
    ):  # DPM-Solver / UniPC sampling a flow-matching model (Sana): the network is a rectified-flow one
        return "flow_matching", {
            "sigma_data": 0.5 if sigma_data is None else sigma_data,
            "timestep_scale": float(scheduler_config.get("num_train_timesteps", 1000)),
        }
    if cls in VP_SCHEDULERS:
        prediction = scheduler_config.get("prediction_type", "epsilon")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"{cls} with prediction_type={prediction!r} is not supported: use epsilon or v_prediction."
            )
        params = {k: scheduler_config[k] for k in _VP_KEYS if scheduler_config.get(k) is not None}
        params["sigma_data"] = 0.5 if sigma_data is None else sigma_data
        return ("vp_epsilon" if prediction == "epsilon" else "vp_v"), params
    raise ValueError(
        f"Cannot infer the parameterization from a scheduler of class {cls!r}. Known: EDM ({', '.join(EDM_SCHEDULERS)}), "
        f"flow matching ({', '.join(FLOW_SCHEDULERS)}), TrigFlow ({', '.join(TRIGFLOW_SCHEDULERS)}) and DDPM-family "
        f"schedulers. Pass `parameterization=` (one of {', '.join(PARAMETERIZATIONS)}) to override."
    )


def _load_network(folder: str, torch_dtype=None):
    config = read_json(os.path.join(folder, "config.json"))
    cls_name = config.get("_class_name")
    import diffusers

    import diffusers_scm

    cls = getattr(diffusers, cls_name, None) or getattr(diffusers_scm, cls_name, None)
    if cls is None:
        raise ValueError(
            f"The network in {folder} is a {cls_name!r}, which neither diffusers nor diffusers_scm provides; "
            "install the package that defines it."
        )
    return cls.from_pretrained(folder, torch_dtype=torch_dtype)


def load_teacher(
    path_or_id: str,
    parameterization: str | None = None,
    sigma_data: float | None = None,
    torch_dtype: torch.dtype | None = None,
    **hub_kwargs,
) -> TrigFlowDenoiser:
    """
    Load a diffusers network or pipeline folder (or Hub id) as a frozen `TrigFlowDenoiser`.

    The parameterization is inferred from the pipeline's scheduler config: `EDMEulerScheduler` /
    `EDMDPMSolverMultistepScheduler` -> "edm"; `FlowMatchEulerDiscreteScheduler` -> "flow_matching";
    DDPM/DDIM-family -> "vp_epsilon" or "vp_v" by prediction type; `TrigFlowScheduler`/`SCMScheduler` -> "trigflow".

    Args:
        path_or_id (`str`): a pipeline folder (with `model_index.json`), a network folder (with `config.json`,
            optionally a `scheduler/` or `scheduler_config.json` beside it), or a Hub repository id. A path that looks
            local (absolute, or starting with `./`, `../` or `~`, say) and does not exist is a `FileNotFoundError`.
        parameterization (`str`, *optional*): overrides the inferred parameterization.
        sigma_data (`float`, *optional*): the data's standard deviation (read from EDM/TrigFlow configs otherwise,
            0.5 by default).
        torch_dtype (`torch.dtype`, *optional*): dtype to load the network in.
        hub_kwargs: `revision`, `cache_dir`, `token`, `local_files_only`, `force_download` for Hub ids (which also
            honour `HF_HUB_OFFLINE`); only the network, its config and the scheduler config are downloaded.
    """
    from ..hub.folders import check_network_folder, check_pipeline_folder, download_teacher, local_folder

    folder = local_folder(path_or_id)  # a path that does not exist is named here
    if folder is None:
        folder = download_teacher(path_or_id, network_components=NETWORK_COMPONENTS, **hub_kwargs)
    found = sorted(os.listdir(folder))
    scheduler_config = None
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        index = read_json(os.path.join(folder, "model_index.json"))
        names = [n for n in NETWORK_COMPONENTS if isinstance(index.get(n), list) and index[n][0] is not None]
        if not names:
            raise ValueError(
                f"{path_or_id} is a {index.get('_class_name')} pipeline without a network component "
                f"({' or '.join(NETWORK_COMPONENTS)}); found components {[k for k in index if not k.startswith('_')]}."
            )
        network_folder = os.path.join(folder, names[0])
        sched_path = os.path.join(folder, "scheduler", "scheduler_config.json")
        # the network and scheduler that are read: present, their JSON parses, their safetensors headers read
        check_pipeline_folder(folder, path_or_id, pipeline_class=None, components=[names[0], "scheduler"])
        from ..families import get_family, is_family

        family = index.get("_class_name")
        if is_family(family) and get_family(family).teacher_network is not None:
            # a teacher of several networks (Wan 2.2's experts): the pipeline without its VAE and text encoders
            from diffusers import DiffusionPipeline

            from ..conditioning import TEXT_COMPONENTS

            skip = {n: None for n in ("vae", *TEXT_COMPONENTS) if isinstance(index.get(n), list)}
            pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch_dtype, **skip)
            return teacher_from_pipeline(pipe, parameterization, sigma_data)
    elif os.path.isfile(os.path.join(folder, "config.json")):
        network_folder = folder
        sched_path = next(
            (
                p
                for p in (
                    os.path.join(folder, "scheduler_config.json"),
                    os.path.join(os.path.dirname(folder.rstrip("/")), "scheduler", "scheduler_config.json"),
                )
                if os.path.isfile(p)
            ),
            "",
        )
        check_network_folder(folder, path_or_id)
    else:
        raise ValueError(
            f"{path_or_id} is neither a diffusers pipeline folder (model_index.json) nor a network folder "
            f"(config.json); it contains {found}."
        )
    if os.path.isfile(sched_path):
        scheduler_config = read_json(sched_path)

    if parameterization is None and scheduler_config is None:
        raise ValueError(
            f"No scheduler config found for {path_or_id} (looked for {sched_path or 'scheduler_config.json'}; the "
            f"folder contains {found}). Pass `parameterization=` (one of {', '.join(PARAMETERIZATIONS)})."
        )
    name, params = parameterization, {}
    if scheduler_config is not None:
        try:
            inferred, inferred_params = infer_parameterization(scheduler_config, sigma_data)
        except ValueError:
            if parameterization is None:
                raise
        else:
            if parameterization is None or inferred == parameterization:  # keep the config's settings
                name, params = inferred, inferred_params
    if sigma_data is not None:
        params["sigma_data"] = sigma_data
    p = get_parameterization(name, **params)
    network = _load_network(network_folder, torch_dtype=torch_dtype).eval().requires_grad_(False)
    return TrigFlowDenoiser(network, p, sigma_data=p.sigma_data)


def teacher_from_pipeline(pipe, parameterization: str | None = None, sigma_data: float | None = None):
    """The network of a loaded diffusers pipeline as a frozen `TrigFlowDenoiser`, its parameterization inferred from
    the pipeline's scheduler (as `load_teacher` does)."""
    from ..families import get_family, is_family

    network = next((getattr(pipe, n, None) for n in NETWORK_COMPONENTS if getattr(pipe, n, None) is not None), None)
    if is_family(type(pipe).__name__):  # a family whose teacher calls more than its network (Wan 2.2's experts)
        network = get_family(pipe).teacher_network_of(pipe) or network
    if network is None:
        raise ValueError(f"{type(pipe).__name__} has no network component ({' or '.join(NETWORK_COMPONENTS)}).")
    name, params = parameterization, {}
    config = {**dict(pipe.scheduler.config), "_class_name": type(pipe.scheduler).__name__}
    inferred, inferred_params = infer_parameterization(config, sigma_data)
    if parameterization is None or parameterization == inferred:
        name, params = inferred, inferred_params
    if sigma_data is not None:
        params["sigma_data"] = sigma_data
    p = get_parameterization(name, **params)
    return TrigFlowDenoiser(network.eval().requires_grad_(False), p, sigma_data=p.sigma_data)


class TextToImageTeacher:
    """
    A text-to-image (or latent) teacher: the family's diffusers pipeline, its network as a `TrigFlowDenoiser`, the
    prompt encoding through the pipeline's own `encode_prompt`, and the VAE's latent codec (SPEC.md section 8).

    Attributes:
        pipeline (`DiffusionPipeline`): the family pipeline (network, VAE, text encoders, tokenizers, scheduler).
        denoiser (`TrigFlowDenoiser`): the frozen network in TrigFlow coordinates.
        encoding (`PromptEncoding`): prompts to conditioning (cond and unconditional).
        codec (`LatentCodec`): images to latents x0 and back.
        family (`str`): the pipeline's class name.
    """

    def __init__(self, pipeline, parameterization: str | None = None, sigma_data: float | None = None):
        from ..families import get_family

        self.pipeline = pipeline
        self.family = type(pipeline).__name__
        self.family_spec = get_family(pipeline)
        self.encoding = self.family_spec.prompt_encoding(pipeline)
        if getattr(pipeline, "vae", None) is None:
            raise ValueError(f"The {self.family} teacher has no VAE: a latent teacher needs its `vae` component.")
        self.codec = self.family_spec.latent_codec(
            pipeline.vae, sample=False
        )  # the VAE's mode: x0 is a function of the image
        self.denoiser = teacher_from_pipeline(pipeline, parameterization, sigma_data)

    def text_components(self) -> dict:
        """The text encoders and tokenizers of the pipeline (what a student's pipeline folder keeps)."""
        from ..conditioning import TEXT_COMPONENTS

        return {name: getattr(self.pipeline, name) for name in TEXT_COMPONENTS if getattr(self.pipeline, name, None)}


def load_text_to_image_teacher(
    path_or_id: str,
    parameterization: str | None = None,
    sigma_data: float | None = None,
    torch_dtype: torch.dtype | None = None,
    **hub_kwargs,
) -> TextToImageTeacher:
    """
    Load a text-to-image pipeline folder or Hub id (StableDiffusion3Pipeline, FluxPipeline, SanaPipeline,
    PixArtSigmaPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline) as a `TextToImageTeacher`: every
    component through `DiffusionPipeline.from_pretrained` (frozen, eval mode, `torch_dtype` for the network, VAE and
    text encoders), the parameterization inferred from its scheduler as `load_teacher` does.

    The whole folder is checked once before any weights load (`diffusers_scm.hub.check_pipeline_folder`): every
    component of `model_index.json` has its folder, its JSON files parse and its safetensors headers read, so a
    damaged or missing file is named with its component; after loading, each tokenizer must hold a vocabulary.

    Args:
        path_or_id (`str`): a pipeline folder, or a Hub repository id (downloaded first, then checked the same way).
        parameterization (`str`, *optional*): overrides the inferred parameterization.
        sigma_data (`float`, *optional*): the data's standard deviation (0.5 by default).
        torch_dtype (`torch.dtype`, *optional*): dtype to load the network, VAE and text encoders in.
        hub_kwargs: `revision`, `cache_dir`, `token`, `local_files_only`, `force_download` for Hub ids; `variant` and
            `use_safetensors` choose the weight files.
    """
    from diffusers import DiffusionPipeline

    from ..conditioning import check_tokenizers
    from ..families import family_names, is_family
    from ..hub.folders import check_pipeline_folder, local_folder

    folder = local_folder(path_or_id)
    if folder is None:  # a Hub id: the family's files, downloaded (or found in the cache), checked as a local folder
        folder = DiffusionPipeline.download(path_or_id, **hub_kwargs)
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(
            f"{path_or_id} is not a text-to-image pipeline folder (no model_index.json); it contains "
            f"{sorted(os.listdir(folder))}."
        )
    index = read_json(index_path)
    family = index.get("_class_name")
    if not is_family(family):
        raise ValueError(
            f"{path_or_id} is a {family}, not a supported text-to-image or text-to-video family ({', '.join(family_names())})."
        )
    missing = [n for n in ("text_encoder", "tokenizer") if not (isinstance(index.get(n), list) and index[n][0])]
    if missing:
        raise ValueError(
            f"{path_or_id} ({family}) has no {' or '.join(missing)}: a text-to-image teacher needs its text "
            "encoder and tokenizer to encode the captions (or train from a cache made by prepare_data.py)."
        )
    check_pipeline_folder(folder, path_or_id, pipeline_class=None)  # every component, before any weights load
    load_kwargs = {k: hub_kwargs[k] for k in ("variant", "use_safetensors") if k in hub_kwargs}
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch_dtype, **load_kwargs)
    check_tokenizers(pipe, path_or_id)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    return TextToImageTeacher(pipe, parameterization, sigma_data)
