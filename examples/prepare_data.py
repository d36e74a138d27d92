"""Cache the latents and prompt embeddings of a text-to-image data set once (SPEC.md section 8).

    python examples/prepare_data.py --teacher PIPELINE_FOLDER_OR_HUB_ID --dataset_name DATA --caption_column text \
        --resolution 512 --cache_dir my-cache
    accelerate launch examples/distill.py --teacher PIPELINE_FOLDER_OR_HUB_ID --cache_dir my-cache ...

Images go through the teacher's VAE (with its scaling and shift factors), captions through the family pipeline's own
`encode_prompt`; prompt-only data gets x0 from the teacher's guided ODE. The cache is a `datasets` Arrow dataset (see
`diffusers_scm.training.data.latent_cache`); `distill.py --cache_dir` trains from it without loading the VAE or the text
encoders (and writes it first when it is missing).

The cache is written in `CACHE_DIR.tmp` and takes the place of `--cache_dir` whole when it is complete: an interrupted
run leaves an earlier cache there as it was. Its `cache_info.json` records what it was made with (teacher, its VAE and
text encoders, resolution, dtype); `distill.py --cache_dir` refuses a cache made with other settings than its own
(or, with `--rebuild_cache`, writes it again).

Video teachers (WanPipeline, ...) take `--num_frames F`: the data set is a folder of clips with `metadata.jsonl`
captions (`diffusers_scm.training.data.videos`), the latents are 5-D and the cache records F.
"""

import argparse
import logging

import torch

from diffusers_scm.training.data.captions import load_text_image_dataset
from diffusers_scm.training.data.latent_cache import write_cache
from diffusers_scm.training.machinery.arguments import positive_int
from diffusers_scm.training.teacher import load_text_to_image_teacher


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True, help="text-to-image pipeline folder or Hub id")
    p.add_argument("--teacher_revision", default=None)
    p.add_argument(
        "--dataset_name", required=True, help="image folder with metadata.jsonl, prompt file or datasets name"
    )
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="text")
    p.add_argument("--resolution", type=positive_int, default=512)
    p.add_argument(
        "--cache_dir", required=True, help="a new or empty folder, or an earlier cache (replaced whole when done)"
    )
    p.add_argument("--batch_size", type=positive_int, default=8)
    p.add_argument("--teacher_dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--skip_bad_images", action="store_true", help="leave out unreadable images (or clips)")
    p.add_argument(
        "--num_frames", type=positive_int, default=None, help="video teachers: frames per clip (4k + 1 for Wan)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    teacher = load_text_to_image_teacher(
        args.teacher, torch_dtype=getattr(torch, args.teacher_dtype), revision=args.teacher_revision
    )
    teacher.pipeline.to(args.device)
    if teacher.family_spec.video != (args.num_frames is not None):
        raise SystemExit(
            f"--num_frames is for video teachers: {teacher.family} "
            + ("makes videos, pass --num_frames F." if teacher.family_spec.video else "makes images, drop it.")
        )
    if args.num_frames is not None:
        from diffusers_scm.training.data.videos import load_text_video_dataset

        teacher.codec.check_num_frames(args.num_frames, where=f"--num_frames: {args.teacher}'s VAE: ")
        dataset = load_text_video_dataset(
            args.dataset_name, args.resolution, args.num_frames, args.caption_column, args.skip_bad_images
        )
    else:
        dataset = load_text_image_dataset(
            args.dataset_name, args.resolution, args.image_column, args.caption_column, args.skip_bad_images
        )
    rows = write_cache(
        dataset,
        teacher,
        args.cache_dir,
        args.batch_size,
        args.device,
        args.resolution,
        teacher_name=args.teacher,
        teacher_revision=args.teacher_revision,
        dataset_name=args.dataset_name,
        caption_column=args.caption_column,
        num_frames=args.num_frames,
    )
    print(f"cached {rows} rows in {args.cache_dir}")


if __name__ == "__main__":
    main()
