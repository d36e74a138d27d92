"""The whole path on a laptop CPU: train a digits teacher, distill it with sCD and TCM, evaluate both, write a report.

    python examples/demo.py --output_dir demo-report          # or: make demo

Phases (each with its own progress bar), all through the scripts a user runs:
1. `train_teacher.py`: a tiny TrigFlow `SCMUNet2DModel` on the 8x8 digits (cached under
   `~/.cache/diffusers_scm/demo/`, keyed by its settings, and reused by later runs); `--teacher_architecture edm2`:
   a tiny `EDM2UNet2DModel` (`examples/configs/edm2_digits.json`) trained the EDM2 way instead (`--objective edm`:
   EDM's loss weighting, EDM2's uncertainty weighting through the network's log-variance output, EDM2's ImageNet-64
   noise levels P_mean -0.8, P_std 1.6, learning rate 1e-2), then distilled with the same TCM settings at 10x the
   student's learning rates (2e-3, 4e-3: EDM2's normalized weights move slowly at the SCMUNet student's rates);
2. `distill.py --method tcm`: the one/two-step student, from a copy of the teacher: sCD as TCM's Stage 1, then its
   Stage 2 on t >= `--tcm_dividing_timestep` from the Stage-1 student, with rCM's score regularization
   (`--dmd_weight`; `--distill_method scd`: sCD only);
3. `evaluate.py`: the teacher by its ODE (DPM-Solver++ at several NFE; cached beside the teacher, keyed by the seed,
   sample count and NFE) and the student in 1 and 2 steps, from the same noise, with FD-digits and the paired RMSE to
   the teacher's ODE solution at the most NFE (its saved images, `evaluate.py --paired_reference`);
4. the report: `results.json`, `results.md` (the table and the targets), `samples.png` (teacher and student side by
   side, same noise), `fd_vs_nfe.png` (FD-digits against NFE), and the sample grids under `grids/`.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from diffusers_scm.metrics import describe_target, few_step_target


EXAMPLES = Path(__file__).resolve().parent
EDM2_DIGITS_CONFIG = EXAMPLES / "configs" / "edm2_digits.json"
# the teacher's network, how train_teacher.py trains it (the flags beyond the common ones, the learning rate) and the
# student's learning rates (TCM Stage 1 and Stage 2; the student is a copy of the teacher's network)
TEACHER_ARCHITECTURES = {
    "scmunet": {"flags": {}, "learning_rate": 1e-3, "student_learning_rates": (2e-4, 4e-4)},
    # EDM2 (magnitude-preserving, forced weight normalization) trains at a higher rate: 600-step validation loss 0.63 at
    # 1e-2 against 0.90 at 1e-3 (an SCMUNet2DModel at 1e-3: 0.61); P_mean, P_std: EDM2's ImageNet-64 noise levels.
    # Its student too: FD-digits 1.65x / 1.26x the teacher's best (1 / 2 steps) at 2e-3 / 4e-3, against 6.99x / 2.83x
    # at the SCMUNet student's 2e-4 / 4e-4 (docs/results/demos.md)
    "edm2": {
        "flags": {"objective": "edm", "P_mean": -0.8, "P_std": 1.6},
        "learning_rate": 1e-2,
        "student_learning_rates": (2e-3, 4e-3),
    },
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="demo-report")
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "diffusers_scm", "demo"))
    p.add_argument("--retrain_teacher", action="store_true", help="ignore a cached teacher")
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--teacher_steps", type=int, default=4000)
    p.add_argument("--teacher_batch_size", type=int, default=64)
    p.add_argument(
        "--teacher_learning_rate", type=float, default=None, help="default 1e-3 (scmunet), 1e-2 (edm2, EDM2-style)"
    )
    p.add_argument(
        "--teacher_architecture",
        choices=list(TEACHER_ARCHITECTURES),
        default="scmunet",
        help="scmunet: the TrigFlow SCMUNet2DModel teacher; edm2: an EDM2UNet2DModel trained with --objective edm",
    )
    p.add_argument("--class_conditional", action="store_true", help="teacher and student conditioned on the digit")
    # the student: TCM, 1,000 sCD steps (Stage 1, cosine learning rate 2e-4) then 500 Stage-2 steps on t >= 0.9
    # (cosine 4e-4). Chosen with benchmarks/study_one_step.py on the held-out distillation seed 1 (FD-digits from
    # 5,000 samples): 1-step 2.14x / 2-step 1.01x the teacher's best, against 2.31x / 1.05x with Stage 2 at 2e-4,
    # 2.43x / 1.35x for 1,500 sCD steps (cosine, 2e-4) and 2.73x / 1.31x for the Stage 1 alone. --distill_method scd
    # gives the sCD-only student.
    p.add_argument("--distill_method", choices=["scd", "tcm"], default="tcm", help="tcm: sCD Stage 1, then Stage 2")
    p.add_argument("--distill_steps", type=int, default=1000, help="sCD steps (TCM: Stage 1)")
    p.add_argument("--distill_batch_size", type=int, default=64)
    p.add_argument("--distill_learning_rate", type=float, default=None, help="default 2e-4 (scmunet), 2e-3 (edm2)")
    p.add_argument("--distill_lr_scheduler", default="cosine", help="distill.py --lr_scheduler (each TCM stage)")
    p.add_argument("--tangent_warmup_steps", type=int, default=500)
    p.add_argument("--tangent_norm_c", default="0.1")
    p.add_argument("--stage2_steps", type=int, default=500, help="TCM Stage-2 steps")
    p.add_argument(
        "--stage2_learning_rate", type=float, default=None, help="TCM Stage 2; default 4e-4 (scmunet), 4e-3 (edm2)"
    )
    p.add_argument("--tcm_dividing_timestep", type=float, default=0.9, help="TCM's t' (the two-step middle time too)")
    # Stage 2's score regularization (distill.py --dmd_weight), on the 1- and 2-step samples in turn, 3 fake-score
    # updates per step, noising times toward low noise (--dmd_P_mean -0.8): chosen on seed 1 (FD-digits from 5,000
    # samples) 1.54x / 1.25x the teacher's best, against 1.84x / 1.27x at P_mean 0, 2.38x / 1.49x at 0.8, 1.80x /
    # 1.16x with 4 updates, 2.14x / 1.01x without the term (benchmarks/study_one_step.py, README)
    p.add_argument("--dmd_weight", type=float, default=100.0, help="score regularization of Stage 2 (0: off)")
    p.add_argument("--dmd_sample_steps", type=int, choices=[1, 2], default=2)
    p.add_argument("--dmd_fake_updates", type=int, default=3, help="fake-score updates per student update")
    p.add_argument("--dmd_P_mean", type=float, default=-0.8, help="noising times of the term's samples")
    # two-step middle time: 0.9 suits 8x8 digits (2-step FD-digits of a 1,500-step student: 1.80 at 0.9, 1.82 at 0.8,
    # 1.99 at 1.0, 2.27 at sCM's 1.1 for 64x64 images, 2.62 at 1.2)
    p.add_argument("--intermediate_timestep", type=float, default=0.9)
    p.add_argument("--teacher_nfe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    stage1, stage2 = TEACHER_ARCHITECTURES[args.teacher_architecture]["student_learning_rates"]
    args.distill_learning_rate = stage1 if args.distill_learning_rate is None else args.distill_learning_rate
    args.stage2_learning_rate = stage2 if args.stage2_learning_rate is None else args.stage2_learning_rate
    return args


def run(script: str, args: list) -> None:
    """Run an example script in a fresh process, exactly as a user would (stdout/stderr stream through)."""
    command = [sys.executable, str(EXAMPLES / script), *map(str, args)]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def teacher_settings(args) -> dict:
    architecture = TEACHER_ARCHITECTURES[args.teacher_architecture]
    settings = {
        "resolution": args.resolution,
        "max_train_steps": args.teacher_steps,
        "train_batch_size": args.teacher_batch_size,
        "learning_rate": args.teacher_learning_rate or architecture["learning_rate"],
        "seed": args.seed,
        # only when set, so that the unconditional teacher keeps its cache key
        **({"class_conditional": True} if args.class_conditional else {}),
        **architecture["flags"],
    }
    if args.teacher_architecture == "edm2":  # the network's config itself (at this resolution) keys the cache
        with open(EDM2_DIGITS_CONFIG) as f:
            config = json.load(f)
        settings["model_config"] = {
            **config,
            "sample_size": args.resolution,
            "num_classes": 10 * args.class_conditional,
        }
    return settings


def settings_key(settings: dict) -> str:
    """The cache key of a cached output: a short hash of the settings that made it."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def publish(partial: str, folder: str) -> None:
    """Move a finished output from `partial` to its cache `folder` (replacing an older one), without its training
    checkpoints: the result is what is cached, not the training state."""
    for name in os.listdir(partial):
        if name.startswith("checkpoint-"):
            shutil.rmtree(os.path.join(partial, name))
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.replace(partial, folder)


