"""sCD on 2-D data, where exact sample metrics are cheap: train a small TrigFlow MLP teacher, distill it, compare.

    python examples/toy_2d.py [--teacher_steps 3000] [--distill_steps 3000] [--json toy_2d.json]
    python examples/toy_2d.py --method cd     # discrete-time consistency distillation instead of sCD
    python examples/toy_2d.py --method tcm --tcm_objective continuous --stage2_steps 3000   # TCM (SPEC.md section 5)

Data: a mixture of 8 Gaussians on the unit circle. The teacher is trained with the TrigFlow diffusion loss and sampled by
its probability-flow ODE (`TrigFlowODEScheduler`, DPM-Solver++ 64 steps); the student starts from the teacher and is
trained with `SCMLoss` (sCD), its learning rate decayed to 0 on a cosine (`--lr_schedule`; with a constant rate the
normalized tangent keeps the weights jittering and the students plateau near 1.8x the teacher's MMD). Two-step
sampling re-noises to `--intermediate_timestep` (0.4 here: the modes are 0.77 apart, and the image setting 1.1, sigma
0.98, would wash out which mode the first step chose). Reported for teacher and students: MMD (multi-scale Gaussian
kernels) and sliced Wasserstein-2 distance to fresh data, the fraction of samples off every mode, the paired RMSE to the
teacher's ODE solution from the same noise, and the MMD as a ratio to the teacher's.

`--method cd` trains with the discrete `ConsistencyLoss` (ECT's step schedule) instead. `--method tcm` trains Stage 1
(`--tcm_stage1_method`), then Stage 2 (`TCMLoss`, `--tcm_objective`) from the Stage-1 EMA weights for `--stage2_steps`,
and, as the baseline at the same total number of steps, Stage 1 continued with its own loss for as many steps.
`--cache_dir` keeps the teacher and Stage-1 weights, so several Stage-2 runs share them.
"""

import argparse
import copy
import json
import math
import os
import time

import torch
from diffusers.optimization import get_scheduler
from torch import nn
from tqdm.auto import tqdm

from diffusers_scm import TrigFlowDenoiser, TrigFlowODEScheduler, TrigFlowScheduler
from diffusers_scm.training import (
    ConsistencyLoss,
    LogVarHead,
    PowerFunctionEMA,
    SCMLoss,
    TCMLoss,
    TrigFlowDiffusionLoss,
)


SIGMA_DATA = 0.5


class TimeMLP(nn.Module):
    """MLP for 2-D points; time through a positional embedding of c_noise(t) = t (SPEC.md sections 3 and 7)."""

    def __init__(self, width=256, depth=4, channels=32, min_freq=1e-4, max_freq=1.0):
        super().__init__()
        self.register_buffer("freqs", torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), channels // 2)))
        layers, d = [], 2 + channels
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        self.net = nn.Sequential(*layers, nn.Linear(d, 2))

    def forward(self, sample, timestep):
        arg = timestep.float()[:, None] * self.freqs[None]
        return self.net(torch.cat([sample, torch.cos(arg), torch.sin(arg)], dim=1))


CENTERS = torch.stack([torch.cos(torch.arange(8) * math.pi / 4), torch.sin(torch.arange(8) * math.pi / 4)], dim=1)
CLUSTER_STD = 0.1


def sample_data(n, generator=None):
    """8 Gaussians (std 0.1) on the unit circle: per-coordinate std 0.71, sigma_data 0.5 as for images.

    (With the data's std exactly equal to sigma_data the ideal F has no linear part, and a small MLP sits at F = 0
    for thousands of steps before it starts to learn.)"""
    k = torch.randint(0, 8, (n,), generator=generator)
    return CENTERS[k] + CLUSTER_STD * torch.randn(n, 2, generator=generator)


def mmd(a, b, bandwidths=(0.05, 0.1, 0.2, 0.5, 1.0), n=4096):
    """Maximum mean discrepancy with a sum of Gaussian kernels (square root of the unbiased-free V-statistic)."""
    a, b = a[:n].double(), b[:n].double()

    def k(x, y):
        d2 = torch.cdist(x, y) ** 2
        return sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)

    return (k(a, a).mean() + k(b, b).mean() - 2 * k(a, b).mean()).clamp_min(0).sqrt().item()


