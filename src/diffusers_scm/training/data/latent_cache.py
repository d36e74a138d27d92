"""Training batches of text-to-image distillation (SPEC.md section 8): captions and images become the teacher's
latents x0, the prompt conditioning, the unconditional conditioning of classifier-free guidance and the guidance
scale of each sample, either on the fly (teacher's VAE and text encoders) or from a cache written once by
`examples/prepare_data.py` (then neither is loaded).

The cache is a `datasets` Arrow dataset saved with `save_to_disk`: one row per image with `latents` and the
conditioning tensors under flattened names (`cond.encoder_hidden_states`, `cond.added_cond_kwargs.text_embeds`, ...),
beside `uncond.safetensors` (the empty prompt's conditioning) and `cache_info.json`, written last: what the cache was
made with (format version, family, teacher and revision, the class and config hash of its VAE, text encoders and
tokenizers, resolution, dtype, sequence length), its row count and the size of each data file. A cache is built in a
temporary folder and swapped in whole, so an interrupted write leaves the previous cache as it was; `load_cache`
refuses a folder whose files do not match its `cache_info.json`, or that was made with other settings than the run's.
"""

import hashlib
import json
import logging
import os

import torch

from ...adapters import cast_floating
from ...conditioning import TEXT_COMPONENTS


__all__ = [
    "TextBatches",
    "flatten_conditioning",
    "unflatten_conditioning",
    "teacher_record",
    "cache_problem",
    "write_cache",
    "load_cache",
    "sample_ode",
]

logger = logging.getLogger(__name__)

CACHE_INFO = "cache_info.json"
UNCOND_FILE = "uncond.safetensors"
CACHE_DATA = "data"
CACHE_FORMAT = 2  # cache_info.json's format_version: 2 records the settings, the data file sizes and `complete`
# the components whose config a cache records: they make the latents and the conditioning
CACHE_COMPONENTS = ("vae", *TEXT_COMPONENTS)
# the settings a cache records and the flag of distill.py that sets each
CACHE_FLAGS = {
    "family": "--teacher",
    "teacher": "--teacher",
    "teacher_revision": "--teacher_revision",
    "components": "--teacher",
    "resolution": "--resolution",
    "dtype": "--teacher_dtype",
    "num_frames": "--num_frames",
}


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
    from ...denoiser import combine_guidance
    from ...schedulers import TrigFlowODEScheduler

    # the denoiser answers in TrigFlow F whatever the network's family: a "trigflow" sampler steps it
    scheduler = TrigFlowODEScheduler(parameterization="trigflow", sigma_data=denoiser.sigma_data, solver=solver)
    scheduler.set_timesteps(num_inference_steps, device=x_T.device)
    x = x_T
    for t in scheduler.timesteps:
        tb = t.expand(x.shape[0]).to(x)
        if uncond is not None and guidance_scale != 1.0 and hasattr(denoiser, "guided"):
            F = denoiser.guided(x, tb, guidance_scale, cond, uncond)  # as the family's pipeline guides (Qwen-Image)
        else:
            F = denoiser(x, tb, **cond)
            if uncond is not None and guidance_scale != 1.0:
                F = combine_guidance(F, denoiser(x, tb, **uncond), guidance_scale)
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
        num_frames (`int`, *optional*): video teachers: frames per clip (the latent shape of prompt-only data's ODE
            samples, through the video codec's `latent_shape`).
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
        num_frames: int | None = None,
    ):
        self.num_frames = num_frames
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
        shape = (n, codec.latent_channels, size, size)
        if self.num_frames is not None:  # a video teacher: (n, C, F', h, w)
            shape = codec.latent_shape(n, self.resolution, self.resolution, self.num_frames)
        noise = torch.randn(
            shape,
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


def _config_hash(path: str | None) -> str | None:
    """sha256 of a component's config file (`config.json`, `tokenizer_config.json`) without the entries that name or
    date it (`_name_or_path`, versions) or give its dtype (recorded on its own); None where there is no such file."""
    from ...utils import read_json

    if path is None or not os.path.isfile(path):
        return None
    config = read_json(path)
    skip = {"transformers_version", "dtype", "torch_dtype", "name_or_path"}
    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in skip}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def teacher_record(teacher: str | None, revision: str | None = None) -> dict:
    """
    The teacher's part of what a cache records, read from the pipeline's `model_index.json` and its components'
    config files (nothing is loaded): `{"teacher", "teacher_revision", "family", "components"}`, where `components`
    maps the VAE, the text encoders and the tokenizers to `{"class", "config_sha256"}`.

    Args:
        teacher (`str`, *optional*): the pipeline folder (recorded as an absolute path) or Hub id.
        revision (`str`, *optional*): the Hub revision.
    """
    from ...hub.folders import _hub_file, local_folder
    from ...utils import read_json

    folder = None if teacher is None else local_folder(teacher)

    def file(name):
        if folder is not None:
            return os.path.join(folder, name)
        return None if teacher is None else _hub_file(teacher, name, revision=revision)

    index_path = file("model_index.json")
    index = read_json(index_path) if index_path is not None and os.path.isfile(index_path) else {}
    components = {}
    for name in CACHE_COMPONENTS:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            continue
        config = "tokenizer_config.json" if name.startswith("tokenizer") else "config.json"
        components[name] = {"class": entry[1], "config_sha256": _config_hash(file(f"{name}/{config}"))}
    return {
        "teacher": os.path.abspath(folder) if folder is not None else teacher,
        "teacher_revision": revision,
        "family": index.get("_class_name"),
        "components": components,
    }


