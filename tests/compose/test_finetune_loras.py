"""LoRAs that ``finetune`` trains on the transformer families (SD3, FLUX.1) mix and export exactly: a mixed diffusers
export loads in the family's own pipeline with every module matched and fuses to base + weight x the trained
delta, and the kohya and original exports read back to the same deltas. The reference delta is peft's own
(``get_delta_weight`` of each trained layer), not compose's reading of the file."""

import pytest
import torch
from peft.tuners.lora import LoraLayer

from compose import load_lora, mix, save_lora
from finetune.config import TrainConfig
from finetune.pipelines import build_random_pipeline, load_pipeline
from finetune.trainer import Trainer
from rewards import get_reward

WEIGHT = 0.7


@pytest.fixture(scope="module", params=["flux", "sd3"])
def trained(request, tmp_path_factory):
    """(family, model directory, run directory, peft's delta of every trained module) for one family."""
    root = tmp_path_factory.mktemp(request.param)
    build_random_pipeline("tiny", seed=0, family=request.param).save_pretrained(root / "model")
    config = TrainConfig(
        resolution=64, num_inference_steps=2, guidance_scale=3.0, batch_size=1, steps=1, lr=3e-2,
        weight_decay=0.0, eval_seeds=(0,), output_dir=str(root / "run"),
    )  # fmt: skip
    trainer = Trainer(load_pipeline(root / "model"), get_reward("contrast"), config)
    trainer.train()
    deltas = {
        f"transformer.{name}": layer.get_delta_weight("default").detach().clone()
        for name, layer in trainer.family.denoiser.named_modules()
        if isinstance(layer, LoraLayer)
    }
    assert any(d.abs().max() > 0 for d in deltas.values()), "one step must move the LoRA off zero"
    return request.param, root / "model", root / "run", deltas


def test_mixed_diffusers_export_loads_and_fuses_exactly(trained, tmp_path):
    _, model_dir, run_dir, deltas = trained
    mixed = mix([load_lora(run_dir)], [WEIGHT])
    assert set(mixed.modules) == set(deltas)
    path = save_lora(mixed, tmp_path / "mixed", "diffusers")
    pipeline = load_pipeline(model_dir)
    base = {k: v.clone() for k, v in pipeline.transformer.state_dict().items()}
    pipeline.load_lora_weights(str(path.parent), adapter_name="mixed")
    loaded = {n.split(".lora_A.")[0] for n, _ in pipeline.transformer.named_parameters() if ".lora_A." in n}
    assert {f"transformer.{n}" for n in loaded} == set(deltas), "every trained module is matched, nothing else"
    pipeline.fuse_lora(components=["transformer"])
    pipeline.unload_lora_weights()
    fused = pipeline.transformer.state_dict()
    for key, value in base.items():
        name = f"transformer.{key.rsplit('.', 1)[0]}"
        if key.endswith(".weight") and name in deltas:
            expected = WEIGHT * deltas[name]
            error = (fused[key] - value - expected).norm() / expected.norm().clamp_min(1e-12)
            assert error < 1e-5, (key, float(error))
        else:
            assert torch.equal(fused[key], value), f"{key} is not targeted but changed"


@pytest.mark.parametrize("export", ["kohya", "original"])
def test_fused_layout_exports_read_back_to_the_trained_deltas(trained, tmp_path, export):
    family, _, run_dir, deltas = trained
    # The tiny geometry is no real model's, and SD3's and FLUX's attention names overlap: declare the family's base
    # model, as `--base-model` does on the command line (real geometries are recognised from their shapes).
    lora = load_lora(run_dir, {"flux": "flux-1-dev", "sd3": "sd3.5-medium"}[family])
    path = save_lora(mix([lora], [WEIGHT]), tmp_path / "mixed.safetensors", export)
    back = load_lora(path)
    # A fused layer cannot hold a part whose delta is exactly zero (SD3's last block never trains its context
    # queries: their output is discarded), so such a part comes back absent; every other module comes back.
    assert set(back.modules) <= set(deltas)
    assert all(not deltas[name].any() for name in set(deltas) - set(back.modules))
    for name, delta in deltas.items():
        if name not in back.modules:
            continue
        expected = WEIGHT * delta
        error = (back.modules[name].delta() - expected).norm() / expected.norm().clamp_min(1e-12)
        assert error < 1e-5, (name, float(error))
