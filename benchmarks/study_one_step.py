"""What moves the demo's one-step FD-digits: sCD/TCM settings of `make demo`'s distillation, one variant at a time.

    python benchmarks/study_one_step.py --seed 1                          # every variant, held-out seed
    python benchmarks/study_one_step.py --seed 0 --variants baseline chosen  # report the choice on the demo's seed

The teacher is the demo's cached one (`examples/demo.py`'s `train_teacher`, same settings and cache key, trained first
if it is not cached). Each variant is `examples/distill.py` with the demo's distillation flags (the defaults of
`BASE`) plus its own, then `examples/evaluate.py` of the student at 1 and 2 steps; the teacher is evaluated once per
seed by its DPM-Solver++ ODE at the demo's NFE. `--seed` seeds both the distillation and the evaluation noise (the
teacher itself is always the demo's, trained with seed 0). Results accumulate in `--output` (JSON, keyed by seed and
variant; variants already there are not distilled again unless `--rerun`), and the table is printed as Markdown.

FD-digits from 1,000 samples moves a lot with the evaluation noise (the teacher's best: 1.77 at seed 0, 2.42 at
seed 1), so `--eval_seeds` evaluates every student and the teacher from several noise seeds; the table shows the mean
FD and the mean ratio to the teacher's best at the same seed.

A TCM variant may name an sCD variant as its Stage 1 (`stage1`): its Stage 2 then starts from that student
(`--stage1_model`), and its time counts both stages.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# the demo's distillation before this study (examples/demo.py: 1,500 steps of batch 64, 337 s on 2 CPU cores)
BASE = {
    "--method": "scd",
    "--train_batch_size": 64,
    "--max_train_steps": 1500,
    "--learning_rate": 1e-4,
    "--tangent_warmup_steps": 500,
    "--tangent_norm_c": 0.1,
    "--intermediate_timestep": 0.9,
}


def _stage2(steps: int, lr: float, stage1: str = "scd1000_cosine_lr2e-4", **flags) -> dict:
    """A continuous TCM Stage 2 on t >= 0.9 (two-step middle time 0.9) from the sCD variant `stage1`, cosine decay."""
    return {
        "--method": "tcm",
        "--max_train_steps": steps,
        "--lr_scheduler": "cosine",
        "--learning_rate": lr,
        "--stage2_learning_rate": lr,
        "--tcm_dividing_timestep": 0.9,
        "--tcm_intermediate_timestep": 0.9,
        **flags,
        "stage1": stage1,
    }


# name: flags over BASE (and `stage1`: the sCD variant whose student starts TCM's Stage 2)
VARIANTS = {
    "baseline": {},
    # learning rate and its schedule (a decay to 0 stops the late jitter of the normalized gradient)
    "cosine": {"--lr_scheduler": "cosine"},
    "cosine_lr2e-4": {"--lr_scheduler": "cosine", "--learning_rate": 2e-4},
    "linear_lr2e-4": {"--lr_scheduler": "linear", "--learning_rate": 2e-4},
    "lr2e-4": {"--learning_rate": 2e-4},
    # EMA length (EDM2 power EMA, default sigma_rel 0.05)
    "cosine_ema0.02": {"--lr_scheduler": "cosine", "--ema_sigma_rel": 0.02},
    "cosine_ema0.1": {"--lr_scheduler": "cosine", "--ema_sigma_rel": 0.1},
    # time proposal: more weight on high noise, where the one-step sample is decided
    "cosine_Pmean-0.4": {"--lr_scheduler": "cosine", "--P_mean": -0.4},
    "cosine_Pmean0.0": {"--lr_scheduler": "cosine", "--P_mean": 0.0},
    "cosine_Pstd1.0": {"--lr_scheduler": "cosine", "--P_std": 1.0},
    # tangent warmup and normalization
    "cosine_warmup0": {"--lr_scheduler": "cosine", "--tangent_warmup_steps": 0},
    "cosine_warmup1000": {"--lr_scheduler": "cosine", "--tangent_warmup_steps": 1000},
    "cosine_c1.0": {"--lr_scheduler": "cosine", "--tangent_norm_c": 1.0},
    "cosine_lr2e-4_Pmean-0.4": {"--lr_scheduler": "cosine", "--learning_rate": 2e-4, "--P_mean": -0.4},
    # the proposal reported for teachers trained in TrigFlow (SPEC.md section 3), warmup, EMA length at lr 2e-4
    "cosine_lr2e-4_Pmean-0.8_Pstd1.6": {
        "--lr_scheduler": "cosine",
        "--learning_rate": 2e-4,
        "--P_mean": -0.8,
        "--P_std": 1.6,
    },
    "cosine_lr2e-4_warmup0": {"--lr_scheduler": "cosine", "--learning_rate": 2e-4, "--tangent_warmup_steps": 0},
    "cosine_lr2e-4_ema0.1": {"--lr_scheduler": "cosine", "--learning_rate": 2e-4, "--ema_sigma_rel": 0.1},
    # TCM at the demo's budget: Stage 1 = 1,000 sCD steps, Stage 2 = 500 continuous steps on t >= t' = 0.9 (the
    # two-step middle time must not lie below t'; the paper's t' = 1.107 forces a worse middle time at 8x8)
    "scd1000_cosine_lr2e-4": {"--max_train_steps": 1000, "--lr_scheduler": "cosine", "--learning_rate": 2e-4},
    "tcm500_t0.9": {
        "--method": "tcm",
        "--max_train_steps": 500,
        "--lr_scheduler": "cosine",
        "--learning_rate": 2e-4,  # Stage 2: half of it
        "--tcm_dividing_timestep": 0.9,
        "--tcm_intermediate_timestep": 0.9,
        "stage1": "scd1000_cosine_lr2e-4",
    },
    "tcm500_t0.9_lr2e-4": _stage2(500, 2e-4),
    "tcm750_t0.9_lr2e-4": _stage2(750, 2e-4),
    # Stage 2 longer, with a larger learning rate, or on t >= 1.1 (the two-step middle time follows t')
    "tcm1000_t0.9_lr2e-4": _stage2(1000, 2e-4),
    "tcm500_t0.9_lr4e-4": _stage2(500, 4e-4),
    "tcm500_t0.9_lr8e-4": _stage2(500, 8e-4),
    "tcm500_t1.1_lr2e-4": _stage2(
        500,
        2e-4,
        **{"--tcm_dividing_timestep": 1.1, "--tcm_intermediate_timestep": 1.1, "--intermediate_timestep": 1.1},
    ),
    # larger learning rates in Stage 1 too
    "scd1000_cosine_lr4e-4": {"--max_train_steps": 1000, "--lr_scheduler": "cosine", "--learning_rate": 4e-4},
    "tcm500_t0.9_lr4e-4_stage1_lr4e-4": _stage2(500, 4e-4, stage1="scd1000_cosine_lr4e-4"),
    "scd1000_cosine_lr8e-4": {"--max_train_steps": 1000, "--lr_scheduler": "cosine", "--learning_rate": 8e-4},
    "scd1500_cosine_lr4e-4": {"--lr_scheduler": "cosine", "--learning_rate": 4e-4},
    # tangent normalization c = 1 (0.1 otherwise) in Stage 1, then the chosen Stage 2
    "scd1000_cosine_lr2e-4_c1.0": {
        "--max_train_steps": 1000,
        "--lr_scheduler": "cosine",
        "--learning_rate": 2e-4,
        "--tangent_norm_c": 1.0,
    },
    "tcm500_t0.9_lr4e-4_stage1_c1.0": _stage2(500, 4e-4, stage1="scd1000_cosine_lr2e-4_c1.0"),
    "tcm500_t0.9_lr4e-4_stage1_1500_lr4e-4": _stage2(500, 4e-4, stage1="scd1500_cosine_lr4e-4"),
    # Stage 2 at lr 4e-4: twice the batch, the log-normal time proposal, a stronger boundary term
    "tcm500_t0.9_lr4e-4_bs128": _stage2(500, 4e-4, **{"--stage2_train_batch_size": 128}),
    "tcm500_t0.9_lr4e-4_lognormal": _stage2(500, 4e-4, **{"--tcm_time_proposal": "lognormal"}),
    "tcm500_t0.9_lr4e-4_boundary3": _stage2(500, 4e-4, **{"--tcm_boundary_weight": 3.0}),
    # the training budget: 4,000 sCD steps (about 18 minutes on one core)
    "scd4000_cosine_lr2e-4": {"--max_train_steps": 4000, "--lr_scheduler": "cosine", "--learning_rate": 2e-4},
    # score regularization (rCM): DMD's reverse-divergence gradient in the chosen Stage 2, by its weight
    "tcm500_t0.9_lr4e-4_dmd1": _stage2(500, 4e-4, **{"--dmd_weight": 1.0}),
    "tcm500_t0.9_lr4e-4_dmd10": _stage2(500, 4e-4, **{"--dmd_weight": 10.0}),
    "tcm500_t0.9_lr4e-4_dmd100": _stage2(500, 4e-4, **{"--dmd_weight": 100.0}),
    # the term on the student's 1- and 2-step samples in turn (the 2-step ones through the middle time 0.9)
    "tcm500_t0.9_lr4e-4_dmd100_steps2": _stage2(500, 4e-4, **{"--dmd_weight": 100.0, "--dmd_sample_steps": 2}),
    "tcm500_t0.9_lr4e-4_dmd300_steps2": _stage2(500, 4e-4, **{"--dmd_weight": 300.0, "--dmd_sample_steps": 2}),
    # three fake-score updates per step (a quarter less time), and the noising times of the term's samples moved
    # toward high noise (where the digit's shape is decided) or low noise (its strokes)
    "tcm500_t0.9_lr4e-4_dmd100_steps2_fake3": _stage2(
        500, 4e-4, **{"--dmd_weight": 100.0, "--dmd_sample_steps": 2, "--dmd_fake_updates": 3}
    ),
    "tcm500_t0.9_lr4e-4_dmd100_steps2_fake3_Pmean0.8": _stage2(
        500, 4e-4, **{"--dmd_weight": 100.0, "--dmd_sample_steps": 2, "--dmd_fake_updates": 3, "--dmd_P_mean": 0.8}
    ),
    "tcm500_t0.9_lr4e-4_dmd100_steps2_fake3_Pmean-0.4": _stage2(
        500, 4e-4, **{"--dmd_weight": 100.0, "--dmd_sample_steps": 2, "--dmd_fake_updates": 3, "--dmd_P_mean": -0.4}
    ),
    "tcm500_t0.9_lr4e-4_dmd100_steps2_fake3_Pmean-0.8": _stage2(
        500, 4e-4, **{"--dmd_weight": 100.0, "--dmd_sample_steps": 2, "--dmd_fake_updates": 3, "--dmd_P_mean": -0.8}
    ),
    # more 1-step batches of the term than 2-step ones (--dmd_step_weights)
    "tcm500_t0.9_lr4e-4_dmd100_w21": _stage2(
        500, 4e-4, **{"--dmd_weight": 100.0, "--dmd_sample_steps": 2, "--dmd_step_weights": [2, 1]}
    ),
    "tcm500_t0.9_lr4e-4_dmd100_steps2_fakelr1e-4": _stage2(
        500, 4e-4, **{"--dmd_weight": 100.0, "--dmd_sample_steps": 2, "--dmd_fake_learning_rate": 1e-4}
    ),
    "tcm500_t0.9_lr4e-4_dmd100_w31": _stage2(
        500, 4e-4, **{"--dmd_weight": 100.0, "--dmd_sample_steps": 2, "--dmd_step_weights": [3, 1]}
    ),
    # the TCM paper's own Stage-2 objective: discrete consistency steps, pseudo-Huber distance
    "tcm500_t0.9_lr4e-4_discrete": _stage2(500, 4e-4, **{"--tcm_objective": "discrete"}),
    # TCM: Stage 1 = 1,000 sCD steps, Stage 2 = 500 continuous steps on t >= t' (default t' = 1.107)
    "scd1000": {"--max_train_steps": 1000},
    "scd1000_cosine": {"--max_train_steps": 1000, "--lr_scheduler": "cosine"},
    "tcm500": {"--method": "tcm", "--max_train_steps": 500, "stage1": "scd1000"},
    "tcm500_cosine": {"--method": "tcm", "--max_train_steps": 500, "--lr_scheduler": "cosine", "stage1": "scd1000"},
}


def run(script: str, args: list, log: str) -> float:
    """Run an example script in a fresh process (output to `log`); returns its wall time."""
    command = [sys.executable, str(EXAMPLES / script), *map(str, args)]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        subprocess.run(command, check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def flag_list(flags: dict) -> list:
    """`{"--flag": value}` as command-line arguments; a list value gives several (an nargs="+" flag)."""
    items = []
    for key, value in flags.items():
        if key.startswith("--"):
            items += [key, *(value if isinstance(value, (list, tuple)) else [value])]
    return items


def fd_by_steps(results_json: str, model: str) -> dict:
    with open(results_json) as f:
        rows = json.load(f)["rows"]
    return {r["steps"]: r["fd_digits"] for r in rows if r["model"] == model}


def evaluate_teacher(args, teacher: str, work: str, eval_seed: int) -> dict:
    """The teacher's FD-digits at `--teacher_nfe` from the noise of `eval_seed`, once per work folder: a study process
    running beside another on the same folder waits for the one that took the evaluation (its lock file)."""
    out = os.path.join(work, f"teacher-eval-seed{eval_seed}")
    results_json = os.path.join(out, "results.json")
    try:
        os.close(os.open(f"{out}.lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        mine = True
    except FileExistsError:
        mine = False
    while not mine and not os.path.isfile(results_json):
        time.sleep(10)
    if not os.path.isfile(results_json):
        os.makedirs(out, exist_ok=True)
        common = ["--num_samples", args.num_samples, "--seed", eval_seed, "--output_dir", out, "--num_grid_images", 0]
        run(
            "evaluate.py",
            ["--pipeline", teacher, "--name", "teacher", "--steps", *args.teacher_nfe, *common],
            f"{out}.log",
        )
    fd = fd_by_steps(results_json, "teacher")
    best = min(fd, key=fd.get)
    return {"fd_digits": fd, "best_fd_digits": fd[best], "best_nfe": best}


def distill_variant(args, name: str, teacher: str, work: str, record: dict) -> dict:
    spec = dict(VARIANTS[name])
    flags = {**BASE, **spec}
    out = os.path.join(work, name)
    student = os.path.join(out, "student")
    os.makedirs(out, exist_ok=True)
    stage1_seconds = 0.0
    extra = []
    if "stage1" in spec:
        first = spec["stage1"]
        if first not in record["variants"]:
            record["variants"][first] = distill_variant(args, first, teacher, work, record)
        extra = ["--stage1_model", os.path.join(work, first, "student")]
        stage1_seconds = record["variants"][first]["distill_seconds"]
    distill = ["--teacher", teacher, "--dataset_name", "digits", "--resolution", 8, *flag_list(flags), *extra]
    distill += ["--report_to", "none", "--seed", args.seed, "--output_dir", student]
    distill += ["--checkpointing_steps", 100000, "--validation_steps", 100000]
    seconds = run("distill.py", distill, os.path.join(out, "log.txt"))
    shown = {k: v for k, v in spec.items() if k != "stage1"}
    if "stage1" in spec:
        shown["stage1"] = spec["stage1"]
    return {"flags": shown, "distill_seconds": stage1_seconds + seconds, "fd": {}}


def evaluate_variant(args, name: str, work: str, entry: dict, eval_seed: int):
    """FD-digits of the student at 1 and 2 steps from the noise of `eval_seed` (once per seed)."""
    if str(eval_seed) in entry["fd"]:
        return
    out = os.path.join(work, name, f"eval-seed{eval_seed}")
    student = os.path.join(work, name, "student")
    common = ["--num_samples", args.num_samples, "--seed", eval_seed, "--output_dir", out, "--metrics", "fd_digits"]
    common += ["--num_grid_images", 16]
    run("evaluate.py", ["--pipeline", student, "--name", "student", "--steps", 1, 2, *common], f"{out}.log")
    fd = fd_by_steps(os.path.join(out, "results.json"), "student")
    entry["fd"][str(eval_seed)] = {"1": fd[1], "2": fd[2]}


def summary(record: dict, entry: dict) -> dict:
    """Per-step mean FD over the evaluation seeds and mean ratio to the teacher's best at the same seed."""
    seeds = [s for s in entry["fd"] if s in record["teacher"]]
    result = {"eval_seeds": seeds}
    for steps in ("1", "2"):
        fds = [entry["fd"][s][steps] for s in seeds]
        ratios = [entry["fd"][s][steps] / record["teacher"][s]["best_fd_digits"] for s in seeds]
        result[f"fd_{steps}step"] = sum(fds) / len(fds)
        result[f"ratio_{steps}step"] = sum(ratios) / len(ratios)
        result[f"ratios_{steps}step"] = ratios
    return result