def _check_replaceable(folder: str):
    """Writing a cache replaces its whole folder: refuse a folder that holds anything else."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"--cache_dir {folder} is a file: pass a new or empty folder (or an existing cache).")
    if not os.path.isdir(folder):
        return
    foreign = sorted(set(os.listdir(folder)) - {CACHE_DATA, CACHE_INFO, UNCOND_FILE})
    if foreign:
        raise ValueError(
            f"--cache_dir {folder} holds other files than a cache ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}): writing the cache replaces the whole folder, so pass a new or "
            "empty folder."
        )


def _file_sizes(folder: str) -> dict:
    """`{relative path: bytes}` of the cache's data files and unconditional conditioning."""
    sizes = {}
    for root, _, names in os.walk(os.path.join(folder, CACHE_DATA)):
        for name in names:
            path = os.path.join(root, name)
            sizes[os.path.relpath(path, folder).replace(os.sep, "/")] = os.path.getsize(path)
    sizes[UNCOND_FILE] = os.path.getsize(os.path.join(folder, UNCOND_FILE))
    return dict(sorted(sizes.items()))


@torch.no_grad()
def _check_equal_lengths(rows: list[dict], family: str):
    """Every cached row's text conditioning must have one shape: training batches stack rows written from different
    encode batches. A family whose `encode_prompt` pads each batch to its longest prompt and runs the padding through
    the text encoder (CogView4) gives rows of different lengths, which no mask can join."""
    for key in (k for k in rows[0] if k not in ("latents", "caption")):
        shapes = {tuple(getattr(r[key], "shape", ())) for r in rows}
        if len(shapes) > 1:
            raise ValueError(
                f"{family}'s encode_prompt gave the cached conditioning {key!r} {len(shapes)} different shapes "
                f"({sorted(shapes)[:4]}): it pads each batch of captions to its longest caption, so rows encoded in "
                "different batches cannot be stacked into one training batch. Encode every caption in one batch "
                "(prepare_data.py --batch_size at least the number of captions), or train without a cache."
            )


