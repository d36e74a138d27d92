"""Families whose `encode_prompt` pads each batch of captions to its longest caption and runs the padding through
the text encoder (CogView4): captions encoded in different batches differ in length. The in-memory caption cache then
encodes such a batch together, as the pipeline would; the latent cache refuses rows of different lengths with the fix."""

import numpy as np
import pytest
import torch

from diffusers_scm.training.data.encoded import CaptionCache
from diffusers_scm.training.data.latent_cache import _check_equal_lengths


class LongestPadding:
    """The `PromptEncoding` interface with CogView4's padding: every caption of a batch gets as many tokens as the
    batch's longest, and each token's state depends on that length (the pads pass through the encoder)."""

    calls = 0

    def encode(self, captions, device=None, guidance=False):
        type(self).calls += 1
        length = max(len(c.split()) for c in captions)
        states = torch.stack(
            [torch.arange(length, dtype=torch.float32)[:, None] * len(c) + length * torch.ones(1, 4) for c in captions]
        )
        cond = {"encoder_hidden_states": states}
        return cond, ({"encoder_hidden_states": torch.zeros(1, 1, 4)} if guidance else None)


def test_caption_cache_encodes_a_batch_of_different_lengths_together():
    encoding = LongestPadding()
    cache = CaptionCache(encoding, "cpu")
    first, _ = cache(["a cat", "a red cat sits"])
    assert first["encoder_hidden_states"].shape == (2, 4, 4)
    second, uncond = cache(["a cat", "dogs"])  # "a cat" was encoded at length 4, "dogs" alone has length 1
    expected, _ = encoding.encode(["a cat", "dogs"])
    torch.testing.assert_close(second["encoder_hidden_states"], expected["encoder_hidden_states"], rtol=0, atol=0)
    assert uncond["encoder_hidden_states"].shape[0] == 2
    calls = LongestPadding.calls
    again, _ = cache(["a cat", "a red cat sits"])  # one length: from the cache, no new encoding
    assert LongestPadding.calls == calls
    torch.testing.assert_close(again["encoder_hidden_states"], first["encoder_hidden_states"], rtol=0, atol=0)


def test_latent_cache_refuses_rows_of_different_lengths():
    row = {"latents": np.zeros((4, 2, 2)), "caption": "x"}
    rows = [
        {**row, "cond.encoder_hidden_states": np.zeros((16, 8))},
        {**row, "cond.encoder_hidden_states": np.zeros((32, 8))},
    ]
    with pytest.raises(ValueError, match="CogView4Pipeline.*pads each batch.*--batch_size at least the number"):
        _check_equal_lengths(rows, "CogView4Pipeline")
    _check_equal_lengths(rows[:1] * 3, "CogView4Pipeline")