def table(record: dict) -> str:
    teacher = record["teacher"]
    seeds = sorted(teacher, key=int)
    best = ", ".join(f"{teacher[s]['best_fd_digits']:.3f} (seed {s}, {teacher[s]['best_nfe']} NFE)" for s in seeds)
    lines = [
        f"Distillation seed {record['seed']}; evaluation noise seeds {', '.join(seeds)} ({record['num_samples']} "
        f"samples each). Teacher's best FD-digits (DPM-Solver++ ODE): {best}. FD: mean over the evaluation seeds; "
        "ratio: mean of FD / teacher's best at the same seed (per seed in brackets).",
        "",
        "| variant | flags over the old demo settings | 1-step FD | 2-step FD | 1-step / teacher | 2-step / teacher "
        "| distill s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, entry in record["variants"].items():
        if not entry["fd"]:
            continue
        r = summary(record, entry)
        flags = " ".join(f"{k} {v}" for k, v in entry["flags"].items()) or "(demo before the study)"
        per = {k: " ".join(f"{x:.2f}" for x in r[f"ratios_{k}step"]) for k in ("1", "2")}
        lines.append(
            f"| {name} | {flags} | {r['fd_1step']:.3f} | {r['fd_2step']:.3f} | {r['ratio_1step']:.2f}x ({per['1']}) "
            f"| {r['ratio_2step']:.2f}x ({per['2']}) | {entry['distill_seconds']:.0f} |"
        )
    return "\n".join(lines)


def upgrade(record: dict):
    """Entries written before evaluation seeds were recorded: their one evaluation was at the distillation seed."""
    if "best_fd_digits" in record.get("teacher", {}):
        record["teacher"] = {str(record["seed"]): record["teacher"]}
    for entry in record["variants"].values():
        if "fd" not in entry:
            entry["fd"] = {str(record["seed"]): {"1": entry.pop("fd_1step"), "2": entry.pop("fd_2step")}}
            entry.pop("eval_seconds", None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=1, help="distillation and evaluation seed (the demo's is 0)")
    p.add_argument("--eval_seeds", type=int, nargs="+", default=None, help="evaluation noise seeds (default: --seed)")
    p.add_argument("--num_samples", type=int, default=1000)
    p.add_argument("--teacher_nfe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    p.add_argument("--work_dir", default=os.path.join("outputs", "study_one_step"))
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "study_one_step.json"))
    p.add_argument("--rerun", action="store_true", help="run variants again that the output already has")
    p.add_argument(
        "--class_conditional",
        action="store_true",
        help="the demo's class-conditional teacher (demo.py --class_conditional)",
    )
    args = p.parse_args(argv)

    sys.path.insert(0, str(EXAMPLES))
    import demo  # the demo's cached teacher: same settings, same cache key

    teacher, _ = demo.train_teacher(demo.parse_args(["--class_conditional"] if args.class_conditional else []))
    key = f"seed{args.seed}" + ("_class_conditional" if args.class_conditional else "")
    work = os.path.abspath(os.path.join(args.work_dir, key))
    os.makedirs(work, exist_ok=True)
    everything = {}
    if os.path.isfile(args.output):
        with open(args.output) as f:
            everything = json.load(f)
    record = everything.setdefault(
        key,
        {
            "seed": args.seed,
            "class_conditional": args.class_conditional,
            "num_samples": args.num_samples,
            "base": BASE,
            "variants": {},
        },
    )
    upgrade(record)
    record.setdefault("teacher", {})
    eval_seeds = args.eval_seeds or [args.seed]

    def save():
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(everything, f, indent=2)

    for name in args.variants:
        if name not in record["variants"] or args.rerun:
            record["variants"][name] = distill_variant(args, name, teacher, work, record)
            save()
        for eval_seed in eval_seeds:  # after the first distillation, so that two processes can share the folder
            if str(eval_seed) not in record["teacher"]:
                record["teacher"][str(eval_seed)] = evaluate_teacher(args, teacher, work, eval_seed)
        for done, entry in record["variants"].items():  # also earlier variants and a TCM Stage 1 on the way
            for eval_seed in eval_seeds:
                evaluate_variant(args, done, work, entry, eval_seed)
        save()
        print(table(record), flush=True)
    print(table(record))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
