"""Sample a saved SCMPipeline folder and write an image grid (videos: one filmstrip per video, and with
`--video_dir` each video as an animated GIF).

    python examples/sample.py --pipeline path/to/student --num_inference_steps 2 --batch_size 16 --output grid.png
    python examples/sample.py --pipeline my-t2i-student --prompt "a red fox" "a bowl of soup" --height 512 --width 512
    python examples/sample.py --pipeline my-video-student --prompt "a red fox running" --num_frames 33 --video_dir out

With `--ode_solver`, the network is sampled as a diffusion model (a teacher) by `TrigFlowODEScheduler` instead.
"""

import argparse
import os

import torch

from diffusers_scm import SCMPipeline, TrigFlowODEScheduler
from diffusers_scm.utils import square_image_grid, video_filmstrips


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="folder saved by SCMPipeline.save_pretrained, or a Hub id")
    parser.add_argument("--num_inference_steps", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=16, help="samples without prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class_labels", type=int, nargs="*", default=None, help="one label, or one per image")
    parser.add_argument(
        "--prompt", nargs="*", default=None, help="text-to-image / text-to-video students: one sample each"
    )
    parser.add_argument("--height", type=int, default=None, help="pixels (text-to-image / video students)")
    parser.add_argument("--width", type=int, default=None, help="pixels (text-to-image / video students)")
    parser.add_argument("--num_frames", type=int, default=None, help="video students: frames per video")
    parser.add_argument("--video_dir", default=None, help="video students: also write each video as an animated GIF")
    parser.add_argument("--fps", type=int, default=8, help="frames per second of the GIFs")
    parser.add_argument(
        "--ode_solver",
        choices=["ddim", "heun", "dpmsolver++"],
        default=None,
        help="sample the network as a diffusion model with TrigFlowODEScheduler",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="samples.png")
    args = parser.parse_args(argv)
    if args.video_dir is not None and args.num_frames is None:
        parser.error("--video_dir writes videos: give --num_frames F (and --prompt) for a video student")
    return args


def main(argv=None):
    from diffusers.utils import export_to_gif, numpy_to_pil

    args = parse_args(argv)
    pipe = SCMPipeline.from_pretrained(args.pipeline).to(args.device)
    if args.ode_solver is not None:
        config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
        config.pop("intermediate_timesteps", None)
        pipe.scheduler = TrigFlowODEScheduler.from_config({**config, "solver": args.ode_solver})
    n = len(args.prompt) if args.prompt else args.batch_size
    inputs = {"prompt": args.prompt, "height": args.height, "width": args.width} if args.prompt else {"batch_size": n}
    if args.num_frames is not None:
        inputs["num_frames"] = args.num_frames
    labels = args.class_labels[0] if args.class_labels and len(args.class_labels) == 1 else args.class_labels
    out = pipe(
        **inputs,
        num_inference_steps=args.num_inference_steps,
        class_labels=labels,
        generator=[torch.Generator().manual_seed(args.seed + i) for i in range(n)],
        output_type="np",
    )
    videos = getattr(out, "frames", None)
    images = out.images if videos is None else video_filmstrips(videos)
    square_image_grid(numpy_to_pil(images)).save(args.output)
    if videos is not None and args.video_dir is not None:
        os.makedirs(args.video_dir, exist_ok=True)
        for i, video in enumerate(videos):
            export_to_gif(numpy_to_pil(video), os.path.join(args.video_dir, f"video-{i:03d}.gif"), fps=args.fps)
    kind = "images" if videos is None else f"videos of {videos.shape[1]} frames"
    print(f"wrote {args.output}: {n} {kind}, {args.num_inference_steps} steps")


if __name__ == "__main__":
    main()
