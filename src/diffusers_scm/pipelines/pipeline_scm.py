"""`SCMPipeline`: sample a consistency model (or, with `TrigFlowODEScheduler`, a diffusion model)."""

import dataclasses
import numbers
import os
from collections.abc import Callable

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import randn_tensor

from ..adapters import cast_floating, get_adapter
from ..conditioning import TEXT_COMPONENTS, LatentCodec, check_tokenizers
from ..denoiser import call_network
from ..families import family_names, get_family, is_family, prompt_encoding
from ..guidance import guidance_conditioning


logger = logging.get_logger(__name__)


EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> from diffusers_scm import SCMPipeline

        >>> pipe = SCMPipeline.from_pretrained("path/to/student")  # a folder or a Hub id, "org/name"
        >>> images = pipe(batch_size=4, num_inference_steps=2).images
        ```

        A converted EDM2 teacher guided by its unconditional XS (SPEC.md section 10), sampled by its ODE:

        ```py
        >>> from diffusers_scm import SCMPipeline

        >>> # folders written by `python -m diffusers_scm.convert --checkpoint edm2-img512-....pkl --vae ...`
        >>> guide = SCMPipeline.from_pretrained("edm2-img512-xs-uncond").unet
        >>> pipe = SCMPipeline.from_pretrained("edm2-img512-s", guidance_model=guide, guidance_scale=1.4)
        >>> images = pipe(class_labels=[88, 207], batch_size=2, num_inference_steps=32).images
        ```
"""


@dataclasses.dataclass
class SCMVideoPipelineOutput(BaseOutput):
    """
    The videos of a video student, as diffusers' video pipelines return them.

    Args:
        frames (`np.ndarray`, `torch.Tensor` or `list[list[PIL.Image.Image]]`): "np": (B, F, H, W, C) in [0, 1];
            "pt": (B, F, C, H, W); "pil": one list of frames per video; "latent": (B, C, F', h, w).
    """

    frames: object


class SCMPipeline(DiffusionPipeline):
    r"""
    Pipeline for one-, two- or k-step generation with a TrigFlow consistency model (SPEC.md section 4).

    The network's inputs come from the scheduler's parameterization (`scheduler.model_inputs`), so the same loop
    samples TrigFlow, EDM, flow-matching and DDPM networks. Given a `TrigFlowODEScheduler` instead of a
    `TrigFlowScheduler`, the same loop samples a diffusion model (a teacher) by its probability-flow ODE.

    Args:
        scheduler ([`TrigFlowScheduler`] or [`TrigFlowODEScheduler`]): the sampler; its config names the
            parameterization of the network.
        unet (`UNet2DModel`, *optional*): the network, for UNet models.
        transformer (`DiTTransformer2DModel`, *optional*): the network, for transformer models.
        vae (`AutoencoderKL`, *optional*): decodes latents for latent models.
        text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3 (*optional*): the text
            encoders and tokenizers of a text-to-image family (transformers classes), as the family pipeline names
            them.
        family_pipeline (`str`, *optional*): the family's diffusers pipeline class (e.g. "StableDiffusion3Pipeline");
            prompts are encoded through its own `encode_prompt`.
        guidance_scale (`float`, *optional*): the default guidance value of a network with a guidance input, or, with
            a `guidance_model`, the default w of its guidance.
        guidance_scale_range (`list[float]`, *optional*): the range [LO, HI] a guidance-conditioned student was
            distilled on (recorded for users and the model card).
        guidance_model (`ModelMixin`, *optional*): a second, smaller network that guides a teacher the EDM2 way,
            D = D_g + w (D - D_g) (SPEC.md section 10): EDM2's unconditional XS, or an autoguidance network. It takes
            the same inputs as the main network (the scheduler's parameterization); a guiding network without
            classes is called without `class_labels`.
        image_range (`list[float]`, *optional*): the range [LO, HI] of the images the network (or its VAE) gives,
            mapped to [0, 1] and clamped for output; default [-1, 1] (diffusers' convention). Latent EDM2 models
            give [0, 1]: their VAE encodes and decodes images in [0, 1] (SPEC.md section 10).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->guidance_model->vae"
    _optional_components = ["unet", "transformer", "vae", "guidance_model", *TEXT_COMPONENTS]
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        scheduler,
        unet=None,
        transformer=None,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        family_pipeline: str | None = None,
        guidance_scale: float | None = None,
        guidance_scale_range: list[float] | None = None,
        guidance_model=None,
        image_range: list[float] | None = None,
    ):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("SCMPipeline needs exactly one network: pass `unet` or `transformer`.")
        if family_pipeline is not None and not is_family(family_pipeline):
            raise ValueError(f"Unknown family_pipeline {family_pipeline!r}: use one of {sorted(family_names())}.")
        if image_range is not None:
            image_range = [float(v) for v in image_range]
            if len(image_range) != 2 or not image_range[0] < image_range[1]:
                raise ValueError(f"`image_range` must be [LO, HI] with LO < HI, got {image_range}.")
        self.register_modules(unet=unet, transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_modules(guidance_model=guidance_model)
        self.register_modules(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        self.register_to_config(
            family_pipeline=family_pipeline,
            guidance_scale=guidance_scale,
            guidance_scale_range=None if guidance_scale_range is None else [float(w) for w in guidance_scale_range],
            image_range=image_range,
        )
        self.image_processor = VaeImageProcessor(do_normalize=False)  # images reach it in [0, 1] (`latents_to_images`)
        self._family = None  # the family pipeline object, built on first use (prompt encoding)

    # `from_pretrained` arguments that only concern finding the files
    _hub_kwargs = ("revision", "cache_dir", "token", "local_files_only", "force_download")

    @classmethod
    def download(cls, pretrained_model_name: str, **kwargs) -> str:
        r"""
        Download an SCMPipeline repository from the Hub (or find it in the local cache) and return its local folder.

        diffusers' `DiffusionPipeline.download` refuses components saved as `["diffusers_scm", ClassName]` when given
        a repository id; this downloads `model_index.json` and the component folders with `huggingface_hub` instead
        (see `diffusers_scm.hub.download_pipeline`).

        Args:
            pretrained_model_name (`str`): the repository id, `"org/name"`.
            revision (`str`, *optional*): branch, tag or commit hash.
            cache_dir (`str`, *optional*): the Hugging Face cache (default `HF_HUB_CACHE`).
            token (`str` or `bool`, *optional*): for private or gated repositories.
            local_files_only (`bool`, defaults to `False`): use the cache only (as `HF_HUB_OFFLINE=1` does).
            force_download (`bool`, defaults to `False`): download again even if cached.
            variant (`str`, *optional*), use_safetensors (`bool`, *optional*): which weight files to fetch.
        """
        from ..hub.folders import download_pipeline

        keys = cls._hub_kwargs + ("variant", "use_safetensors")
        return download_pipeline(
            pretrained_model_name, pipeline_class=cls.__name__, **{k: kwargs[k] for k in keys if k in kwargs}
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        r"""
        Load an SCMPipeline from a folder saved by `save_pretrained` or from a Hub repository id (`"org/name"`).

        A Hub id is resolved by [`~SCMPipeline.download`] (which honours `revision`, `cache_dir`, `token`,
        `local_files_only` and `HF_HUB_OFFLINE`); the folder is checked (an SCMPipeline, every component present and
        importable, its JSON files parsing and its safetensors headers readable) and loaded by
        `DiffusionPipeline.from_pretrained`, which takes the remaining arguments (`torch_dtype`, `variant`,
        `device_map`, components to replace, ...); each tokenizer loaded must hold a vocabulary. A path that looks
        local (absolute, or starting with `./`, `../` or `~`, say) and does not exist is a `FileNotFoundError` that
        names it.
        """
        from ..hub.folders import check_pipeline_folder, local_folder

        hub_kwargs = {k: kwargs.pop(k) for k in cls._hub_kwargs if k in kwargs}
        path = local_folder(pretrained_model_name_or_path)  # a path that does not exist is named here
        if path is not None:
            names = ("unet", "transformer", "scheduler", "vae", "guidance_model", *TEXT_COMPONENTS)
            passed = [name for name in names if kwargs.get(name) is not None]
            check_pipeline_folder(path, pipeline_class=cls.__name__, exclude=passed)
        else:
            for key in ("variant", "use_safetensors"):
                if key in kwargs:
                    hub_kwargs[key] = kwargs[key]
            path = cls.download(str(pretrained_model_name_or_path), **hub_kwargs)
        pipe = super().from_pretrained(path, **kwargs)
        check_tokenizers(pipe, str(pretrained_model_name_or_path))
        return pipe

    def register_modules(self, **kwargs):
        super().register_modules(**kwargs)
        # Record our own components as ["diffusers_scm", ClassName] rather than by their private module path.
        for name, module in kwargs.items():
            if module is not None and type(module).__module__.startswith("diffusers_scm."):
                self.register_to_config(**{name: ("diffusers_scm", type(module).__name__)})

    @property
    def image_range(self) -> tuple[float, float]:
        """The range [LO, HI] of the images the network (or its VAE) gives: the config's `image_range`, else
        [-1, 1]."""
        lo, hi = self.config.get("image_range") or (-1.0, 1.0)
        return float(lo), float(hi)

    @torch.no_grad()
    def latents_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """
        Images (B, C, H, W) in [0, 1], float32, from samples x0: the VAE's decode for latent models (the latent
        normalization inverted by `LatentCodec`, SPEC.md section 8), then the pipeline's `image_range` mapped to
        [0, 1] and clamped (latent EDM2: its VAE gives [0, 1] itself, SPEC.md section 10).

        Args:
            latents (`torch.Tensor`): x0 as the sampler returns it (`output_type="latent"`).
        """
        image = latents
        if getattr(self, "vae", None) is not None:
            image = self.latent_codec().decode(latents)
        lo, hi = self.image_range
        return ((image.float() - lo) / (hi - lo)).clamp(0, 1)

    def latent_codec(self) -> LatentCodec:
        """The codec between images and this pipeline's latents x0: its family's (`diffusers_scm.families`: a VAE
        whose latents its pipeline patchifies or normalizes otherwise, Flux.2's), else `LatentCodec`."""
        family = self.config.get("family_pipeline")
        return get_family(family).latent_codec(self.vae) if family is not None else LatentCodec(self.vae)

    @property
    def network(self) -> torch.nn.Module:
        return getattr(self, self.network_name)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    def is_video(self) -> bool:
        """Whether this is a video student (its family is declared with `video=True`)."""
        family = self.config.get("family_pipeline")
        return family is not None and get_family(family).video

    def _video_shape(self, batch_size: int, height, width, num_frames) -> tuple[int, ...]:
        """(B, C, F', h, w): the video codec's latent shape; sizes not given default to the family pipeline's."""
        import inspect

        import diffusers

        defaults = inspect.signature(getattr(diffusers, self.config.family_pipeline).__call__).parameters
        if (height is None) != (width is None):
            raise ValueError("Pass both `height` and `width` (pixels), or neither.")
        if height is None:
            height, width = defaults["height"].default, defaults["width"].default
            if height is None or width is None:  # HunyuanVideo15Pipeline derives them from its network's config
                raise ValueError(
                    f"{self.config.family_pipeline} has no default video size: pass `height` and `width` (pixels)."
                )
        if num_frames is None:
            num_frames = defaults["num_frames"].default
        return self.latent_codec().latent_shape(batch_size, height, width, num_frames)

    def sampling_scheduler(self):
        """The scheduler `__call__` steps, in TrigFlow times: the pipeline's own, or for a `TrigFlowFamilyScheduler`
        (a student folder that its family's own pipeline samples too) its equivalent `TrigFlowScheduler`."""
        if hasattr(self.scheduler, "trigflow_scheduler"):
            return self.scheduler.trigflow_scheduler()
        return self.scheduler

    def _sample_shape(
        self, batch_size: int, height: int | None = None, width: int | None = None, num_frames: int | None = None
    ) -> tuple[int, ...]:
        if getattr(self, "vae", None) is not None and self.is_video():
            return self._video_shape(batch_size, height, width, num_frames)
        if num_frames is not None:
            raise ValueError("`num_frames` is for video students; this pipeline makes images.")
        config = self.network.config
        size = config.get("sample_size")
        if getattr(self, "vae", None) is not None:  # the unpacked latent image of the VAE
            codec = self.latent_codec()
            channels, factor = codec.latent_channels, codec.scale_factor
            size = size if size is not None else 64
            default = (size, size) if isinstance(size, int) else tuple(size)
            if (height is None) != (width is None):
                raise ValueError("Pass both `height` and `width` (pixels), or neither.")
            if height is not None:
                if height % factor or width % factor:
                    raise ValueError(f"`height` and `width` must be multiples of {factor} (the VAE's scale).")
                return (batch_size, channels, height // factor, width // factor)
            return (batch_size, channels, *default)
        channels = config.get("in_channels")
        if channels is None or size is None:
            raise ValueError(
                f"Cannot infer the sample shape from {type(self.network).__name__}'s config (in_channels, "
                "sample_size); pass `latents` of the right shape."
            )
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, channels, height, width)

    def family_pipeline(self):
        """The family's own diffusers pipeline over this pipeline's components (for its `encode_prompt`)."""
        family = self.config.get("family_pipeline")
        if family is None:
            raise ValueError(
                "This SCMPipeline has no text-to-image family (`family_pipeline` in its config): prompts need one. "
                "Pass `class_labels` or nothing for unconditional models."
            )
        if self._family is None:
            import inspect

            import diffusers

            cls = getattr(diffusers, family)
            params = inspect.signature(cls.__init__).parameters
            parts = {**self.components, self.network_name: self.network}
            kwargs = {
                name: parts.get(name)
                for name in params
                if name != "self" and params[name].default is params[name].empty
            }
            kwargs.update({k: v for k, v in parts.items() if k in params and v is not None})
            if "requires_safety_checker" in params:
                kwargs["requires_safety_checker"] = False
            self._family = cls(**kwargs)
        return self._family

    @property
    def network_name(self) -> str:
        return "unet" if getattr(self, "unet", None) is not None else "transformer"

    def encode_prompt(
        self, prompt=None, negative_prompt=None, guidance: bool = False, height=None, width=None, **embeds
    ):
        """`(cond, uncond)`: the network's conditioning for `prompt` (or `prompt_embeds=` and the family's other
        embedding inputs), through the family pipeline's own `encode_prompt`; `uncond` for classifier-free guidance."""
        encoding = prompt_encoding(self.family_pipeline())
        return encoding.encode(
            prompt,
            negative_prompt,
            device=self._execution_device,
            guidance=guidance,
            height=height,
            width=width,
            **embeds,
        )

    def _check_text_shapes(self, conditioning: dict, embeds: dict, negative: bool = False):
        """
        The text conditioning against the shapes the network's config sets (its adapter's `conditioning_shapes`):
        a wrong width is a `ValueError` that names the input it came from (`prompt_embeds`, `pooled_prompt_embeds`,
        their `negative_` forms) or, for prompts, the text encoders, instead of a matmul error inside the network.
        """
        network = self.network
        names = get_family(self.config.family_pipeline).encoding.embed_names
        prefix = "negative_" if negative else ""
        for key, shape in get_adapter(network).conditioning_shapes(network).items():
            value = conditioning.get(key)
            if not isinstance(value, torch.Tensor) or shape.matches(value):
                continue
            expected = (
                f"{type(network).__name__} reads `{key}` of shape {shape.describe()} ({shape.config_key} = "
                f"{shape.width} in its config)"
            )
            name = prefix + names.get(key, key)
            if embeds.get(name) is not None:
                raise ValueError(
                    f"`{name}` has shape {tuple(value.shape)}, but {expected}: pass the embeddings that this "
                    "pipeline's text encoders give (`pipe.family_pipeline().encode_prompt(...)`), or `prompt`."
                )
            raise ValueError(
                f"The text encoders give `{key}` of shape {tuple(value.shape)}, but {expected}: the text encoders do "
                "not belong to this network. Save the student with its teacher's text encoders and tokenizers."
            )

    def _guidance_input(self) -> bool:
        """Whether the network takes a guidance value of its own (Flux's and Sana's `guidance_embeds`)."""
        return bool(self.network.config.get("guidance_embeds", False))

    def _class_labels(self, class_labels, batch_size: int, device) -> torch.Tensor | None:
        config = self.network.config
        conditional = (
            config.get("num_class_embeds") is not None
            or config.get("class_embed_type") is not None
            or (type(self.network).__name__ == "DiTTransformer2DModel" and config.get("num_embeds_ada_norm"))
        )
        if class_labels is None:
            if conditional:
                raise ValueError(
                    f"{type(self.network).__name__} is class-conditional: pass `class_labels` (one per image, or "
                    "one for the whole batch)."
                )
            return None
        labels = torch.as_tensor(class_labels, device=device, dtype=torch.long).flatten()
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"Got {labels.numel()} class labels for a batch of {batch_size} images.")
        return labels

    @staticmethod
    def _check_call_arguments(batch_size, num_inference_steps, timesteps):
        counts = {"batch_size": batch_size}
        if timesteps is None:  # else `timesteps` sets the steps
            counts["num_inference_steps"] = num_inference_steps
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if timesteps is not None:
            values = torch.as_tensor(timesteps, dtype=torch.float64).detach().cpu().flatten()
            if not torch.isfinite(values).all():
                raise ValueError(
                    f"`timesteps` must be finite TrigFlow times in (0, pi/2], got {values.tolist()}; pass real "
                    "numbers (or `num_inference_steps` instead)."
                )

    @staticmethod
    def _warn_non_finite(bad_per_step: list[torch.Tensor], timesteps: torch.Tensor, batch_size: int):
        """One warning per call: the first step whose network output is NaN or infinite, and for how many samples."""
        if not bad_per_step:
            return
        counts = torch.stack(bad_per_step).tolist()  # one device sync for the whole call
        first = next((i for i, n in enumerate(counts) if n > 0), None)
        if first is None:
            return
        logger.warning(
            f"The network's output is NaN or infinite at step {first + 1} of {len(counts)} (t = "
            f"{float(timesteps[first]):.4f}) for {counts[first]} of {batch_size} samples, so those samples are NaN. "
            "Check the network's weights (a diverged training run leaves NaN weights) and its dtype (float16 can "
            "overflow: load with `torch_dtype=torch.float32` or `torch.bfloat16`)."
        )

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        batch_size: int | None = None,
        num_inference_steps: int = 1,
        timesteps: list[float] | None = None,
        class_labels: int | list[int] | torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        **prompt_embeds,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Generate images.

        Args:
            prompt (`str` or `list[str]`, *optional*): for text-to-image students: one image per prompt, encoded
                through the family pipeline's own `encode_prompt`.
            batch_size (`int`, *optional*): number of images (default: one per prompt, else 1).
            num_inference_steps (`int`, defaults to 1): network evaluations (consistency steps, or ODE steps for
                a `TrigFlowODEScheduler`).
            timesteps (`list[float]`, *optional*): explicit TrigFlow times in (0, pi/2]; overrides
                `num_inference_steps`.
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*): class of each image, for
                class-conditional networks.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): one generator, or one per image
                (then the images do not depend on how the batch is split).
            latents (`torch.Tensor`, *optional*): unit Gaussian noise to start from; scaled by the scheduler's
                `init_noise_sigma`.
            output_type (`str`, defaults to `"pil"`): "pil", "np", "pt" or "latent".
            return_dict (`bool`, defaults to `True`): return an `ImagePipelineOutput` or a tuple.
            callback_on_step_end (`Callable`, *optional*): called as `callback(pipe, i, t, callback_kwargs)` after
                each step; it may return a dict that replaces tensors named in
                `callback_on_step_end_tensor_inputs`.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): tensors passed to it.
            guidance_scale (`float`, *optional*): for networks with a guidance input of their own (Flux, Sana with
                guidance embeddings; guidance-conditioned students) the value fed to it (default: the one recorded
                in the config, else 3.5); with a `guidance_model`, w of its guidance D_g + w (D - D_g) (default: the
                config's `guidance_scale`, else 1: no guidance); otherwise, with an ODE scheduler (a teacher),
                classifier-free guidance F_u + w (F_c - F_u) against `negative_prompt` (default: the empty prompt).
                A consistency student distilled with guidance samples without it (one network call per step).
            negative_prompt (`str` or `list[str]`, *optional*): the unconditional prompt of classifier-free guidance.
            height, width (`int`, *optional*): image size in pixels (latent models; default: the network's; video
                families: their pipeline's default).
            num_frames (`int`, *optional*): video students (`Family(video=True)`): frames per video (a count the
                VAE encodes whole, e.g. 4k + 1 for Wan; default: the family pipeline's). The videos are returned in
                `.frames`, as diffusers' video pipelines return them: "np" (B, F, H, W, C) in [0, 1], "pt"
                (B, F, C, H, W), "pil" a list of frame lists, "latent" (B, C, F', h, w).
            prompt_embeds: precomputed inputs of the family's `encode_prompt` instead of `prompt` (`prompt_embeds`,
                `pooled_prompt_embeds`, `prompt_attention_mask`, `negative_prompt_embeds`, ...).

        Examples:

        Returns:
            [`~pipelines.ImagePipelineOutput`] or `tuple`: the images (first element of the tuple); for video
            students an `SCMVideoPipelineOutput` whose `frames` hold the videos.
        """
        text = prompt is not None or prompt_embeds.get("prompt_embeds") is not None
        unknown = [k for k in prompt_embeds if not k.endswith(("prompt_embeds", "attention_mask", "embeds_mask"))]
        if unknown:
            raise TypeError(f"SCMPipeline.__call__ got unexpected keyword arguments {unknown}.")
        family = self.config.get("family_pipeline")
        if family is not None and not text:
            needed = get_family(family).encoding.embeds_with_prompt_embeds
            with_embeds = "".join(f" and `{k}`" for k in needed)
            raise ValueError(
                f"This SCMPipeline is a text-to-image student ({family}): pass `prompt` (a string, or a list with "
                f"one prompt per image) or `prompt_embeds`{with_embeds} as `{family}.encode_prompt` returns them."
            )
        if text and family is not None:  # the given embeddings' shapes, before anything is built from them
            for negative, prefix in ((False, ""), (True, "negative_")):
                given = {
                    key: prompt_embeds.get(prefix + name)
                    for key, name in get_family(family).encoding.embed_names.items()
                }
                self._check_text_shapes(given, prompt_embeds, negative)
        if text:
            n = (
                (1 if isinstance(prompt, str) else len(prompt))
                if prompt is not None
                else prompt_embeds["prompt_embeds"].shape[0]
            )
            if batch_size is not None and batch_size != n:
                raise ValueError(f"`batch_size` {batch_size} differs from the number of prompts ({n}): drop it.")
            batch_size = n
            if isinstance(generator, list) and len(generator) != n:
                raise ValueError(
                    f"Got {len(generator)} generators for {n} prompts: pass one generator per prompt, or a single one."
                )
        batch_size = 1 if batch_size is None else batch_size
        self._check_call_arguments(batch_size, num_inference_steps, timesteps)
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"Unknown output_type {output_type!r}: use 'pil', 'np', 'pt' or 'latent'.")
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(
                f"Callback tensor inputs {bad} are not available; choose from {self._callback_tensor_inputs}."
            )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} images.")

        network, device = self.network, self._execution_device
        dtype = network.dtype
        shape = self._sample_shape(batch_size, height, width, num_frames)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"`latents` has shape {tuple(latents.shape)}, the network expects {shape}.")
        scheduler = self.sampling_scheduler()
        latents = latents.to(device=device, dtype=dtype) * scheduler.init_noise_sigma
        labels = self._class_labels(class_labels, batch_size, device)
        conditioning = {} if labels is None else {"class_labels": labels}
        uncond = None
        from ..schedulers import TrigFlowODEScheduler

        guide = getattr(self, "guidance_model", None)
        guide_scale = None  # w of the guiding network (SPEC.md section 10)
        if guide is not None:
            guide_scale = guidance_scale if guidance_scale is not None else self.config.get("guidance_scale")
            guide_scale = 1.0 if guide_scale is None else float(guide_scale)
        cfg = (
            guide is None
            and guidance_scale is not None
            and guidance_scale != 1.0
            and not self._guidance_input()
            and isinstance(scheduler, TrigFlowODEScheduler)
        )
        if text:
            factor = self.latent_codec().scale_factor
            conditioning, uncond = self.encode_prompt(
                prompt,
                negative_prompt,
                guidance=cfg,
                height=shape[-2] * factor,
                width=shape[-1] * factor,
                **prompt_embeds,
            )
            self._check_text_shapes(conditioning, prompt_embeds)
            if uncond is not None:
                self._check_text_shapes(uncond, prompt_embeds, negative=True)
            # the text encoders' dtype may differ from the network's (a bf16 teacher's encoders, a float32 student)
            conditioning = cast_floating(conditioning, dtype)
            uncond = None if uncond is None else cast_floating(uncond, dtype)
        elif cfg:
            raise ValueError("Classifier-free guidance needs `prompt` (or `prompt_embeds`).")
        if self._guidance_input():
            value = guidance_scale if guidance_scale is not None else self.config.get("guidance_scale") or 3.5
            conditioning["guidance"] = torch.full((batch_size,), float(value), device=device)
        elif guidance_scale not in (None, 1.0) and not cfg and guide is None:
            logger.warning(
                "guidance_scale is ignored: the network has no guidance input, and a consistency student distilled "
                "with guidance samples without classifier-free guidance."
            )

        if timesteps is not None:
            scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            scheduler.set_timesteps(num_inference_steps=num_inference_steps, device=device)
        self._num_timesteps = len(scheduler.timesteps)

        bad_per_step = []  # per step, the number of samples whose network output is not finite
        with self.progress_bar(total=self._num_timesteps) as progress_bar:
            for i, t in enumerate(scheduler.timesteps):
                sample_in, t_in = scheduler.model_inputs(latents, t)
                model_output = call_network(network, sample_in.to(dtype), t_in, **conditioning)
                if uncond is not None:  # classifier-free guidance of a teacher: raw_u + w (raw_c - raw_u)
                    uncond_output = call_network(network, sample_in.to(dtype), t_in, **uncond)
                    model_output = get_adapter(network).guide(model_output, uncond_output, guidance_scale)
                if guide_scale is not None and guide_scale != 1.0:  # EDM2's guidance: raw_g + w (raw - raw_g)
                    # (F is affine in the raw output with the same coefficients for both networks: F_g + w (F - F_g),
                    # D_g + w (D - D_g), SPEC.md section 10)
                    guide_cond = guidance_conditioning(guide, conditioning)
                    guide_output = call_network(guide, sample_in.to(guide.dtype), t_in, **guide_cond)
                    guide_output = guide_output.to(model_output.dtype)
                    model_output = guide_output + guide_scale * (model_output - guide_output)
                bad_per_step.append((~torch.isfinite(model_output)).flatten(1).any(1).sum())
                latents = scheduler.step(model_output, t, latents, generator=generator).prev_sample
                if callback_on_step_end is not None:
                    step_tensors = {"latents": latents}
                    callback_kwargs = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()
        self._warn_non_finite(bad_per_step, scheduler.timesteps, batch_size)

        video = latents.ndim == 5
        if output_type == "latent":
            image = latents
        elif video:  # (B, 3, F, H, W) in [0, 1] -> diffusers' video layouts
            from diffusers.video_processor import VideoProcessor

            processor = VideoProcessor(do_normalize=False)
            image = processor.postprocess_video(self.latents_to_images(latents), output_type=output_type)
        else:
            image = self.image_processor.postprocess(self.latents_to_images(latents), output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        if video:
            return SCMVideoPipelineOutput(frames=image)
        return ImagePipelineOutput(images=image)
