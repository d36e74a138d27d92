"""`examples/train_teacher.py --objective flow_matching`: the rectified-flow loss against a hand computation, SD3's
time sampling against diffusers' scheduler, caption dropout and the caption cache against the pipeline's own
`encode_prompt`, the text encoders built over the captions' words, a run whose folder loads as a
`StableDiffusion3Pipeline` (generating from a prompt), in `load_teacher` / `load_text_to_image_teacher` (inferred
"flow_matching") and distills with `distill.py`; a two-process launch, and the errors of bad inputs. Tiny networks,
nothing is downloaded."""

import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from conftest import load_script
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

from diffusers_scm.training.data.encoded import CaptionCache, cache_latents
from diffusers_scm.training.data.text_encoders import caption_words, text_components
from diffusers_scm.training.objectives.flow_matching import (
    FlowMatchingLoss,
    FlowMatchingModel,
    drop_captions,
    flow_matching_times,
    network_from_config,
)


pytestmark = pytest.mark.usefixtures("one_thread")

RESOLUTION = 16  # 4x4 latents through the 1/4 VAE
SD3_CONFIG = {
    "_class_name": "SD3Transformer2DModel",
    "sample_size": 4,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 1,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 16,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 16,
    "pos_embed_max_size": 4,
}
CAPTIONS = ["digit one", "digit two", "digit one", "digit seven"]
COMMON = [
    "--objective", "flow_matching", "--dataset_name", "digits", "--resolution", str(RESOLUTION),
    "--train_batch_size", "4", "--report_to", "none", "--validation_nfe", "2", "--seed", "1",
]  # fmt: skip


def _write_config(folder, **overrides):
    path = os.path.join(folder, "config.json")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump({**SD3_CONFIG, **overrides}, f)
    return path


@pytest.fixture(scope="module")
def model_config(tmp_path_factory):
    return _write_config(str(tmp_path_factory.mktemp("config")))


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """An untrained tiny AutoencoderKL with its latent scaling measured on the digits, as train_vae.py saves it."""
    from diffusers_scm.training.data.images import DigitsDataset
    from diffusers_scm.training.objectives.vae import latent_statistics, save_vae, set_latent_scaling, tiny_autoencoder

    torch.manual_seed(0)
    vae = tiny_autoencoder("tiny", RESOLUTION).eval()
    set_latent_scaling(vae, *latent_statistics(vae, [DigitsDataset(RESOLUTION).images[:64]]))
    return save_vae(vae, str(tmp_path_factory.mktemp("vae")))