def train_teacher(args) -> tuple[str, bool]:
    """The cached teacher for these settings, trained first if needed; returns (folder, reused)."""
    settings = teacher_settings(args)
    folder = os.path.join(args.cache_dir, f"teacher-{settings_key(settings)}")
    if os.path.isfile(os.path.join(folder, "model_index.json")) and not args.retrain_teacher:
        print(f"Reusing the cached teacher {folder}")
        return folder, True
    partial = folder + ".partial"  # an interrupted run resumes from its last checkpoint
    if "model_config" in settings:  # written beside the teacher, passed as a file
        os.makedirs(args.cache_dir, exist_ok=True)
        config_file = f"{folder}.config.json"
        with open(config_file, "w") as f:
            json.dump(settings["model_config"], f, indent=2)
        settings = {**settings, "model_config": config_file}
    run(
        "train_teacher.py",
        ["--preset", "tiny", "--dataset_name", "digits", "--report_to", "none", "--output_dir", partial]
        + [f"--{k}={v}" for k, v in settings.items() if not isinstance(v, bool)]
        + [f"--{k}" for k, v in settings.items() if v is True]
        + ["--checkpointing_steps", 1000, "--checkpoints_total_limit", 1, "--resume_from_checkpoint", "latest"]
        + ["--validation_steps", args.teacher_steps, "--num_validation_images", 16],
    )
    publish(partial, folder)
    return folder, False


