"""Gradient accumulation: two micro-batches of b make the update of one batch of 2b, for every method (the step's
random draws do not depend on how it is split). The DDIM methods run on the tiny SD pipeline, ``grpo`` (flow
families only) on the tiny SD3 one."""

import pytest
import torch

from finetune.config import METHOD_NAMES
from finetune.pipelines import load_pipeline
from finetune.trainer import Trainer
from rewards import get_reward
from tests.finetune.test_rl import tiny_sd3_dir  # noqa: F401 (the SD3 fixture, for grpo)


def one_step(model_dir, config):
    """Gradients, parameters after the step, and metrics of one optimizer step from LoRA factors moved off their
    zero start (so that every factor has a gradient)."""
    trainer = Trainer(load_pipeline(model_dir), get_reward("contrast") + 0.5 * get_reward("saturation"), config)
    with torch.no_grad():
        for p in trainer.named_params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    metrics = trainer.train_step()
    grads = {name: p.grad.clone() for name, p in trainer.named_params.items()}
    params = {name: p.detach().clone() for name, p in trainer.named_params.items()}
    return grads, params, metrics


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_two_micro_batches_equal_one_double_batch(request, tiny_config, method):
    # ddpo and grpo: one PPO minibatch, so that the step is one optimizer step (whose gradient is compared); grpo:
    # one group of 4 that spans both micro-batches (its advantages need the whole round's rewards), and the KL term
    # to the base model on (its gradient accumulates too).
    grpo = dict(grpo_group_size=4, grpo_kl_weight=0.1, batch_size=4) if method == "grpo" else {}
    config = tiny_config.replace(
        method=method, k=2, num_inference_steps=3, lr=1e-3, max_grad_norm=1e6, ddpo_minibatches=1, **grpo
    )
    model_dir = request.getfixturevalue("tiny_sd3_dir" if method == "grpo" else "tiny_model_dir")
    whole_grads, whole_params, whole = one_step(model_dir, config.replace(batch_size=4, grad_accum=1))
    split_grads, split_params, split = one_step(model_dir, config.replace(batch_size=2, grad_accum=2))
    assert whole_grads.keys() == split_grads.keys() and whole_grads
    scale = max(g.abs().max().item() for g in whole_grads.values())
    assert scale > 0  # a real gradient is compared
    for name in whole_grads:
        # Within float rounding: 1e-4 relative, or 1e-4 of the largest gradient entry for entries near zero.
        torch.testing.assert_close(split_grads[name], whole_grads[name], rtol=1e-4, atol=1e-4 * scale, msg=name)
        # AdamW's first step moves each weight by about lr * sign(gradient): only float rounding differs. (Not for
        # ddpo: its log-probabilities divide by the small DDIM variances, so float rounding in entries whose gradient
        # is near zero can flip that sign; its gradients, compared above, are the accumulation claim.)
        if method != "ddpo":
            torch.testing.assert_close(split_params[name], whole_params[name], rtol=0, atol=1e-5, msg=name)
    for key in ("reward", "reward/contrast", "reward/saturation", "loss", "grad_norm", *(["kl"] if grpo else [])):
        assert split[key] == pytest.approx(whole[key], rel=1e-4, abs=1e-7), key
    assert split["images_seen"] == whole["images_seen"] == 4
