"""The cost model against the reference FLOP counts and against FLOPs counted in a real step; the phase timer."""

import pytest
import torch

from finetune.pipelines import build_random_pipeline, load_pipeline
from finetune.profiling import (
    LORA_STATE_BYTES,
    PHASES,
    component_flops,
    lower_bound_flops,
    memory_model,
    profile_step,
    spec_peak_flops,
    step_floor_flops,
    step_work,
)
from finetune.timing import PhaseTimer
from finetune.trainer import Trainer
from rewards import get_reward


def test_component_flops_of_sd15_match_the_reference():
    """PERFORMANCE.md: UNet 402 GMACs per evaluation at 64x64 latents, VAE decode 1,257, CLIP ViT-L/14 81,
    text encoder 6.8 (counted on the meta device: no weights, no compute)."""
    with torch.device("meta"):
        pipeline = build_random_pipeline("sd15")
        reward = get_reward("aesthetic", pretrained=False)
        gmacs = {name: flops / 2e9 for name, flops in component_flops(pipeline, reward, 512).items()}
    assert gmacs["denoiser"] == pytest.approx(402, rel=0.01)
    assert gmacs["decode"] == pytest.approx(1257, rel=0.01)
    assert gmacs["reward"] == pytest.approx(81, rel=0.01)
    assert gmacs["text encoder"] == pytest.approx(6.8, rel=0.05)


@pytest.mark.parametrize(("method", "k"), [("draft-k", 2), ("draft-lv", 1), ("draft", 1)])
def test_cost_model_matches_the_flops_counted_in_a_step(tiny_model_dir, tiny_config, method, k):
    config = tiny_config.replace(method=method, k=k, lv_n=3, batch_size=2)
    trainer = Trainer(load_pipeline(tiny_model_dir), get_reward("aesthetic", pretrained=False, tiny=True), config)
    profile = profile_step(trainer, repeats=1, warmup=0)
    components = component_flops(trainer.pipeline, trainer.reward, config.resolution)
    work = step_work(config)
    counted = profile.flops
    assert counted.get("no-grad sampling", 0) == pytest.approx(work.denoiser_no_grad * components["denoiser"], rel=1e-3)
    assert counted["grad steps forward"] == pytest.approx(work.denoiser_grad * components["denoiser"], rel=1e-3)
    assert counted["decode"] == pytest.approx(work.decodes * components["decode"], rel=1e-3)
    assert counted["reward"] == pytest.approx(work.rewards * components["reward"], rel=1e-3)
    # The real step does at least the floor's work (checkpointing recomputes, LoRA weights get gradients).
    assert profile.counted_flops >= lower_bound_flops(work, components) * 0.99
    assert {"decode", "grad steps backward", "optimizer"} <= set(profile.seconds) <= set(PHASES)
    assert 0 < sum(profile.seconds.values()) <= profile.step_seconds * 1.01


def test_floor_of_a_bf16_pipeline_is_counted_under_the_trainers_autocast(tiny_model_dir, tiny_config):
    """As on a GPU: frozen weights in bf16, LoRA in fp32, the step under bf16 autocast."""
    trainer = Trainer(load_pipeline(tiny_model_dir), get_reward("aesthetic", pretrained=False, tiny=True), tiny_config)
    fp32_floor = step_floor_flops(trainer)
    for module in (trainer.pipeline.unet, trainer.pipeline.vae, trainer.pipeline.text_encoder, trainer.reward):
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    trainer.autocast_dtype = torch.bfloat16
    assert step_floor_flops(trainer) == fp32_floor > 0


def test_step_work_counts():
    from finetune.config import TrainConfig

    base = dict(num_inference_steps=10, batch_size=4, guidance_scale=7.5)
    assert step_work(TrainConfig(method="draft-k", k=3, **base)).denoiser_no_grad == 7 * 4 * 2
    assert step_work(TrainConfig(method="draft", **base)).denoiser_grad == 10 * 4 * 2
    lv = step_work(TrainConfig(method="draft-lv", lv_n=2, **base))
    assert (lv.denoiser_no_grad, lv.denoiser_grad, lv.decodes) == (80, 16, 8)
    refl = step_work(TrainConfig(method="refl", refl_range=(0.5, 0.5), **base))
    assert refl.denoiser_no_grad == 5 * 4 * 2 and refl.decodes == 4
    no_guidance = step_work(TrainConfig(method="draft-k", k=1, **{**base, "guidance_scale": 1.0}))
    assert no_guidance.denoiser_no_grad == 9 * 4 and no_guidance.text_encodings == 4
    distilled = step_work(TrainConfig(method="draft-k", k=1, **base), passes=1)  # FLUX: guidance embedding
    assert distilled.denoiser_no_grad == 9 * 4 and distilled.text_encodings == 4


def test_timer_records_only_when_enabled():
    timer = PhaseTimer()
    with timer.phase("a"):
        pass
    assert timer.seconds == {}
    timer.enabled = True
    with timer.phase("a"):
        pass
    with timer.phase("a"):
        pass
    assert set(timer.seconds) == {"a"} and timer.seconds["a"] >= 0
    assert spec_peak_flops("cpu") is None


def test_memory_model_counts_weights_and_lora_as_the_trainer_builds_them(tiny_config):
    with torch.device("meta"):
        pipeline = build_random_pipeline("tiny", family="flux")
        reward = get_reward("aesthetic", pretrained=False, tiny=True)
    parameters = sum(
        p.numel() for m in pipeline.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()
    )
    parameters += sum(p.numel() for p in reward.parameters())
    estimate = memory_model(pipeline, reward, resolution=64, lora_rank=4)
    assert estimate.frozen_weights == 2 * parameters  # bf16
    trainer = Trainer(
        build_random_pipeline("tiny", family="flux"),
        get_reward("contrast"),
        tiny_config.replace(lora_rank=4, resolution=64),
    )
    trained = sum(p.numel() for p in trainer.family.denoiser.parameters() if p.requires_grad)
    assert estimate.lora_parameters == trained > 0
    assert estimate.lora_state == trained * LORA_STATE_BYTES
    assert 0 < estimate.text_encoders < estimate.frozen_weights
    assert estimate.total == estimate.frozen_weights + estimate.lora_state + max(
        estimate.denoiser_activations, estimate.decode_reward_activations
    )


def test_memory_model_saves_attention_as_a_fused_kernel():
    """One attention call saves what a fused GPU kernel saves, not the N x N probabilities."""
    from finetune.profiling import _FusedAttention, _SavedActivations

    q, k, v = (torch.empty(1, 2, 64, 8, device="meta", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    saved = _SavedActivations()
    with saved, _FusedAttention():
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    # q, k, v, output (bf16), log-sum-exp (fp32), the kernel's two int64 RNG state scalars; the probabilities
    # alone would be 2 * 64 * 64 * 2 = 16384 bytes.
    assert saved.bytes == 4 * (2 * 64 * 8 * 2) + 2 * 64 * 4 + 2 * 8
