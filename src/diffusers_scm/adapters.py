"""Network adapters: how each diffusers network family is called (DESIGN.md, k-diffusion style).

A parameterization (SPEC.md section 2) gives the network's input `sample` and its time in the convention of the
family's diffusers scheduler (`scheduler.timesteps`: 1000 s for flow matching, the DDPM step index, ln(sigma) / 4 for
EDM, ...). The adapter turns them into the keyword call the family's own pipeline makes, and the network's output back
into the scheduler's convention:

    adapter(model, sample, timestep, **conditioning) -> prediction with the shape of `sample`

`sample` is always the unpacked latent image (B, C, H, W), or (B, C, F, H, W) for video: families that take 2x2-packed
token sequences (Flux, Chroma, Qwen-Image) are packed and unpacked here, with their position ids built from the
latent size when not given. Learned-variance channels are dropped. Each adapter overrides one small method;
`get_adapter(model)` chooses one by the network's class (its MRO), with a fallback for unknown networks that passes
the timestep by keyword. Nothing outside this module special-cases a family. `adapter.guide(cond, uncond, w)` combines
two predictions for classifier-free guidance as the family's pipeline does (linear, uncond + w (cond - uncond), except
Qwen-Image's norm rescale), and `adapter.unused_parameters(model)` names what the prediction never reads (Qwen-Image's
last text-stream output), which training freezes.

`adapter.conditioning_shapes(model)` gives the shapes of the text conditioning a network reads, from its config (the
width of `encoder_hidden_states` and of `pooled_projections`), so that a pipeline can name a wrong-width input before
the network fails on it.

| family (class)                          | time the network takes        | conditioning (keywords)                        |
| --------------------------------------- | ----------------------------- | ---------------------------------------------- |
| UNet2DModel                             | scheduler timestep            | class_labels                                   |
| UNet2DConditionModel (SD 1.5, SDXL)     | scheduler timestep            | encoder_hidden_states, added_cond_kwargs, ...  |
| DiTTransformer2DModel                   | scheduler timestep            | class_labels (learned variance dropped)        |
| PixArtTransformer2DModel                | scheduler timestep            | encoder_hidden_states, encoder_attention_mask  |
| SD3Transformer2DModel                   | 1000 s                        | encoder_hidden_states, pooled_projections      |
| FluxTransformer2DModel (packed)         | s                             | encoder_hidden_states, pooled_projections, guidance |
| ChromaTransformer2DModel (packed)       | s                             | encoder_hidden_states, encoder_attention_mask  |
| QwenImageTransformer2DModel (packed)    | s                             | encoder_hidden_states, encoder_hidden_states_mask |
| SanaTransformer2DModel                  | timestep * config.timestep_scale | encoder_hidden_states, encoder_attention_mask, guidance |
| WanTransformer3DModel (video)           | 1000 s                        | encoder_hidden_states                          |
| Lumina2Transformer2DModel               | 1 - s, output negated         | encoder_hidden_states, encoder_attention_mask  |
| AuraFlowTransformer2DModel              | s                             | encoder_hidden_states                          |
| CogView4Transformer2DModel (families.cogview4) | 1000 s / (s + m (1 - s)), m the time shift | encoder_hidden_states, original_size, target_size, crop_coords |
"""

import dataclasses
import inspect

import torch


__all__ = [
    "ConditioningShape",
    "NetworkAdapter",
    "KeywordAdapter",
    "UNetAdapter",
    "PixArtAdapter",
    "FluxAdapter",
    "ChromaAdapter",
    "QwenImageAdapter",
    "SanaAdapter",
    "UnitTimeAdapter",
    "PackedTokensAdapter",
    "Lumina2Adapter",
    "get_adapter",
    "cast_floating",
    "register_adapter",
    "pack_latents",
    "unpack_latents",
]


def _first_output(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, "sample"):
        return output.sample
    raise TypeError(f"Cannot read a tensor from a network output of type {type(output).__name__}.")


