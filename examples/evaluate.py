"""Evaluate a saved pipeline at a list of step counts: FD-digits, FID, paired RMSE and FD to a teacher's samples,
per-prompt diversity, seconds per image; for text-to-video pipelines (`--num_frames`) the same per video.

    python examples/evaluate.py --pipeline digits-teacher --name teacher --steps 4 8 16 32 --output_dir report
    python examples/evaluate.py --pipeline digits-student --name student --steps 1 2 \
        --paired_teacher digits-teacher --output_dir report

Every call adds its rows to `OUTPUT_DIR/results.json` (rows with the same model, sampler and steps are replaced) and
rewrites the table `OUTPUT_DIR/results.md`, so a teacher and its student evaluated by two calls share one table. The
noise comes from `--seed`, so two calls with the same seed start every model from the same noise (image i, noise i),
and the sample grids under `OUTPUT_DIR/grids/` can be compared image by image.

Samplers: a pipeline saved with a `TrigFlowScheduler` is sampled as a consistency model, one saved with a
`TrigFlowODEScheduler` by its probability-flow ODE; `--sampler` and `--solver` override. NFE (network evaluations per
image) are counted on the network itself.

Text-to-image pipelines (`--prompts`): image i is drawn for prompt i mod the number of prompts, from the same latent
noise for every model. `--pipeline` (and `--paired_teacher`) may also be a family's own diffusers pipeline folder (e.g.
a flow-matching teacher saved by `train_teacher.py --objective flow_matching`), sampled by its own scheduler with
classifier-free guidance `--guidance_scale`; NFE then counts both branches of the guidance. With n prompts and
`--num_grid_images` n^2, row p of each sample grid holds prompt p.

    python examples/evaluate.py --pipeline t2i-teacher --name teacher --steps 4 8 16 32 --guidance_scale 4 \
        --prompts "digit zero" "digit one" ... --output_dir report
    python examples/evaluate.py --pipeline t2i-student --name student --steps 1 2 --paired_teacher t2i-teacher \
        --guidance_scale 4 --prompts "digit zero" "digit one" ... --output_dir report

Text-to-video pipelines (`--num_frames F` with `--prompts`): a video student (an SCMPipeline folder of a video
family: Wan, LTX-Video, HunyuanVideo, ...) or a video teacher (an SCMPipeline ODE folder, or the family's own
pipeline folder, e.g. a `WanPipeline`, sampled by its own scheduler with `--guidance_scale`) draws video i of F frames
for prompt i mod n, from the same latent noise (B, C, F', h, w) for every model, at `--height` x `--width` pixels
(default `--resolution`, else the family pipeline's default size). Seconds are per video; the grids under `grids/` are
filmstrips (one row of frames per video; with n prompts and `--num_grid_images` n^2, row p of the grid holds prompt
p's first n videos); `--save_images` writes the videos (N, F, 3, H, W) in [-1, 1] as safetensors (with F in the
metadata, checked by `--paired_reference`) and each as an animated GIF under `videos/<name>-<steps>step/`. The
metrics of videos: `paired_rmse` over every pixel of every frame; the feature metrics treat every frame as an image
(`fd_to_teacher`, `fd_digits`, `fid`: the Frechet distance between the two sets of frames; `prompt_accuracy`: the share
of frames labelled as their prompt's digit), except `diversity`, which takes the distance between two videos as the
distance between their frame features stacked in frame order (the mean over a prompt's pairs of videos). Default
metrics: `paired_rmse`, `fd_to_teacher` (with `--paired_teacher` or `--paired_reference`) and `diversity`.

    python examples/evaluate.py --pipeline wan-teacher --name teacher --steps 50 --guidance_scale 5 --num_frames 33 \
        --height 480 --width 832 --prompts "a red fox running" "a bird in flight" --num_samples 8 --batch_size 2 \
        --save_images --output_dir report
    python examples/evaluate.py --pipeline wan-student --steps 1 2 --num_frames 33 --height 480 --width 832 \
        --prompts "a red fox running" "a bird in flight" --num_samples 8 --batch_size 2 --output_dir report \
        --paired_reference report/images/teacher-50step.safetensors

Metrics (`--metrics`): `fd_digits` (Frechet distance in the features of the digits classifier of
`diffusers_scm.metrics`, against the digits training split), `fid` (Inception features through torch-fidelity or
clean-fid, weights already on disk or `--inception_weights`; against `--reference`, or against the statistics of
`--reference_stats FILE.npz`), `paired_rmse` (RMSE to the
`--paired_teacher`'s ODE solution from the same noise), `fd_to_teacher` (the Frechet distance in the same digit
features to those ODE samples: to what a student was taught, rather than to the data; with `paired_rmse` by default),
`prompt_accuracy` (the share of images that the digits classifier labels as their prompt's digit: `--prompt_labels`,
or the digit a prompt names), `diversity` (the mean pairwise distance in the digit features between the images of one
prompt, averaged over the prompts, `metrics.group_diversity`; each prompt's value under `diversity_per_group` in
results.json; on by default with `--prompts`; a class-conditional model's groups are its classes, an unconditional
model's one group), `class_accuracy` (a class-conditional digits model, whose image i is drawn for class i mod 10: the
share that the classifier labels as their class; on by default for such a model).

`--reference_stats FILE.npz` reads FID reference statistics in EDM's layout (`mu`, the mean of the 2048 Inception pool
features of a training set, and `sigma`, their 2048x2048 covariance: NVlabs' `fid-refs/*.npz`, e.g.
`cifar10-32x32.npz`, `imagenet-64x64.npz`, or EDM2's `img512.npz`; `--metrics` then includes `fid`), so that a FID
from the same Inception features (TensorFlow's 2015-12-05 network) is comparable with the published tables:

    python examples/evaluate.py --pipeline cifar10-student --steps 1 2 --num_samples 50000 \
        --reference_stats fid-refs/cifar10-32x32.npz --inception_weights pt_inception-2015-12-05.pth

`--save_images` writes each step count's images to `OUTPUT_DIR/images/<name>-<steps>step.safetensors` (with the
pipeline, sampler, seed and sample count as metadata); `--paired_reference FILE` then serves as the paired RMSE's
reference (of `paired_rmse` and `fd_to_teacher`) in place of `--paired_teacher`, so that a teacher's ODE is run once
for many students evaluated from the same `--seed` and `--num_samples` (and `--prompts`), and for the teacher's own
rows at fewer steps (the yardstick of `fd_to_teacher`: how far the teacher's own cheaper samples are from it):

    python examples/evaluate.py --pipeline digits-teacher --name teacher --steps 64 --save_images --output_dir t
    python examples/evaluate.py --pipeline digits-teacher --name teacher --steps 8 16 --output_dir t \
        --paired_reference t/images/teacher-64step.safetensors
    python examples/evaluate.py --pipeline digits-student --steps 1 2 \
        --paired_reference t/images/teacher-64step.safetensors --output_dir report
"""