def write_cache(
    dataset,
    teacher,
    folder: str,
    batch_size: int = 8,
    device="cpu",
    resolution: int | None = None,
    teacher_name: str | None = None,
    teacher_revision: str | None = None,
    dataset_name: str | None = None,
    caption_column: str = "text",
    num_frames: int | None = None,
):
    """
    Encode every image to latents and every caption to the family's conditioning once, with the teacher's VAE and
    the pipeline's own `encode_prompt`, into a `datasets` Arrow dataset at `folder` (see the module docstring).
    Prompt-only data gets x0 from the teacher's ODE. The cache is written in `folder + ".tmp"` and then takes the
    place of `folder` whole (replacing an earlier cache there), `cache_info.json` last. Returns the number of rows.

    Args:
        dataset (`Dataset`): captioned images (`load_text_image_dataset`).
        teacher (`TextToImageTeacher`): its VAE and text encoders encode the data.
        folder (`str`): the cache folder: new, empty, or an earlier cache (anything else is refused).
        batch_size (`int`), device: of the encoding.
        resolution (`int`, *optional*): the images' size in pixels.
        teacher_name (`str`, *optional*), teacher_revision (`str`, *optional*): the pipeline folder or Hub id the
            teacher was loaded from, recorded with the class and config hash of its components (default: the
            pipeline's `_name_or_path`).
        dataset_name (`str`, *optional*), caption_column (`str`): the data, recorded for the rebuild command.
        num_frames (`int`, *optional*): video teachers: frames per clip (recorded; the latents are 5-D).
    """
    import datasets
    from safetensors.torch import save_file

    from ...families import prompt_sequence_length
    from ...utils import atomic_folder

    _check_replaceable(folder)
    record = teacher_record(teacher_name or teacher.pipeline.config.get("_name_or_path"), teacher_revision)
    batches = TextBatches(teacher, resolution=resolution, num_frames=num_frames)
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
    _check_equal_lengths(rows, type(teacher.pipeline).__name__)
    _, uncond = batches.encode([""], device)
    with atomic_folder(folder) as tmp:  # an interrupted write leaves the earlier cache as it was
        datasets.Dataset.from_list(rows).save_to_disk(os.path.join(tmp, CACHE_DATA))
        save_file(
            {k: v.float().contiguous().cpu() for k, v in flatten_conditioning(uncond).items()},
            os.path.join(tmp, UNCOND_FILE),
        )
        info = {
            "format_version": CACHE_FORMAT,
            **record,
            "resolution": resolution,
            "num_frames": num_frames,
            "dtype": str(teacher.pipeline.dtype).removeprefix("torch."),
            "max_sequence_length": prompt_sequence_length(teacher.pipeline),
            "dataset": {"name": dataset_name, "caption_column": caption_column},
            "num_rows": len(rows),
            "sigma_data_measured": _std(rows),
            "files": _file_sizes(tmp),
            "complete": True,  # written last: a folder without it was cut off
        }
        with open(os.path.join(tmp, CACHE_INFO), "w") as f:
            json.dump(info, f, indent=2)
    logger.info("Cached %d rows in %s (latent std %.4f).", len(rows), folder, info["sigma_data_measured"])
    return len(rows)


def _std(rows) -> float:
    import numpy as np

    return float(np.concatenate([r["latents"].ravel() for r in rows[:512]]).std()) if rows else float("nan")


def _rebuild_hint(folder: str, info: dict | None, expected: dict | None) -> str:
    """The commands that write the cache again: the run's settings where given, else the recorded ones."""
    known = {**(info or {}), **{k: v for k, v in (expected or {}).items() if v is not None}}
    data = (info or {}).get("dataset") or {}
    command = f"python examples/prepare_data.py --teacher {known.get('teacher') or 'TEACHER'}"
    if known.get("teacher_revision"):
        command += f" --teacher_revision {known['teacher_revision']}"
    command += f" --dataset_name {data.get('name') or 'DATA'}"
    if data.get("caption_column", "text") != "text":
        command += f" --caption_column {data['caption_column']}"
    command += f" --resolution {known.get('resolution') or 'RESOLUTION'}"
    if known.get("num_frames"):
        command += f" --num_frames {known['num_frames']}"
    if known.get("dtype", "float32") != "float32":
        command += f" --teacher_dtype {known['dtype']}"
    return f"Rebuild it with `{command} --cache_dir {folder}`, or add --rebuild_cache to distill.py."


def _component_changes(made: dict, run: dict) -> list[str]:
    """The components whose class or config differs (where both hashes are known)."""
    changed = []
    for name in sorted(set(made) | set(run)):
        a, b = made.get(name), run.get(name)
        if a is None or b is None or a.get("class") != b.get("class"):
            changed.append(name)
        elif None not in (a.get("config_sha256"), b.get("config_sha256")) and a["config_sha256"] != b["config_sha256"]:
            changed.append(name)
    return changed