def off_mode_fraction(x, radius=3 * CLUSTER_STD):
    """Fraction of samples farther than 3 cluster standard deviations from every mode."""
    return (torch.cdist(x, CENTERS).min(dim=1).values > radius).float().mean().item()


def sliced_wasserstein(a, b, projections=256, seed=0):
    """sqrt of the mean over random directions of the squared W2 distance of the 1-D projections."""
    dirs = torch.randn(2, projections, generator=torch.Generator().manual_seed(seed))
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = torch.sort(a @ dirs, dim=0).values, torch.sort(b @ dirs, dim=0).values
    return ((pa - pb) ** 2).mean().sqrt().item()


@torch.no_grad()
def sample(model, scheduler, noise, steps, generator_seed=0):
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    g = torch.Generator().manual_seed(generator_seed)
    for t in scheduler.timesteps:
        sample_in, t_in = scheduler.model_inputs(x, t)
        raw = model.inner_model(sample_in, t_in.expand(x.shape[0]))
        x = scheduler.step(raw, t, x, generator=g).prev_sample
    return x


def train(
    model,
    loss_fn,
    steps,
    lr,
    batch,
    desc,
    teacher=None,
    ema_sigma_rel=0.05,
    seed=0,
    stage1=None,
    lr_schedule="constant",
):
    head = LogVarHead()
    opt = torch.optim.Adam(list(model.parameters()) + list(head.parameters()), lr=lr, betas=(0.9, 0.99))
    lr_scheduler = get_scheduler(lr_schedule, opt, num_warmup_steps=0, num_training_steps=steps)
    ema = PowerFunctionEMA(model, sigma_rel=ema_sigma_rel)
    g = torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps), desc=desc):
        x0 = sample_data(batch, g)
        if isinstance(loss_fn, TCMLoss):
            loss, _ = loss_fn(model, stage1, x0, teacher=teacher, step=step, logvar_head=head, generator=g)
        elif isinstance(loss_fn, ConsistencyLoss):
            loss, _ = loss_fn(model, x0, teacher=teacher, step=step)
        elif isinstance(loss_fn, SCMLoss):
            loss, _ = loss_fn(model, x0, teacher=teacher, step=step, logvar_head=head)
        else:
            loss, _ = loss_fn(model, x0, logvar_head=head)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lr_scheduler.step()
        ema.step(model)
    return ema.averaged_model(model).eval()


