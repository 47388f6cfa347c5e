"""Gradient methods on the tiny SD pipeline: what gets gradients, checkpointing, LV and ReFL mechanics (the gradient
cut of DRaFT-K against a reference loop, for every family, is in test_families.py)."""

import pytest
import torch

from finetune.methods import METHODS, BatchRandom, MethodSettings
from finetune.trainer import Trainer
from rewards import get_reward


def lora_gradient(trainer, method, settings, seed=0):
    """Gradient of -mean(contrast) w.r.t. every LoRA parameter, for one fixed batch of noise and prompts."""
    trainer.optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((2, *trainer.latent_shape), generator=generator)
    conditioning = trainer._conditioning(["a cat", "a dog"])
    generated = METHODS[method](trainer.sampler, conditioning, noise, settings, BatchRandom(generator, 2))
    (-trainer.reward(trainer.sampler.decode(generated.latents)).mean()).backward()
    return {name: p.grad.clone() for name, p in trainer.named_params.items() if p.grad is not None}


@pytest.fixture
def trainer(tiny_pipeline, tiny_config):
    trainer = Trainer(tiny_pipeline, get_reward("contrast"), tiny_config)
    with torch.no_grad():  # move off the zero-initialised LoRA B so every LoRA factor gets a gradient
        for p in trainer.named_params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return trainer


def test_only_lora_parameters_are_trainable(trainer):
    trainable = [n for n, p in trainer.pipeline.unet.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for module in (trainer.pipeline.vae, trainer.pipeline.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())
    assert set(trainer.named_params) == {f"unet.{n}" for n in trainable}
    targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
    assert targets == {"to_q", "to_k", "to_v", "0"}  # to_out.0


def test_checkpointing_gives_the_same_gradients(trainer):
    settings = MethodSettings(k=2)
    with_checkpointing = lora_gradient(trainer, "draft-k", settings)
    trainer.sampler.checkpoint_unet = False
    trainer.sampler.checkpoint_decode = False
    plain = lora_gradient(trainer, "draft-k", settings)
    trainer.sampler.checkpoint_decode = True
    decode_checkpointed = lora_gradient(trainer, "draft-k", settings)
    for key in plain:
        torch.testing.assert_close(with_checkpointing[key], plain[key], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(decode_checkpointed[key], plain[key], rtol=1e-5, atol=1e-9)


def test_draft_lv_renoises_n_copies(trainer):
    noise = torch.randn((2, *trainer.latent_shape))
    settings = MethodSettings(lv_n=3)
    generated = METHODS["draft-lv"](
        trainer.sampler, trainer._conditioning(["a", "b"]), noise, settings, BatchRandom(torch.Generator(), 2)
    )
    assert generated.latents.shape == (6, *trainer.latent_shape)
    assert generated.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert generated.latents.requires_grad
    copies = generated.latents.detach()
    assert (copies[0] - copies[1]).abs().max() > 0, "each copy is re-noised independently"
    grads = lora_gradient(trainer, "draft-lv", settings)
    assert all(torch.isfinite(g).all() for g in grads.values()) and grads


@pytest.mark.parametrize(("low", "high", "expected"), [(0.0, 0.0, {0}), (0.75, 1.0, {3}), (0.5, 1.0, {2, 3})])
def test_refl_stops_in_the_configured_range(trainer, low, high, expected, monkeypatch):
    seen = set()
    denoise = trainer.sampler.denoise

    def spy(latents, conditioning, start, stop, grad, generator=None):
        seen.add(stop)
        return denoise(latents, conditioning, start, stop, grad, generator)

    monkeypatch.setattr(trainer.sampler, "denoise", spy)
    generator = torch.Generator().manual_seed(0)
    for _ in range(12):
        noise = torch.randn((1, *trainer.latent_shape))
        settings = MethodSettings(refl_range=(low, high))
        METHODS["refl"](trainer.sampler, trainer._conditioning(["a"]), noise, settings, BatchRandom(generator, 1))
    assert seen == expected


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the distinct storages autograd saves for backward."""

    def __init__(self):
        self.bytes, self._seen = 0, set()
        super().__init__(self._pack, lambda tensor: tensor)

    def _pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes += storage.nbytes()
        return tensor


@pytest.mark.parametrize("checkpointing", [True, False])
def test_saved_activations_flat_in_k_with_checkpointing(trainer, checkpointing):
    trainer.sampler.checkpoint_unet = checkpointing
    saved = {}
    for k in (1, trainer.config.num_inference_steps):
        counter = SavedBytes()
        with counter:
            noise = torch.randn((2, *trainer.latent_shape))
            generated = METHODS["draft-k"](
                trainer.sampler,
                trainer._conditioning(["a", "b"]),
                noise,
                MethodSettings(k=k),
                BatchRandom(torch.Generator(), 2),
            )
            trainer.reward(trainer.sampler.decode(generated.latents))
        saved[k] = counter.bytes
    ratio = saved[trainer.config.num_inference_steps] / saved[1]
    assert ratio < 1.05 if checkpointing else ratio > 1.5
