"""The embedded world pipeline: its tokenizer, its training script (shortened), and the shipped weights."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import StableDiffusionPipeline

from finetune.world.evaluate import evaluate_pipeline
from finetune.world.pipeline import (
    SHIPPED_PIPELINE,
    build_world_pipeline,
    load_world_pipeline,
    world_tokenizer,
    world_words,
)
from rewards import get_reward
from rewards.clip import build_clip_tokenizer
from rewards.shapes import all_captions


def test_world_tokenizer_splits_world_words_as_clip_does():
    small, full = world_tokenizer(), build_clip_tokenizer()
    assert len(small.get_vocab()) < 600
    for text in [*world_words(), *all_captions()]:
        assert small.tokenize(text) == full.tokenize(text)
    assert small.tokenize("hello world") and small("a dog").input_ids[-1] == small.eos_token_id
    assert small.get_vocab() == load_world_pipeline().tokenizer.get_vocab()  # what the shipped pipeline holds


def test_training_script_runs_short(tmp_path):
    from finetune.world.classifier import train_classifier
    from finetune.world.pipeline import train_pipeline

    metrics = train_pipeline(tmp_path / "pipeline", steps=2, vae_steps=2, decoder_steps=2, dataset_size=64)
    assert metrics["denoiser_steps"] == 2 and 0 <= metrics["decoder_mean_abs_error"] <= 1
    pipeline = load_world_pipeline(tmp_path / "pipeline")
    out = pipeline(
        "two red circles", num_inference_steps=2, height=32, width=32, output_type="pt", generator=None
    ).images
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()

    classifier = tmp_path / "classifier.safetensors"
    assert 0 <= train_classifier(classifier, steps=2, batch_size=8)["held_out_accuracy"] <= 1
    get_reward("shapes", weights=str(classifier), objective="count")  # strict loading


def test_training_cli_records_provenance(tmp_path):
    output = tmp_path / "c.safetensors"
    command = [sys.executable, "-m", "finetune.world.train", "classifier", "--steps", "1", "--output", str(output)]
    subprocess.run(command, check=True, capture_output=True)
    record = json.loads((tmp_path / "c.provenance.json").read_text())
    assert record["command"] == "python -m finetune.world.train classifier --steps 1 --output " + str(output)
    assert record["seed"] == 0 and record["commit"]


def test_decoder_stage_keeps_the_latent_space_and_the_record(tmp_path):
    directory = tmp_path / "pipeline"
    build_world_pipeline().save_pretrained(directory)
    (directory / "provenance.json").write_text(json.dumps({"command": "earlier"}))
    before = load_world_pipeline(directory)
    command = [sys.executable, "-m", "finetune.world.train", "decoder", "--steps", "2", "--output", str(directory)]
    subprocess.run(command, check=True, capture_output=True)
    after = load_world_pipeline(directory)
    record = json.loads((directory / "provenance.json").read_text())
    assert record["command"] == "earlier" and record["decoder_refinement"]["decoder_steps"] == 2
    for name, value in before.vae.encoder.state_dict().items():
        assert torch.equal(after.vae.encoder.state_dict()[name], value)
    changed = [
        not torch.equal(after.vae.decoder.state_dict()[k], v) for k, v in before.vae.decoder.state_dict().items()
    ]
    assert any(changed)
    for name, value in before.unet.state_dict().items():
        assert torch.equal(after.unet.state_dict()[name], value)


def test_shipped_pipeline_is_diffusers_and_small():
    size = sum(f.stat().st_size for f in SHIPPED_PIPELINE.rglob("*") if f.is_file())
    assert size < 25 * 2**20
    pipeline = load_world_pipeline()
    assert isinstance(pipeline, StableDiffusionPipeline)
    provenance = json.loads((SHIPPED_PIPELINE / "provenance.json").read_text())
    assert provenance["command"].startswith("python -m finetune.world.train pipeline")


def test_shipped_pipeline_follows_prompts():
    """One image per world caption at a seed never used in training: the classifier must agree on most."""
    pipeline = load_world_pipeline()
    classifier = get_reward("shapes", objective="prompt").classifier
    result, images = evaluate_pipeline(pipeline, classifier, all_captions(), seeds=(4242,))
    assert images.shape == (36, 3, 32, 32)
    assert result["color_accuracy"] > 0.9
    assert result["agreement"] > 0.6


def test_missing_world_pipeline_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"python -m finetune\.world\.train pipeline"):
        load_world_pipeline(tmp_path)