def consistency_loss(method, steps, tangent_norm_c, P_mean, P_std, warmup=True, start_stage=0):
    """sCD (`SCMLoss`) or discrete CD (`ConsistencyLoss`, ECT's schedule with 8 stages over `steps`)."""
    if method == "scd":
        warmup_steps = steps // 4 if warmup else 0
        return SCMLoss(
            SIGMA_DATA, P_mean=P_mean, P_std=P_std, tangent_warmup_steps=warmup_steps, tangent_norm_c=tangent_norm_c
        )
    if method == "cd":
        return ConsistencyLoss(
            SIGMA_DATA, P_mean=P_mean, P_std=P_std, stage_steps=max(1, steps // 8), start_stage=start_stage
        )
    raise ValueError(f"Unknown method {method!r}: use 'scd' or 'cd'.")


def _cached(cache_dir, name, build):
    """`build(fresh=True)` trains a model; with `cache_dir` its state dict is kept as `name`, and later calls load it
    into `build(fresh=False)` (an untrained model of the same shape)."""
    path = os.path.join(cache_dir, name) if cache_dir else None
    if path and os.path.isfile(path):
        model = build(fresh=False)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = build(fresh=True)
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model


def run(
    teacher_steps=3000,
    distill_steps=3000,
    batch=1024,
    n_eval=8192,
    seed=0,
    teacher_lr=1e-3,
    distill_lr=1e-3,
    tangent_norm_c=0.003,  # with D = 2, ||g|| is small: c = 0.1 (the image setting) damps the tangent (measured)
    P_mean=-1.0,
    P_std=1.4,
    lr_schedule="cosine",
    intermediate_timestep=0.4,
    method="scd",
    tcm_stage1_method="scd",
    tcm_objective="continuous",
    stage2_steps=None,
    stage2_lr=None,
    boundary_weight=None,
    cache_dir=None,
):
    torch.manual_seed(seed)
    start = time.time()
    if method not in ("scd", "cd", "tcm"):
        raise ValueError(f"Unknown method {method!r}: use 'scd', 'cd' or 'tcm'.")

    def build_teacher(fresh):
        net = TrigFlowDenoiser(TimeMLP(), "trigflow", sigma_data=SIGMA_DATA)
        if not fresh:
            return net
        loss = TrigFlowDiffusionLoss(SIGMA_DATA, P_mean=-0.8, P_std=1.6)
        return train(net, loss, teacher_steps, teacher_lr, batch, "teacher", seed=seed)

    teacher = _cached(cache_dir, f"teacher_{teacher_steps}_{seed}.pt", build_teacher).requires_grad_(False)

    def distill(stage_method, init, steps, lr, desc, seed_offset, warmup=True, start_stage=0):
        student = copy.deepcopy(init).requires_grad_(True).train()
        loss_fn = consistency_loss(stage_method, steps, tangent_norm_c, P_mean, P_std, warmup, start_stage)
        return train(
            student, loss_fn, steps, lr, batch, desc, teacher=teacher, seed=seed + seed_offset, lr_schedule=lr_schedule
        )

    first = method if method != "tcm" else tcm_stage1_method

    def build_stage1(fresh):
        if not fresh:
            return copy.deepcopy(teacher)
        return distill(first, teacher, distill_steps, distill_lr, first.upper(), 1)

    stage1 = _cached(
        cache_dir, f"stage1_{first}_{lr_schedule}_{teacher_steps}_{distill_steps}_{seed}.pt", build_stage1
    )
    stage1.requires_grad_(False)
    cm = TrigFlowScheduler(sigma_data=SIGMA_DATA, intermediate_timesteps=intermediate_timestep)
    if method != "tcm":
        students = {"student": (stage1, cm)}
    else:
        stage2_steps = stage2_steps or distill_steps // 2
        stage2_lr = stage2_lr or distill_lr / 2
        cl = ConsistencyLoss(SIGMA_DATA)
        # discrete Stage 2 after a finished Stage 1: the schedule's smallest step (as distill.py does)
        start_stage = (distill_steps // max(1, distill_steps // 8)) if first == "cd" else cl.stage_at_limit()
        inner = consistency_loss(
            "scd" if tcm_objective == "continuous" else "cd",
            stage2_steps,
            tangent_norm_c,
            P_mean,
            P_std,
            False,
            start_stage,
        )
        tcm = TCMLoss(tcm_objective, inner, sigma_data=SIGMA_DATA, boundary_weight=boundary_weight)
        student = copy.deepcopy(stage1).requires_grad_(True).train()
        stage2 = train(
            student,
            tcm,
            stage2_steps,
            stage2_lr,
            batch,
            f"TCM stage 2 ({tcm_objective})",
            teacher,
            seed=seed + 2,
            stage1=stage1,
            lr_schedule=lr_schedule,
        )
        continued = distill(
            first, stage1, stage2_steps, stage2_lr, f"{first.upper()} continued", 3, False, start_stage
        )
        t_div = tcm.dividing_timestep
        students = {
            f"stage 1 ({first}, {distill_steps})": (stage1, cm),
            f"stage 1 continued ({distill_steps + stage2_steps})": (continued, cm),
            f"stage 2 ({tcm_objective}, +{stage2_steps})": (
                stage2,
                TrigFlowScheduler(sigma_data=SIGMA_DATA, dividing_timestep=t_div, intermediate_timesteps=t_div),
            ),
        }

    g = torch.Generator().manual_seed(1234)
    data_ref, data_ref2 = sample_data(n_eval, g), sample_data(n_eval, g)
    noise = torch.randn(n_eval, 2, generator=g)
    ode = TrigFlowODEScheduler(sigma_data=SIGMA_DATA, solver="dpmsolver++")
    teacher_x = sample(teacher, ode, noise, 64)
    teacher_euler = sample(teacher, TrigFlowODEScheduler(sigma_data=SIGMA_DATA), noise, 1)
    rows = {
        "data (noise floor)": (data_ref2, None),
        "teacher ODE, 64 steps": (teacher_x, 64),
        "teacher, 1 DDIM step": (teacher_euler, 1),
    }
    for name, (model, scheduler) in students.items():
        for steps in (1, 2):
            rows[f"{name}, {steps}-step"] = (sample(model, scheduler, noise, steps), steps)
    result = {
        "method": method,
        "teacher_steps": teacher_steps,
        "distill_steps": distill_steps,
        "lr_schedule": lr_schedule,
        "intermediate_timestep": intermediate_timestep,
        "seconds": time.time() - start,
        "rows": [],
    }
    if method == "tcm":
        result.update(tcm_stage1_method=first, tcm_objective=tcm_objective, stage2_steps=stage2_steps)
    teacher_mmd = mmd(teacher_x, data_ref)
    for name, (x, nfe) in rows.items():
        distance = mmd(x, data_ref)
        result["rows"].append(
            {
                "sampler": name,
                "nfe": nfe,
                "mmd_to_data": distance,
                "mmd_vs_teacher": distance / teacher_mmd,
                "swd_to_data": sliced_wasserstein(x, data_ref),
                "off_mode_fraction": off_mode_fraction(x),
                "paired_rmse_to_teacher_ode": (x - teacher_x).pow(2).sum(1).mean().sqrt().item(),
            }
        )
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["scd", "cd", "tcm"], default="scd")
    parser.add_argument("--teacher_steps", type=int, default=3000)
    parser.add_argument("--distill_steps", type=int, default=3000, help="sCD / CD, or TCM Stage 1")
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distill_lr", type=float, default=1e-3)
    parser.add_argument("--tangent_norm_c", type=str, default="0.003", help="a number, or 'none'")
    parser.add_argument("--P_mean", type=float, default=-1.0)
    parser.add_argument("--P_std", type=float, default=1.4)
    parser.add_argument("--lr_schedule", choices=["constant", "cosine", "linear"], default="cosine")
    parser.add_argument("--intermediate_timestep", type=float, default=0.4, help="two-step sampling's middle time")
    parser.add_argument("--tcm_stage1_method", choices=["scd", "cd"], default="scd")
    parser.add_argument("--tcm_objective", choices=["continuous", "discrete"], default="continuous")
    parser.add_argument("--stage2_steps", type=int, default=None, help="default: half of --distill_steps")
    parser.add_argument("--stage2_lr", type=float, default=None, help="default: half of --distill_lr")
    parser.add_argument("--boundary_weight", type=float, default=None, help="default: 0.1 discrete, 1.0 continuous")
    parser.add_argument("--cache_dir", type=str, default=None, help="keep teacher and Stage-1 weights here")
    parser.add_argument("--json", default="toy_2d.json")
    args = parser.parse_args()
    c = None if args.tangent_norm_c.lower() == "none" else float(args.tangent_norm_c)
    result = run(
        args.teacher_steps,
        args.distill_steps,
        args.batch_size,
        seed=args.seed,
        distill_lr=args.distill_lr,
        tangent_norm_c=c,
        P_mean=args.P_mean,
        P_std=args.P_std,
        lr_schedule=args.lr_schedule,
        intermediate_timestep=args.intermediate_timestep,
        method=args.method,
        tcm_stage1_method=args.tcm_stage1_method,
        tcm_objective=args.tcm_objective,
        stage2_steps=args.stage2_steps,
        stage2_lr=args.stage2_lr,
        boundary_weight=args.boundary_weight,
        cache_dir=args.cache_dir,
    )
    print(
        f"\n{'sampler':40} {'NFE':>4} {'MMD to data':>12} {'x teacher':>10} {'SWD':>8} {'off-mode':>9} "
        f"{'RMSE to teacher ODE':>20}"
    )
    for r in result["rows"]:
        print(
            f"{r['sampler']:40} {str(r['nfe'] or '-'):>4} {r['mmd_to_data']:>12.4f} {r['mmd_vs_teacher']:>10.2f} "
            f"{r['swd_to_data']:>8.4f} {r['off_mode_fraction']:>9.3f} {r['paired_rmse_to_teacher_ode']:>20.4f}"
        )
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
