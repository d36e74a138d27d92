"""Wall time and peak memory of one sCD training step versus one plain diffusion training step of the same network.

    python benchmarks/bench_train_step.py [--batch_size 8] [--json PATH]

Networks: a tiny and a medium `UNet2DModel` and a DiT, each wrapped in `TrigFlowDenoiser`. The sCD step is
`SCMLoss` (teacher forward, JVP pass, gradient pass) plus backward and an Adam step; the diffusion step is
`TrigFlowDiffusionLoss` plus backward and an Adam step. Peak memory: `torch.cuda.max_memory_allocated` on CUDA; on
CPU the growth of the peak resident set, measured in a fresh process per configuration. Target: sCD at most 2.5x.
"""

import argparse
import copy
import json
import subprocess
import sys

import torch
from _timing import best_time, peak_memory_baseline, peak_memory_since, write_results


def build(name):
    from diffusers import DiTTransformer2DModel, UNet2DModel

    torch.manual_seed(0)
    if name == "unet-tiny":
        net = UNet2DModel(
            sample_size=16,
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            attention_head_dim=32,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )
        return net, (3, 16), {}
    if name == "unet-medium":
        net = UNet2DModel(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            block_out_channels=(64, 128, 256),
            layers_per_block=1,
            norm_num_groups=32,
            attention_head_dim=64,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
        return net, (3, 32), {}
    net = DiTTransformer2DModel(
        num_attention_heads=6,
        attention_head_dim=64,
        in_channels=4,
        out_channels=8,
        num_layers=6,
        sample_size=32,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    return net, (4, 32), {"class_labels": True}


def training_step(
    kind,
    loss_fn,
    student,
    x0,
    optimizer,
    teacher=None,
    cond=None,
    uncond=None,
    head=None,
    ema=None,
    autocast_dtype=None,
):
    """One training step as a function: the loss ("scd": `SCMLoss`'s teacher passes, JVP pass and gradient pass;
    "diffusion": `TrigFlowDiffusionLoss`), its backward, the optimizer step and, given `ema`, the EMA update of the
    student's network. `uncond` (the teacher's unconditional inputs, for guidance) and `head` (the adaptive weighting)
    are optional; the loss runs under autocast to `autocast_dtype` when one is given."""
    cond = cond or {}
    extra = {"logvar_head": head} if head is not None else {}
    if kind == "scd" and uncond is not None:
        extra["uncond_conditioning"] = uncond

    def step():
        with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            if kind == "scd":
                loss, _ = loss_fn(student, x0, teacher=teacher, **extra, **cond)
            else:
                loss, _ = loss_fn(student, x0, **extra, **cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if ema is not None:
            ema.step(student.inner_model)
        return loss

    return step


def measure(name, kind, batch, device, repeats):
    from diffusers_scm import TrigFlowDenoiser
    from diffusers_scm.training import SCMLoss, TrigFlowDiffusionLoss

    net, (channels, res), cond = build(name)
    student = TrigFlowDenoiser(net.to(device).train(), "trigflow")
    teacher = TrigFlowDenoiser(copy.deepcopy(net).eval().requires_grad_(False), "trigflow")
    opt = torch.optim.Adam(student.parameters(), lr=1e-5)
    x0 = torch.randn(batch, channels, res, res, device=device)
    kwargs = {"class_labels": torch.arange(batch, device=device) % 10} if cond else {}
    loss_fn = SCMLoss(adaptive_weighting=False, tangent_warmup_steps=0) if kind == "scd" else TrigFlowDiffusionLoss()
    step = training_step(kind, loss_fn, student, x0, opt, teacher=teacher, cond=kwargs)

    # this process does nothing else: the peak resident set growth over the models and optimizer is the step's
    baseline = peak_memory_baseline(device)
    seconds = best_time(step, repeats, device)
    return {"seconds": seconds, "peak_bytes": peak_memory_since(device, baseline)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["unet-tiny", "unet-medium", "dit"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="benchmarks/results/train_step.json")
    parser.add_argument("--_worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        print(json.dumps(measure(*args._worker, args.batch_size, args.device, args.repeats)))
        return

    rows = []
    for name in args.models:
        result = {}
        for kind in ("diffusion", "scd"):
            cmd = [
                sys.executable,
                __file__,
                "--_worker",
                name,
                kind,
                "--batch_size",
                str(args.batch_size),
                "--device",
                args.device,
                "--repeats",
                str(args.repeats),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            result[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "model": name,
                "diffusion_s": result["diffusion"]["seconds"],
                "scd_s": result["scd"]["seconds"],
                "diffusion_peak_mb": result["diffusion"]["peak_bytes"] / 2**20,
                "scd_peak_mb": result["scd"]["peak_bytes"] / 2**20,
                "time_ratio": result["scd"]["seconds"] / result["diffusion"]["seconds"],
            }
        )
        rows[-1]["memory_ratio"] = rows[-1]["scd_peak_mb"] / max(rows[-1]["diffusion_peak_mb"], 1e-9)
        print(f"  {name}: {rows[-1]['time_ratio']:.2f}x", flush=True)

    print(f"\nOne sCD step vs one diffusion step ({args.device}, batch {args.batch_size})")
    print(f"{'model':12} {'diffusion s':>12} {'sCD s':>9} {'time x':>7} {'diff. MiB':>10} {'sCD MiB':>9} {'mem x':>6}")
    for r in rows:
        print(
            f"{r['model']:12} {r['diffusion_s']:>12.4f} {r['scd_s']:>9.4f} {r['time_ratio']:>7.2f} "
            f"{r['diffusion_peak_mb']:>10.1f} {r['scd_peak_mb']:>9.1f} {r['memory_ratio']:>6.2f}"
        )
    write_results(args.json, {"device": args.device, "batch_size": args.batch_size, "rows": rows})


if __name__ == "__main__":
    main()
