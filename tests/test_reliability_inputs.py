"""Reliability of inputs (issue 24): a damaged or incomplete teacher folder is named, with its component and file,
before any weights load; SCMPipeline's text inputs (`prompt_embeds` of the wrong width, no prompt at all, missing
pooled embeddings) and packed token sequences given to Flux / Qwen-Image are `ValueError`s that say what is expected.
Tiny random pipelines of diffusers' own classes; nothing is downloaded."""

import fnmatch
import math
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from families import FAMILIES
from t2i_pipelines import IMAGE_SIZE, save_tiny_pipeline, tiny_pipeline
from test_hub import COMMIT_A, hub_cache, put_in_cache  # noqa: F401 (hub_cache is a fixture)
from transformers import CLIPTokenizer

from diffusers_scm import SCMPipeline, TrigFlowDenoiser, TrigFlowScheduler
from diffusers_scm.adapters import get_adapter, pack_latents
from diffusers_scm.conditioning import TEXT_COMPONENTS
from diffusers_scm.hub import download_pipeline
from diffusers_scm.training.teacher import load_teacher, load_text_to_image_teacher


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------------------------
# Case 3: teacher components, checked before training and before any weights load


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    """A tiny StableDiffusionXLPipeline (two CLIP text encoders and tokenizers) saved once; tests damage copies."""
    folder = tmp_path_factory.mktemp("teachers") / "sdxl"
    save_tiny_pipeline("sdxl", folder)
    return folder


@pytest.fixture
def teacher(sdxl_folder, tmp_path) -> Path:
    return Path(shutil.copytree(sdxl_folder, tmp_path / "sdxl"))


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any weights fails the test: the damaged file must be found by the check that runs first."""

    def refuse(*args, **kwargs):
        raise AssertionError("DiffusionPipeline.from_pretrained ran before the folder was checked")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)


def _cut(path: Path, keep: float = 0.5):
    """Cut a file off as an interrupted write or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_truncated_tokenizer_json_names_the_component_and_file(teacher, no_loading):
    _cut(teacher / "tokenizer" / "tokenizer.json")
    expected = (
        r"the component 'tokenizer' \(`transformers.CLIPTokenizer`\): .*tokenizer/tokenizer.json is not valid JSON "
        r"\(Unterminated string .*\): the file is damaged .*Save the pipeline again"
    )
    with pytest.raises(ValueError, match=expected):
        load_text_to_image_teacher(str(teacher))


@pytest.mark.parametrize("keep", [0.5, 0.99])  # cut in the tensors, or just before the end of the file
def test_truncated_text_encoder_safetensors_names_the_component_and_file(teacher, no_loading, keep):
    _cut(teacher / "text_encoder_2" / "model.safetensors", keep)
    expected = (
        r"the component 'text_encoder_2' \(`transformers.CLIPTextModelWithProjection`\): "
        r"text_encoder_2/model.safetensors is not a readable safetensors file \(.*incomplete metadata.*\): the file "
        r"is damaged or was cut off while being written or downloaded\. Save the pipeline again"
    )
    with pytest.raises(ValueError, match=expected):
        load_text_to_image_teacher(str(teacher))


def test_missing_tokenizer_folder_is_named_before_loading(teacher, no_loading):
    """Before: `tokenizer_2/` missing loaded a 2-token CLIP tokenizer, and a student was trained and saved."""
    shutil.rmtree(teacher / "tokenizer_2")
    expected = r"lists the component 'tokenizer_2' \(`transformers.CLIPTokenizer`\) in model_index.json but has no "
    with pytest.raises(ValueError, match=expected + r"tokenizer_2/ folder"):
        load_text_to_image_teacher(str(teacher))
    os.makedirs(teacher / "tokenizer_2")  # the folder, without the tokenizer's files
    with pytest.raises(ValueError, match=expected + r"vocabulary in tokenizer_2/ \(one of tokenizer.json, vocab.json"):
        load_text_to_image_teacher(str(teacher))


def test_a_tokenizer_without_vocabulary_is_refused_after_loading(tmp_path):
    """transformers 5's `CLIPTokenizer.from_pretrained` of a folder without the tokenizer's files returns a stand-in
    with only its two special tokens; `check_tokenizers` names the component."""
    from diffusers_scm.conditioning import check_tokenizers

    pipe = tiny_pipeline("sdxl")
    check_tokenizers(pipe, "teacher")  # real vocabularies pass
    os.makedirs(tmp_path / "empty")
    stand_in = CLIPTokenizer.from_pretrained(tmp_path / "empty")
    assert len(stand_in) == 2
    pipe.tokenizer_2 = stand_in
    expected = r"teacher: the component 'tokenizer_2' \(CLIPTokenizer\) loaded with 0 tokens besides its special"
    with pytest.raises(ValueError, match=expected):
        check_tokenizers(pipe, "teacher")


