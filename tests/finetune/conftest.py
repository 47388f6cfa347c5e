"""Fixtures: a tiny random SD-architecture pipeline saved with save_pretrained and loaded like a user's model."""

import pytest

from finetune.config import TrainConfig
from finetune.pipelines import build_random_pipeline, load_pipeline


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sd"
    build_random_pipeline("tiny", seed=0).save_pretrained(path)
    return path


@pytest.fixture
def tiny_pipeline(tiny_model_dir):
    return load_pipeline(tiny_model_dir)


@pytest.fixture
def tiny_config(tmp_path):
    """Settings sized for the tiny pipeline: 64 px, 4 DDIM steps, batch 2."""
    return TrainConfig(
        resolution=64,
        num_inference_steps=4,
        guidance_scale=3.0,
        batch_size=2,
        steps=4,
        lr=3e-2,
        weight_decay=0.0,
        eval_every=100,
        checkpoint_every=100,
        eval_seeds=(0,),
        output_dir=str(tmp_path / "run"),
    )
