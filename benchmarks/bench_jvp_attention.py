"""Wall time and peak memory of attention with and without a JVP, per backend and sequence length.

    python benchmarks/bench_jvp_attention.py [--lengths 256 512 1024 2048 4096 8192] [--json PATH]

Configurations: 8 heads, head dim 64, batch 2, float32. "sdpa" is PyTorch's fused attention forward (no JVP), the
others compute the output and its JVP (`jvp_attention`). Each measurement runs in its own subprocess; on CPU the peak
memory is the growth of the process's peak resident set over its inputs, on CUDA `torch.cuda.max_memory_allocated`
above the inputs. "math" is skipped where its N x N matrices alone would pass `--math_limit_gb`.
Targets (CPU, one run): "blocked" peak memory at 4096 tokens at most 25% of "math", its time at most 1.5x "math".
"""

import argparse
import json
import subprocess
import sys

import torch
from _timing import best_time, peak_memory_baseline, peak_memory_since, write_results


HEADS, HEAD_DIM, BATCH = 8, 64, 2


def attention_call(backend: str, q, k, v, dq, dk, dv, attn_mask=None, block_size=None):
    """A no-grad call of one backend on these inputs: "sdpa" (PyTorch's fused forward, no JVP) or a `jvp_attention`
    backend, which returns `(out, dout)`."""
    import torch.nn.functional as F

    from diffusers_scm.jvp import jvp_attention

    def run():
        with torch.no_grad():
            if backend == "sdpa":
                return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            return jvp_attention(q, k, v, dq, dk, dv, attn_mask, backend=backend, block_size=block_size)

    return run


def measure(backend: str, length: int, device: str, repeats: int) -> dict:
    torch.manual_seed(0)
    shape = (BATCH, HEADS, length, HEAD_DIM)
    run = attention_call(backend, *[torch.randn(shape, device=device) for _ in range(6)])
    baseline = peak_memory_baseline(device)
    seconds = best_time(run, repeats, device)
    # on CPU the warm-up already set the process's peak: CPU memory is measured in a fresh process instead
    peak = peak_memory_since(device, baseline) if device == "cuda" else None
    return {"seconds": seconds, "peak_bytes": peak}


def measure_cpu_peak(backend: str, length: int) -> int:
    """Peak RSS growth of one run, in a fresh process (ru_maxrss only ever grows)."""
    code = f"""
import resource, torch, torch.nn.functional as F
from diffusers_scm.jvp import jvp_attention
torch.manual_seed(0)
x = [torch.randn({BATCH}, {HEADS}, {length}, {HEAD_DIM}) for _ in range(6)]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.no_grad():
    out = F.scaled_dot_product_attention(*x[:3]) if {backend!r} == "sdpa" else jvp_attention(*x, backend={backend!r})
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--device", default=None)
    parser.add_argument("--math_limit_gb", type=float, default=8.0)
    parser.add_argument("--json", default="benchmarks/results/jvp_attention.json")
    parser.add_argument("--_worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._worker:  # child process: one measurement
        backend, length, device = args._worker
        length = int(length)
        result = measure(backend, length, device, repeats=3 if length <= 2048 else 1)
        print(json.dumps(result))
        return

    from diffusers_scm.jvp import available_backends

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["sdpa"] + available_backends(device)
    rows = []
    for length in args.lengths:
        for backend in backends:
            nn_bytes = BATCH * HEADS * length * length * 4
            if backend == "math" and 4 * nn_bytes > args.math_limit_gb * 2**30:
                rows.append(
                    {
                        "length": length,
                        "backend": backend,
                        "seconds": None,
                        "peak_mb": None,
                        "note": f"skipped: ~{4 * nn_bytes / 2**30:.0f} GiB of N x N matrices",
                    }
                )
                continue
            cmd = [sys.executable, __file__, "--_worker", backend, str(length), device]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                rows.append(
                    {
                        "length": length,
                        "backend": backend,
                        "seconds": None,
                        "peak_mb": None,
                        "note": "failed: " + res.stderr.strip().splitlines()[-1][:80],
                    }
                )
                continue
            result = json.loads(res.stdout.strip().splitlines()[-1])
            peak = result["peak_bytes"] if device == "cuda" else measure_cpu_peak(backend, length)
            rows.append(
                {
                    "length": length,
                    "backend": backend,
                    "seconds": result["seconds"],
                    "peak_mb": peak / 2**20,
                    "note": "",
                }
            )
            print(
                f"  measured {backend:8} N={length:5}: {result['seconds']:.4f} s, {peak / 2**20:.1f} MiB", flush=True
            )

    def get(length, backend, key):
        return next((r[key] for r in rows if r["length"] == length and r["backend"] == backend), None)

    print(f"\nJVP attention, {device}: batch {BATCH}, {HEADS} heads, head dim {HEAD_DIM}, float32")
    print(f"{'N':>6} {'backend':8} {'seconds':>9} {'peak MiB':>9} {'time/math':>9} {'mem/math':>9}  note")
    for r in rows:
        t_m, m_m = get(r["length"], "math", "seconds"), get(r["length"], "math", "peak_mb")
        r["time_vs_math"] = r["seconds"] / t_m if r["seconds"] and t_m else None
        r["memory_vs_math"] = r["peak_mb"] / m_m if r["peak_mb"] and m_m else None
        fmt = lambda x, f: format(x, f) if x is not None else "-".rjust(int(f.split(".")[0]))  # noqa: E731
        print(
            f"{r['length']:>6} {r['backend']:8} {fmt(r['seconds'], '9.4f')} {fmt(r['peak_mb'], '9.1f')} "
            f"{fmt(r['time_vs_math'], '9.2f')} {fmt(r['memory_vs_math'], '9.3f')}  {r['note']}"
        )
    write_results(
        args.json,
        {
            "device": device,
            "batch": BATCH,
            "heads": HEADS,
            "head_dim": HEAD_DIM,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