def test_components_from_diffusers_pipeline_modules_are_checked(tmp_path):
    """SD 1.5 folders list their safety checker as `["stable_diffusion", "StableDiffusionSafetyChecker"]`, a module of
    `diffusers.pipelines` (as diffusers resolves it), not a library: the check finds its class, then its files."""
    from diffusers import StableDiffusionPipeline
    from diffusers.pipelines.stable_diffusion import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    text = {**tiny, "vocab_size": 16, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(text_config=text, vision_config={**tiny, "image_size": 32, "patch_size": 16}, projection_dim=8)
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    components = {**tiny_pipeline("sd15").components, "safety_checker": checker, "feature_extractor": processor}
    StableDiffusionPipeline(**components).save_pretrained(tmp_path / "sd15")
    teacher = load_text_to_image_teacher(str(tmp_path / "sd15"))
    assert isinstance(teacher.pipeline.safety_checker, StableDiffusionSafetyChecker)
    _cut(tmp_path / "sd15" / "safety_checker" / "model.safetensors")
    expected = r"the component 'safety_checker' .*safety_checker/model.safetensors is not a readable safetensors file"
    with pytest.raises(ValueError, match=expected):
        load_text_to_image_teacher(str(tmp_path / "sd15"))


def test_damaged_teacher_by_hub_id_is_named(sdxl_folder, tmp_path, hub_cache):  # noqa: F811
    """A Hub id is downloaded (here: found in the offline cache) and checked as a local folder before loading."""
    damaged = Path(shutil.copytree(sdxl_folder, tmp_path / "damaged"))
    _cut(damaged / "text_encoder" / "model.safetensors")
    put_in_cache(hub_cache, "org/sdxl", damaged, COMMIT_A)
    with pytest.raises(ValueError, match=r"org/sdxl: the component 'text_encoder' .*text_encoder/model.safetensors"):
        load_text_to_image_teacher("org/sdxl")


def test_load_teacher_checks_the_network_before_loading(teacher):
    _cut(teacher / "unet" / "diffusion_pytorch_model.safetensors")
    expected = r"the component 'unet' .*unet/diffusion_pytorch_model.safetensors is not a readable safetensors file"
    with pytest.raises(ValueError, match=expected):
        load_teacher(str(teacher))
    with pytest.raises(ValueError, match=r"the network: unet/diffusion_pytorch_model.safetensors is not a readable"):
        load_teacher(str(teacher / "unet"), parameterization="vp_epsilon")  # a network folder


def test_a_missing_weight_shard_is_named(teacher):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(teacher / "unet")
    shutil.rmtree(teacher / "unet")
    unet.save_pretrained(teacher / "unet", max_shard_size="100KB")
    shards = sorted((teacher / "unet").glob("*-of-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()  # a copy or download cut short
    expected = (
        rf"the component 'unet' .*: unet/diffusion_pytorch_model.safetensors.index.json lists the weight shards "
        rf"\['{re.escape(shards[-1].name)}'\], which unet/ does not hold"
    )
    with pytest.raises(ValueError, match=expected):
        load_teacher(str(teacher))


def test_a_hub_download_fetches_text_encoder_weights_and_tokenizer_files(tmp_path, hub_cache, monkeypatch):  # noqa: F811
    """Every file of a text-to-image student folder is matched by the download's patterns (before: the text
    encoders' `model.safetensors` were left out, so a student loaded by Hub id had no text encoder weights)."""
    import diffusers_scm.hub.folders as hub

    pipe = tiny_pipeline("sd15")
    parts = {k: getattr(pipe, k) for k in TEXT_COMPONENTS if getattr(pipe, k, None) is not None}
    student = SCMPipeline(
        unet=pipe.unet, scheduler=TrigFlowScheduler(), vae=pipe.vae, family_pipeline="StableDiffusionPipeline", **parts
    )
    student.save_pretrained(tmp_path / "student")
    put_in_cache(hub_cache, "org/student", tmp_path / "student", COMMIT_A)
    patterns, snapshot = [], hub._snapshot

    def recording(repo_id, allow_patterns, *args, **kwargs):
        patterns.extend(allow_patterns)
        return snapshot(repo_id, allow_patterns, *args, **kwargs)

    monkeypatch.setattr(hub, "_snapshot", recording)
    download_pipeline("org/student")
    files = [p.relative_to(tmp_path / "student").as_posix() for p in (tmp_path / "student").rglob("*") if p.is_file()]
    assert "text_encoder/model.safetensors" in files
    assert [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)] == []


# ---------------------------------------------------------------------------------------------------------------------
# Case 5: SCMPipeline inputs


def _student(family: str) -> SCMPipeline:
    """A text-to-image student over a tiny family pipeline's components (any weights do for input checks)."""
    pipe = tiny_pipeline(family)
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    parts = {k: getattr(pipe, k) for k in TEXT_COMPONENTS if getattr(pipe, k, None) is not None}
    scheduler = TrigFlowScheduler(parameterization="flow_matching", max_timesteps=math.pi / 2)
    student = SCMPipeline(
        scheduler=scheduler, vae=pipe.vae, family_pipeline=type(pipe).__name__, **{name: getattr(pipe, name)}, **parts
    )
    student.set_progress_bar_config(disable=True)
    return student


SIZE = {"height": IMAGE_SIZE, "width": IMAGE_SIZE, "output_type": "pt"}


def _embeds(student: SCMPipeline, prompt: str) -> dict:
    """The family pipeline's own `encode_prompt` outputs for `prompt`, as `SCMPipeline.__call__` takes them."""
    family = student.family_pipeline()
    if student.config.family_pipeline == "StableDiffusionPipeline":
        embeds, _ = family.encode_prompt([prompt], "cpu", 1, False)
        return {"prompt_embeds": embeds}
    embeds, _, pooled, _ = family.encode_prompt(
        prompt=[prompt], prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=False
    )
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


@pytest.mark.parametrize(
    "family, name, expected",
    [
        ("sd15", "prompt_embeds", r"UNet2DConditionModel reads `encoder_hidden_states` of shape \(batch, tokens, 32\) "
         r"\(cross_attention_dim = 32 in its config\)"),
        ("sd3", "pooled_prompt_embeds", r"SD3Transformer2DModel reads `pooled_projections` of shape \(batch, 48\) "
         r"\(pooled_projection_dim = 48 in its config\)"),
    ],
)  # fmt: skip
def test_embeddings_of_the_wrong_width_are_named(family, name, expected):
    """Before: a matmul `RuntimeError` inside the network. The right embeddings still sample as the prompt does."""
    student = _student(family)
    embeds = _embeds(student, "a red fox")
    image = student(**embeds, **SIZE, generator=torch.Generator().manual_seed(0)).images
    reference = student(prompt="a red fox", **SIZE, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(image, reference)
    wrong = torch.randn(*embeds[name].shape[:-1], embeds[name].shape[-1] + 5)
    shape = re.escape(str(tuple(wrong.shape)))
    with pytest.raises(ValueError, match=rf"`{name}` has shape {shape}, but {expected}: pass the embeddings"):
        student(**{**embeds, name: wrong}, **SIZE)


def test_text_to_image_student_without_prompt_says_what_to_pass():
    """Before: an `AttributeError` (or a missing-argument `TypeError`) inside diffusers."""
    student = _student("sd3")
    expected = (
        r"This SCMPipeline is a text-to-image student \(StableDiffusion3Pipeline\): pass `prompt` \(a string, or a "
        r"list with one prompt per image\) or `prompt_embeds` and `pooled_prompt_embeds`"
    )
    with pytest.raises(ValueError, match=expected):
        student(**SIZE)
    with pytest.raises(ValueError, match=expected):
        student(batch_size=2, **SIZE)


def test_prompt_embeds_without_pooled_embeddings_are_named():
    """Before: `'NoneType' object has no attribute 'dtype'` inside StableDiffusion3Pipeline.encode_prompt."""
    student = _student("sd3")
    embeds = _embeds(student, "a red fox")
    expected = r"StableDiffusion3Pipeline's `encode_prompt` needs `pooled_prompt_embeds` with `prompt_embeds`"
    with pytest.raises(ValueError, match=expected):
        student(prompt_embeds=embeds["prompt_embeds"], **SIZE)


@pytest.mark.parametrize("family", ["flux", "qwenimage"])
def test_packed_tokens_given_to_a_packed_family_are_named(family):
    """The state is the unpacked latent (B, C, H, W); a packed token sequence (B, H/2 * W/2, 4C), as the family's own
    pipeline carries it, was "not enough values to unpack"."""
    spec = FAMILIES[family]
    denoiser = TrigFlowDenoiser(spec.make(), "flow_matching")
    x = torch.randn(spec.shape)
    cond = spec.conditioning(torch.Generator().manual_seed(0), torch.float32)
    t = torch.full((x.shape[0],), 0.7)
    with torch.no_grad():
        assert denoiser(x, t, **cond).shape == x.shape
        packed = pack_latents(x)
        expected = (
            rf"{type(denoiser.inner_model).__name__} takes the unpacked latent image \(B, C, H, W\) here.*Got shape "
            rf"{re.escape(str(tuple(packed.shape)))} \(a packed token sequence.*unpack_latents\(tokens, height, width\)"
        )
        with pytest.raises(ValueError, match=expected):
            denoiser(packed, t, **cond)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_conditioning_shapes_match_what_each_family_reads(family):
    """The adapter's `conditioning_shapes` (from the network's config) agree with the conditioning each family's
    network is called with in tests/families.py, and networks without text have none."""
    spec = FAMILIES[family]
    model = spec.make()
    cond = spec.conditioning(torch.Generator().manual_seed(0), torch.float32)
    shapes = get_adapter(model).conditioning_shapes(model)
    text = {k for k in ("encoder_hidden_states", "pooled_projections") if k in cond}
    assert set(shapes) == text
    for key, shape in shapes.items():
        assert shape.matches(cond[key]), (key, shape, cond[key].shape)