def evaluate_teacher(args, teacher: str) -> tuple[str, bool]:
    """The teacher's rows (its DPM-Solver++ ODE at `--teacher_nfe`) from the demo's noise, cached beside the teacher
    and keyed by the evaluation settings: a folder of `evaluate.py --save_images` whose images at the most NFE are the
    students' paired reference. Returns (folder, reused)."""
    settings = {"num_samples": args.num_samples, "seed": args.seed, "steps": sorted(args.teacher_nfe)}
    folder = f"{teacher}-eval-{settings_key(settings)}"
    if os.path.isfile(os.path.join(folder, "results.json")) and not args.retrain_teacher:
        print(f"Reusing the teacher's cached evaluation {folder}")
        return folder, True
    partial = folder + ".partial"
    if os.path.isdir(partial):
        shutil.rmtree(partial)
    run(
        "evaluate.py",
        ["--pipeline", teacher, "--name", "teacher", "--steps", *settings["steps"], "--save_images"]
        + ["--num_samples", args.num_samples, "--seed", args.seed, "--output_dir", partial],
    )
    publish(partial, folder)
    return folder, False


def side_by_side(output_dir: str, panels: list[tuple[str, str]], path: str):
    """One PNG with the given sample grids side by side, each titled."""
    from PIL import Image, ImageDraw

    images = [(title, Image.open(os.path.join(output_dir, "grids", file)).convert("RGB")) for title, file in panels]
    pad, head = 8, 18
    width = sum(im.width for _, im in images) + pad * (len(images) + 1)
    height = max(im.height for _, im in images) + head + 2 * pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for title, im in images:
        draw.text((x, pad // 2), title, fill="black")
        canvas.paste(im, (x, head + pad))
        x += im.width + pad
    canvas.save(path)


def plot_fd_vs_nfe(
    rows: list[dict],
    path: str,
    students=(("student", "s", "student"),),
    teacher_label="teacher",
    metric: str = "fd_digits",
    ylabel: str = "FD-digits (lower is better)",
    log_y: bool = False,
):
    """`metric` (FD-digits) against NFE: the teacher's rows as a line, each student's (`students`: (model, marker,
    label)) as points; rows without the metric are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for model, style, label in (("teacher", "o-", teacher_label), *students):
        points = sorted((r["nfe"], r[metric]) for r in rows if r["model"] == model and r.get(metric) is not None)
        if points:
            nfe, fd = zip(*points)
            ax.plot(nfe, fd, style, label=label, markersize=7)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finish_report(
    out: str, results: dict, demo: dict, lines: list[str], times: dict, cached: str = "", note: str = ""
):
    """Write the demo's summary into `results.json` (under "demo") and its target lines, the time line (`cached`:
    what was reused, appended to it), `note` and the figures into `results.md`; print the lines."""
    results["demo"] = demo
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    lines = [*lines, "- time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + cached]
    with open(os.path.join(out, "results.md"), "a") as f:
        f.write(
            "\n## Demo targets\n\n"
            + "\n".join(lines)
            + f"\n\n{note}"
            + "![samples](samples.png)\n\n![FD-digits](fd_vs_nfe.png)\n"
        )
    print("\n".join(lines))
    print(f"Report: {out}/results.md")


def summarize(results: dict) -> dict:
    """The demo's targets: student 1-step FD-digits <= 1.5x the teacher's best, 2-step <= 1.10x, at >= 16x fewer NFE
    (the teacher evaluated at 16x the student's NFE or more; `metrics.few_step_target`)."""
    teacher = [r for r in results["rows"] if r["model"] == "teacher"]
    student = {r["steps"]: r for r in results["rows"] if r["model"] == "student"}
    best = min(teacher, key=lambda r: r["fd_digits"])
    summary = {
        "teacher_best_fd_digits": best["fd_digits"],
        "teacher_best_nfe": best["nfe"],
        "teacher_best_steps": best["steps"],
        "targets": {},
    }
    for steps, limit in ((1, 1.5), (2, 1.10)):
        if steps in student:
            target = few_step_target(teacher, student[steps], limit)
            target["fd_ratio_to_teacher_best"] = target.pop("ratio")
            if "class_accuracy" in student[steps]:  # class-conditional: reported beside the target
                target["class_accuracy"] = student[steps]["class_accuracy"]
            summary["targets"][f"{steps}-step"] = target
    if "class_accuracy" in best:
        summary["teacher_class_accuracy"] = best["class_accuracy"]
    return summary


def target_line(name: str, target: dict, summary: dict) -> str:
    """A target's report line, with the class accuracy of a class-conditional student beside the teacher's."""
    line = f"{describe_target(name, target)}: {'met' if target['met'] else 'NOT met'}"
    if "class_accuracy" in target:
        line += f"; class accuracy {target['class_accuracy']:.1%} (teacher {summary['teacher_class_accuracy']:.1%})"
    return line


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    times = {}

    print("== 1/4 teacher (train_teacher.py)", flush=True)
    start = time.perf_counter()
    teacher, reused = train_teacher(args)
    times["teacher"] = time.perf_counter() - start

    print(f"== 2/4 {args.distill_method.upper()} distillation (distill.py)", flush=True)
    start = time.perf_counter()
    student = os.path.join(out, "student")
    stage_flags = []
    if args.distill_method == "tcm":  # Stage 2 after the sCD Stage 1, from t' up; two steps through t'
        stage_flags = [
            "--stage2_max_train_steps",
            args.stage2_steps,
            "--stage2_learning_rate",
            args.stage2_learning_rate,
        ]
        stage_flags += ["--tcm_dividing_timestep", args.tcm_dividing_timestep]
        stage_flags += ["--tcm_intermediate_timestep", max(args.intermediate_timestep, args.tcm_dividing_timestep)]
    if args.dmd_weight:  # Stage 2's (TCM) or the whole run's (sCD, after the tangent warmup)
        stage_flags += ["--dmd_weight", args.dmd_weight, "--dmd_fake_updates", args.dmd_fake_updates]
        stage_flags += ["--dmd_sample_steps", args.dmd_sample_steps, "--dmd_P_mean", args.dmd_P_mean]
    last = max(args.distill_steps, args.stage2_steps)
    run(
        "distill.py",
        ["--teacher", teacher, "--method", args.distill_method, "--dataset_name", "digits"]
        + ["--resolution", args.resolution, "--train_batch_size", args.distill_batch_size]
        + ["--max_train_steps", args.distill_steps, "--learning_rate", args.distill_learning_rate]
        + ["--lr_scheduler", args.distill_lr_scheduler, "--tangent_warmup_steps", args.tangent_warmup_steps]
        + ["--tangent_norm_c", args.tangent_norm_c, "--intermediate_timestep", args.intermediate_timestep]
        + stage_flags
        + ["--report_to", "none", "--seed", args.seed]
        + ["--checkpointing_steps", last, "--checkpoints_total_limit", 1]
        + ["--validation_steps", last, "--num_validation_images", 16, "--output_dir", student],
    )
    times["distill"] = time.perf_counter() - start

    print("== 3/4 evaluation (evaluate.py)", flush=True)
    start = time.perf_counter()
    results_json = os.path.join(out, "results.json")
    if os.path.exists(results_json):
        os.remove(results_json)  # a fresh table for this run
    teacher_eval, eval_reused = evaluate_teacher(args, teacher)
    shutil.copy(os.path.join(teacher_eval, "results.json"), results_json)  # the student's rows join the teacher's
    shutil.copytree(os.path.join(teacher_eval, "grids"), os.path.join(out, "grids"), dirs_exist_ok=True)
    reference = os.path.join(teacher_eval, "images", f"teacher-{max(args.teacher_nfe)}step.safetensors")
    run(
        "evaluate.py",
        ["--pipeline", student, "--name", "student", "--steps", 1, 2, "--paired_reference", reference]
        + ["--num_samples", args.num_samples, "--seed", args.seed, "--output_dir", out],
    )
    times["evaluate"] = time.perf_counter() - start

    print("== 4/4 report", flush=True)
    with open(results_json) as f:
        results = json.load(f)
    summary = summarize(results)
    best_nfe, best_steps = summary["teacher_best_nfe"], summary["teacher_best_steps"]
    side_by_side(
        out,
        [
            (f"teacher, ODE {best_nfe:g} NFE", f"teacher-{best_steps}step.png"),
            ("student, 1 step", "student-1step.png"),
            ("student, 2 steps", "student-2step.png"),
        ],
        os.path.join(out, "samples.png"),
    )
    plot_fd_vs_nfe(results["rows"], os.path.join(out, "fd_vs_nfe.png"))
    times["total"] = sum(times.values())
    lines = [target_line(name, t, summary) for name, t in summary["targets"].items()]
    demo = {**summary, "seconds": times, "teacher": teacher, "teacher_reused": reused, "args": vars(args)}
    demo["teacher_evaluation_reused"] = eval_reused
    cached = [what for what, hit in (("teacher", reused), ("teacher's evaluation", eval_reused)) if hit]
    finish_report(out, results, demo, lines, times, f" (cached {' and '.join(cached)})" if cached else "")
    return results


if __name__ == "__main__":
    main()
