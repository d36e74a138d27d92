"""Model cards and sample grids of saved pipeline folders.

`save_model_card` renders `README.md` with huggingface_hub's `ModelCard.from_template` and the templates in
`diffusers_scm/model_cards/`: YAML metadata (`ModelCardData`, with the Hub's model-index), the teacher, the method and
its own hyperparameters from `training_args.json`, training steps and hardware from `training_summary.json`, the
evaluation table from `examples/evaluate.py`'s `results.json`, the sample grid and a usage snippet."""

import importlib
import importlib.resources
import importlib.util
import json
import os
import re
from dataclasses import dataclass

from ..utils import read_json
from .folders import _WEIGHTS_STEM, CARD, SAMPLE_GRID, _components, check_pipeline_folder


__all__ = [
    "load_eval_results",
    "method_hyperparameters",
    "render_model_card",
    "save_model_card",
    "save_sample_grid",
    "SAMPLE_GRID",
]


EVAL_RESULTS_FILES = ("eval_results.json", "results.json")


_GRID_STEPS_KEY = "diffusers_scm_steps"  # PNG text chunk: the step count of each row of the sample grid


_NON_METRIC_KEYS = {"model", "pipeline", "sampler", "nfe", "steps", "sec_per_image"}


_METRIC_NAMES = {"fd_digits": "FD-digits", "fid": "FID", "paired_rmse": "paired RMSE"}


# Training arguments that say nothing about the model (paths, logging, publishing, secrets): left out of the card.
_UNREPORTED_ARGS = {
    "output_dir",
    "logging_dir",
    "report_to",
    "resume_from_checkpoint",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "validation_steps",
    "num_validation_images",
    "validation_nfe",
    "dataloader_num_workers",
    "image_column",
    "teacher",
    "student",
    "model",
    "stage1_model",
    "push_to_hub",
    "push_at_checkpoints",
    "hub_model_id",
    "hub_token",
    "hub_private_repo",
    "hub_license",
    "teacher_revision",
}


_SCM_BIBTEX = """@article{lu2024simplifying,
  title   = {Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models},
  author  = {Lu, Cheng and Song, Yang},
  journal = {arXiv preprint arXiv:2410.11081},
  year    = {2024}
}"""


_TCM_BIBTEX = """@article{lee2024truncated,
  title   = {Truncated Consistency Models},
  author  = {Lee, Sangyun and Xu, Yilun and Geffner, Tomas and Fanti, Giulia and Kreis, Karsten and Vahdat, Arash
             and Nie, Weili},
  journal = {arXiv preprint arXiv:2410.14895},
  year    = {2024}
}"""


_CM_BIBTEX = """@article{song2023consistency,
  title   = {Consistency Models},
  author  = {Song, Yang and Dhariwal, Prafulla and Chen, Mark and Sutskever, Ilya},
  journal = {arXiv preprint arXiv:2303.01469},
  year    = {2023}
}"""


@dataclass
class Method:
    name: str  # as the papers write it
    description: str
    paper: str
    bibtex: str


METHODS = {
    "scd": Method("sCD", "continuous-time consistency distillation", "Lu & Song, 2024", _SCM_BIBTEX),
    "sct": Method("sCT", "continuous-time consistency training", "Lu & Song, 2024", _SCM_BIBTEX),
    "cd": Method("CD", "discrete-time consistency distillation", "Song et al., 2023", _CM_BIBTEX),
    "ct": Method("CT", "discrete-time consistency training", "Song et al., 2023", _CM_BIBTEX),
    "tcm": Method("TCM", "truncated consistency training", "Lee et al., 2024", _TCM_BIBTEX),
    "teacher": Method("TrigFlow diffusion", "TrigFlow diffusion training", "Lu & Song, 2024", _SCM_BIBTEX),
}


