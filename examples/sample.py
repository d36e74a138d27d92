"""Sample a saved SCMPipeline folder and write an image grid.

    python examples/sample.py --pipeline path/to/student --num_inference_steps 2 --batch_size 16 --output grid.png

With `--ode_solver`, the network is sampled as a diffusion model (a teacher) by `TrigFlowODEScheduler` instead.
"""

import argparse

import torch

from diffusers_scm import SCMPipeline, TrigFlowODEScheduler
from diffusers_scm.utils import square_image_grid


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="folder saved by SCMPipeline.save_pretrained")
    parser.add_argument("--num_inference_steps", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--class_labels", type=int, nargs="*", default=None, help="one label, or one per image")
    parser.add_argument(
        "--ode_solver",
        choices=["ddim", "heun", "dpmsolver++"],
        default=None,
        help="sample the network as a diffusion model with TrigFlowODEScheduler",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="samples.png")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    pipe = SCMPipeline.from_pretrained(args.pipeline).to(args.device)
    if args.ode_solver is not None:
        config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
        config.pop("intermediate_timesteps", None)
        pipe.scheduler = TrigFlowODEScheduler.from_config({**config, "solver": args.ode_solver})
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.batch_size)]
    labels = args.class_labels[0] if args.class_labels and len(args.class_labels) == 1 else args.class_labels
    images = pipe(
        batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps,
        class_labels=labels,
        generator=generators,
    ).images
    square_image_grid(images).save(args.output)
    print(f"wrote {args.output}: {args.batch_size} images, {args.num_inference_steps} steps")


if __name__ == "__main__":
    main()
