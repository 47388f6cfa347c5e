"""The fast SVD re-rank (QR of both factors + SVD of the small core) against the dense SVD of each delta."""

import pytest
import torch

from compose.lora import LoRA, LoRAModule
from compose.ops import mix, svd_rerank


def module(shape, rank, alpha, seed):
    generator = torch.Generator().manual_seed(seed)
    up_shape = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
    return LoRAModule(
        torch.randn(rank, *shape[1:], generator=generator), torch.randn(up_shape, generator=generator), alpha
    )


def dense_rerank(delta, rank):
    """The reference: best rank-``rank`` approximation of the dense delta, and its kept energy."""
    u, s, vh = torch.linalg.svd(delta.flatten(1).double(), full_matrices=False)
    k = min(rank, s.numel())
    return (u[:, :k] * s[:k]) @ vh[:k], float((s[:k] ** 2).sum() / (s**2).sum())


@pytest.mark.parametrize("target", [1, 5, 16, 40])
def test_fast_rerank_equals_the_dense_svd(target):
    lora_a = LoRA(
        {
            "unet.a.to_q": module((96, 64), 12, 6.0, 0),
            "unet.b.conv1": module((24, 8, 3, 3), 10, 2.0, 1),  # in*kh*kw = 72
            "unet.c.proj_in": module((6, 50), 8, 8.0, 2),  # rank above the output width
            "unet.d.to_k": module((40, 3), 5, -1.0, 3),  # rank above the input width, negative alpha
        }
    )
    lora_b = LoRA({"unet.a.to_q": module((96, 64), 20, 1.0, 4), "unet.b.conv1": module((24, 8, 3, 3), 4, 4.0, 5)})
    mixed = mix([lora_a, lora_b], [0.7, -0.4])
    fast, report = svd_rerank(mixed, target)
    total_kept = total = 0.0
    for name, source in mixed.modules.items():
        reference, energy = dense_rerank(source.delta(), target)
        result = fast.modules[name]
        assert result.rank == min(target, *source.weight_shape[:1], source.down.flatten(1).shape[1], source.rank)
        assert result.weight_shape == source.weight_shape
        error = (result.delta().flatten(1).double() - reference).norm() / reference.norm()
        assert error < 1e-5, (name, float(error))
        assert report.per_module[name] == pytest.approx(energy, abs=1e-6)
        squared = float(source.delta().double().norm() ** 2)
        total_kept, total = total_kept + energy * squared, total + squared
    assert report.overall == pytest.approx(total_kept / total, rel=1e-6)


def test_rerank_of_a_zero_delta_keeps_everything():
    zero = LoRA({"unet.a.to_q": LoRAModule(torch.zeros(3, 8), torch.zeros(16, 3), 3.0)})
    result, report = svd_rerank(zero, 2)
    assert report.overall == 1.0 and result.modules["unet.a.to_q"].delta().abs().max() == 0
