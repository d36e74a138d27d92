"""One JVP pass through each diffusers family, as a ratio to a no-grad forward pass of the same network.

    python benchmarks/bench_jvp_model.py [--families sd3 flux ...] [--batch_size 1] [--json PATH]

Each family is a random instance of diffusers' own class at a realistic small size (about 10-50M parameters,
256-1024 tokens), wrapped in `TrigFlowDenoiser` through its adapter; the JVP is taken in (x_t, t) as the sCD/sCT step
does (`diffusers_scm.jvp.jvp`, forward-mode AD, attention intercepted by `jvp_mode`), with the "math" and "blocked"
attention backends, timed in interleaved rounds (a forward, then a JVP; the best of each), so that load from other
processes slows both sides of the ratio alike. Each (family, backend) runs in a fresh process, so the CPU peak memory
(growth of the peak resident set above the built model) is the pass's own. Prints a table and writes JSON. Target:
JVP / forward <= 3.0 for every transformer family (the limit is about 2: one extra matmul per linear layer).
"""

import argparse
import contextlib
import json
import multiprocessing as mp

import torch
from _timing import best_time, peak_memory_baseline, peak_memory_since, write_results


TEXT = 32  # prompt tokens
W = 384  # transformer width: 6 heads x 64


def _text(b, dim):
    return torch.randn(b, TEXT, dim)


def build(name, b, width=W, depth=1, latent=None):
    """`(network, latent shape, conditioning, parameterization, tokens)` for a family.

    `width` (a multiple of 64: heads of 64 channels) and `depth` (a factor on every layer count) scale the network;
    `latent` is the latent side of the SD3, Flux, Sana and Wan networks (default: 32; Wan 16, with 4 frames).
    """
    import diffusers as d

    heads = width // 64

    def layers(n):
        return max(1, round(n * depth))

    if name == "unet_sd":
        net = d.UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(128, 256, 384),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=width,
            attention_head_dim=8,
        )
        return net, (b, 4, 32, 32), {"encoder_hidden_states": _text(b, width)}, "vp_epsilon", 1024
    if name == "dit":
        net = d.DiTTransformer2DModel(
            num_attention_heads=heads,
            attention_head_dim=64,
            in_channels=4,
            out_channels=8,
            num_layers=layers(8),
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=10,
        )
        return net, (b, 4, 32, 32), {"class_labels": torch.arange(b) % 10}, "vp_epsilon", 256
    if name == "pixart":
        net = d.PixArtTransformer2DModel(
            sample_size=32,
            num_layers=layers(8),
            patch_size=2,
            attention_head_dim=64,
            num_attention_heads=heads,
            caption_channels=width,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=width,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        )
        mask = torch.ones(b, TEXT)
        return (
            net,
            (b, 4, 32, 32),
            {"encoder_hidden_states": _text(b, width), "encoder_attention_mask": mask},
            "vp_epsilon",
            256,
        )
    if name == "sd3":
        side = latent or 32
        net = d.SD3Transformer2DModel(
            sample_size=side,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=layers(6),
            attention_head_dim=64,
            num_attention_heads=heads,
            caption_projection_dim=width,
            joint_attention_dim=width,
            pooled_projection_dim=256,
        )
        cond = {"encoder_hidden_states": _text(b, width), "pooled_projections": torch.randn(b, 256)}
        return net, (b, 16, side, side), cond, "flow_matching", (side // 2) ** 2
    if name in ("flux", "chroma"):
        common = {
            "patch_size": 1,
            "in_channels": 64,
            "num_layers": layers(2),
            "num_single_layers": layers(5),
            "attention_head_dim": 64,
            "num_attention_heads": heads,
            "joint_attention_dim": width,
            "axes_dims_rope": (16, 24, 24),
        }
        if name == "flux":
            net = d.FluxTransformer2DModel(pooled_projection_dim=256, guidance_embeds=True, **common)
            pooled = torch.randn(b, 256)
            cond = {"encoder_hidden_states": _text(b, width), "pooled_projections": pooled, "guidance": 3.5}
        else:
            net = d.ChromaTransformer2DModel(approximator_num_channels=64, approximator_hidden_dim=width, **common)
            cond = {"encoder_hidden_states": _text(b, width)}
        side = latent or 32  # packed 2 x 2 by the adapter
        return net, (b, 16, side, side), cond, "flow_matching", (side // 2) ** 2
    if name == "qwenimage":
        net = d.QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=layers(6),
            attention_head_dim=64,
            num_attention_heads=heads,
            joint_attention_dim=width,
            axes_dims_rope=(16, 24, 24),
        )
        cond = {"encoder_hidden_states": _text(b, width), "encoder_hidden_states_mask": torch.ones(b, TEXT)}
        return net, (b, 16, 32, 32), cond, "flow_matching", 256
    if name == "sana":
        side = latent or 32
        net = d.SanaTransformer2DModel(
            patch_size=1,
            in_channels=32,
            out_channels=32,
            num_layers=layers(8),
            attention_head_dim=32,
            num_attention_heads=2 * heads,
            num_cross_attention_heads=heads,
            cross_attention_head_dim=64,
            cross_attention_dim=width,
            caption_channels=width,
            sample_size=side,
        )
        cond = {"encoder_hidden_states": _text(b, width), "encoder_attention_mask": torch.ones(b, TEXT)}
        return net, (b, 32, side, side), cond, "flow_matching", side**2
    if name == "wan":
        side = latent or 16
        net = d.WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=64,
            in_channels=16,
            out_channels=16,
            text_dim=width,
            freq_dim=256,
            ffn_dim=4 * width,
            num_layers=layers(6),
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        )
        shape = (b, 16, 4, side, side)
        return net, shape, {"encoder_hidden_states": _text(b, width)}, "flow_matching", 4 * (side // 2) ** 2
    if name == "lumina2":
        net = d.Lumina2Transformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=16,
            hidden_size=width,
            num_layers=layers(6),
            num_refiner_layers=1,
            num_attention_heads=heads,
            num_kv_heads=2,
            multiple_of=16,
            norm_eps=1e-5,
            scaling_factor=1.0,
            axes_dim_rope=(16, 24, 24),
            axes_lens=(300, 512, 512),
            cap_feat_dim=width,
        )
        mask = torch.ones(b, TEXT, dtype=torch.bool)
        return (
            net,
            (b, 16, 32, 32),
            {"encoder_hidden_states": _text(b, width), "encoder_attention_mask": mask},
            "flow_matching",
            256,
        )
    if name == "auraflow":
        net = d.AuraFlowTransformer2DModel(
            sample_size=32,
            patch_size=2,
            in_channels=4,
            num_mmdit_layers=layers(2),
            num_single_dit_layers=layers(6),
            attention_head_dim=64,
            num_attention_heads=heads,
            caption_projection_dim=width,
            joint_attention_dim=width,
            out_channels=4,
            pos_embed_max_size=1024,
        )
        return net, (b, 4, 32, 32), {"encoder_hidden_states": _text(b, width)}, "flow_matching", 256
    raise ValueError(f"unknown family {name}")