def _pipeline(vae_dir, seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    network = SD3Transformer2DModel.from_config(SD3_CONFIG).eval()
    parts = text_components(network, CAPTIONS, seed=seed)
    pipe = StableDiffusion3Pipeline(
        transformer=network,
        vae=AutoencoderKL.from_pretrained(vae_dir),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        **parts,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd3_conditioning(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder_hidden_states": torch.randn(n, 5, 16, generator=g),
        "pooled_projections": torch.randn(n, 16, generator=g),
    }


@pytest.mark.parametrize("scheme", ["logit_normal", "cosmap", "sigma_sqrt"])
def test_loss_equals_hand_computation(scheme):
    torch.manual_seed(0)
    network = SD3Transformer2DModel.from_config(SD3_CONFIG).eval()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    s = torch.tensor([0.05, 0.5, 0.93])
    cond = _sd3_conditioning(3)
    loss, logs = FlowMatchingLoss(scheme)(FlowMatchingModel(network), x0, s=s, noise=noise, **cond)

    expected, per_sample = 0.0, []
    with torch.no_grad():
        for i in range(
            3
        ):  # SPEC.md section 2, one sample at a time, the network called as StableDiffusion3Pipeline does
            si = float(s[i])
            x_s = (1 - si) * x0[i : i + 1] + si * noise[i : i + 1]
            out = network(
                hidden_states=x_s,
                timestep=torch.tensor([1000 * si]),
                encoder_hidden_states=cond["encoder_hidden_states"][i : i + 1],
                pooled_projections=cond["pooled_projections"][i : i + 1],
            ).sample
            err = float(((out - (noise[i : i + 1] - x0[i : i + 1])) ** 2).mean())
            weight = {"logit_normal": 1.0, "cosmap": 2 / (math.pi * (1 - 2 * si + 2 * si * si)), "sigma_sqrt": si**-2}
            expected += weight[scheme] * err / 3
            per_sample.append(err)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(logs["loss"].numpy(), per_sample, rtol=1e-5)
    np.testing.assert_allclose(
        np.tan(logs["t"].numpy()), s.numpy() / (1 - s.numpy()), rtol=1e-5
    )  # log tan t = logit s


def test_loss_gradient_reaches_the_network_and_draws_from_the_generator():
    torch.manual_seed(0)
    model = FlowMatchingModel(SD3Transformer2DModel.from_config(SD3_CONFIG))
    x0, cond = torch.randn(4, 4, 4, 4), _sd3_conditioning(4)
    loss_fn = FlowMatchingLoss()
    a, _ = loss_fn(model, x0, generator=torch.Generator().manual_seed(5), **cond)
    b, _ = loss_fn(model, x0, generator=torch.Generator().manual_seed(5), **cond)
    c, _ = loss_fn(model, x0, generator=torch.Generator().manual_seed(6), **cond)
    assert a.item() == b.item() != c.item()
    a.backward()
    assert all(p.grad is not None for p in model.inner_model.parameters() if p.requires_grad)


def test_times_are_sd3_logit_normal_with_the_scheduler_shift():
    s = flow_matching_times(4000, "logit_normal", 0.3, 0.8, generator=torch.Generator().manual_seed(2))
    u = torch.sigmoid(torch.normal(0.3, 0.8, (4000,), generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(s, u)
    assert ((s > 0) & (s < 1)).all()
    # the static shift is FlowMatchEulerDiscreteScheduler's own: its shifted sigmas from its unshifted ones
    shifted = flow_matching_times(
        4000, "logit_normal", 0.3, 0.8, shift=3.0, generator=torch.Generator().manual_seed(2)
    )
    torch.testing.assert_close(shifted, 3 * u / (1 + 2 * u))
    plain, three = FlowMatchEulerDiscreteScheduler(shift=1.0), FlowMatchEulerDiscreteScheduler(shift=3.0)
    torch.testing.assert_close(three.sigmas, 3 * plain.sigmas / (1 + 2 * plain.sigmas))
    uniform = flow_matching_times(4000, "none", generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(uniform, torch.rand(4000, generator=torch.Generator().manual_seed(2)))
    with pytest.raises(ValueError, match="weighting_scheme"):
        FlowMatchingLoss("lognormal")


def test_caption_dropout_mixes_the_empty_prompt_per_sample():
    cond = {"encoder_hidden_states": torch.randn(64, 3, 2), "nested": {"pooled": torch.randn(64, 5)}}
    uncond = {"encoder_hidden_states": torch.randn(1, 3, 2), "nested": {"pooled": torch.randn(1, 5)}}
    assert drop_captions(cond, uncond, 0.0) is cond
    mixed = drop_captions(cond, uncond, 0.3, torch.Generator().manual_seed(4))
    drop = torch.rand(64, generator=torch.Generator().manual_seed(4)) < 0.3
    assert 5 < int(drop.sum()) < 40
    for i in range(64):
        source = uncond if drop[i] else cond
        j = 0 if drop[i] else i
        torch.testing.assert_close(mixed["encoder_hidden_states"][i], source["encoder_hidden_states"][j])
        torch.testing.assert_close(mixed["nested"]["pooled"][i], source["nested"]["pooled"][j])
    everything = drop_captions(cond, uncond, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(everything["encoder_hidden_states"], uncond["encoder_hidden_states"].expand(64, 3, 2))


def test_text_components_tokenize_caption_words_and_reload(vae_dir, tmp_path):
    pipe = _pipeline(vae_dir)
    assert caption_words(CAPTIONS) == ["digit", "one", "seven", "two"]
    ids = pipe.tokenizer("digit seven").input_ids
    assert pipe.tokenizer.convert_ids_to_tokens(ids) == ["<|startoftext|>", "digit</w>", "seven</w>", "<|endoftext|>"]
    assert pipe.tokenizer.model_max_length == 8 and pipe.tokenizer_2.model_max_length == 8
    assert pipe.tokenizer_3.model_max_length == 8  # the T5 length every encoding here uses (SD3's default: 256)
    assert pipe.tokenizer_3.convert_ids_to_tokens(pipe.tokenizer_3("digit seven").input_ids) == [
        "\u2581digit",
        "\u2581seven",
        "</s>",
    ]
    # the encoders fit the network: pooled 8 + 8, CLIP hidden states padded into the T5 width 16
    assert pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim == 16
    assert pipe.text_encoder_3.config.d_model == 16
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    same = text_components(pipe.transformer, CAPTIONS, seed=0)["text_encoder_3"]  # the seed fixes the weights
    for a, b in zip(same.parameters(), pipe.text_encoder_3.parameters()):
        torch.testing.assert_close(a, b)

    pipe.save_pretrained(tmp_path / "pipe")
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    kwargs = {"prompt": ["digit two", "an unseen word"], "prompt_2": None, "prompt_3": None, "device": "cpu"}
    for a, b in zip(pipe.encode_prompt(**kwargs), loaded.encode_prompt(**kwargs)):
        torch.testing.assert_close(a, b)


def test_caption_cache_equals_encode_prompt(vae_dir, monkeypatch):
    from diffusers_scm.families import prompt_encoding, prompt_sequence_length

    pipe = _pipeline(vae_dir)
    cache = CaptionCache(prompt_encoding(pipe), "cpu", max_captions=2)
    cond, uncond = cache(CAPTIONS)
    assert prompt_sequence_length(pipe) == 8  # the T5 tokenizer's model_max_length, shorter than SD3's 256
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=CAPTIONS,
        prompt_2=None,
        prompt_3=None,
        device="cpu",
        do_classifier_free_guidance=True,
        max_sequence_length=8,
    )  # the pipeline's own encoding, negative prompt "" (its default)
    assert pe.shape == (4, 8 + 8, 16)  # CLIP (8 tokens) + T5 (8)
    torch.testing.assert_close(cond["encoder_hidden_states"], pe)
    torch.testing.assert_close(cond["pooled_projections"], ppe)
    torch.testing.assert_close(uncond["encoder_hidden_states"], npe)
    torch.testing.assert_close(uncond["pooled_projections"], nppe)
    assert sorted(cache.rows) == ["digit one", "digit two"]  # at most max_captions kept
    calls = []
    encode = cache.encoding.encode
    monkeypatch.setattr(cache.encoding, "encode", lambda *a, **k: calls.append(a[0]) or encode(*a, **k))
    again, _ = cache(["digit two", "digit one"])
    assert calls == []  # kept captions cost no text-encoder pass
    torch.testing.assert_close(again["encoder_hidden_states"], pe[[1, 0]])
    cache(["digit seven"])
    assert calls == [["digit seven"]]  # beyond max_captions: encoded each time


def test_model_call_matches_load_teacher_time_map(vae_dir):
    """The network sees in training what the distillation teacher gives it: FlowMatchingModel at (x_s, s) equals
    `TrigFlowDenoiser.raw_output` of the flow_matching parameterization at the TrigFlow (x_t, t) of that s."""
    from diffusers_scm import TrigFlowDenoiser

    torch.manual_seed(0)
    network = SD3Transformer2DModel.from_config(SD3_CONFIG).eval()
    teacher = TrigFlowDenoiser(network, "flow_matching", sigma_data=1.0)
    t = torch.tensor([0.2, 0.8, 1.3])
    x_t = torch.randn(3, 4, 4, 4)
    sample, timestep = teacher.parameterization.model_inputs(x_t, t)
    s = timestep / 1000
    cond = _sd3_conditioning(3)
    with torch.no_grad():
        torch.testing.assert_close(FlowMatchingModel(network)(sample, s, **cond), teacher.raw_output(x_t, t, **cond))
    # SPEC.md section 2 with sigma_data = 1: s = sin t / (cos t + sin t), x_s = x_t / (cos t + sin t)
    torch.testing.assert_close(s, torch.sin(t) / (torch.cos(t) + torch.sin(t)))


def test_train_flow_matching_teacher_loads_everywhere_and_distills(tmp_path, model_config, vae_dir):
    from diffusers_scm import SCMPipeline
    from diffusers_scm.training import load_teacher
    from diffusers_scm.training.data.captions import save_captioned_digits
    from diffusers_scm.training.teacher import load_text_to_image_teacher

    train_teacher = load_script("train_teacher")
    out, part = tmp_path / "teacher", tmp_path / "part"
    args = [*COMMON, "--model_config", model_config, "--vae", vae_dir, "--validation_steps", "2", "--cache_latents"]
    args += ["--checkpointing_steps", "2"]
    train_teacher.main([*args, "--output_dir", str(out), "--max_train_steps", "3"])
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["replicas_in_sync"]
    # a resumed run draws what the whole run drew (times, noise, caption dropout; the text encoders from the seed)
    train_teacher.main([*args, "--output_dir", str(part), "--max_train_steps", "2"])
    train_teacher.main(
        [*args, "--output_dir", str(part), "--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    )
    losses = [
        [json.loads(line)["loss"] for line in (f / "loss_log.jsonl").read_text().splitlines()] for f in (out, part)
    ]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
    assert (out / "samples" / "step-0000002-2step.png").is_file() and (out / "sample_grid.png").is_file()

    pipe = StableDiffusion3Pipeline.from_pretrained(out, local_files_only=True)  # the family's own class, as is
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 1.0
    images = pipe(
        "digit three",
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert (
        images.shape == (1, RESOLUTION, RESOLUTION, 3) and np.isfinite(images).all()
    )  # default size: the trained one

    teacher = load_teacher(str(out))
    assert (
        teacher.parameterization.name == "flow_matching"
        and type(teacher.inner_model).__name__ == "SD3Transformer2DModel"
    )
    t2i = load_text_to_image_teacher(str(out))
    assert t2i.family == "StableDiffusion3Pipeline" and t2i.denoiser.parameterization.name == "flow_matching"

    data = save_captioned_digits(str(tmp_path / "captioned"), RESOLUTION)
    student = tmp_path / "student"
    load_script("distill").main(
        ["--teacher", str(out), "--dataset_name", data, "--caption_column", "text", "--resolution", str(RESOLUTION)]
        + ["--output_dir", str(student), "--max_train_steps", "2", "--train_batch_size", "4", "--guidance_scale", "3"]
        + ["--sigma_data", "1.0", "--report_to", "none", "--num_validation_images", "2", "--tangent_warmup_steps", "2"]
        + ["--validation_prompts", "digit one", "digit two"]
    )
    scm = SCMPipeline.from_pretrained(student)
    scm.set_progress_bar_config(disable=True)
    assert scm.config.family_pipeline == "StableDiffusion3Pipeline"
    image = scm(
        prompt="digit five", num_inference_steps=1, output_type="pt", height=RESOLUTION, width=RESOLUTION
    ).images
    assert image.shape == (1, 3, RESOLUTION, RESOLUTION) and torch.isfinite(image).all()


def test_cache_latents_equals_the_codec(vae_dir):
    from diffusers import AutoencoderKL

    from diffusers_scm.conditioning import LatentCodec
    from diffusers_scm.training.data.captions import CaptionedDigitsDataset

    data = torch.utils.data.Subset(CaptionedDigitsDataset(RESOLUTION), range(10))
    codec = LatentCodec(AutoencoderKL.from_pretrained(vae_dir), sample=False)
    cached = cache_latents(data, codec, batch_size=4)
    assert len(cached) == 10 and cached[3]["caption"] == data[3]["caption"]
    torch.testing.assert_close(cached[3]["latents"], codec.encode(data[3]["pixel_values"][None])[0])


def test_two_process_launch(tmp_path, model_config, vae_dir):
    from test_distill_script import LAUNCH_TIMEOUT, _free_port, _run_with_stacks

    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "train_teacher.py")
    out = tmp_path / "two"
    cmd = [accelerate, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()), script]
    cmd += [*COMMON, "--model_config", model_config, "--vae", vae_dir, "--output_dir", str(out)]
    res = _run_with_stacks(cmd + ["--max_train_steps", "3", "--validation_steps", "100"])
    assert res is not None, f"no result in {LAUNCH_TIMEOUT} s:\n{_run_with_stacks.last_stderr}"
    assert res.returncode == 0, res.stderr[-4000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 3 and summary["replicas_in_sync"]
    assert len((out / "loss_log.jsonl").read_text().splitlines()) == 3
    pipe = StableDiffusion3Pipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert np.isfinite(pipe("digit nine", num_inference_steps=2, output_type="np").images).all()


def test_bad_inputs(tmp_path, capsys, model_config, vae_dir):
    train_teacher = load_script("train_teacher")

    def parse_error(argv, message):
        with pytest.raises(SystemExit):
            train_teacher.parse_args(argv)
        assert message in capsys.readouterr().err

    parse_error(["--objective", "flow_matching", "--vae", vae_dir], "needs --model_config")
    parse_error(["--objective", "flow_matching", "--model_config", model_config], "needs --vae")
    parse_error(["--model_config", model_config], "need --objective flow_matching")
    flow = ["--objective", "flow_matching", "--model_config", model_config, "--vae", vae_dir]
    parse_error([*flow, "--class_conditional"], "TrigFlow teachers only")
    parse_error([*flow, "--caption_dropout", "1.5"], "--caption_dropout")
    parse_error([*flow, "--push_to_hub"], "not supported for flow_matching")

    def run_error(config_path, error, message):
        argv = [*COMMON, "--model_config", str(config_path), "--vae", vae_dir, "--output_dir", str(tmp_path / "o")]
        with pytest.raises(error, match=message):
            train_teacher.main([*argv, "--max_train_steps", "1"])

    not_a_model = tmp_path / "clip.json"
    not_a_model.write_text(json.dumps({"_class_name": "CLIPTextModel", "hidden_size": 8}))
    run_error(not_a_model, ValueError, "not a diffusers model class")
    scheduler = tmp_path / "sched.json"
    scheduler.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler"}))
    run_error(scheduler, ValueError, "not a diffusers model class")
    nameless = tmp_path / "nameless.json"
    nameless.write_text(json.dumps({"num_layers": 1}))
    run_error(nameless, ValueError, "no `_class_name`")
    run_error(tmp_path / "missing.json", FileNotFoundError, "no such config file")
    unet = tmp_path / "unet.json"
    unet.write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 4, "in_channels": 4}))
    run_error(unet, ValueError, "no text-to-image family")
    run_error(_write_config(str(tmp_path / "c8"), in_channels=8, out_channels=8), ValueError, "4 latent channels")
    run_error(_write_config(str(tmp_path / "s8"), sample_size=8), ValueError, "set sample_size to 4")
    with pytest.raises(ValueError, match="_class_name"):
        network_from_config(str(nameless))