def save_sample_grid(
    pipe,
    path: str,
    step_counts=(1, 2),
    num_images: int = 8,
    seed: int = 0,
    prompts=None,
    image_size=None,
    num_frames=None,
) -> str:
    """
    Sample `num_images` images for each step count and save them as one grid (a row per step count; image i of each
    row starts from the noise of seed `seed + i` and, for class-conditional networks, has class i; for text-to-image
    pipelines, prompt i of `prompts`, one image per prompt, `image_size` pixels; video students, `num_frames` frames
    per prompt, shown side by side). The step counts (and prompts) are stored in the PNG, so the model card can caption
    the grid.
    """
    import torch
    from diffusers.utils import make_image_grid
    from PIL.PngImagePlugin import PngInfo

    num_classes = _num_classes(pipe.network.config)
    labels = [i % num_classes for i in range(num_images)] if num_classes else None
    text = {"batch_size": num_images}
    if pipe.config.get("family_pipeline") is not None:
        prompts = list(prompts or ["a photo"])
        num_images, labels = len(prompts), None
        text = {"prompt": prompts, "height": image_size, "width": image_size}
        if num_frames is not None:
            text["num_frames"] = num_frames
    images = []
    with torch.no_grad():
        for steps in step_counts:
            generators = [torch.Generator().manual_seed(seed + i) for i in range(num_images)]
            out = pipe(**text, num_inference_steps=steps, class_labels=labels, generator=generators)
            if num_frames is not None:  # a video: its frames in one row
                images += [make_image_grid(list(video), rows=1, cols=len(video)) for video in out.frames]
            else:
                images += out.images
    info = PngInfo()
    info.add_text(_GRID_STEPS_KEY, ",".join(str(s) for s in step_counts))
    if "prompt" in text:
        info.add_text("diffusers_scm:prompts", json.dumps(text["prompt"]))
    make_image_grid(images, rows=len(step_counts), cols=num_images).save(path, pnginfo=info)
    return path


def _num_classes(config) -> int | None:
    for key in ("num_classes", "num_class_embeds", "num_embeds_ada_norm"):
        if config.get(key):
            return int(config[key])
    return None


def _count_parameters(network_folder: str) -> int | None:
    from safetensors import safe_open

    files = [f for f in os.listdir(network_folder) if f.startswith(_WEIGHTS_STEM) and f.endswith(".safetensors")]
    if not files:
        return None
    total = 0
    for name in files:
        with safe_open(os.path.join(network_folder, name), framework="pt") as f:
            for key in f.keys():
                count = 1
                for size in f.get_slice(key).get_shape():
                    count *= size
                total += count
    return total


def _format_count(n: int | None) -> str:
    if n is None:
        return "an unknown number of"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_format_value(v) for v in value)
    return str(value)


def _looks_like_hub_id(name) -> bool:
    return (
        isinstance(name, str)
        and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None
        and not os.path.exists(name)
    )


