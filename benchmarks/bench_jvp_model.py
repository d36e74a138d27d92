"""Time of one JVP pass through a network, as a ratio to a no-grad forward pass of the same network.

    python benchmarks/bench_jvp_model.py [--batch_size 4] [--json PATH]

Networks: a tiny and a medium `UNet2DModel` (attention at 16x16 = 256 tokens in the medium one) and a tiny and a
medium class-conditional `DiTTransformer2DModel`, each wrapped in `TrigFlowDenoiser`; the JVP is taken in (x_t, t)
as the sCD/sCT step does (`diffusers_scm.jvp.jvp`, forward-mode AD). Prints a table and writes JSON.
"""

import argparse

import torch
from _timing import best_time, write_results
from diffusers import DiTTransformer2DModel, UNet2DModel

from diffusers_scm import TrigFlowDenoiser
from diffusers_scm.jvp import available_backends, jvp


def unet(size):
    if size == "tiny":
        cfg = {
            "sample_size": 16,
            "block_out_channels": (32, 64),
            "attention_head_dim": 32,
            "norm_num_groups": 8,
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        }
    else:
        cfg = {
            "sample_size": 32,
            "block_out_channels": (64, 128, 256),
            "attention_head_dim": 64,
            "norm_num_groups": 32,
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
            "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        }
    return UNet2DModel(in_channels=3, out_channels=3, layers_per_block=1, **cfg), (3, cfg["sample_size"]), {}


def dit(size):
    heads, dim, layers, sample = (4, 32, 2, 16) if size == "tiny" else (6, 64, 6, 32)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=dim,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=sample,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    return model, (4, sample), {"class_labels": "labels"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="benchmarks/results/jvp_model.json")
    args = parser.parse_args()

    rows = []
    for family, build in (("UNet2DModel", unet), ("DiT", dit)):
        for size in ("tiny", "medium"):
            torch.manual_seed(0)
            net, (channels, res), cond = build(size)
            den = TrigFlowDenoiser(net.eval().to(args.device), "trigflow")
            b = args.batch_size
            x = torch.randn(b, channels, res, res, device=args.device)
            t = torch.rand(b, device=args.device) * 1.5 + 0.05
            kwargs = {"class_labels": torch.arange(b, device=args.device) % 10} if cond else {}

            def f(a, s):
                return den(a, s, **kwargs)

            def forward():
                with torch.no_grad():
                    return f(x, t)

            base = best_time(forward, args.repeats)
            params = sum(p.numel() for p in net.parameters())
            for backend in available_backends(args.device):
                seconds = best_time(
                    lambda: jvp(f, (x, t), (x, torch.ones_like(t)), module=den, backend=backend), args.repeats
                )
                rows.append(
                    {
                        "model": f"{family} {size}",
                        "params": params,
                        "backend": backend,
                        "forward_s": base,
                        "jvp_s": seconds,
                        "ratio": seconds / base,
                    }
                )
                print(f"  {family} {size} {backend}: {seconds / base:.2f}x", flush=True)

    print(f"\nOne JVP pass vs one no-grad forward ({args.device}, batch {args.batch_size})")
    print(f"{'model':20} {'params':>10} {'backend':8} {'forward s':>10} {'JVP s':>10} {'ratio':>7}")
    for r in rows:
        print(
            f"{r['model']:20} {r['params']:>10} {r['backend']:8} {r['forward_s']:>10.4f} {r['jvp_s']:>10.4f} "
            f"{r['ratio']:>7.2f}"
        )
    write_results(args.json, {"device": args.device, "batch_size": args.batch_size, "rows": rows})


if __name__ == "__main__":
    main()
