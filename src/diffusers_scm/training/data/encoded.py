"""Captions and latents encoded once and kept in memory, for training flow-matching teachers
(`examples/train_teacher.py --objective flow_matching --cache_latents`)."""

import torch


__all__ = ["CaptionCache", "LatentCaptionDataset", "cache_latents"]


class CaptionCache:
    """
    Captions to conditioning through the family pipeline's own `encode_prompt` (a `PromptEncoding`), each distinct
    caption encoded once and kept (up to `max_captions`; later new captions are encoded every time), and the
    unconditional conditioning (the negative prompt "", as the pipeline encodes it for classifier-free guidance)
    encoded once. Data sets with a few distinct captions (the digits: ten) then cost no text-encoder passes.

    Args:
        encoding (`PromptEncoding`): `diffusers_scm.families.prompt_encoding(pipeline)`.
        device: where the conditioning is computed and kept.
        max_captions (`int`, defaults to 4096): the most captions kept.
    """

    def __init__(self, encoding, device, max_captions: int = 4096):
        self.encoding, self.device, self.max_captions = encoding, device, max_captions
        self.rows: dict[str, dict] = {}
        self._uncond = None

    def _encode(self, captions: list[str]) -> dict:
        from ...adapters import cast_floating
        from .latent_cache import flatten_conditioning

        cond, _ = self.encoding.encode(list(captions), device=self.device, guidance=False)
        return flatten_conditioning(cast_floating(cond, torch.float32))

    def __call__(self, captions) -> tuple[dict, dict]:
        """`(cond, uncond)` for a batch of captions, float32; uncond has the batch's size."""
        from .latent_cache import unflatten_conditioning

        captions = [str(c) for c in captions]
        new = [c for c in dict.fromkeys(captions) if c not in self.rows]
        if new:
            flat = self._encode(new)
            fresh = {c: {k: v[i] for k, v in flat.items()} for i, c in enumerate(new)}
            for caption in new[: max(0, self.max_captions - len(self.rows))]:
                self.rows[caption] = fresh[caption]
        else:
            fresh = {}
        rows = [self.rows.get(c) or fresh[c] for c in captions]
        if any(len({tuple(r[k].shape) for r in rows}) > 1 for k in rows[0]):
            # a family that pads each batch to its longest caption through the text encoder (CogView4): captions
            # encoded in different batches differ in length, so the batch is encoded together, as its pipeline would
            return unflatten_conditioning(self._encode(captions)), self.uncond(len(captions))
        cond = unflatten_conditioning({k: torch.stack([r[k] for r in rows]) for k in rows[0]})
        return cond, self.uncond(len(captions))

    def uncond(self, n: int) -> dict:
        """The unconditional conditioning, expanded to `n` samples."""
        from ...adapters import cast_floating
        from .latent_cache import flatten_conditioning, unflatten_conditioning

        if self._uncond is None:
            _, uncond = self.encoding.encode([""], device=self.device, guidance=True)
            self._uncond = flatten_conditioning(cast_floating(uncond, torch.float32))
        return unflatten_conditioning({k: v.expand(n, *v.shape[1:]) for k, v in self._uncond.items()})


class LatentCaptionDataset(torch.utils.data.Dataset):
    """Items `{"latents", "caption"}`: a captioned image data set encoded once (`cache_latents`)."""

    def __init__(self, latents: torch.Tensor, captions: list[str]):
        self.latents, self.captions = latents, list(captions)

    def __len__(self):
        return len(self.latents)

    def __getitem__(self, i):
        return {"latents": self.latents[i], "caption": self.captions[i]}


@torch.no_grad()
def cache_latents(dataset, codec, device="cpu", batch_size: int = 64) -> LatentCaptionDataset:
    """Encode every image of a captioned data set once with the VAE's `LatentCodec` (its latents x0, SPEC.md section
    8), as diffusers' SD3 training scripts do with `--cache_latents`; the latents are kept on the CPU."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    latents, captions = [], []
    for batch in loader:
        latents.append(codec.encode(batch["pixel_values"].to(device)).cpu())
        captions += list(batch["caption"])
    return LatentCaptionDataset(torch.cat(latents), captions)


def _tensors(cond):
    for value in cond.values():
        if isinstance(value, dict):
            yield from _tensors(value)
        elif isinstance(value, torch.Tensor):
            yield value
