"""The embedded text-to-image pipeline of the shapes world: diffusers' own ``StableDiffusionPipeline`` classes at a
small size (32x32 images, 8x8x4 latents), trained here from scratch on rendered scenes and their captions.

Training has two stages, both seeded: the VAE learns to reconstruct world images, then the text encoder and UNet
learn epsilon-prediction on the VAE's latents (captions dropped 10% of the time so classifier-free guidance works),
with an exponential moving average of the UNet weights saved as the result.
"""

from __future__ import annotations

import copy
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from compose.files import atomic_write_directory
from finetune.pipelines import SD15_SCHEDULER, check_pipeline
from finetune.world import SHIPPED_PIPELINE
from rewards.clip import build_clip_tokenizer
from rewards.shapes.world import COLORS, COUNT_WORDS, RESOLUTION, SHAPES, sample_batch

MAX_TOKENS = 16
CAPTION_DROPOUT = 0.1
DECODER_SEED_OFFSET = 2
"""Stage 3 (:func:`refine_decoder`) is seeded with ``seed + 2``."""
UNET = dict(
    sample_size=RESOLUTION // 4,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=RESOLUTION,
)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu")


def world_words() -> list[str]:
    """Every word a world caption can use."""
    return ["a", "an", *COUNT_WORDS, *COLORS, *SHAPES, *(s + "s" for s in SHAPES)]


def world_tokenizer() -> CLIPTokenizer:
    """OpenAI CLIP's BPE tokenizer cut down to the world's words (560 tokens; they split exactly as in CLIP)."""
    return build_clip_tokenizer(MAX_TOKENS, words=world_words())


def build_world_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The world pipeline's architecture with random weights."""
    torch.manual_seed(seed)
    tokenizer = world_tokenizer()
    vocab = tokenizer.get_vocab()
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        **TEXT,
    )
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**VAE),
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**UNET),
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_world_pipeline(path: str | Path = SHIPPED_PIPELINE, dtype: torch.dtype = torch.float32):
    """The shipped (or a rebuilt) world pipeline, as a diffusers ``StableDiffusionPipeline`` with DDIM."""
    path = Path(path)
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"no world pipeline at {path}; reinstall the package or rebuild it with "
            f"`python -m finetune.world.train pipeline`"
        )
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(path), dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    check_pipeline(pipeline)
    return pipeline


