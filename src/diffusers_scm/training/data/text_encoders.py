"""Small frozen text encoders with random weights and tokenizers over the captions' vocabulary, for training a
text-to-image teacher from scratch (`examples/train_teacher.py --objective flow_matching`). Nothing is downloaded.

    words = caption_words(captions)                       # the words of the captions, most frequent first
    parts = text_components("SD3Transformer2DModel", network.config, captions, seed=0)
    pipe = StableDiffusion3Pipeline(transformer=network, vae=vae, scheduler=scheduler, **parts)

Random frozen encoders are enough to condition a small model on short captions: distinct words get distinct random
embeddings, and the network learns what they mean. The tokenizers are the families' own transformers classes:
`CLIPTokenizer` (byte-level BPE, lower-cased) whose vocabulary holds the 256 byte symbols plus every caption word
(letters a-z) as one token, so any caption tokenizes (unseen words fall back to bytes), and `T5Tokenizer` (unigram)
with a piece per caption word and single characters. They are saved and loaded with
the pipeline like any other tokenizer.

Families (`TEXT_TO_IMAGE_FAMILIES`, by the network's class): SD3 (`SD3Transformer2DModel` in a
`StableDiffusion3Pipeline` with two CLIP text encoders with projection and a T5 encoder).
"""

import collections
import dataclasses
import re

import torch


__all__ = [
    "TEXT_TO_IMAGE_FAMILIES",
    "TextToImageFamily",
    "caption_words",
    "clip_tokenizer",
    "clip_text_encoder",
    "t5_tokenizer",
    "t5_text_encoder",
    "sd3_text_components",
    "text_components",
    "text_to_image_family",
]

_WORD = re.compile(r"[a-z]+")  # what CLIP's pre-tokenizer keeps together (letters), after lower-casing
CLIP_MAX_LENGTH = 77  # CLIP's position limit


def caption_words(captions, max_words: int | None = None) -> list[str]:
    """The words (lower-cased runs of a-z) of `captions`, most frequent first (ties alphabetically), at most
    `max_words`."""
    counts = collections.Counter(word for caption in captions for word in _WORD.findall(str(caption).lower()))
    words = sorted(counts, key=lambda word: (-counts[word], word))
    return words if max_words is None else words[:max_words]


def _word_merges(vocab: dict, words, end_of_word_suffix: str) -> list:
    """BPE merges that make each of `words` one token. For each word in turn: tokenize it with the merges so far, then
    append the merges that join its pieces left to right. A new merge ranks below all earlier ones, so it never
    applies while an earlier word is being merged: every word ends as a single token."""
    from tokenizers.models import BPE

    merges = []
    for word in words:
        model = BPE(
            vocab=dict(vocab), merges=list(merges), continuing_subword_prefix="", end_of_word_suffix=end_of_word_suffix
        )
        pieces = [token.value for token in model.tokenize(word)]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    return merges