def _inspect_cache(folder: str, expected: dict | None) -> tuple[str | None, dict | None]:
    """`(problem or None, cache_info or None)`: see `cache_problem`."""
    from ...utils import read_json

    if not os.path.isdir(folder):
        return f"There is no cache at {folder}.", None
    info_path = os.path.join(folder, CACHE_INFO)
    if not os.path.isfile(info_path):
        return f"{folder} holds no complete cache: it has no {CACHE_INFO} (the file written last).", None
    try:
        info = read_json(info_path, fix="")
    except ValueError as e:
        return str(e).strip(), None
    if not isinstance(info, dict) or info.get("format_version") != CACHE_FORMAT:
        version = info.get("format_version") if isinstance(info, dict) else None
        return (
            f"{folder} was written by another version of diffusers-scm (cache format {version}; this version reads "
            f"format {CACHE_FORMAT}, which records the settings and file sizes that make a cache checkable).",
            None,
        )
    if info.get("complete") is not True:
        return f"{folder} is incomplete: its {CACHE_INFO} is not marked complete.", info
    for name, size in info.get("files", {}).items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return f"{folder} is incomplete: {name} is missing.", info
        if os.path.getsize(path) != size:
            return (
                f"{folder} is incomplete or damaged: {name} has {os.path.getsize(path)} bytes, {CACHE_INFO} records "
                f"{size}.",
                info,
            )
    if not expected:
        return None, info
    differences = []
    for key, flag in CACHE_FLAGS.items():
        if key not in expected:
            continue
        made, run = info.get(key), expected[key]
        if key == "components":
            changed = _component_changes(made, run) if made and run else []  # {}: model_index.json unreadable
            if changed:
                differences.append(
                    f"{flag} {expected.get('teacher')}: its {', '.join(changed)} (class or config) differ from those "
                    "the cache was made with"
                )
        elif key == "family":
            if None not in (made, run) and made != run:
                differences.append(f"it was made with a {made} teacher, this run's {flag} is a {run}")
        elif made != run:
            differences.append(f"it was made with {flag} {made}, this run has {flag} {run}")
    if differences:
        return (
            f"The cache {folder} was made with other settings than this run's: {'; '.join(differences)}. Pass the "
            "cache's values, or rebuild it for this run.",
            info,
        )
    return None, info


def cache_problem(folder: str, expected: dict | None = None) -> str | None:
    """
    What is wrong with the cache at `folder`, or None where it is complete and (with `expected`) was made with the
    run's settings: a missing folder or `cache_info.json`, another cache format, data files whose sizes differ from
    the recorded ones, or settings that differ from `expected` (each named by its flag in `CACHE_FLAGS`, with both
    values).

    Args:
        folder (`str`): the cache folder.
        expected (`dict`, *optional*): the run's settings: `teacher_record(...)` with `resolution` and `dtype`.
    """
    return _inspect_cache(folder, expected)[0]


def load_cache(folder: str, expected: dict | None = None):
    """
    `(dataset, uncond, info)` of a cache written by `write_cache`: a torch-formatted Arrow dataset, the unconditional
    conditioning (one row) and `cache_info.json`.

    Args:
        folder (`str`): the cache folder.
        expected (`dict`, *optional*): the run's settings (see `cache_problem`).

    Raises:
        `ValueError`: the cache is missing, incomplete, damaged or was made with other settings than `expected`; the
            error names the folder (and the flag and both values of a mismatch) and the command that rebuilds it.
    """
    import datasets
    from safetensors.torch import load_file

    problem, info = _inspect_cache(folder, expected)
    if problem is not None:
        raise ValueError(f"{problem} {_rebuild_hint(folder, info, expected)}")
    try:
        data = datasets.load_from_disk(os.path.join(folder, CACHE_DATA)).with_format("torch")
        uncond = unflatten_conditioning(load_file(os.path.join(folder, UNCOND_FILE)))
    except Exception as e:  # Arrow and safetensors raise OSError, ArrowInvalid, SafetensorError, ... for damaged files
        raise ValueError(
            f"Cannot read the cache {folder} ({type(e).__name__}: {e}). {_rebuild_hint(folder, info, expected)}"
        ) from e
    if len(data) != info["num_rows"]:
        raise ValueError(
            f"The cache {folder} holds {len(data)} rows, its {CACHE_INFO} records {info['num_rows']}. "
            + _rebuild_hint(folder, info, expected)
        )
    data = data.remove_columns([c for c in data.column_names if c == "caption"])
    return data, uncond, info
