"""Speed and memory options give the plain path's gradients: chunked backward, attention kernel, channels-last,
compiled prefix, TF32."""

import math

import pytest
import torch

from finetune.methods import BatchRandom
from finetune.pipelines import load_pipeline
from finetune.profiling import step_floor_flops
from finetune.trainer import Trainer
from rewards import get_reward


def trainer_for(model_dir, config, **changes):
    """A trainer on a fresh copy of the tiny pipeline, LoRA factors moved off their zero start (so every factor
    gets a gradient) the same way for every variant."""
    reward = get_reward("contrast") + 0.5 * get_reward("saturation")
    trainer = Trainer(load_pipeline(model_dir), reward, config.replace(**changes))
    with torch.no_grad():
        for p in trainer.named_params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return trainer


def gradients(trainer, batch=3):
    """LoRA gradients and scores of one micro-batch with fixed prompts and noise."""
    trainer.optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(1)
    noise = torch.randn((batch, *trainer.latent_shape), generator=generator)
    prompts = ["a cat", "a dog", "a red car"][:batch]
    scores, members = trainer.backward(prompts, noise, BatchRandom(generator, batch))
    grads = {name: p.grad.clone() for name, p in trainer.named_params.items()}
    return grads, scores, members


def assert_close_to_fp32(model_dir, config, trainer, metrics):
    """The first step of a mixed-precision ``trainer`` against the fp32 path on the same data: the batch's mean
    reward within 0.2% (bf16 keeps 8 significant bits; measured at most 0.04% on the tiny pipeline), and the LoRA
    gradient (before clipping) within 1% in direction (cosine >= 0.99; measured >= 0.9986) and 5% in norm
    (measured 1.4%)."""
    reference = trainer_for(model_dir, config, mixed_precision="no", max_grad_norm=1e6)
    expected = reference.train_step()
    assert metrics["reward"] == pytest.approx(expected["reward"], rel=2e-3)
    grad = torch.cat([p.grad.flatten() for p in trainer.named_params.values()])
    fp32 = torch.cat([p.grad.flatten() for p in reference.named_params.values()])
    assert torch.nn.functional.cosine_similarity(grad, fp32, dim=0) >= 0.99
    assert grad.norm() / fp32.norm() == pytest.approx(1.0, abs=0.05)


def assert_same(a, b, rtol=1e-4, atol=1e-7):
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol)


@pytest.mark.parametrize(("method", "k"), [("draft-k", 2), ("draft-lv", 1), ("refl", 1), ("draft-k", 1)])
def test_chunked_backward_gives_the_same_gradients(tiny_model_dir, tiny_config, method, k):
    config = tiny_config.replace(method=method, k=k, lv_n=2)
    whole, whole_scores, whole_members = gradients(trainer_for(tiny_model_dir, config))
    chunked, chunked_scores, chunked_members = gradients(trainer_for(tiny_model_dir, config, grad_chunk_size=2))
    assert_same(chunked, whole)
    torch.testing.assert_close(chunked_scores, whole_scores)
    assert whole_members.keys() == {"contrast", "saturation"}
    for key in whole_members:
        torch.testing.assert_close(chunked_members[key], whole_members[key])
    assert len(whole_scores) == (6 if method == "draft-lv" else 3)


def test_chunked_checkpointed_unet_recomputes_one_chunk_at_a_time(tiny_model_dir, tiny_config):
    """Every UNet call of the grad steps (forward and its recomputation in backward) sees one chunk."""
    trainer = trainer_for(tiny_model_dir, tiny_config.replace(k=2, grad_chunk_size=1))
    seen = []
    hook = trainer.pipeline.unet.register_forward_pre_hook(
        lambda module, args: seen.append((torch.is_grad_enabled(), len(args[0])))
    )
    try:
        gradients(trainer)
    finally:
        hook.remove()
    grad_calls = [size for grad, size in seen if grad]
    assert grad_calls and set(grad_calls) == {2}  # one image, both guidance branches
    assert len(grad_calls) == 2 * 2 * 3  # K = 2 steps x (forward + recompute) x 3 chunks
    assert {size for grad, size in seen if not grad} == {6}  # the no-grad prefix runs the whole batch


