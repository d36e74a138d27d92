"""Text-to-image on a laptop CPU: a latent flow-matching teacher trained here, distilled with guidance into one- and
two-step students (sCD and TCM), evaluated on prompts, with a report.

    python examples/demo_t2i.py --output_dir demo-t2i-report          # or: make demo-t2i

Phases, all through the scripts a user runs (each in a fresh process):
1. `train_vae.py`: a tiny `AutoencoderKL` on the 32x32 captioned digits (cached);
2. `train_teacher.py --objective flow_matching`: a small `SD3Transformer2DModel` (config in `examples/configs/`) on
   its latents, captions "digit zero" .. "digit nine" through a small frozen text encoder created by the script,
   caption dropout for classifier-free guidance; saved as a `StableDiffusion3Pipeline` folder (cached);
3. `distill.py --method scd --guidance_scale W` from that pipeline, and `--method tcm` as a second student;
4. `evaluate.py` on the ten prompts, every model from the same latent noise: the teacher with guidance W (its own
   pipeline and scheduler) at 64 NFE, its images saved (`--save_images`) as the reference; the teacher at 2 to 32 NFE
   and the students at 1 and 2 steps against it (`--paired_reference`): FD to the teacher's samples
   (`fd_to_teacher`, in the digits classifier's features), per-prompt diversity (mean pairwise feature distance
   between the images of one prompt), prompt accuracy (the classifier's label equals the prompt's digit), paired
   RMSE, FD-digits to the data, seconds per image;
5. the report: `results.json`, `results.md` (table and targets), `samples.png` (a row per prompt: teacher | 1 step |
   2 steps), `fd_vs_nfe.png` (FD to the teacher's samples against NFE).

A student is measured against what it was taught, the teacher's guided samples at the same prompts and noise, not
against the data: at CFG 4 the teacher draws nearly one image per prompt whatever the noise, so its FD-digits to the
data is 45-47 at every NFE, and a student with more variety than its teacher scores below the teacher there whatever
its fidelity. The unit of the FD is the teacher's own: its 8-NFE samples against its 64-NFE samples (the yardstick).

Targets (`metrics.teacher_samples_target`), each at >= 16x fewer NFE than the reference (64 NFE):
- FD to the teacher's 64-NFE samples <= 4x the yardstick at 1 step, <= 3x at 2 steps. FD is a squared distance, so 4x
  is twice the teacher's own 8-NFE distance; the teacher's one Euler step (2 NFE, as many as a 2-step student) is at
  7.5x, so a limit near it would pass samplers that distillation is meant to beat. Measured (seed 0, README): the
  sCD student at 1,200 steps 3.6x / 2.4x, at 300 steps 6.9x / 3.1x.
- diversity (per prompt, averaged) within a factor 4/3 of the teacher's, 0.75x-1.33x: the band holds the teacher's own
  8- to 32-NFE samples (0.82x-0.97x) and leaves out its one Euler step (0.67x) and a collapsed sampler (0x), and too
  much variety (a student that draws the data rather than its guided teacher) fails it too.
- the 1-step sCD student's prompt accuracy within 3 points of the teacher's.
Degenerate samplers must fail them, and the report checks two: the teacher at one Euler step (2 NFE: FD 7.5x,
diversity 0.67x), and each prompt's mean teacher image for every noise (FD 2.0x, but diversity 0: FD alone does not
separate it, since the teacher's own samples vary little within a prompt).
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from diffusers_scm.metrics import describe_teacher_samples_target, teacher_samples_target


EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))

from demo import finish_report, plot_fd_vs_nfe, publish, run, settings_key, side_by_side  # noqa: E402


PROMPTS = [f"digit {w}" for w in "zero one two three four five six seven eight nine".split()]
FD_LIMITS = {1: 4.0, 2: 3.0}  # FD to the teacher's 64-NFE samples / the teacher's own at 8 NFE (see the docstring)
DIVERSITY_BAND = (0.75, 1.33)  # a student's per-prompt diversity / the teacher's: within a factor 4/3
ACCURACY_POINTS = 3.0  # the 1-step student's prompt accuracy within this many points of the teacher's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="demo-t2i-report")
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "diffusers_scm", "demo_t2i"))
    p.add_argument("--retrain", action="store_true", help="ignore the cached VAE and teacher")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--model_config", default=str(EXAMPLES / "configs" / "sd3_digits.json"))
    p.add_argument("--vae_steps", type=int, default=400)
    p.add_argument("--teacher_steps", type=int, default=1200)
    p.add_argument("--teacher_batch_size", type=int, default=32)
    p.add_argument("--teacher_learning_rate", type=float, default=5e-4)
    p.add_argument("--guidance_scale", type=float, default=4.0, help="CFG of the teacher, distilled into the students")
    # 1,200 sCD steps: FD to the teacher's samples 3.6x / 2.4x the yardstick at 1 / 2 steps, 6.9x / 3.1x at 300
    p.add_argument("--distill_steps", type=int, default=1200)
    p.add_argument("--distill_batch_size", type=int, default=32)
    p.add_argument("--distill_learning_rate", type=float, default=1e-4)
    p.add_argument("--tangent_warmup_steps", type=int, default=100)
    p.add_argument("--tcm_steps", type=int, default=150, help="each TCM stage (0: no TCM row)")
    p.add_argument(
        "--teacher_steps_eval",
        type=int,
        nargs="+",
        default=[1, 4, 8, 16, 32],
        help="ODE steps (NFE x2); the most: the reference samples; 1: the degenerate check",
    )
    p.add_argument("--yardstick_steps", type=int, default=4, help="the teacher's steps whose FD is the unit (8 NFE)")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.yardstick_steps not in args.teacher_steps_eval or args.yardstick_steps >= max(args.teacher_steps_eval):
        p.error(
            f"--yardstick_steps {args.yardstick_steps} must be one of --teacher_steps_eval {args.teacher_steps_eval} "
            "and fewer than the most (the reference)."
        )
    return args


def cached(args, name: str, settings: dict, script: str, script_args: list) -> tuple[str, bool]:
    """The cached output of `script` for `settings` (trained first if needed); returns (folder, reused)."""
    folder = os.path.join(args.cache_dir, f"{name}-{settings_key(settings)}")
    if os.path.isfile(os.path.join(folder, "config.json")) or os.path.isfile(os.path.join(folder, "model_index.json")):
        if not args.retrain:
            print(f"Reusing the cached {name} {folder}")
            return folder, True
    partial = folder + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    run(script, script_args + ["--output_dir", partial])
    publish(partial, folder)
    return folder, False


def captioned_digits(args) -> str:
    """The captioned digits as an image folder (metadata.jsonl), the data of the teacher and the students."""
    from diffusers_scm.training.data.captions import save_captioned_digits

    folder = os.path.join(args.cache_dir, f"digits-{args.resolution}")
    if not os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        save_captioned_digits(folder, args.resolution)
    return folder


def summarize(results: dict, yardstick_steps: int) -> dict:
    """The targets (`metrics.teacher_samples_target`): per student and step count, the FD to the teacher's reference
    samples (its most NFE) in units of the yardstick (the teacher's own FD at `yardstick_steps`), the per-prompt
    diversity in units of the reference's, the NFE reduction, and for 1 step the prompt accuracy against the
    reference teacher's. `checks`: the teacher at 1 Euler step (when evaluated) against the 1-step target."""
    teacher = {r["steps"]: r for r in results["rows"] if r["model"] == "teacher"}
    reference, yardstick = teacher[max(teacher)], teacher[yardstick_steps]
    summary = {
        "reference_steps": reference["steps"],
        "reference_nfe": reference["nfe"],
        "yardstick_nfe": yardstick["nfe"],
        "yardstick_fd_to_teacher": yardstick["fd_to_teacher"],
        "teacher_diversity": reference["diversity"],
        "teacher_prompt_accuracy": reference["prompt_accuracy"],
        "fd_limits": FD_LIMITS,
        "diversity_band": list(DIVERSITY_BAND),
        "targets": {},
        "checks": {},
    }
    for row in results["rows"]:
        if row["model"] == "teacher" or row["steps"] not in FD_LIMITS:
            continue
        entry = teacher_samples_target(row, yardstick, reference, FD_LIMITS[row["steps"]], DIVERSITY_BAND)
        entry.update(prompt_accuracy=row["prompt_accuracy"], fd_digits=row["fd_digits"])
        if row["steps"] == 1:
            entry["accuracy_gap_points"] = 100 * (reference["prompt_accuracy"] - row["prompt_accuracy"])
            entry["met"] = bool(entry["met"] and entry["accuracy_gap_points"] <= ACCURACY_POINTS)
        summary["targets"][f"{row['model']} {row['steps']}-step"] = entry
    if 1 in teacher:  # the teacher's one Euler step: a degenerate 1-step sampler that the target must fail
        summary["checks"]["teacher 1-step (Euler)"] = teacher_samples_target(
            teacher[1], yardstick, reference, FD_LIMITS[1], DIVERSITY_BAND
        )
    return summary


def mean_image_check(out: str, reference_file: str, num_prompts: int, summary: dict) -> dict:
    """The 1-step target for a sampler that draws each prompt's mean reference image whatever the noise (diversity 0):
    its FD to the reference samples and diversity, from the saved reference images."""
    import torch
    from safetensors.torch import load_file

    from diffusers_scm.metrics import fd_digits, group_diversity, load_digits_classifier

    images = load_file(reference_file)["images"]  # image i: prompt i mod n
    means = torch.stack([images[p::num_prompts].mean(0) for p in range(num_prompts)])
    collapsed = means.repeat(len(images) // num_prompts + 1, 1, 1, 1)[: len(images)]
    classifier, _ = load_digits_classifier()
    with torch.no_grad():
        diversity = float(group_diversity(classifier.embed(collapsed), num_prompts).mean())
    row = {"nfe": 1, "fd_to_teacher": fd_digits(collapsed, images, classifier), "diversity": diversity}
    yardstick = {"nfe": summary["yardstick_nfe"], "fd_to_teacher": summary["yardstick_fd_to_teacher"]}
    reference = {"nfe": summary["reference_nfe"], "diversity": summary["teacher_diversity"]}
    return teacher_samples_target(row, yardstick, reference, FD_LIMITS[1], DIVERSITY_BAND)


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    os.makedirs(args.cache_dir, exist_ok=True)
    times = {}
    common = ["--report_to", "none", "--seed", args.seed]

    print("== 1/5 VAE (train_vae.py)", flush=True)
    start = time.perf_counter()
    vae_settings = {"resolution": args.resolution, "max_train_steps": args.vae_steps, "seed": args.seed}
    vae, vae_reused = cached(
        args,
        "vae",
        vae_settings,
        "train_vae.py",
        ["--dataset_name", "digits", "--resolution", args.resolution, "--max_train_steps", args.vae_steps] + common,
    )
    times["vae"] = time.perf_counter() - start

    print("== 2/5 flow-matching teacher (train_teacher.py --objective flow_matching)", flush=True)
    start = time.perf_counter()
    with open(args.model_config) as f:
        config = json.load(f)
    teacher_settings = {
        "vae": vae,
        "config": config,
        "max_train_steps": args.teacher_steps,
        "train_batch_size": args.teacher_batch_size,
        "learning_rate": args.teacher_learning_rate,
        "seed": args.seed,
        "text_length": "captions",  # T5 tokens: the captions' length (a cached 256-token teacher is not reused)
    }
    teacher, teacher_reused = cached(
        args,
        "teacher",
        teacher_settings,
        "train_teacher.py",
        ["--objective", "flow_matching", "--model_config", args.model_config, "--vae", vae, "--cache_latents"]
        + ["--dataset_name", "digits", "--resolution", args.resolution]
        + ["--max_train_steps", args.teacher_steps, "--train_batch_size", args.teacher_batch_size]
        + ["--learning_rate", args.teacher_learning_rate, "--lr_scheduler", "constant_with_warmup"]
        + ["--lr_warmup_steps", min(100, args.teacher_steps // 10), "--validation_nfe", 16]
        + ["--guidance_scale", args.guidance_scale, "--validation_prompts", *PROMPTS[:4]]
        + ["--checkpointing_steps", args.teacher_steps, "--validation_steps", args.teacher_steps]
        + common,
    )
    times["teacher"] = time.perf_counter() - start

    print("== 3/5 distillation with guidance (distill.py --method scd, tcm)", flush=True)
    start = time.perf_counter()
    data = captioned_digits(args)
    distill_common = ["--teacher", teacher, "--dataset_name", data, "--caption_column", "text"]
    distill_common += ["--resolution", args.resolution, "--guidance_scale", args.guidance_scale]
    distill_common += ["--sigma_data", 1.0]  # the VAE's scaling gives the latents unit standard deviation
    distill_common += ["--train_batch_size", args.distill_batch_size, "--learning_rate", args.distill_learning_rate]
    distill_common += ["--validation_prompts", *PROMPTS[:4], "--lr_scheduler", "cosine"] + common
    students = {"sCD": os.path.join(out, "student-scd")}
    run(
        "distill.py",
        distill_common
        + ["--method", "scd", "--max_train_steps", args.distill_steps]
        + ["--tangent_warmup_steps", args.tangent_warmup_steps]
        + ["--checkpointing_steps", args.distill_steps, "--validation_steps", args.distill_steps]
        + ["--output_dir", students["sCD"]],
    )
    if args.tcm_steps:
        students["TCM"] = os.path.join(out, "student-tcm")
        run(
            "distill.py",
            distill_common
            + ["--method", "tcm", "--max_train_steps", args.tcm_steps, "--stage2_max_train_steps", args.tcm_steps]
            + ["--tangent_warmup_steps", min(args.tangent_warmup_steps, args.tcm_steps)]
            + ["--checkpointing_steps", args.tcm_steps, "--validation_steps", args.tcm_steps]
            + ["--output_dir", students["TCM"]],
        )
    times["distill"] = time.perf_counter() - start

    print("== 4/5 evaluation (evaluate.py)", flush=True)
    start = time.perf_counter()
    results_json = os.path.join(out, "results.json")
    if os.path.exists(results_json):
        os.remove(results_json)  # a fresh table for this run
    evaluation = ["--num_samples", args.num_samples, "--seed", args.seed, "--output_dir", out]
    evaluation += ["--prompts", *PROMPTS, "--guidance_scale", args.guidance_scale, "--resolution", args.resolution]
    evaluation += ["--num_grid_images", 100]
    # the teacher's samples at its most NFE are the reference of every other row (fd_to_teacher, paired_rmse)
    reference_steps = max(args.teacher_steps_eval)
    teacher_eval = ["--pipeline", teacher, "--name", "teacher"]
    run("evaluate.py", teacher_eval + ["--steps", reference_steps, "--save_images"] + evaluation)
    reference = os.path.join(out, "images", f"teacher-{reference_steps}step.safetensors")
    fewer = sorted(set(args.teacher_steps_eval) - {reference_steps})
    run("evaluate.py", teacher_eval + ["--steps", *fewer, "--paired_reference", reference] + evaluation)
    for name, folder in students.items():
        run(
            "evaluate.py",
            ["--pipeline", folder, "--name", name, "--steps", 1, 2, "--paired_reference", reference] + evaluation,
        )
    times["evaluate"] = time.perf_counter() - start

    print("== 5/5 report", flush=True)
    with open(results_json) as f:
        results = json.load(f)
    summary = summarize(results, args.yardstick_steps)
    summary["checks"]["mean teacher image per prompt"] = mean_image_check(out, reference, len(PROMPTS), summary)
    side_by_side(
        out,
        [
            (
                f"teacher, CFG {args.guidance_scale:g}, {summary['reference_nfe']:g} NFE",
                f"teacher-{reference_steps}step.png",
            ),
            ("sCD, 1 step", "sCD-1step.png"),
            ("sCD, 2 steps", "sCD-2step.png"),
        ],
        os.path.join(out, "samples.png"),
    )
    students = [(name, style, f"student ({name})") for name, style in (("sCD", "s"), ("TCM", "^"))]
    teacher_label = f"teacher (CFG {args.guidance_scale:g})"
    ylabel = f"FD to the teacher's {summary['reference_nfe']:g}-NFE samples"
    plot_fd_vs_nfe(
        results["rows"],
        os.path.join(out, "fd_vs_nfe.png"),
        students,
        teacher_label,
        "fd_to_teacher",
        ylabel,
        log_y=True,
    )
    times["total"] = sum(times.values())
    reused = {"vae": vae_reused, "teacher": teacher_reused}
    lines = []
    for name, t in summary["targets"].items():
        line = f"{describe_teacher_samples_target(name, t)}, prompt accuracy {t['prompt_accuracy']:.1%}"
        if "accuracy_gap_points" in t:
            line += (
                f" ({t['accuracy_gap_points']:+.1f} points below the teacher's "
                f"{summary['teacher_prompt_accuracy']:.1%}; target <= {ACCURACY_POINTS:g})"
            )
        lines.append(line + f": {'met' if t['met'] else 'NOT met'}")
    for name, t in summary["checks"].items():  # degenerate samplers: the target must fail them
        verdict = "fails, as it must" if not t["met"] else "MEETS it: the target does not separate it"
        lines.append(f"{describe_teacher_samples_target(f'check, {name}', t)}: {verdict}")
    cached_parts = [k for k, v in reused.items() if v]
    demo = {**summary, "seconds": times, "teacher": teacher, "reused": reused, "args": vars(args)}
    finish_report(
        out,
        results,
        demo,
        lines,
        times,
        f" (cached: {', '.join(cached_parts)})" if cached_parts else "",
        "Rows of each grid: the prompts digit zero .. digit nine; columns: different noise.\n\n",
    )
    return results


if __name__ == "__main__":
    main()
