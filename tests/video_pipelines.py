"""Tiny random text-to-video pipelines of diffusers' own classes, built offline (nothing is downloaded).

    tiny_wan(version="2.1", seed=0)          WanPipeline: Wan 2.1 (one transformer) or "2.2" (two experts,
                                             `transformer_2`, boundary_ratio 0.875), float32, eval mode
    save_tiny_wan(folder, version, seed)     saved (safetensors) and checked to load back as WanPipeline, offline
    save_clips(folder, ...)                  a folder of GIF clips with `metadata.jsonl` captions

The networks and VAE follow diffusers' tests/pipelines/wan/test_wan.py and test_wan_22.py (`get_dummy_components`):
`WanTransformer3DModel` (patch (1, 2, 2), 2 heads of 12, text_dim 32), `AutoencoderKLWan` (z_dim 16, 8x spatial, 4x
temporal: 5 frames of 16x16 pixels are a 2x2x2 latent), `FlowMatchEulerDiscreteScheduler(shift=7.0)` (2.1) and
UniPC flow (2.2, as its test). The text encoder is a `UMT5EncoderModel` (as the released Wan) of d_model 32 with
random weights, its tokenizer a T5 unigram tokenizer over `t2i_pipelines.WORDS`.
"""

import json
import os

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from t2i_pipelines import WORDS, finish_tiny, save_and_reload, umt5_encoder

from diffusers_scm.training.data import text_encoders


SIZE = 16  # pixels: a 2x2 latent
NUM_FRAMES = 5  # 4k + 1: two latent frames
MAX_SEQUENCE_LENGTH = 16


def _transformer(seed):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


def _umt5(tokenizer, seed):
    torch.manual_seed(seed)
    return umt5_encoder(tokenizer, 32)


def tiny_wan(version: str = "2.1", seed: int = 0) -> WanPipeline:
    """The tiny WanPipeline of Wan `version` ("2.1" or "2.2"); the same `seed` gives the same weights (the two 2.2
    experts differ). The global torch RNG is left as it was."""
    if version not in ("2.1", "2.2"):
        raise ValueError(f"version must be '2.1' or '2.2', got {version!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        )
        tokenizer = text_encoders.t5_tokenizer(WORDS, 512)
        text_encoder = _umt5(tokenizer, seed + 1)
        extra = {}
        if version == "2.1":
            scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
        else:
            scheduler = UniPCMultistepScheduler(
                prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
            )
            extra = {"transformer_2": _transformer(seed + 3), "boundary_ratio": 0.875}
        pipe = WanPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=scheduler,
            transformer=_transformer(seed + 2),
            **extra,
        )
    return finish_tiny(pipe)


def save_tiny_wan(folder, version: str = "2.1", seed: int = 0) -> WanPipeline:
    """Save `tiny_wan(version, seed)` to `folder` and check that it loads back offline as a WanPipeline with the same
    components."""
    pipe = tiny_wan(version, seed)
    loaded = save_and_reload(pipe, folder)
    if type(loaded) is not WanPipeline or (version == "2.2") != (loaded.transformer_2 is not None):
        raise RuntimeError(f"{folder} does not load back as the Wan {version} pipeline it was saved as.")
    return pipe


def clip_frames(n: int, size: int = 24, seed: int = 0) -> list[np.ndarray]:
    """`n` RGB frames (uint8, size x size) of a moving square on a coloured background."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, 3)
    frames = []
    for i in range(n):
        frame = np.empty((size, size, 3), dtype=np.uint8)
        frame[:] = base
        x = (2 * i) % (size - 6)
        frame[4:10, x : x + 6] = 255 - base
        frames.append(frame)
    return frames


def save_gif(path, frames: list[np.ndarray]):
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=40, loop=0)


def save_clips(folder, captions=("a red fox", "a blue bird"), num_frames: int = 7, size: int = 24) -> str:
    """A folder of GIF clips (`num_frames` frames each) with `metadata.jsonl` lines {"file_name", "text"}."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i, caption in enumerate(captions):
        name = f"{i:03d}.gif"
        save_gif(os.path.join(folder, name), clip_frames(num_frames, size, seed=i))
        lines.append(json.dumps({"file_name": name, "text": caption}))
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(folder)
