"""Training batches of text-to-image distillation (SPEC.md section 8): captions and images become the teacher's
latents x0, the prompt conditioning, the unconditional conditioning of classifier-free guidance and the guidance
scale of each sample, either on the fly (teacher's VAE and text encoders) or from a cache written once by
`examples/prepare_data.py` (then neither is loaded).

The cache is a `datasets` Arrow dataset saved with `save_to_disk`: one row per image with `latents` and the
conditioning tensors under flattened names (`cond.encoder_hidden_states`, `cond.added_cond_kwargs.text_embeds`, ...),
beside `cache_info.json` (family, resolution, teacher) and `uncond.safetensors` (the empty prompt's conditioning).
"""

import json
import logging
import os

import torch

from ..adapters import cast_floating


__all__ = ["TextBatches", "flatten_conditioning", "unflatten_conditioning", "write_cache", "load_cache", "sample_ode"]

logger = logging.getLogger(__name__)

CACHE_INFO = "cache_info.json"
UNCOND_FILE = "uncond.safetensors"


def flatten_conditioning(cond: dict, prefix: str = "cond") -> dict:
    """`{"cond.a": tensor, "cond.b.c": tensor}` from a nested conditioning dict (tensors only)."""
    out = {}
    for key, value in cond.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            out.update(flatten_conditioning(value, name))
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


def unflatten_conditioning(flat: dict, prefix: str = "cond") -> dict:
    """The inverse of `flatten_conditioning` for the keys under `prefix`."""
    out = {}
    for name, value in flat.items():
        if not name.startswith(prefix + "."):
            continue
        parts = name[len(prefix) + 1 :].split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


@torch.no_grad()
def sample_ode(denoiser, x_T, cond, uncond=None, guidance_scale=1.0, num_inference_steps=16, solver="dpmsolver++"):
    """x0 from the teacher's guided probability-flow ODE (SPEC.md sections 1 and 8) from x_T = sd n at t_max:
    `TrigFlowODEScheduler` steps on F = F_c + (w - 1)(F_c - F_u)."""
    from ..schedulers import TrigFlowODEScheduler

    # the denoiser answers in TrigFlow F whatever the network's family: a "trigflow" sampler steps it
    scheduler = TrigFlowODEScheduler(parameterization="trigflow", sigma_data=denoiser.sigma_data, solver=solver)
    scheduler.set_timesteps(num_inference_steps, device=x_T.device)
    x = x_T
    for t in scheduler.timesteps:
        tb = t.expand(x.shape[0]).to(x)
        F = denoiser(x, tb, **cond)
        if uncond is not None and guidance_scale != 1.0:
            F = F + (guidance_scale - 1.0) * (F - denoiser(x, tb, **uncond))
        x = scheduler.step(F, t, x).prev_sample
    return x


class TextBatches:
    """
    Turns a data loader batch into `(x0, cond, uncond, teacher_guidance)` for the losses.

    Args:
        teacher (`TextToImageTeacher`, *optional*): for on-the-fly encoding and prompt-only data (None from a cache).
        guidance_scale (`float`): the teacher's classifier-free guidance scale (1: no unconditional pass).
        guidance_range (`tuple[float, float]`, *optional*): draw w per sample; it goes to the student's and teacher's
            guidance input (`guidance`) and, for a teacher without one, to classifier-free guidance.
        teacher_guidance_input (`bool`): the teacher's network takes `guidance` (Flux.1-dev).
        uncond (`dict`, *optional*): the cached unconditional conditioning (one row, expanded to the batch).
        resolution (`int`): image size in pixels (SDXL's micro-conditioning).
        ode_steps (`int`): teacher ODE steps for prompt-only data.
    """

    def __init__(
        self,
        teacher=None,
        guidance_scale: float = 1.0,
        guidance_range=None,
        teacher_guidance_input: bool = False,
        uncond: dict | None = None,
        resolution: int | None = None,
        ode_steps: int = 16,
    ):
        self.teacher, self.guidance_scale, self.guidance_range = teacher, float(guidance_scale), guidance_range
        self.teacher_guidance_input = teacher_guidance_input
        self.cached_uncond, self.resolution, self.ode_steps = uncond, resolution, ode_steps

    @property
    def needs_uncond(self) -> bool:
        if self.teacher_guidance_input:  # guidance-distilled teacher: its guidance input, no unconditional pass
            return False
        return self.guidance_range is not None or self.guidance_scale != 1.0

    def encode(self, captions: list[str], device) -> tuple[dict, dict | None]:
        """The conditioning of `captions` through the teacher's `encode_prompt` (cond, uncond)."""
        return self.teacher.encoding.encode(
            list(captions), device=device, guidance=True, height=self.resolution, width=self.resolution
        )

    def __call__(self, batch: dict, device, generator: torch.Generator | None = None):
        if "latents" in batch:  # from the cache
            x0 = batch["latents"].to(device, torch.float32)
            cond = _to(unflatten_conditioning(batch), device)
            uncond = None
            if self.needs_uncond:
                uncond = _expand(_to(self.cached_uncond, device), x0.shape[0])
        else:
            cond, uncond = self.encode(batch["caption"], device)
            x0 = None if "pixel_values" not in batch else self.teacher.codec.encode(batch["pixel_values"].to(device))
        # float32 conditioning for the float32 student (a bf16 teacher's adapter casts its own inputs down)
        cond, uncond = cast_floating(cond, torch.float32), cast_floating(uncond, torch.float32)
        n = next(iter(flatten_conditioning(cond).values())).shape[0]
        w = self._guidance(n, device, generator)
        teacher_guidance = self.guidance_scale
        if self.guidance_range is not None:
            cond["guidance"] = w
            teacher_guidance = 1.0 if self.teacher_guidance_input else w
            if uncond is not None:
                uncond["guidance"] = w
        elif self.teacher_guidance_input:
            cond["guidance"] = torch.full((n,), self.guidance_scale, device=device)
            teacher_guidance = 1.0
        if not self.needs_uncond:
            uncond = None
        if x0 is None:  # prompt-only data: x0 from the teacher's own guided ODE
            x0 = self.ode_latents(cond, uncond, teacher_guidance, n, device, generator)
        if not getattr(self, "_logged_std", False):  # sigma_data is a property of the latents (SPEC.md section 8)
            self._logged_std = True
            logger.info("Latent std of the first batch: %.4f (sigma_data is set separately).", float(x0.float().std()))
        return x0.float(), cond, uncond, teacher_guidance

    def _guidance(self, n, device, generator):
        if self.guidance_range is None:
            return None
        lo, hi = self.guidance_range
        u = torch.rand(n, generator=generator, device=generator.device if generator is not None else device)
        return (lo + (hi - lo) * u).to(device)

    def ode_latents(self, cond, uncond, guidance, n, device, generator):
        codec, denoiser = self.teacher.codec, self.teacher.denoiser
        size = self.resolution // codec.scale_factor
        noise = torch.randn(
            (n, codec.latent_channels, size, size),
            generator=generator,
            device=generator.device if generator else device,
        ).to(device)
        w = guidance if isinstance(guidance, torch.Tensor) else float(guidance)
        if isinstance(w, torch.Tensor):  # a range: one ODE per distinct w is too costly; use the batch mean
            w = float(w.mean())
        return sample_ode(denoiser, denoiser.sigma_data * noise, cond, uncond, w, self.ode_steps)