def load_eval_results(results) -> dict:
    """
    Read and check evaluation results in the format of `examples/evaluate.py`'s `results.json`:
    `{"rows": [{"model", "sampler", "nfe", "steps", <metrics>..., "sec_per_image"}, ...], "classifier_accuracy", ...}`.
    Every numeric (or null) row entry other than model, pipeline, sampler, nfe, steps and sec_per_image is a metric.

    Args:
        results (`str` or `dict`): the path of the JSON file, or its content.
    """
    source = results if isinstance(results, str) else "the evaluation results"
    if isinstance(results, str):
        results = read_json(results, fix="Run examples/evaluate.py again to write it.")
    rows = results.get("rows") if isinstance(results, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(
            f"{source} has no evaluation rows: expected {{'rows': [{{'model': ..., 'nfe': ..., <metric>: ...}}]}} "
            "as examples/evaluate.py writes it."
        )
    for i, row in enumerate(rows):
        missing = [k for k in ("model", "nfe") if k not in row]
        if missing:
            raise ValueError(f"Row {i} of {source} lacks {missing}: each row names its model and its NFE.")
    return results


def _metrics(rows: list[dict]) -> list[str]:
    keys = []
    for row in rows:
        for key, value in row.items():
            if key not in _NON_METRIC_KEYS and key not in keys and (value is None or isinstance(value, (int, float))):
                keys.append(key)
    return [k for k in keys if any(isinstance(row.get(k), (int, float)) for row in rows)]


def _evaluation(results: dict) -> dict:
    """The card's evaluation table: a row per model and NFE, teachers first."""
    rows = sorted(results["rows"], key=lambda r: (r["model"] != "teacher", str(r["model"]), float(r["nfe"])))
    metrics = _metrics(rows)
    columns = ["model", "sampler", "steps", "NFE"] + [_METRIC_NAMES.get(m, m) for m in metrics] + ["s / image"]
    table = []
    for r in rows:
        values = [str(r["model"]), str(r.get("sampler", "-")), str(r.get("steps", "-")), f"{float(r['nfe']):g}"]
        values += ["-" if r.get(m) is None else f"{r[m]:.4g}" for m in metrics]
        values.append("-" if r.get("sec_per_image") is None else f"{r['sec_per_image']:.2e}")
        table.append(values)
    notes = []
    if results.get("classifier_accuracy") is not None:
        notes.append(
            "FD-digits: Frechet distance in the features of a digits classifier "
            f"({results['classifier_accuracy']:.1%} held-out accuracy) to the digits training split."
        )
    if "paired_rmse" in metrics:
        notes.append("Paired RMSE: distance to the teacher's ODE solution from the same noise.")
    if results.get("num_samples"):
        notes.append(f"{results['num_samples']} samples per row.")
    return {"columns": columns, "rows": table, "notes": notes, "metrics": metrics, "sorted_rows": rows}


def _model_index_results(evaluation: dict, model: str, dataset: str) -> list:
    """The rows of `model` as the Hub's model-index: one entry per metric and NFE."""
    from huggingface_hub import EvalResult

    out = []
    for row in evaluation["sorted_rows"]:
        if row["model"] != model:
            continue
        for metric in evaluation["metrics"]:
            if isinstance(row.get(metric), (int, float)):
                out.append(
                    EvalResult(
                        task_type="unconditional-image-generation",
                        dataset_type=dataset,
                        dataset_name=dataset,
                        metric_type=metric,
                        metric_value=float(row[metric]),
                        metric_name=f"{_METRIC_NAMES.get(metric, metric)} ({float(row['nfe']):g} NFE)",
                    )
                )
    return out


def _hardware(summary: dict) -> str:
    processes = summary.get("num_processes", 1)
    device = summary.get("device_name") or summary.get("device_type") or "an unrecorded device"
    if summary.get("device_type") == "cuda":
        text = f"{processes} x {device}"
    else:
        text = f"{device}, {processes} process{'es' if processes != 1 else ''}"
    if summary.get("mixed_precision") not in (None, "no"):
        text += f", {summary['mixed_precision']} mixed precision"
    return text


def _images(net_config: dict, has_vae: bool) -> str:
    """What the network draws, for the card's first line: e.g. "32x32 grayscale images"."""
    size, channels = net_config.get("sample_size"), net_config.get("in_channels")
    if not size:
        return "images"
    res = f"{size}x{size}" if isinstance(size, int) else "x".join(str(s) for s in size)
    if has_vae:
        return f"images from {res} latents"
    return f"{res} {'grayscale' if channels == 1 else f'{channels}-channel'} images"


def _training(args: dict, summary: dict) -> dict:
    """The card's training paragraph from `training_args.json` and `training_summary.json`."""
    batch = None
    if args.get("train_batch_size"):
        total = (
            args["train_batch_size"] * summary.get("num_processes", 1) * (args.get("gradient_accumulation_steps") or 1)
        )
        batch = f"batch size {total}"
    return {
        "steps": summary.get("steps"),
        "skipped": summary.get("skipped_steps"),
        "hardware": _hardware(summary),
        "dataset": args.get("dataset_name"),
        "batch": batch,
    }


def _grid(folder: str, num_classes: int | None) -> dict | None:
    """The sample grid and its caption (step counts and prompts from the grid's PNG text chunks), if saved."""
    if not os.path.isfile(os.path.join(folder, SAMPLE_GRID)):
        return None
    from PIL import Image

    with Image.open(os.path.join(folder, SAMPLE_GRID)) as im:
        steps = [int(s) for s in im.text.get(_GRID_STEPS_KEY, "").split(",") if s]
        prompts = json.loads(im.text.get("diffusers_scm:prompts", "null"))
    rows = ", ".join(f"{s} step{'s' if s != 1 else ''}" for s in steps)
    caption = f"Rows: {rows}. " if rows else ""
    caption += "Each column starts from the same noise" + (", class = column index." if num_classes else ".")
    if prompts:
        caption += " Prompts (by column): " + "; ".join(f'"{p}"' for p in prompts) + "."
    return {"file": SAMPLE_GRID, "caption": caption}


# distill.py's flags that belong to one objective (by prefix): a card lists its own method's only
_CONTINUOUS_FLAGS = ("tangent_", "prior_weighting", "no_adaptive_weighting", "jvp_", "guidance_scale_range")
_DISCRETE_FLAGS = ("consistency_", "huber_c", "dt_")
_TCM_FLAGS = ("tcm_", "stage1_", "stage2_")
_OPTIONAL_FLAGS = {"dmd_": "dmd_weight", "lora_": "lora_rank", "fuse_lora": "lora_rank"}  # listed when switched on


def _objective_flags(method: str, args: dict) -> tuple[str, ...]:
    """The flag prefixes of `method`'s objectives: TCM's own, its Stage 1's and its Stage 2 objective's."""
    if method in ("scd", "sct"):
        return _CONTINUOUS_FLAGS
    if method in ("cd", "ct"):
        return _DISCRETE_FLAGS
    if method == "tcm":
        stages = {args.get("tcm_objective") or "discrete", args.get("tcm_stage1_method") or "scd"}
        continuous = bool(stages & {"continuous", "scd", "sct"})
        discrete = bool(stages & {"discrete", "cd", "ct"})
        return _TCM_FLAGS + (_CONTINUOUS_FLAGS if continuous else ()) + (_DISCRETE_FLAGS if discrete else ())
    return ()


def method_hyperparameters(args: dict, method: str) -> list[tuple[str, str]]:
    """
    The hyperparameters a card lists: the run's settings (`training_args.json`) less paths, logging and publishing
    flags, and less the flags of other methods' objectives (an sCD card lists no TCM or discrete-CD flag; the score
    regularizer's and LoRA's only when they were switched on).

    Args:
        args (`dict`): the run's `training_args.json`.
        method (`str`): `"scd"`, `"sct"`, `"cd"`, `"ct"`, `"tcm"` or `"teacher"`.

    Returns:
        `list` of `(flag, formatted value)`.
    """
    own = _objective_flags(method, args)
    foreign = tuple(p for p in _CONTINUOUS_FLAGS + _DISCRETE_FLAGS + _TCM_FLAGS if p not in own)
    rows = []
    for name, value in args.items():
        if name in _UNREPORTED_ARGS or value is None or value is False:
            continue
        if foreign and name.startswith(foreign):
            continue
        switch = next((flag for prefix, flag in _OPTIONAL_FLAGS.items() if name.startswith(prefix)), None)
        if switch is not None and not args.get(switch):  # the switch itself too: 0 is off
            continue
        rows.append((name, _format_value(value)))
    return rows


def render_model_card(
    folder: str,
    repo_id: str | None = None,
    eval_results=None,
    license: str = "apache-2.0",
    base_model: str | None = None,
    kind: str | None = None,
):
    """
    Render the model card of a pipeline folder saved by `examples/distill.py` or `examples/train_teacher.py`.

    Args:
        folder (`str`): the pipeline folder (with `training_args.json` and `training_summary.json` where the scripts
            wrote them, and the sample grid `sample_grid.png` if saved).
        repo_id (`str`, *optional*): the Hub id the card's usage snippet loads (default: the folder's path).
        eval_results (`str` or `dict`, *optional*): `examples/evaluate.py`'s `results.json` (path or content);
            default: `eval_results.json` or `results.json` in `folder`, if there.
        license (`str`, defaults to `"apache-2.0"`): the license identifier (a student inherits its teacher's).
        base_model (`str`, *optional*): the teacher's Hub id (default: the `--teacher` argument if it is a Hub id).
        kind (`str`, *optional*): `"student"` or `"teacher"` (default: from the scheduler: a `TrigFlowODEScheduler`
            pipeline is a teacher).

    Returns:
        `huggingface_hub.ModelCard`.
    """
    from huggingface_hub import ModelCard, ModelCardData

    index = check_pipeline_folder(folder)
    components = _components(index)
    network = next(n for n in ("unet", "transformer") if n in components)
    net_config = read_json(os.path.join(folder, network, "config.json"))
    sched_config = read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    kind = kind or ("teacher" if sched_config.get("_class_name") == "TrigFlowODEScheduler" else "student")
    if kind not in ("student", "teacher"):
        raise ValueError(f"kind must be 'student' or 'teacher', not {kind!r}.")

    def optional_json(name):
        path = os.path.join(folder, name)
        return read_json(path) if os.path.isfile(path) else {}

    args, summary = optional_json("training_args.json"), optional_json("training_summary.json")
    method_key = "teacher" if kind == "teacher" else str(args.get("method", "scd"))
    method = METHODS.get(method_key) or Method(
        method_key, f"the `{method_key}` method of examples/distill.py", "Lu & Song, 2024", _SCM_BIBTEX
    )
    teacher = args.get("teacher") if kind == "student" else None
    if base_model is None and _looks_like_hub_id(teacher):
        base_model = teacher
    if teacher is not None:
        teacher = (
            f"[{teacher}](https://huggingface.co/{teacher})"
            if _looks_like_hub_id(teacher)
            else f"`{os.path.basename(os.path.normpath(teacher))}` (a local folder)"
        )

    if eval_results is None:
        found = [os.path.join(folder, f) for f in EVAL_RESULTS_FILES if os.path.isfile(os.path.join(folder, f))]
        eval_results = found[0] if found else None
    evaluation = _evaluation(load_eval_results(eval_results)) if eval_results is not None else None
    dataset = str(args.get("dataset_name") or "custom")
    model_id = repo_id or os.path.abspath(folder)
    title = (repo_id or os.path.basename(os.path.normpath(os.path.abspath(folder)))).split("/")[-1]

    index_results = _model_index_results(evaluation, kind, dataset) if evaluation else []
    tags = ["diffusers", "diffusers-scm"]
    tags += ["trigflow", "diffusion-model"] if kind == "teacher" else ["consistency-model", method_key]
    family = index.get("family_pipeline")
    card_data = ModelCardData(
        library_name="diffusers",
        license=license,
        pipeline_tag="text-to-image" if family else "unconditional-image-generation",
        tags=tags,
        base_model=base_model,
        model_name=title if index_results else None,
        eval_results=index_results or None,
    )

    num_classes = _num_classes(net_config)
    images = _images(net_config, has_vae="vae" in components)
    training = _training(args, summary) if summary else None
    hyperparameters = method_hyperparameters(args, method_key)
    grid = _grid(folder, num_classes)

    template = importlib.resources.files("diffusers_scm").joinpath("model_cards", f"{kind}_card.md").read_text()
    return ModelCard.from_template(
        card_data,
        template_str=template,
        title=title,
        model_id=model_id,
        images=images,
        method=method,
        teacher=teacher,
        teacher_parameterization=args.get("teacher_parameterization"),
        network={
            "component": network,
            "class_name": components[network][1],
            "diffusers_class": components[network][0] == "diffusers",
            "parameters": _format_count(_count_parameters(os.path.join(folder, network))),
            "num_classes": num_classes,
        },
        has_vae="vae" in components,
        scheduler={
            "class_name": sched_config.get("_class_name"),
            "parameterization": sched_config.get("parameterization", "trigflow"),
            "sigma_data": sched_config.get("sigma_data"),
            "intermediate": sched_config.get("intermediate_timesteps", 1.1),
            "solver": sched_config.get("solver"),
        },
        training=training,
        hyperparameters=hyperparameters,
        evaluation=evaluation,
        grid=grid,
        usage_steps=32 if kind == "teacher" else 2,
        family=family,
        flow_student=sched_config.get("parameterization") == "flow_matching"
        and sched_config.get("_class_name") != "TrigFlowFamilyScheduler",
        family_scheduler=sched_config.get("_class_name") == "TrigFlowFamilyScheduler",
        video=_is_video_family(family),
        family_guider=_family_has_guider(family),
        default_guidance=index.get("guidance_scale"),  # a guidance-input student's value (Flux.1-dev, HunyuanVideo)
        guidance_range=index.get("guidance_scale_range"),
        usage_class_labels=f"[{', '.join(str(i % num_classes) for i in range(4))}]" if num_classes else None,
    )


def _family_has_guider(family: str | None) -> bool:
    """Whether the family's pipeline guides through a `guider` component (HunyuanVideo 1.5), not `guidance_scale`."""
    from ..families import get_family, is_family

    return family is not None and is_family(family) and "guider" in get_family(family).extra_components


def _is_video_family(family: str | None) -> bool:
    from ..families import get_family, is_family

    return family is not None and is_family(family) and get_family(family).video


def save_model_card(folder: str, **kwargs) -> str:
    """Render the model card (arguments of `render_model_card`) and write it to `folder/README.md`; returns the path."""
    path = os.path.join(folder, CARD)
    render_model_card(folder, **kwargs).save(path)
    return path