def clip_tokenizer(words, model_max_length: int = CLIP_MAX_LENGTH):
    """
    A `CLIPTokenizer` (byte-level BPE, lower-cased, "</w>" word ends) over the 256 byte symbols and `words` (each one
    token). Ids: 0 "<|startoftext|>" (bos), 1 "<|endoftext|>" (eos, pad and unk, as in CLIP).
    """
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
            vocab[symbol + suffix] = len(vocab)
    words = [w for w in words if _WORD.fullmatch(w)]
    merges = _word_merges(vocab, words, end_of_word_suffix="</w>")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def clip_text_encoder(tokenizer, hidden_size: int, projection_dim: int, num_layers: int = 2):
    """A `CLIPTextModelWithProjection` with random weights (from the global torch RNG) for `tokenizer`: its pooled
    output is read at the first eos token; two layers, as SD3 reads the second-to-last hidden state."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    heads = 2 if hidden_size % 2 == 0 else 1
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the pooled output is taken at the first eos token
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config).eval().requires_grad_(False)


def t5_tokenizer(words, model_max_length: int = 512):
    """
    A `T5Tokenizer` (unigram) with one "▁word" piece per word of `words` (score -1) and single characters (score -5),
    no sentinel tokens; other words are spelled in characters (or `<unk>`). Ids: 0 "<pad>", 1 "</s>" (appended to
    every sequence), 2 "<unk>".
    """
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in string.ascii_letters + string.digits + string.punctuation]
    vocab += [("\u2581" + w, -1.0) for w in words if _WORD.fullmatch(w)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def t5_text_encoder(tokenizer, d_model: int, num_layers: int = 2):
    """A `T5EncoderModel` (T5 v1.1: gated GELU) with random weights (from the global torch RNG) for `tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    d_kv = 8 if d_model % 8 == 0 else d_model
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_kv,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=d_model // d_kv,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config).eval().requires_grad_(False)


def _token_length(captions, words) -> int:
    """The CLIP sequence length for `captions`: their longest tokenization (bos and eos included, every caption word
    one token), rounded up to a multiple of 8, at most CLIP's 77."""
    longest = 2
    if words:
        tokenizer = clip_tokenizer(words)
        for caption in set(map(str, captions)):
            longest = max(longest, len(tokenizer(caption).input_ids))
    return min(CLIP_MAX_LENGTH, 8 * -(-longest // 8))


def sd3_text_components(network_config, captions, max_words: int | None = 10000) -> dict:
    """
    The text components of a `StableDiffusion3Pipeline` for an `SD3Transformer2DModel` config: two CLIP text encoders
    with projection whose pooled outputs together give `pooled_projection_dim` (its first half and the rest) and
    whose hidden sizes together fit in `joint_attention_dim` (the pipeline pads them there), a T5 encoder of width
    `joint_attention_dim`, and their tokenizers over the captions' words. Weights come from the global torch RNG.

    The T5 encoder is small, and it makes the folder a plain SD3 pipeline (`from_pretrained` needs no
    `text_encoder_3=None`). Both tokenizers' `model_max_length` is the captions' longest tokenization (rounded up to
    8): the T5 one is the pipeline's `max_sequence_length` here (`families.prompt_sequence_length`), so the
    network attends to a few text tokens instead of SD3's default 256 (five times fewer network FLOPs for digits).
    """
    pooled = int(network_config["pooled_projection_dim"])
    joint = int(network_config["joint_attention_dim"])
    if pooled < 2:
        raise ValueError(f"pooled_projection_dim = {pooled}: the two CLIP text encoders need at least 2 (1 each).")
    words = caption_words(captions, max_words)
    length = _token_length(captions, words)
    first, second = pooled // 2, pooled - pooled // 2  # projections: their concatenation is the pooled embedding
    hidden_first, hidden_second = (first, second) if joint >= pooled else (joint // 2, joint - joint // 2)
    if min(hidden_first, hidden_second) < 1:
        raise ValueError(f"joint_attention_dim = {joint} leaves no room for two CLIP hidden states (1 each at least).")
    tokenizer, tokenizer_2, tokenizer_3 = (
        clip_tokenizer(words, length),
        clip_tokenizer(words, length),
        t5_tokenizer(words, length),
    )
    return {
        "text_encoder": clip_text_encoder(tokenizer, hidden_first, first),
        "tokenizer": tokenizer,
        "text_encoder_2": clip_text_encoder(tokenizer_2, hidden_second, second),
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": t5_text_encoder(tokenizer_3, joint),
        "tokenizer_3": tokenizer_3,
    }


@dataclasses.dataclass(frozen=True)
class TextToImageFamily:
    """A network class's text-to-image family: its diffusers pipeline class name and the builder of its text
    components, `build(network_config, captions) -> dict` of pipeline components."""

    pipeline: str
    build: callable


TEXT_TO_IMAGE_FAMILIES = {"SD3Transformer2DModel": TextToImageFamily("StableDiffusion3Pipeline", sd3_text_components)}


def text_to_image_family(network) -> TextToImageFamily:
    """The `TextToImageFamily` of a diffusers network (by its class or nearest registered base class)."""
    for cls in type(network).__mro__:
        if cls.__name__ in TEXT_TO_IMAGE_FAMILIES:
            return TEXT_TO_IMAGE_FAMILIES[cls.__name__]
    raise ValueError(
        f"{type(network).__name__} has no text-to-image family with text encoders built here; supported network "
        f"classes: {', '.join(TEXT_TO_IMAGE_FAMILIES)}."
    )


def text_components(network, captions, seed: int = 0) -> dict:
    """The frozen random text encoders and tokenizers of `network`'s family pipeline for `captions`; the same `seed`
    gives the same weights on every process (the global torch RNG is left as it was)."""
    family = text_to_image_family(network)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return family.build(network.config, captions)