def _per_sample(timestep, sample: torch.Tensor) -> torch.Tensor:
    timestep = torch.as_tensor(timestep, device=sample.device)
    return timestep.expand(sample.shape[0]) if timestep.ndim == 0 else timestep


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): the 2x2 patch tokens of Flux, Chroma and Qwen-Image (their pipelines'
    `_pack_latents`)."""
    if latents.ndim != 4:
        raise ValueError(
            f"pack_latents takes an unpacked latent image (B, C, H, W), got a tensor of shape {tuple(latents.shape)}."
        )
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Packed-token networks need an even latent height and width, got {h}x{w}.")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H/2 * W/2, 4C) -> (B, C, H, W), the inverse of `pack_latents`."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def latent_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Position ids (H/2 * W/2, 3) of the packed tokens: (0, row, column), as Flux's pipeline builds them."""
    rows = torch.arange(height // 2, device=device, dtype=dtype)[:, None].expand(height // 2, width // 2)
    cols = torch.arange(width // 2, device=device, dtype=dtype)[None, :].expand(height // 2, width // 2)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)


@dataclasses.dataclass(frozen=True)
class ConditioningShape:
    """The shape of one conditioning tensor a network reads: `ndim` dimensions, the last of width `width`, which the
    network's config entry `config_key` sets."""

    ndim: int  # 3: text tokens (B, L, D); 2: a pooled embedding (B, D)
    width: int
    config_key: str

    def describe(self) -> str:
        return f"(batch, tokens, {self.width})" if self.ndim == 3 else f"(batch, {self.width})"

    def matches(self, value: torch.Tensor) -> bool:
        return value.ndim == self.ndim and value.shape[-1] == self.width


class NetworkAdapter:
    """
    How one network family is called. `__call__` builds the keyword call with `inputs`, runs the network and reads
    its output with `output`; subclasses override one of `network_time`, `inputs` or `output`.

    Attributes:
        sample_keyword (`str`): the name of the network's input (e.g. "sample" for UNets, "hidden_states").
        timestep_keyword (`str`): the name of its time input.
        text_width_keys (`tuple[str]`): the config entries that may set the width of the text tokens
            (`encoder_hidden_states`), the first one set wins: SD3, Flux, Chroma, Qwen-Image and AuraFlow
            `joint_attention_dim`; Sana and PixArt `caption_channels`; UNets `encoder_hid_dim` (a projection of the
            text) else `cross_attention_dim`; Wan `text_dim`; Lumina 2 `cap_feat_dim`.
    """

    sample_keyword = "hidden_states"
    timestep_keyword = "timestep"
    linear_guidance = True  # `guide` is the plain combination (else: a family's own, e.g. Qwen-Image's rescale)
    text_width_keys = (
        "joint_attention_dim",
        "caption_channels",
        "encoder_hid_dim",
        "cross_attention_dim",
        "text_dim",
        "cap_feat_dim",
    )

    def conditioning_shapes(self, model) -> dict[str, ConditioningShape]:
        """The shapes of the text conditioning `model` reads, from its config: `encoder_hidden_states` (B, L, D) and,
        where the config sets `pooled_projection_dim` (SD3, Flux), `pooled_projections` (B, P). Empty for networks
        that read no text."""
        config = getattr(model, "config", None) or {}
        shapes = {}
        key = next((k for k in self.text_width_keys if _positive_int(config.get(k))), None)
        if key is not None:
            shapes["encoder_hidden_states"] = ConditioningShape(3, config[key], key)
        if _positive_int(config.get("pooled_projection_dim")):
            shapes["pooled_projections"] = ConditioningShape(
                2, config["pooled_projection_dim"], "pooled_projection_dim"
            )
        return shapes

    def network_time(self, model, timestep: torch.Tensor) -> torch.Tensor:
        """The network's time input from the scheduler's timestep (identity by default)."""
        return timestep

    def inputs(self, model, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict) -> dict:
        """The keyword arguments of the network call (a `guidance` input, where given, as one value per sample)."""
        if conditioning.get("guidance") is not None:
            conditioning["guidance"] = _per_sample(conditioning["guidance"], sample).to(sample.dtype)
        return {
            self.sample_keyword: sample,
            self.timestep_keyword: self.network_time(model, timestep),
            **conditioning,
        }

    def output(self, model, out: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The prediction in the scheduler's convention, shaped as `sample`: learned-variance channels (twice the
        input channels, as DiT, PixArt and improved DDPM predict) are dropped."""
        if out.ndim >= 2 and out.shape[1] == 2 * sample.shape[1] and out.shape[2:] == sample.shape[2:]:
            out = out[:, : sample.shape[1]]
        return out

    def unused_parameters(self, model) -> tuple[str, ...]:
        """Name prefixes of `model`'s parameters that its prediction never depends on (none by default). Training
        freezes them: DDP waits for a gradient of every trainable parameter."""
        return ()

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale) -> torch.Tensor:
        """Classifier-free guidance of two predictions (this adapter's outputs at the same input) as the family's
        pipeline combines them: uncond + w (cond - uncond) (SPEC.md section 8). `guidance_scale`: a number or one per
        sample. Where `linear_guidance` holds, this is F_u + w (F_c - F_u) in TrigFlow too (F is affine in the
        prediction)."""
        if isinstance(guidance_scale, torch.Tensor) and guidance_scale.ndim == 1:
            guidance_scale = guidance_scale.to(cond).view(-1, *(1,) * (cond.ndim - 1))
        return uncond + guidance_scale * (cond - uncond)

    def __call__(self, model, sample: torch.Tensor, timestep, **conditioning) -> torch.Tensor:
        work = _network_dtype(model, sample)
        if work is not None:  # a half-precision network (a frozen bf16 teacher): its inputs in its dtype
            out_dtype, sample = sample.dtype, sample.to(work)
            conditioning = cast_floating(conditioning, work)
            return self(model, sample, timestep, **conditioning).to(out_dtype)
        kwargs = self.inputs(model, sample, _per_sample(timestep, sample), dict(conditioning))
        how = f"with {sorted(kwargs)} through {type(self).__name__}"
        return self.output(model, _call(model, (), kwargs, how), sample)

    def __repr__(self):
        return f"{type(self).__name__}()"


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _network_dtype(model, sample: torch.Tensor):
    """The dtype to cast inputs to: a half-precision network's own, where the sample is wider; else None."""
    dtype = getattr(model, "dtype", None)
    if dtype in (torch.float16, torch.bfloat16) and sample.dtype != dtype and not torch.is_autocast_enabled():
        return dtype
    return None


def cast_floating(value, dtype):
    """`value` (a tensor or a nested dict of them) with its floating tensors cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: cast_floating(v, dtype) for k, v in value.items()}
    return value


def _call(model, args: tuple, kwargs: dict, how: str) -> torch.Tensor:
    """`model(*args, **kwargs)` (with `return_dict=False` where it takes one) and its prediction tensor; a call with
    arguments the network does not take is an error naming the network and the fix."""
    if _accepts(model, "return_dict"):
        kwargs = {**kwargs, "return_dict": False}
    try:
        return _first_output(model(*args, **kwargs))
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise TypeError(
            f"Cannot call {type(model).__name__} {how} ({e}). Pass the conditioning under the names of its forward() "
            "arguments, or register an adapter for this network with `diffusers_scm.adapters.register_adapter`."
        ) from e


def _accepts(model, name: str) -> bool:
    try:
        params = inspect.signature(getattr(model, "forward", model)).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


class UNetAdapter(NetworkAdapter):
    """UNet2DModel, UNet2DConditionModel (SD 1.5, SDXL with `added_cond_kwargs`), SCMUNet2DModel: `sample=`."""

    sample_keyword = "sample"


class PixArtAdapter(NetworkAdapter):
    """PixArt-Alpha/Sigma: `added_cond_kwargs` defaults to no resolution/aspect-ratio conditioning, as the pipeline
    passes for models without additional conditions."""

    def inputs(self, model, sample, timestep, conditioning):
        conditioning.setdefault("added_cond_kwargs", {"resolution": None, "aspect_ratio": None})
        return super().inputs(model, sample, timestep, conditioning)


class UnitTimeAdapter(NetworkAdapter):
    """Flow networks that take the flow time s in [0, 1] (their pipelines pass `timestep / 1000`): AuraFlow."""

    def network_time(self, model, timestep):
        return timestep / 1000


class PackedTokensAdapter(UnitTimeAdapter):
    """Networks that take 2x2-packed token sequences and the flow time s: the sample is packed, the prediction
    unpacked; `position_inputs` adds the family's position inputs built from the latent size."""

    def position_inputs(self, sample, conditioning: dict) -> dict:
        return conditioning

    def inputs(self, model, sample, timestep, conditioning):
        if sample.ndim != 4:
            packed = " (a packed token sequence, as the family's own pipeline passes it)" if sample.ndim == 3 else ""
            raise ValueError(
                f"{type(model).__name__} takes the unpacked latent image (B, C, H, W) here, the state that training "
                f"and sampling carry; its adapter packs it into 2x2 tokens. Got shape {tuple(sample.shape)}{packed}: "
                "unpack it first with `diffusers_scm.adapters.unpack_latents(tokens, height, width)` (the latent "
                "height and width)."
            )
        conditioning = self.position_inputs(sample, conditioning)
        return super().inputs(model, pack_latents(sample), timestep, conditioning)

    def output(self, model, out, sample):
        return unpack_latents(out, *sample.shape[-2:])


class FluxAdapter(PackedTokensAdapter):
    """Flux.1: `img_ids` / `txt_ids` built from the latent size and the text length when not given; `guidance`
    (guidance-distilled models) is passed through, one value per sample."""

    def position_inputs(self, sample, conditioning):
        h, w = sample.shape[-2:]
        conditioning.setdefault("img_ids", latent_image_ids(h, w, sample.device, sample.dtype))
        text = conditioning.get("encoder_hidden_states")
        if text is not None:
            conditioning.setdefault("txt_ids", torch.zeros(text.shape[1], 3, device=sample.device, dtype=sample.dtype))
        return conditioning


class ChromaAdapter(FluxAdapter):
    """Chroma: Flux's packing and ids, no pooled projections or guidance input. A text padding mask given as
    `encoder_attention_mask` (B, L) is extended with the image tokens into the joint `attention_mask`, as its pipeline
    does (`ChromaPipeline._prepare_attention_mask`, in the mask's own dtype: the pipeline's mask is floating, 1 and 0,
    which its attention adds to the scores rather than masking, and a student learns that network)."""

    def position_inputs(self, sample, conditioning):
        text_mask = conditioning.pop("encoder_attention_mask", None)
        if text_mask is not None:
            image_tokens = sample.shape[-2] * sample.shape[-1] // 4
            ones = torch.ones(sample.shape[0], image_tokens, device=text_mask.device, dtype=torch.bool)
            conditioning["attention_mask"] = torch.cat([text_mask, ones], dim=1)
        return super().position_inputs(sample, conditioning)


class QwenImageAdapter(PackedTokensAdapter):
    """Qwen-Image: `img_shapes` from the latent size when not given. Its pipeline's true classifier-free guidance
    rescales the combined prediction per packed token to the norm of the conditional one (`guide`)."""

    linear_guidance = False

    def position_inputs(self, sample, conditioning):
        h, w = sample.shape[-2:]
        conditioning.setdefault("img_shapes", [[(1, h // 2, w // 2)]] * sample.shape[0])
        return conditioning

    def unused_parameters(self, model):
        """The last block's text-stream output (`attn.to_add_out`, `txt_mlp`): the prediction reads the image stream."""
        last = f"transformer_blocks.{len(model.transformer_blocks) - 1}."
        return (last + "attn.to_add_out.", last + "txt_mlp.")

    def guide(self, cond, uncond, guidance_scale):
        """`QwenImagePipeline`'s `true_cfg_scale`: comb = uncond + w (cond - uncond), then comb |cond| / |comb|, the
        norms over each packed token's channels (its 2x2 patch of C latent channels)."""
        combined = super().guide(cond, uncond, guidance_scale)
        c, g = pack_latents(cond), pack_latents(combined)
        rescaled = g * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(g, dim=-1, keepdim=True))
        return unpack_latents(rescaled, *cond.shape[-2:])


class SanaAdapter(NetworkAdapter):
    """Sana: the pipeline multiplies the scheduler's timestep by `config.timestep_scale`."""

    def network_time(self, model, timestep):
        return timestep * model.config.get("timestep_scale", 1.0)


class Lumina2Adapter(NetworkAdapter):
    """Lumina-Image 2.0: time 1 - s (data at 1) and the negated velocity x0 - n (its pipeline negates it). Its
    pipeline's guidance at its defaults (`cfg_normalization=True`, `cfg_trunc_ratio=1.0`) rescales the combination
    to the conditional prediction's norm over the last axis (`guide`)."""

    linear_guidance = False

    def network_time(self, model, timestep):
        return 1 - timestep / 1000

    def inputs(self, model, sample, timestep, conditioning):
        text = conditioning.get("encoder_hidden_states")
        mask = conditioning.get("encoder_attention_mask")
        if text is not None and mask is None:  # a required argument
            conditioning["encoder_attention_mask"] = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        elif mask is not None and mask.is_floating_point():
            # integers, as the pipeline passes the tokenizer's (the network counts the text tokens from it); a mask
            # read back from the latent cache is floating point
            conditioning["encoder_attention_mask"] = mask.round().long()
        return super().inputs(model, sample, timestep, conditioning)

    def output(self, model, out, sample):
        return -super().output(model, out, sample)

    def guide(self, cond, uncond, guidance_scale):
        """comb = uncond + w (cond - uncond), then comb |cond| / |comb|, the norms over the last axis (the latent
        image's width), as `Lumina2Pipeline.__call__` (SPEC.md section 8)."""
        combined = super().guide(cond, uncond, guidance_scale)
        return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


class KeywordAdapter(NetworkAdapter):
    """Fallback for networks without an adapter: the sample positionally, the time by keyword (`timestep`, or
    `timesteps`), or positionally when the network names it otherwise (plain modules `forward(x, t)`)."""

    def __call__(self, model, sample, timestep, **conditioning):
        timestep = _per_sample(timestep, sample)
        kwargs = dict(conditioning)
        try:
            params = inspect.signature(getattr(model, "forward", model)).parameters
        except (TypeError, ValueError):
            params = {}
        keyword = next((k for k in ("timestep", "timesteps") if k in params), None)
        args = (sample,) if keyword else (sample, timestep)
        if keyword:
            kwargs[keyword] = timestep
        how = f"as model(sample, timestep, **{sorted(conditioning)}) (it has no adapter in diffusers_scm.adapters)"
        return self.output(model, _call(model, args, kwargs, how), sample)


_ADAPTERS: dict[str, NetworkAdapter] = {
    "UNet2DModel": UNetAdapter(),
    "UNet2DConditionModel": UNetAdapter(),
    "SCMUNet2DModel": UNetAdapter(),
    "EDM2UNet2DModel": UNetAdapter(),  # EDM and EDM2 networks: timestep = c_noise, class_labels
    "SongUNet2DModel": UNetAdapter(),
    "DhariwalUNet2DModel": UNetAdapter(),
    "DiTTransformer2DModel": NetworkAdapter(),
    "Transformer2DModel": NetworkAdapter(),
    "PixArtTransformer2DModel": PixArtAdapter(),
    "SD3Transformer2DModel": NetworkAdapter(),
    "FluxTransformer2DModel": FluxAdapter(),
    "ChromaTransformer2DModel": ChromaAdapter(),
    "QwenImageTransformer2DModel": QwenImageAdapter(),
    "SanaTransformer2DModel": SanaAdapter(),
    "WanTransformer3DModel": NetworkAdapter(),
    "Lumina2Transformer2DModel": Lumina2Adapter(),
    "AuraFlowTransformer2DModel": UnitTimeAdapter(),
}
_FALLBACK = KeywordAdapter()


def register_adapter(network_class: str | type, adapter: NetworkAdapter):
    """Use `adapter` for networks of `network_class` (a class or its name) and its subclasses."""
    name = network_class if isinstance(network_class, str) else network_class.__name__
    _ADAPTERS[name] = adapter


def get_adapter(model) -> NetworkAdapter:
    """The adapter of `model`'s class or its nearest registered base class (DDP / compiled wrappers are looked
    through; adapters registered by the family modules of `diffusers_scm.families` included), else the keyword
    fallback."""
    from .families import family_names
    from .jvp import unwrap_model

    family_names()  # the family modules register their networks' adapters when first imported
    for cls in type(unwrap_model(model)).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    return _FALLBACK