def _to(cond, device):
    if cond is None:
        return None
    return {k: (_to(v, device) if isinstance(v, dict) else v.to(device)) for k, v in cond.items()}


def _expand(cond, n):
    return {k: (_expand(v, n) if isinstance(v, dict) else v.expand(n, *v.shape[1:])) for k, v in cond.items()}


@torch.no_grad()
def write_cache(dataset, teacher, folder: str, batch_size: int = 8, device="cpu", resolution: int | None = None):
    """Encode every image to latents and every caption to the family's conditioning once, with the teacher's VAE and
    the pipeline's own `encode_prompt`, into a `datasets` Arrow dataset at `folder` (see the module docstring).
    Prompt-only data gets x0 from the teacher's ODE. Returns the number of rows."""
    import datasets
    from safetensors.torch import save_file

    batches = TextBatches(teacher, resolution=resolution)
    rows = []
    generator = torch.Generator(device=device).manual_seed(0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:
        x0, cond, _, _ = batches(batch, device, generator)
        flat = flatten_conditioning(cond)
        for i in range(x0.shape[0]):
            row = {"latents": x0[i].cpu().numpy(), "caption": batch["caption"][i]}
            row.update({k: v[i].float().cpu().numpy() for k, v in flat.items()})
            rows.append(row)
    _, uncond = batches.encode([""], device)
    os.makedirs(folder, exist_ok=True)
    datasets.Dataset.from_list(rows).save_to_disk(os.path.join(folder, "data"))
    save_file(
        {k: v.float().contiguous().cpu() for k, v in flatten_conditioning(uncond).items()},
        os.path.join(folder, UNCOND_FILE),
    )
    info = {
        "family": teacher.family,
        "resolution": resolution,
        "num_rows": len(rows),
        "sigma_data_measured": _std(rows),
    }
    with open(os.path.join(folder, CACHE_INFO), "w") as f:
        json.dump(info, f, indent=2)
    logger.info("Cached %d rows in %s (latent std %.4f).", len(rows), folder, info["sigma_data_measured"])
    return len(rows)


def _std(rows) -> float:
    import numpy as np

    return float(np.concatenate([r["latents"].ravel() for r in rows[:512]]).std()) if rows else float("nan")


def load_cache(folder: str):
    """`(dataset, uncond, info)` of a cache written by `write_cache`: a torch-formatted Arrow dataset, the
    unconditional conditioning (one row) and `cache_info.json`."""
    import datasets
    from safetensors.torch import load_file

    from ..utils import read_json

    info_path = os.path.join(folder, CACHE_INFO)
    if not os.path.isfile(info_path):
        raise ValueError(f"{folder} is not a cache written by prepare_data.py (no {CACHE_INFO}).")
    data = datasets.load_from_disk(os.path.join(folder, "data")).with_format("torch")
    data = data.remove_columns([c for c in data.column_names if c == "caption"])
    uncond = unflatten_conditioning(load_file(os.path.join(folder, UNCOND_FILE)))
    return data, uncond, read_json(info_path)