import argparse
import json
import math
import os
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusers_scm import SCMPipeline, TrigFlowODEScheduler, TrigFlowScheduler
from diffusers_scm.families import prompt_sequence_length
from diffusers_scm.metrics import (
    InceptionFeatures,
    digit_of_prompt,
    feature_statistics,
    frechet_distance,
    group_diversity,
    load_digits_classifier,
)
from diffusers_scm.metrics import paired_rmse as rmse
from diffusers_scm.utils import square_image_grid


METRICS = ("fd_digits", "fid", "paired_rmse", "fd_to_teacher", "prompt_accuracy", "diversity", "class_accuracy")
PAIRED = ("paired_rmse", "fd_to_teacher")  # the metrics against --paired_teacher or --paired_reference


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="an SCMPipeline folder (or Hub id)")
    p.add_argument("--name", default=None, help="the model's name in the table (default: teacher or student)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2], help="step counts to evaluate")
    p.add_argument("--sampler", choices=["auto", "consistency", "ode"], default="auto")
    p.add_argument("--solver", choices=["ddim", "heun", "dpmsolver++"], default=None, help="ODE solver")
    p.add_argument("--metrics", nargs="+", choices=METRICS, default=None, help="default: fd_digits (+ paired_rmse)")
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", default="digits", help="reference images for FID: 'digits', a folder or dataset")
    p.add_argument(
        "--reference_stats",
        default=None,
        help="FID against reference statistics: an .npz with `mu` (2048) and `sigma` (2048x2048), EDM's fid-refs",
    )
    p.add_argument("--image_column", default="image")
    p.add_argument("--paired_teacher", default=None, help="teacher pipeline for paired_rmse")
    p.add_argument("--paired_teacher_steps", type=int, default=64)
    p.add_argument("--paired_teacher_solver", choices=["ddim", "heun", "dpmsolver++"], default="heun")
    p.add_argument(
        "--paired_reference",
        default=None,
        help="images saved by --save_images (same --seed and --num_samples) as the paired RMSE's reference",
    )
    p.add_argument("--save_images", action="store_true", help="write every step count's images under images/")
    p.add_argument("--inception_backend", choices=["auto", "torch-fidelity", "clean-fid"], default="auto")
    p.add_argument("--inception_weights", default=None, help="a local Inception weights file for FID")
    p.add_argument("--num_grid_images", type=int, default=64, help="images in each saved sample grid (0: none)")
    p.add_argument("--prompts", nargs="+", default=None, help="text-to-image: image i is drawn for prompt i mod n")
    p.add_argument("--prompt_labels", type=int, nargs="+", default=None, help="digit of each prompt (accuracy)")
    p.add_argument("--guidance_scale", type=float, default=None, help="CFG of ODE teachers (text-to-image)")
    p.add_argument("--resolution", type=int, default=None, help="text-to-image: image size in pixels")
    p.add_argument("--height", type=int, default=None, help="text-to-video: frame height in pixels (or --resolution)")
    p.add_argument("--width", type=int, default=None, help="text-to-video: frame width in pixels (or --resolution)")
    p.add_argument("--num_frames", type=int, default=None, help="text-to-video: frames per video (needs --prompts)")
    p.add_argument("--output_dir", default="evaluation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    args.default_metrics = args.metrics is None  # main adds class_accuracy for a class-conditional model
    if args.num_frames is not None and not args.prompts:
        p.error(
            "--num_frames evaluates a text-to-video pipeline: give --prompts (video i is drawn for prompt i mod n)"
        )
    if (args.height is None) != (args.width is None):
        p.error("give both --height and --width (pixels), or --resolution")
    if args.height is not None and args.num_frames is None:
        p.error("--height and --width are for videos (--num_frames); images take --resolution")
    if args.metrics is None and args.num_frames is not None:  # videos: nothing digit-specific by default
        paired = args.paired_teacher or args.paired_reference
        args.metrics = (list(PAIRED) if paired else []) + ["diversity"]
    if args.metrics is None:
        paired = args.paired_teacher or args.paired_reference
        args.metrics = ["fd_digits"] + (list(PAIRED) if paired else [])
        args.metrics += ["prompt_accuracy", "diversity"] if args.prompts else []
        args.metrics += ["fid"] if args.reference_stats else []
    if args.reference_stats and "fid" not in args.metrics:
        p.error("--reference_stats holds FID's reference statistics: add fid to --metrics")
    if args.paired_teacher and args.paired_reference:
        p.error("give --paired_teacher (its ODE is run) or --paired_reference (images already saved), not both")
    for metric in PAIRED:
        if metric in args.metrics and not (args.paired_teacher or args.paired_reference):
            p.error(f"--metrics {metric} needs --paired_teacher or --paired_reference")
    if "prompt_accuracy" in args.metrics:
        if not args.prompts:
            p.error("--metrics prompt_accuracy needs --prompts")
        if args.prompt_labels is None:
            labels = [digit_of_prompt(prompt) for prompt in args.prompts]
            if None in labels:
                p.error(
                    f"--metrics prompt_accuracy: no digit named in {args.prompts[labels.index(None)]!r}; give "
                    "--prompt_labels (one digit per prompt)."
                )
            args.prompt_labels = labels
        if len(args.prompt_labels) != len(args.prompts):
            p.error(f"--prompt_labels has {len(args.prompt_labels)} digits for {len(args.prompts)} prompts.")
    return args


def load_pipeline(path: str, device: str):
    """An `SCMPipeline` folder (or Hub id), or a family's own diffusers pipeline (a text-to-image teacher)."""
    from diffusers import DiffusionPipeline

    if DiffusionPipeline.load_config(path).get("_class_name") == "SCMPipeline":
        pipe = SCMPipeline.from_pretrained(path)
    else:
        pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def network_of(pipe):
    return pipe.network if isinstance(pipe, SCMPipeline) else getattr(pipe, "transformer", None) or pipe.unet


def networks_of(pipe) -> list:
    """The networks whose calls count as NFE: the pipeline's network, and a second expert where it has one (Wan 2.2's
    `transformer_2`, which the pipeline calls below its boundary timestep)."""
    second = None if isinstance(pipe, SCMPipeline) else getattr(pipe, "transformer_2", None)
    return [network_of(pipe)] + ([second] if second is not None else [])


def is_video_pipeline(pipe) -> bool:
    """Whether a loaded pipeline makes videos: a video student (`SCMPipeline.is_video`) or a video family's own
    pipeline."""
    from diffusers_scm.families import get_family

    if isinstance(pipe, SCMPipeline):
        return getattr(pipe, "vae", None) is not None and pipe.is_video()
    try:
        return get_family(pipe).video
    except ValueError:  # not a declared family
        return False


# Family pipelines whose own call takes one video at a time: diffusers 0.42's AutoencoderKLHunyuanVideo15 decodes
# batches of one (its attention mask does not broadcast over a batch)
ONE_VIDEO_PER_CALL = ("HunyuanVideo15Pipeline",)


def call_batch_size(pipe, batch_size: int) -> int:
    """The batch size of each call of `pipe`: `batch_size`, or 1 for the family pipelines of `ONE_VIDEO_PER_CALL`
    (the results do not depend on it: every sample has its own noise and generator)."""
    if not isinstance(pipe, SCMPipeline) and type(pipe).__name__ in ONE_VIDEO_PER_CALL:
        return 1
    return batch_size


def video_noise_shape(pipe, num_samples: int, num_frames: int, height: int | None, width: int | None):
    """The latent noise (n, C, F', h, w) of `num_samples` videos of `num_frames` frames and their size in pixels
    (height, width); sizes not given default to the family pipeline's."""
    import inspect

    if height is None:
        family = pipe.config.family_pipeline if isinstance(pipe, SCMPipeline) else type(pipe).__name__
        import diffusers

        defaults = inspect.signature(getattr(diffusers, family).__call__).parameters
        height, width = defaults["height"].default, defaults["width"].default
        if height is None or width is None:
            raise ValueError(f"{family} has no default video size: give --height and --width (pixels).")
    return latent_codec(pipe).latent_shape(num_samples, height, width, num_frames), (height, width)


def text_noise_shape(pipe, num_samples: int, resolution: int | None) -> tuple[int, ...]:
    """The unpacked latent noise (n, C, h, w) of a text-to-image pipeline at `resolution` pixels (default: the
    network's sample size)."""
    codec = latent_codec(pipe)
    size = network_of(pipe).config.get("sample_size") or 64
    size = size[0] if isinstance(size, (list, tuple)) else size
    h = (resolution // codec.scale_factor) if resolution else size
    return (num_samples, codec.latent_channels, h, h)


def with_sampler(pipe: SCMPipeline, sampler: str, solver: str | None) -> tuple[SCMPipeline, str]:
    """The pipeline with the requested scheduler, and the sampler's name for the table."""
    if not isinstance(pipe, SCMPipeline):  # a family pipeline: its own scheduler
        if sampler == "consistency" or solver is not None:
            raise ValueError(f"{type(pipe).__name__} samples with its own scheduler: drop --sampler/--solver.")
        return pipe, f"ode-{type(pipe.scheduler).__name__}"
    is_ode = isinstance(pipe.scheduler, TrigFlowODEScheduler)
    if sampler == "auto":
        sampler = "ode" if is_ode else "consistency"
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    if sampler == "ode":
        solver = solver or (pipe.scheduler.config.solver if is_ode else "dpmsolver++")
        if not is_ode or solver != pipe.scheduler.config.solver:
            pipe.scheduler = TrigFlowODEScheduler.from_config({**config, "solver": solver})
        return pipe, f"ode-{solver}"
    if is_ode:
        pipe.scheduler = TrigFlowScheduler.from_config(config)
    return pipe, "consistency"


def is_conditional(network) -> bool:
    config = network.config
    return bool(config.get("num_class_embeds") or config.get("num_classes") or config.get("class_embed_type"))


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s generator."""
    return seed * 1_000_003 + index + 1


class NFECounter:
    """Counts the samples a network evaluates (forward pre-hook): a guided call on a doubled batch counts twice.
    `network` may be a list of networks (two experts): their calls add up."""

    def __init__(self, network):
        self.rows = 0
        networks = network if isinstance(network, (list, tuple)) else [network]
        self._handles = [n.register_forward_pre_hook(self._hook, with_kwargs=True) for n in networks]

    def _hook(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        self.rows += sample.shape[0]

    def remove(self):
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def generate(pipe, noise: torch.Tensor, steps: int, batch_size: int, desc: str, seed: int = 0, text=None):
    """Images in [-1, 1] from `noise` (unit Gaussian), network evaluations per image, seconds per image; videos
    (noise (n, C, F', h, w)): (n, F, 3, H, W) in [-1, 1], per video.

    Image i draws any further noise (multi-step consistency sampling) from its own generator, seeded
    `image_seed(seed, i)`, so the images do not depend on the batch size. `text`: `{"prompts", "guidance_scale",
    "resolution"}` for text-to-image pipelines (image i gets prompt i mod n), with `"height"`, `"width"` and
    `"num_frames"` for text-to-video ones."""
    network = network_of(pipe)
    conditional = is_conditional(network)
    counter = NFECounter(networks_of(pipe))
    images, seconds = [], 0.0
    try:
        for i in tqdm(range(0, len(noise), batch_size), desc=desc, leave=False):
            chunk = noise[i : i + batch_size]
            start = time.perf_counter()
            generators = [
                torch.Generator(noise.device).manual_seed(image_seed(seed, i + j)) for j in range(len(chunk))
            ]
            kwargs = {"num_inference_steps": steps, "generator": generators, "output_type": "pt"}
            if text is not None:
                kwargs.update(text_call(pipe, chunk, i, text))
            else:
                labels = [(i + j) % 10 for j in range(len(chunk))] if conditional else None
                kwargs.update(batch_size=len(chunk), latents=chunk, class_labels=labels)
            out = pipe(**kwargs)
            out = out.frames if hasattr(out, "frames") else out.images  # videos: (B, F, 3, H, W)
            seconds += time.perf_counter() - start
            images.append(out.float().cpu() * 2 - 1)
    finally:
        counter.remove()
    return torch.cat(images), counter.rows / len(noise), seconds / len(noise)


def text_call(pipe, chunk: torch.Tensor, first: int, text: dict) -> dict:
    """The prompt, latents, size and guidance arguments of a text-to-image call (an SCMPipeline or the family's own
    pipeline, whose packed-latent families get their noise packed by their own helper)."""
    import inspect

    prompts = [text["prompts"][(first + j) % len(text["prompts"])] for j in range(len(chunk))]
    size = text["resolution"]
    kwargs = {"prompt": prompts, "height": text.get("height") or size, "width": text.get("width") or size}
    if text.get("num_frames") is not None:
        kwargs["num_frames"] = text["num_frames"]
    if isinstance(pipe, SCMPipeline):
        ode = isinstance(pipe.scheduler, TrigFlowODEScheduler)
        return {**kwargs, "latents": chunk, "guidance_scale": text["guidance_scale"] if ode else None}
    latents = chunk
    pack = getattr(pipe, "_pack_latents", None)
    pack_parameters = inspect.signature(pack).parameters if pack is not None else {}
    if chunk.ndim == 5 and "patch_size_t" in pack_parameters:  # LTX-Video: (B, C, F', h, w) -> packed tokens
        latents = pack(chunk, pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)
    elif chunk.ndim == 4 and len(pack_parameters) > 1:  # Flux.1-style: 2x2-packed tokens
        latents = pack(chunk, *chunk.shape)  # (Flux.2's pipelines take the patchified latent x0 itself)
    kwargs["latents"] = latents
    parameters = inspect.signature(pipe.__call__).parameters
    if "use_resolution_binning" in parameters:  # the exact size, not the nearest trained aspect-ratio bin
        kwargs["use_resolution_binning"] = False
    if text["guidance_scale"] is not None:
        if "guidance_scale" in parameters:
            kwargs["guidance_scale"] = text["guidance_scale"]
        elif getattr(pipe, "guider", None) is not None:  # HunyuanVideo 1.5: classifier-free guidance by its guider
            pipe.guider = pipe.guider.new(guidance_scale=text["guidance_scale"])
    length = prompt_sequence_length(pipe)  # the text length the teacher was trained with (and is distilled at)
    if length is not None:
        kwargs["max_sequence_length"] = length
    if "generator" not in parameters:
        kwargs.pop("generator", None)
    return kwargs


# The Inception pool features of FID (and of EDM's reference statistics)
INCEPTION_FEATURES = 2048


def load_reference_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """FID reference statistics in EDM's layout (`fid-refs/*.npz`, written as `np.savez(path, mu=mu, sigma=sigma)`):
    `mu` (2048,) and `sigma` (2048, 2048), the mean and covariance of the training set's Inception pool features, as
    float64. Read without unpickling; wrong keys, shapes or values are errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--reference_stats {path}: no such file (an .npz with `mu` and `sigma`, e.g. NVlabs' fid-refs)."
        )
    try:
        data = np.load(path, allow_pickle=False)  # arrays only: a pickle in the file is refused
    except (OSError, EOFError, ValueError) as e:  # not a numpy file, a truncated one, or pickled objects
        raise ValueError(f"--reference_stats {path} is not a readable .npz file of arrays ({e}).") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"--reference_stats {path} is a single .npy array, not an .npz with `mu` and `sigma`.")
    with data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(
                f"--reference_stats {path} has no {' and '.join(f'`{k}`' for k in missing)} (it holds "
                f"{', '.join(data.files) or 'nothing'}): FID references hold the Inception features' mean `mu` and "
                "covariance `sigma`, as EDM's fid-refs files and `np.savez(path, mu=mu, sigma=sigma)` write them."
            )
        mu, sigma = data["mu"], data["sigma"]
    d = INCEPTION_FEATURES
    if mu.shape != (d,) or sigma.shape != (d, d):
        raise ValueError(
            f"--reference_stats {path}: `mu` has shape {mu.shape} and `sigma` {sigma.shape}; FID's Inception features "
            f"need ({d},) and ({d}, {d}) (the 2048-d pool features, as in EDM's fid-refs)."
        )
    mu, sigma = mu.astype(np.float64), sigma.astype(np.float64)
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"--reference_stats {path}: `mu` or `sigma` holds NaN or infinite values.")
    return mu, sigma


def latent_codec(pipe):
    """The codec of a text-to-image pipeline's latents x0: its family's (Flux.2: patchified and batch-normalized),
    else `LatentCodec`."""
    from diffusers_scm.conditioning import LatentCodec
    from diffusers_scm.families import get_family

    if isinstance(pipe, SCMPipeline):
        return pipe.latent_codec()
    try:
        return get_family(pipe).latent_codec(pipe.vae)
    except ValueError:  # not a declared family
        return LatentCodec(pipe.vae)


def _scale_factor(pipe) -> int:
    return latent_codec(pipe).scale_factor


def reference_images(name: str, resolution: int, channels: int, image_column: str) -> torch.Tensor:
    from diffusers_scm.training.data.images import DigitsDataset, load_image_dataset

    if name == "digits":
        return DigitsDataset(resolution, "train").images
    dataset = load_image_dataset(name, resolution, channels, image_column)
    return torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])


def grid_images(images: torch.Tensor, count: int, num_prompts: int | None = None) -> torch.Tensor:
    """The images of a square sample grid: the first `count`; with prompts (image i drawn for prompt i mod n) and
    `count` = n^2, row p holds the first n images of prompt p."""
    side = math.isqrt(count)
    if num_prompts is None or side != num_prompts or len(images) < count:
        return images[:count]
    return images[[p + num_prompts * j for p in range(num_prompts) for j in range(side)]]


def save_grid(images: torch.Tensor, path: str, scale: int = 4):
    """A square grid of images in [-1, 1], each upscaled `scale` times (nearest) so small images stay visible, and
    framed in gray."""
    from diffusers.utils import numpy_to_pil

    images = ((images.clamp(-1, 1) + 1) / 2).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    images = torch.nn.functional.pad(images, (1, 1, 1, 1), value=0.5)  # a gray frame between neighbours
    os.makedirs(os.path.dirname(path), exist_ok=True)
    square_image_grid(numpy_to_pil(images.permute(0, 2, 3, 1).numpy())).save(path)


def save_video_grid(videos: torch.Tensor, path: str):
    """A near-square grid of filmstrips (`diffusers_scm.utils.video_filmstrips`: each video's frames side by side) of
    videos (N, F, 3, H, W) in [-1, 1], small frames upscaled (nearest) to at least 64 pixels (at most 4 times), each
    filmstrip framed in gray."""
    from diffusers.utils import numpy_to_pil

    from diffusers_scm.utils import video_filmstrips

    scale = max(1, min(4, 64 // min(videos.shape[-2:])))
    frames = ((videos.clamp(-1, 1) + 1) / 2).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    strips = torch.from_numpy(video_filmstrips(frames.permute(0, 1, 3, 4, 2).numpy()))  # (N, H, F * W, 3)
    strips = torch.nn.functional.pad(strips.permute(0, 3, 1, 2), (1, 1, 1, 1), value=0.5)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    square_image_grid(numpy_to_pil(strips.permute(0, 2, 3, 1).numpy())).save(path)


def save_gifs(videos: torch.Tensor, folder: str, fps: int = 8):
    """Each video (N, F, 3, H, W) in [-1, 1] as an animated GIF `folder/video-000.gif`, ..."""
    from diffusers.utils import export_to_gif, numpy_to_pil

    os.makedirs(folder, exist_ok=True)
    frames = ((videos.clamp(-1, 1) + 1) / 2).permute(0, 1, 3, 4, 2).numpy()
    for i, video in enumerate(frames):
        export_to_gif(numpy_to_pil(video), os.path.join(folder, f"video-{i:03d}.gif"), fps=fps)


def frames_as_images(samples: torch.Tensor) -> torch.Tensor:
    """Videos (N, F, 3, H, W) as N * F images (video-major) for the frame-level feature metrics; images unchanged."""
    return samples.flatten(0, 1) if samples.ndim == 5 else samples


def format_table(rows: list[dict]) -> str:
    """Markdown table: model, sampler, steps, NFE, each metric present, seconds per image (per video)."""
    metrics = [m for m in METRICS if any(r.get(m) is not None for r in rows)]
    guided = any(r.get("guidance_scale") is not None for r in rows)
    per = "s/video" if rows and all("sec_per_video" in r for r in rows) else "s/image"
    header = ["model", "sampler", *(["CFG"] if guided else []), "steps", "NFE", *metrics, per]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cfg = [] if not guided else ["-" if r.get("guidance_scale") is None else f"{r['guidance_scale']:g}"]
        values = [r["model"], r["sampler"], *cfg, str(r["steps"]), f"{r['nfe']:g}"]
        values += ["-" if r.get(m) is None else f"{r[m]:.4g}" for m in metrics]
        values.append(f"{r.get('sec_per_image', r.get('sec_per_video')):.2e}")
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def save_images(images: torch.Tensor, path: str, row: dict, args):
    """The images of one row as safetensors (written atomically), with what `load_images` checks as metadata."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    metadata = {
        "pipeline": str(args.pipeline),
        "sampler": row["sampler"],
        "steps": str(row["steps"]),
        "seed": str(args.seed),
        "num_samples": str(args.num_samples),
        "prompts": json.dumps(args.prompts),
        "guidance_scale": json.dumps(row.get("guidance_scale")),
    }
    if getattr(args, "num_frames", None) is not None:  # videos (N, F, 3, H, W)
        metadata["num_frames"] = str(args.num_frames)
    tmp = path + ".tmp"
    save_file({"images": images.detach().float().cpu().contiguous()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_images(path: str, args) -> tuple[torch.Tensor, dict]:
    """Images saved by `--save_images` as a paired reference, checked against this run: the same seed, sample count
    and prompts, so that image i comes from the same noise (their shape is checked against each row's images).
    Returns the images and the reference's description for results.json."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--paired_reference {path}: no such file (write it with evaluate.py --save_images)")
    with safe_open(path, "pt") as f:
        meta, images = f.metadata() or {}, f.get_tensor("images")
    wanted = {"seed": str(args.seed), "num_samples": str(args.num_samples), "prompts": json.dumps(args.prompts)}
    frames = getattr(args, "num_frames", None)
    if frames is not None or meta.get("num_frames") is not None:  # videos of as many frames (images have none)
        wanted["num_frames"] = None if frames is None else str(frames)
    wrong = {k: (meta.get(k), v) for k, v in wanted.items() if meta.get(k) != v}
    if wrong:
        raise ValueError(
            f"--paired_reference {path} was drawn with other settings than this run: "
            + ", ".join(f"{k} {theirs} (here {ours})" for k, (theirs, ours) in wrong.items())
            + ". Evaluate with the reference's --seed, --num_samples, --prompts (and --num_frames), or save a new "
            "reference."
        )
    description = {
        "pipeline": meta.get("pipeline"),
        "solver": meta.get("sampler"),
        "steps": int(meta["steps"]) if meta.get("steps") else None,
        "guidance_scale": json.loads(meta.get("guidance_scale", "null")),
        "file": path,
    }
    return images, description


def write_results(output_dir: str, new_rows: list[dict], extra: dict):
    """Merge `new_rows` into `results.json` (same model, sampler and steps replaced) and rewrite `results.md`."""
    path = os.path.join(output_dir, "results.json")
    results = {"rows": []}
    if os.path.isfile(path):
        with open(path) as f:
            results = json.load(f)
    keys = {(r["model"], r["sampler"], r["steps"]) for r in new_rows}
    rows = [r for r in results["rows"] if (r["model"], r["sampler"], r["steps"]) not in keys] + new_rows
    results.update(extra, rows=rows)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    os.replace(tmp, path)
    lines = ["# Evaluation", "", format_table(rows), ""]
    if results.get("classifier_accuracy") is not None:
        lines.append(
            f"FD-digits: Frechet distance in the digits classifier's features (held-out accuracy "
            f"{results['classifier_accuracy']:.1%}) to the {results.get('fd_reference_size', '?')} digits of the "
            f"training split, from {results.get('num_samples', '?')} samples."
        )
    reference = results.get("paired_reference")
    if any(r.get("fd_to_teacher") is not None for r in rows) and reference:
        lines.append(
            f"\nfd_to_teacher: the same Frechet distance to the samples of {reference.get('pipeline')} "
            f"({reference.get('solver')}, {reference.get('steps')} steps) from the same noise and prompts."
        )
    if any(r.get("diversity") is not None for r in rows):
        lines.append(
            "\ndiversity: the mean pairwise distance in the classifier's features between the images of one prompt "
            "(class), averaged over the prompts."
        )
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return results


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    pipe = load_pipeline(args.pipeline, args.device)
    pipe, sampler = with_sampler(pipe, args.sampler, args.solver)
    conditional = args.prompts is None and is_conditional(network_of(pipe))
    if args.default_metrics and conditional and "class_accuracy" not in args.metrics:
        args.metrics.append("class_accuracy")
    if "class_accuracy" in args.metrics and not conditional:
        raise ValueError(
            f"--metrics class_accuracy needs a class-conditional model; {args.pipeline} has no classes (leave the "
            "metric out)."
        )
    name = args.name or ("teacher" if sampler.startswith("ode") else "student")
    text = None
    video = is_video_pipeline(pipe)
    if args.num_frames is not None and not video:
        raise ValueError(f"--num_frames is for text-to-video pipelines; {args.pipeline} makes images: drop it.")
    if video and args.num_frames is None:
        raise ValueError(f"{args.pipeline} makes videos: give --num_frames F (a count its VAE encodes whole).")
    if video:
        height, width = (args.height, args.width) if args.height else (args.resolution, args.resolution)
        shape, (height, width) = video_noise_shape(pipe, args.num_samples, args.num_frames, height, width)
        text = {"prompts": args.prompts, "guidance_scale": args.guidance_scale, "resolution": height}
        text.update(height=height, width=width, num_frames=args.num_frames)
    elif args.prompts:
        shape = text_noise_shape(pipe, args.num_samples, args.resolution)
        size = args.resolution or shape[-1] * _scale_factor(pipe)
        text = {"prompts": args.prompts, "guidance_scale": args.guidance_scale, "resolution": size}
    elif not isinstance(pipe, SCMPipeline):
        raise ValueError(f"{args.pipeline} is a {type(pipe).__name__}: give --prompts to evaluate it.")
    else:
        shape = pipe._sample_shape(args.num_samples)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed)).to(args.device)
    extra = {"num_samples": args.num_samples, "seed": args.seed}
    if video:
        extra.update(num_frames=args.num_frames, height=text["height"], width=text["width"])

    classifier = digits_stats = None
    if {"fd_digits", "prompt_accuracy", "class_accuracy", "fd_to_teacher", "diversity"} & set(args.metrics):
        from diffusers_scm.training.data.images import DigitsDataset

        classifier, accuracy = load_digits_classifier()
        reference = DigitsDataset(8, "train").images
        with torch.no_grad():
            digits_stats = feature_statistics(classifier.embed(reference))
        extra.update(classifier_accuracy=accuracy, fd_reference_size=len(reference))
    inception = fid_stats = None
    if "fid" in args.metrics:
        reference_stats = load_reference_statistics(args.reference_stats) if args.reference_stats else None
        inception = InceptionFeatures(args.inception_backend, args.inception_weights, device=args.device)
        if reference_stats is not None:  # EDM's fid-refs: the published tables' reference
            fid_stats = reference_stats
            extra.update(fid_backend=inception.backend, fid_reference=args.reference_stats)
        else:
            size = text["height"] if video else shape[-1]
            images = reference_images(args.reference, size, 3 if video else shape[1], args.image_column)
            fid_stats = feature_statistics(inception(images))
            extra.update(fid_backend=inception.backend, fid_reference=args.reference)
    paired = paired_stats = None
    if set(PAIRED) & set(args.metrics) and args.paired_reference:
        paired, extra["paired_reference"] = load_images(args.paired_reference, args)
        paired = paired.to(args.device)
    elif set(PAIRED) & set(args.metrics):
        teacher = load_pipeline(args.paired_teacher, args.device)
        if is_video_pipeline(teacher) != video:
            kinds = {True: "videos", False: "images"}
            raise ValueError(
                f"--paired_teacher {args.paired_teacher} makes {kinds[not video]}, {args.pipeline} makes "
                f"{kinds[video]}: pair a student with a teacher of its own family."
            )
        family = not isinstance(teacher, SCMPipeline)
        teacher, solver = with_sampler(teacher, "ode", None if family else args.paired_teacher_solver)
        batch = call_batch_size(teacher, args.batch_size)
        paired, _, _ = generate(
            teacher, noise, args.paired_teacher_steps, batch, "teacher ODE (paired)", args.seed, text
        )
        extra["paired_reference"] = {
            "pipeline": args.paired_teacher,
            "solver": solver,
            "steps": args.paired_teacher_steps,
            "guidance_scale": args.guidance_scale if text else None,
        }
    if "fd_to_teacher" in args.metrics:
        with torch.no_grad():
            paired_stats = feature_statistics(classifier.embed(frames_as_images(paired)))
    # diversity within the images of one prompt (image i: prompt i mod n), class (i mod 10), or all of them
    groups = len(args.prompts) if args.prompts else (10 if conditional else 1)

    rows = []
    for steps in tqdm(args.steps, desc=f"evaluate {name}"):
        batch = call_batch_size(pipe, args.batch_size)
        images, nfe, sec = generate(pipe, noise, steps, batch, f"{name} {steps} steps", args.seed, text)
        row = {"model": name, "pipeline": args.pipeline, "sampler": sampler, "steps": steps, "nfe": nfe}
        if text is not None and text["guidance_scale"] is not None and sampler.startswith("ode"):
            row["guidance_scale"] = text["guidance_scale"]
        if video:
            row["num_frames"] = args.num_frames
        if paired is not None and paired.shape != images.shape:
            raise ValueError(
                f"The paired reference holds images of shape {tuple(paired.shape)}; {name} draws "
                f"{tuple(images.shape)}: pair models of one sample count, resolution and channel count."
            )
        frames = frames_as_images(images)  # videos: every frame an image (video-major) for the feature metrics
        if classifier is not None:
            with torch.no_grad():
                embedded = classifier.embed(frames)
                if "fd_digits" in args.metrics:
                    row["fd_digits"] = frechet_distance(*feature_statistics(embedded), *digits_stats)
                if "fd_to_teacher" in args.metrics:
                    row["fd_to_teacher"] = frechet_distance(*feature_statistics(embedded), *paired_stats)
                if "diversity" in args.metrics:  # videos: a video's frame features stacked in frame order
                    per_group = group_diversity(embedded.reshape(len(images), -1), groups)
                    row["diversity"] = float(np.nanmean(per_group)) if not np.isnan(per_group).all() else None
                    row["diversity_per_group"] = [None if np.isnan(v) else float(v) for v in per_group]
                if "prompt_accuracy" in args.metrics:  # videos: each frame labelled with its video's prompt
                    wanted = torch.tensor([args.prompt_labels[i % len(args.prompts)] for i in range(len(images))])
                    wanted = wanted.repeat_interleave(len(frames) // len(images))
                    row["prompt_accuracy"] = (classifier(frames).argmax(1) == wanted).float().mean().item()
                if "class_accuracy" in args.metrics:  # image i was drawn for class i mod 10 (generate)
                    wanted = torch.arange(len(images)) % 10
                    row["class_accuracy"] = (classifier(images).argmax(1) == wanted).float().mean().item()
        if inception is not None:
            row["fid"] = frechet_distance(*feature_statistics(inception(frames)), *fid_stats)
        if "paired_rmse" in args.metrics:
            row["paired_rmse"] = rmse(images, paired)
        row["sec_per_video" if video else "sec_per_image"] = sec
        rows.append(row)
        if args.save_images:
            save_images(images, os.path.join(args.output_dir, "images", f"{name}-{steps}step.safetensors"), row, args)
            if video:
                save_gifs(images, os.path.join(args.output_dir, "videos", f"{name}-{steps}step"))
        if args.num_grid_images:
            grid = grid_images(images, args.num_grid_images, len(args.prompts) if args.prompts else None)
            save = save_video_grid if video else save_grid
            save(grid, os.path.join(args.output_dir, "grids", f"{name}-{steps}step.png"))
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    results = write_results(args.output_dir, rows, extra)
    print(format_table(results["rows"]))
    return results


if __name__ == "__main__":
    main()
