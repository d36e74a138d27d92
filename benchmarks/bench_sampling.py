"""Seconds per image of consistency sampling (1 and 2 steps) versus ODE sampling of the same network.

    python benchmarks/bench_sampling.py [--device cpu] [--batch_size 8] [--json benchmarks/results/sampling.json]

Prints a table and writes JSON. The network is a randomly initialized UNet2DModel: the timings depend only on its
size, not on its weights.
"""

import argparse

import torch
from _timing import best_time, write_results
from diffusers import UNet2DModel

from diffusers_scm import SCMPipeline, TrigFlowODEScheduler, TrigFlowScheduler


SIZES = {
    "tiny": {"sample_size": 16, "block_out_channels": (32, 64), "norm_num_groups": 8},
    "medium": {"sample_size": 32, "block_out_channels": (64, 128, 128), "norm_num_groups": 32},
}


def build(size):
    cfg = SIZES[size]
    levels = len(cfg["block_out_channels"])
    return UNet2DModel(
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        attention_head_dim=32,
        down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
        **cfg,
    ).eval()


def seconds_per_image(pipe, images, repeats, device, **call_kwargs):
    """Best wall time of `repeats` calls `pipe(**call_kwargs)` (after a warm-up call) that each give `images` images,
    per image."""
    pipe.set_progress_bar_config(disable=True)
    return best_time(lambda: pipe(**call_kwargs), repeats, device) / images


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/sampling.json")
    args = parser.parse_args()

    rows = []
    for size in SIZES:
        net = build(size).to(args.device)
        params = sum(p.numel() for p in net.parameters())
        configs = [
            ("consistency", TrigFlowScheduler(), 1),
            ("consistency", TrigFlowScheduler(), 2),
            ("ode dpmsolver++", TrigFlowODEScheduler(solver="dpmsolver++"), 32),
            ("ode heun", TrigFlowODEScheduler(solver="heun"), 16),
        ]
        for name, scheduler, steps in configs:
            pipe = SCMPipeline(unet=net, scheduler=scheduler).to(args.device)
            seconds = seconds_per_image(
                pipe,
                args.batch_size,
                args.repeats,
                args.device,
                batch_size=args.batch_size,
                num_inference_steps=steps,
                output_type="latent",
            )
            nfe = len(pipe.scheduler.timesteps)
            rows.append(
                {
                    "model": size,
                    "params": params,
                    "sampler": name,
                    "steps": steps,
                    "nfe": nfe,
                    "seconds_per_image": seconds,
                }
            )

    base = {r["model"]: r["seconds_per_image"] for r in rows if r["sampler"] == "consistency" and r["steps"] == 1}
    print(f"{'model':8} {'params':>9} {'sampler':16} {'steps':>5} {'NFE':>4} {'s/image':>10} {'x 1-step':>9}")
    for r in rows:
        r["ratio_to_one_step"] = r["seconds_per_image"] / base[r["model"]]
        print(
            f"{r['model']:8} {r['params']:>9} {r['sampler']:16} {r['steps']:>5} {r['nfe']:>4} "
            f"{r['seconds_per_image']:>10.5f} {r['ratio_to_one_step']:>9.2f}"
        )
    write_results(args.json, {"device": args.device, "batch_size": args.batch_size, "rows": rows})


if __name__ == "__main__":
    main()