def test_chunking_checks_every_chunk(tiny_model_dir, tiny_config):
    trainer = trainer_for(tiny_model_dir, tiny_config.replace(grad_chunk_size=2))
    trainer.reward = lambda images, prompts: images.mean(dim=(1, 2, 3)).detach()
    with pytest.raises(ValueError, match="not differentiable"):
        gradients(trainer)


@pytest.mark.parametrize(("option", "value"), [("attention", "eager"), ("channels_last", True)])
def test_speed_option_gives_the_same_gradients(tiny_model_dir, tiny_config, option, value):
    config = tiny_config.replace(k=2)
    plain, plain_scores, _ = gradients(trainer_for(tiny_model_dir, config))
    fast, fast_scores, _ = gradients(trainer_for(tiny_model_dir, config, **{option: value}))
    assert_same(fast, plain)
    torch.testing.assert_close(fast_scores, plain_scores)


def test_options_are_applied(tiny_model_dir, tiny_config):
    trainer = trainer_for(tiny_model_dir, tiny_config, attention="eager", channels_last=True)
    processors = trainer.pipeline.unet.attn_processors.values()
    assert {type(p).__name__ for p in processors} == {"AttnProcessor"}
    weight = trainer.pipeline.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    default = trainer_for(tiny_model_dir, tiny_config)
    assert {type(p).__name__ for p in default.pipeline.unet.attn_processors.values()} == {"AttnProcessor2_0"}


@pytest.mark.slow
def test_compiled_prefix_gives_the_same_gradients(tiny_model_dir, tiny_config):
    """torch.compile (inductor, C++ on CPU) for the no-grad steps: compiles once, then matches eager."""
    config = tiny_config.replace(k=1)
    plain, plain_scores, _ = gradients(trainer_for(tiny_model_dir, config))
    trainer = trainer_for(tiny_model_dir, config, compile_prefix=True)
    calls = []
    trainer.sampler.prefix_unet = _counting(trainer.sampler.prefix_unet, calls)
    compiled, compiled_scores, _ = gradients(trainer)
    assert calls == [False] * (config.num_inference_steps - 1)  # every prefix step, and only those
    assert_same(compiled, plain, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(compiled_scores, plain_scores, rtol=1e-4, atol=1e-5)


def _counting(function, calls):
    def wrapper(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return function(*args, **kwargs)

    return wrapper


@pytest.mark.gpu
def test_tf32_gives_the_same_gradients_on_cuda(tiny_model_dir, tiny_config):
    config = tiny_config.replace(k=2, device="cuda", mixed_precision="no")
    plain, _, _ = gradients(trainer_for(tiny_model_dir, config, allow_tf32=False))
    fast, _, _ = gradients(trainer_for(tiny_model_dir, config, allow_tf32=True))
    assert_same(fast, plain, rtol=2e-2, atol=1e-5)


@pytest.mark.parametrize(("method", "chunk"), [("draft-k", None), ("draft-lv", 1), ("refl", 1)])
def test_gpu_precision_layout_trains_on_the_cpu(tiny_model_dir, tiny_config, method, chunk):
    """What a CUDA trainer does (frozen weights in bf16, LoRA in fp32, bf16 autocast), emulated on the CPU: the
    chunked backward and the profiler's floor hold up to the mixed dtypes, and the step is the fp32 step's within
    bf16's precision."""
    config = tiny_config.replace(method=method, k=2, grad_chunk_size=chunk)
    trainer = trainer_for(tiny_model_dir, config, mixed_precision="bf16", max_grad_norm=1e6)
    for module in (trainer.pipeline.unet, trainer.pipeline.vae, trainer.pipeline.text_encoder):
        for p in module.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    before = {name: p.detach().clone() for name, p in trainer.named_params.items()}
    metrics = trainer.train_step()
    assert all(p.dtype == torch.float32 for p in trainer.named_params.values())
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert any(not torch.equal(before[name], p) for name, p in trainer.named_params.items())
    assert step_floor_flops(trainer) > 0
    assert_close_to_fp32(tiny_model_dir, config, trainer, metrics)