FAMILIES = ["unet_sd", "dit", "pixart", "sd3", "flux", "chroma", "qwenimage", "sana", "wan", "lumina2", "auraflow"]


def passes(den, x, t, cond, backend, autocast_dtype=None):
    """`(forward, jvp_pass)`: a no-grad forward of the denoiser at (x, t) and its JVP in (x_t, t) along (x, 1), as the
    sCD/sCT step takes it; both under autocast to `autocast_dtype` when one is given."""
    from diffusers_scm.jvp import jvp

    def precision():
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, dtype=autocast_dtype)

    def forward():
        with torch.no_grad(), precision():
            return den(x, t, **cond)

    def jvp_pass():
        with precision():
            return jvp(lambda a, s: den(a, s, **cond), (x, t), (x, torch.ones_like(t)), backend=backend)

    return forward, jvp_pass


def interleaved_times(forward, jvp_pass, repeats, device="cpu"):
    """Best seconds of each pass over `repeats` interleaved rounds (a forward, then a JVP): a load that comes and goes
    slows both sides of the ratio alike."""
    rounds = [
        (best_time(forward, 1, device, warmup=False), best_time(jvp_pass, 1, device, warmup=False))
        for _ in range(repeats)
    ]
    return tuple(min(times) for times in zip(*rounds))


def measure(name, backend, batch_size, repeats, queue):
    from diffusers_scm import TrigFlowDenoiser

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    net, shape, cond, parameterization, tokens = build(name, batch_size)
    den = TrigFlowDenoiser(net.eval(), parameterization, sigma_data=0.5)
    x = torch.randn(shape)
    t = torch.rand(batch_size) * 1.4 + 0.1
    forward, jvp_pass = passes(den, x, t, cond, backend)

    base = peak_memory_baseline("cpu")
    forward()  # warm-up, and each pass's peak memory
    forward_mem = peak_memory_since("cpu", base)
    jvp_pass()
    jvp_mem = peak_memory_since("cpu", base)
    forward_s, jvp_s = interleaved_times(forward, jvp_pass, repeats)
    queue.put(
        {
            "family": name,
            "class": type(net).__name__,
            "params": sum(p.numel() for p in net.parameters()),
            "tokens": tokens,
            "backend": backend,
            "forward_s": forward_s,
            "jvp_s": jvp_s,
            "ratio": jvp_s / forward_s,
            "forward_peak_mb": forward_mem / 2**20,
            "jvp_peak_mb": jvp_mem / 2**20,
        }
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--backends", nargs="+", default=["math", "blocked"])
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved (forward, JVP) rounds")
    parser.add_argument("--json", default="benchmarks/results/jvp_model.json")
    args = parser.parse_args()

    ctx = mp.get_context("spawn")
    rows = []
    for name in args.families:
        for backend in args.backends:
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(name, backend, args.batch_size, args.repeats, queue))
            proc.start()
            row = queue.get()
            proc.join()
            rows.append(row)
            print(json.dumps(row), flush=True)

    print(f"\nOne JVP pass vs one no-grad forward (CPU, {torch.get_num_threads()} threads, batch {args.batch_size})")
    header = f"{'family':10} {'class':28} {'params':>7} {'tokens':>6} {'backend':8} {'fwd s':>7} {'JVP s':>7} "
    print(header + f"{'ratio':>6} {'fwd MB':>7} {'JVP MB':>7}")
    for r in rows:
        print(
            f"{r['family']:10} {r['class']:28} {r['params'] / 1e6:>6.1f}M {r['tokens']:>6} {r['backend']:8} "
            f"{r['forward_s']:>7.3f} {r['jvp_s']:>7.3f} {r['ratio']:>6.2f} {r['forward_peak_mb']:>7.0f} "
            f"{r['jvp_peak_mb']:>7.0f}"
        )
    worst = max((r for r in rows if r["family"] != "unet_sd"), key=lambda r: r["ratio"], default=None)
    if worst is not None:
        verdict = "meets" if worst["ratio"] <= 3.0 else "misses"
        print(
            f"worst transformer ratio: {worst['ratio']:.2f} ({worst['family']}, {worst['backend']}): {verdict} <= 3.0"
        )
    write_results(args.json, {"batch_size": args.batch_size, "rows": rows})


if __name__ == "__main__":
    main()
