"""Text-to-image on a laptop CPU: a latent flow-matching teacher trained here, distilled with guidance into one- and
two-step students (sCD and TCM), evaluated on prompts, with a report.

    python examples/demo_t2i.py --output_dir demo-t2i-report          # or: make demo-t2i

Phases, all through the scripts a user runs (each in a fresh process):
1. `train_vae.py`: a tiny `AutoencoderKL` on the 32x32 captioned digits (cached);
2. `train_teacher.py --objective flow_matching`: a small `SD3Transformer2DModel` (config in `examples/configs/`) on
   its latents, captions "digit zero" .. "digit nine" through a small frozen text encoder created by the script,
   caption dropout for classifier-free guidance; saved as a `StableDiffusion3Pipeline` folder (cached);
3. `distill.py --method scd --guidance_scale W` from that pipeline, and `--method tcm` as a second student;
4. `evaluate.py` on the ten prompts: the teacher with guidance W (its own pipeline and scheduler) at 8 to 64 NFE, the
   students at 1 and 2 steps, from the same latent noise: FD-digits, prompt accuracy (the digits classifier's label
   equals the prompt's digit), paired RMSE to the teacher's guided ODE, seconds per image;
5. the report: `results.json`, `results.md` (table and targets), `samples.png` (a row per prompt: teacher | 1 step |
   2 steps), `fd_vs_nfe.png`.

Targets: the 1-step sCD student's FD-digits <= 1.5x the teacher's best and its prompt accuracy within 3 points of the
guided teacher's; 2 steps <= 1.15x; at >= 16x fewer NFE (the teacher evaluated at 16x the student's NFE or more).
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from diffusers_scm.metrics import describe_target, few_step_target


EXAMPLES = Path(__file__).resolve().parent
sys.path.insert(0, str(EXAMPLES))

from demo import finish_report, plot_fd_vs_nfe, publish, run, settings_key, side_by_side  # noqa: E402


PROMPTS = [f"digit {w}" for w in "zero one two three four five six seven eight nine".split()]
TARGETS = {1: 1.5, 2: 1.15}  # FD-digits / the teacher's best
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
    p.add_argument("--distill_steps", type=int, default=300)
    p.add_argument("--distill_batch_size", type=int, default=32)
    p.add_argument("--distill_learning_rate", type=float, default=1e-4)
    p.add_argument("--tangent_warmup_steps", type=int, default=100)
    p.add_argument("--tcm_steps", type=int, default=150, help="each TCM stage (0: no TCM row)")
    p.add_argument("--teacher_steps_eval", type=int, nargs="+", default=[4, 8, 16, 32], help="ODE steps (NFE x2)")
    p.add_argument("--num_samples", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


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


def summarize(results: dict) -> dict:
    """The targets: per student and step count, FD-digits / the teacher's best, the NFE reduction, and for the
    1-step sCD student the prompt accuracy against the guided teacher's (best-FD row). The NFE claim compares with the
    teacher evaluated at >= 16x the student's NFE (`metrics.few_step_target`)."""
    teacher = [r for r in results["rows"] if r["model"] == "teacher"]
    best = min(teacher, key=lambda r: r["fd_digits"])
    summary = {
        "teacher_best_fd_digits": best["fd_digits"],
        "teacher_best_nfe": best["nfe"],
        "teacher_best_steps": best["steps"],
        "teacher_prompt_accuracy": best["prompt_accuracy"],
        "targets": {},
    }
    for row in results["rows"]:
        if row["model"] == "teacher" or row["steps"] not in TARGETS:
            continue
        entry = few_step_target(teacher, row, TARGETS[row["steps"]])
        entry["fd_ratio_to_teacher_best"] = entry.pop("ratio")
        entry["prompt_accuracy"] = row["prompt_accuracy"]
        met = entry["met"]
        if row["steps"] == 1:
            gap = 100 * (best["prompt_accuracy"] - row["prompt_accuracy"])
            entry["accuracy_gap_points"] = gap
            met = met and gap <= ACCURACY_POINTS
        entry["met"] = bool(met)
        summary["targets"][f"{row['model']} {row['steps']}-step"] = entry
    return summary


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
    run("evaluate.py", ["--pipeline", teacher, "--name", "teacher", "--steps", *args.teacher_steps_eval] + evaluation)
    for name, folder in students.items():
        run(
            "evaluate.py",
            ["--pipeline", folder, "--name", name, "--steps", 1, 2, "--paired_teacher", teacher]
            + ["--paired_teacher_steps", max(args.teacher_steps_eval)]
            + evaluation,
        )
    times["evaluate"] = time.perf_counter() - start

    print("== 5/5 report", flush=True)
    with open(results_json) as f:
        results = json.load(f)
    summary = summarize(results)
    side_by_side(
        out,
        [
            (
                f"teacher, CFG {args.guidance_scale:g}, {summary['teacher_best_nfe']:g} NFE",
                f"teacher-{summary['teacher_best_steps']}step.png",
            ),
            ("sCD, 1 step", "sCD-1step.png"),
            ("sCD, 2 steps", "sCD-2step.png"),
        ],
        os.path.join(out, "samples.png"),
    )
    students = [(name, style, f"student ({name})") for name, style in (("sCD", "s"), ("TCM", "^"))]
    teacher_label = f"teacher (CFG {results['rows'][0].get('guidance_scale', '')})"
    plot_fd_vs_nfe(results["rows"], os.path.join(out, "fd_vs_nfe.png"), students, teacher_label)
    times["total"] = sum(times.values())
    reused = {"vae": vae_reused, "teacher": teacher_reused}
    lines = []
    for name, t in summary["targets"].items():
        line = f"{describe_target(name, t)}, prompt accuracy {t['prompt_accuracy']:.1%}"
        if "accuracy_gap_points" in t:
            line += (
                f" ({t['accuracy_gap_points']:+.1f} points below the teacher's "
                f"{summary['teacher_prompt_accuracy']:.1%}; target <= {ACCURACY_POINTS:g})"
            )
        lines.append(line + f": {'met' if t['met'] else 'NOT met'}")
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