def train_vae(vae: AutoencoderKL, steps: int, rng: random.Random, batch_size: int = 64) -> float:
    """Reconstruction (L1 + MSE) with a small KL term; sets ``scaling_factor`` to 1 / std of the latents."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    progress = tqdm(range(steps), desc="vae", unit="step")
    for _ in progress:
        images = sample_batch(batch_size, rng).images * 2 - 1
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        error = reconstruction - images
        loss = error.abs().mean() + (error**2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(sample_batch(256, random.Random(12345)).images * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return reconstruction_error(vae)


def encode_dataset(pipeline: StableDiffusionPipeline, size: int, rng: random.Random) -> tuple[torch.Tensor, list]:
    """Render ``size`` scenes and encode them once: (posterior mean and std, shape (size, 2, 4, h, w); captions)."""
    moments, captions = [], []
    with torch.no_grad():
        for _ in tqdm(range(0, size, 256), desc="encode", unit="batch"):
            batch = sample_batch(256, rng)
            posterior = pipeline.vae.encode(batch.images * 2 - 1).latent_dist
            moments.append(torch.stack([posterior.mean, posterior.std], 1))
            captions += batch.captions
    return torch.cat(moments)[:size], captions[:size]


def train_denoiser(
    pipeline: StableDiffusionPipeline,
    steps: int,
    rng: random.Random,
    dataset_size: int = 32768,
    batch_size: int = 64,
    lr: float = 1e-3,
) -> UNet2DConditionModel:
    """Epsilon-prediction training of UNet and text encoder on pre-encoded scenes; returns the EMA UNet."""
    unet, text_encoder, scheduler = pipeline.unet, pipeline.text_encoder, pipeline.scheduler
    moments, dataset_captions = encode_dataset(pipeline, dataset_size, rng)
    scale = pipeline.vae.config.scaling_factor
    ema = copy.deepcopy(unet).requires_grad_(False)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.03)
    alphas = scheduler.alphas_cumprod
    unet.train()
    text_encoder.train()
    progress = tqdm(range(steps), desc="denoiser", unit="step")
    for step in progress:
        index = torch.tensor([rng.randrange(len(moments)) for _ in range(batch_size)])
        mean, std = moments[index].unbind(1)
        latents = (mean + std * torch.randn_like(std)) * scale
        captions = ["" if rng.random() < CAPTION_DROPOUT else dataset_captions[i] for i in index.tolist()]
        tokens = pipeline.tokenizer(captions, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
        embeddings = text_encoder(tokens.input_ids)[0]
        t = torch.randint(0, len(alphas), (batch_size,))
        noise = torch.randn_like(latents)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, embeddings).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        progress.set_postfix(loss=f"{loss.item():.4f}")
    text_encoder.eval()
    return ema.eval()


def refine_decoder(vae: AutoencoderKL, steps: int, seed: int, batch_size: int = 64) -> float:
    """Stage 3: the decoder alone (with ``post_quant_conv``) learns to reconstruct sharper edges from the frozen
    encoder's latents, so the latent space the UNet was trained on does not change. Seeded on its own, so running
    it inside :func:`train_pipeline` or later on a saved pipeline gives the same weights."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    parameters = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    progress = tqdm(range(steps), desc="decoder", unit="step")
    for _ in progress:
        images = sample_batch(batch_size, rng).images * 2 - 1
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample()
        error = vae.decode(latents).sample - images
        loss = error.abs().mean() + (error**2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        progress.set_postfix(loss=f"{loss.item():.4f}")
    vae.requires_grad_(False)
    return reconstruction_error(vae)


def refine_decoder_of(directory: Path, steps: int = 3000, seed: int = 0) -> dict:
    """Run stage 3 alone on a saved world pipeline and save it back in place."""
    start = time.perf_counter()
    pipeline = load_world_pipeline(directory)
    error = refine_decoder(pipeline.vae, steps, seed + DECODER_SEED_OFFSET)
    save_pipeline(pipeline, directory)
    return {"decoder_steps": steps, "decoder_mean_abs_error": error, "train_seconds": time.perf_counter() - start}


def reconstruction_error(vae: AutoencoderKL) -> float:
    """Mean absolute error in [0, 1] units of encode-decode (posterior mean) on 256 fixed scenes."""
    with torch.no_grad():
        images = sample_batch(256, random.Random(12345)).images * 2 - 1
        return (vae.decode(vae.encode(images).latent_dist.mean).sample - images).abs().mean().item() / 2


def train_pipeline(
    output: Path,
    steps: int = 6000,
    vae_steps: int = 600,
    decoder_steps: int = 3000,
    dataset_size: int = 32768,
    seed: int = 0,
) -> dict:
    """Train the world pipeline from scratch and save it (diffusers format) to ``output``, replacing it whole."""
    start = time.perf_counter()
    rng = random.Random(seed)
    pipeline = build_world_pipeline(seed)
    pipeline.vae.requires_grad_(True)
    vae_error = train_vae(pipeline.vae, vae_steps, rng)
    pipeline.vae.requires_grad_(False)
    pipeline.unet = train_denoiser(pipeline, steps, rng, dataset_size)
    decoder_error = refine_decoder(pipeline.vae, decoder_steps, seed + DECODER_SEED_OFFSET)
    save_pipeline(pipeline, output)
    return {
        "vae_steps": vae_steps,
        "denoiser_steps": steps,
        "dataset_size": dataset_size,
        "vae_mean_abs_error": vae_error,
        "decoder_steps": decoder_steps,
        "decoder_mean_abs_error": decoder_error,
        "train_seconds": time.perf_counter() - start,
    }


def save_pipeline(pipeline: StableDiffusionPipeline, output: Path) -> None:
    """``save_pretrained`` to ``output`` atomically: an interrupted save never leaves a half-written pipeline where a
    complete one was."""
    atomic_write_directory(Path(output), lambda tmp: pipeline.save_pretrained(str(tmp), safe_serialization=True))
