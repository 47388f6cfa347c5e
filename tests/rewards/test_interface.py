"""The Reward contract, checked for every registered reward with random weights."""

import pytest
import torch

from rewards import Reward, get_reward, list_rewards
from rewards.registry import get_entry
from rewards.shapes.world import COLORS, MAX_COUNT, SHAPES, caption

# Options a reward needs to be built at all, or to score random images apart with random weights (a new reward
# with a required option must be added here).
REQUIRED_OPTIONS = {
    "resnet50": {"target": "cat"},
    "owlvit": {"query": "a strawberry"},
    "owlvit-count": {"query": "a strawberry"},
    "shapes": {"objective": "count"},
    "shapes-judge": {"objective": "count"},
    # Noise has no shapes to measure (every noise image reads as count 0, size of area 0); its background differs.
    "shapes-geometry": {"objective": "background"},
    # Random weights (yolo.reinitialise, seeded) score every box near 0.51, most with class 36 as their best: at
    # the default threshold every image has the 300 detections the postprocess keeps at most, all alike.
    "yolo-count": {"target": 36, "threshold": 0.515},
}
PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse", "a red car"]
CAPTION_READERS = {"shapes-match", "shapes-judge-match"}
"""Rewards that read shapes-world captions, not free text."""
HARD = {"owlvit-count", "yolo-count", "shapes-match", "shapes-judge-match"}
"""Counts of boxes above a threshold and exact matches of an argmax: a 16-bit rounding that moves one box across
the threshold (or flips a near tie) changes the score by a whole unit, so their 16-bit scores are not compared with
float32 ones; their models' 16-bit error is bounded on the soft variants (``owlvit``, ``yolo``, ``shapes``,
``shapes-judge``)."""
PRECISION_TOLERANCE = {torch.bfloat16: 0.25, torch.float16: 0.05}
"""Largest change of a score in 16-bit precision (weights or autocast) against float32, as a fraction of the
reward's typical spread (the width of its ``typical_range``, from its model card). Worst measured on the tiny
random-weight variants (3 seeds): bf16 weights 0.16 (hpsv2, owlvit), bf16 autocast 0.09, fp16 autocast 0.01."""


def variants():
    """Every registered reward, tiny where offered (the full geometry of those is checked once, below)."""
    for name in list_rewards():
        options = dict(REQUIRED_OPTIONS.get(name, {}))
        marks = missing_marks(name)
        if "tiny" in get_entry(name).options:
            yield pytest.param(name, {**options, "tiny": True}, id=f"{name}-tiny", marks=marks)
        else:
            yield pytest.param(name, options, id=name, marks=marks)


def missing_marks(name):
    """Skip rewards whose optional extra is not installed (CI installs every extra, so they run there)."""
    missing = get_entry(name).missing_packages
    return [pytest.mark.skip(reason=f"needs {', '.join(missing)} (optional extra)")] if missing else []


SAME_MODEL_AS = {"hpsv2.1": "hpsv2"}
"""Rewards built by the same code at the same geometry as another, differing only in their weights: the full-geometry
contract (half a minute each on 2 cores) runs for the other; ``test_same_model_as`` checks that they still match."""


def full_geometry_variants():
    for name in list_rewards():
        if "tiny" in get_entry(name).options and name not in SAME_MODEL_AS:
            yield pytest.param(name, dict(REQUIRED_OPTIONS.get(name, {})), id=name)


@pytest.mark.parametrize(("name", "other"), SAME_MODEL_AS.items())
def test_same_model_as(name, other):
    """Full geometry, on the meta device: the same reward class and every tensor of the same name and shape."""
    with torch.device("meta"):
        reward, same = get_reward(name, pretrained=False), get_reward(other, pretrained=False)
    assert type(reward) is type(same)
    shapes = [{key: value.shape for key, value in r.state_dict().items()} for r in (reward, same)]
    assert shapes[0] == shapes[1] and len(shapes[0]) > 100


@pytest.fixture(scope="module")
def built():
    cache = {}

    def build(name, options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = get_reward(name, pretrained=False, **options)
        return cache[key]

    return build


def images(n=3, h=64, w=80):
    return torch.rand(n, 3, h, w)


def prompts_for(name, reward, x):
    """One prompt per image that the reward reads. For :data:`CAPTION_READERS`: the caption of the classifier's
    reading of the first image, then another caption (a random classifier reads noise images alike), so that the
    first image scores 1 and the others 0."""
    if name not in CAPTION_READERS:
        return PROMPTS[: len(x)]
    with torch.no_grad():
        prediction = reward.classifier(x[:1].to(next(reward.parameters()).dtype))
    count, color, shape = (label[0].item() for label in prediction.labels())
    first = caption(count, list(COLORS)[color], SHAPES[shape])
    return [first] + [caption((count + 1) % (MAX_COUNT + 1), list(COLORS)[color], SHAPES[shape])] * (len(x) - 1)


def assert_gradient(reward, x, scores):
    """A differentiable reward's scores carry a finite, non-zero gradient to the pixels ``x``; a non-differentiable
    reward's scores carry none (they do not require grad, though ``x`` does)."""
    assert x.requires_grad
    if not reward.differentiable:
        assert not scores.requires_grad and scores.grad_fn is None
        return
    scores.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "options"), variants())
def test_gradient_reaches_pixels(built, name, options):
    reward = built(name, options)
    x = images().requires_grad_(True)
    scores = reward(x, prompts_for(name, reward, x))
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert_gradient(reward, x, scores)

    # Even when a parent module asks for gradients (e.g. requires_grad_(True) on a model holding the reward).
    parent = torch.nn.ModuleDict({"reward": reward, "other": torch.nn.Linear(1, 1)})
    parent.requires_grad_(True)
    x = images().requires_grad_(True)
    assert_gradient(reward, x, reward(x, prompts_for(name, reward, x)))
    assert parent["other"].weight.requires_grad
    assert not any(p.requires_grad for p in reward.parameters())
    assert all(p.grad is None for p in reward.parameters())


@pytest.mark.parametrize(("name", "options"), variants())
def test_batch_equals_items(built, name, options):
    reward = built(name, options)
    x = images()
    prompts = prompts_for(name, reward, x)
    with torch.no_grad():
        batch = reward(x, prompts)
        items = torch.cat([reward(x[i : i + 1], prompts[i : i + 1]) for i in range(3)])
    spread = (batch.max() - batch.min()).item()
    torch.testing.assert_close(batch, items, rtol=1e-5, atol=1e-6 * max(1.0, abs(batch).max().item()))
    assert spread > 0, "scores of different images should differ"


@pytest.mark.parametrize(("name", "options"), variants())
def test_frozen_and_metadata(built, name, options):
    reward = built(name, options)
    assert isinstance(reward, Reward)
    assert reward.name == name
    assert not any(p.requires_grad for p in reward.parameters())
    reward.train()
    assert not reward.training and not any(m.training for m in reward.modules())
    lo, hi = reward.typical_range
    assert lo < hi
    assert reward.normalization[1] > 0
    assert isinstance(reward.needs_prompts, bool)
    assert reward.input_size is None or reward.input_size > 0
    assert get_entry(name).description
    assert reward.differentiable is get_entry(name).differentiable


@pytest.mark.parametrize(("name", "options"), variants())
def test_bfloat16_weights(name, options):
    reward = get_reward(name, pretrained=False, dtype=torch.bfloat16, **options)
    x = images(2).requires_grad_(True)
    prompts = prompts_for(name, reward, x)
    scores = reward(x, prompts)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert_gradient(reward, x, scores)
    reference = get_reward(name, pretrained=False, **options)
    reference.load_state_dict({k: v.float() for k, v in reward.state_dict().items()})
    with torch.no_grad():
        expected = reference(x, prompts)
    assert_close_in_spread(reward, scores.detach(), expected, torch.bfloat16)


def assert_close_in_spread(reward, scores, expected, dtype):
    """``scores`` within :data:`PRECISION_TOLERANCE` of ``expected``, in units of the reward's typical spread
    (hard rewards, :data:`HARD`: only the same shape)."""
    if reward.name in HARD:
        assert scores.shape == expected.shape
        return
    low, high = reward.typical_range
    error = (scores - expected).abs().max().item() / (high - low)
    assert error < PRECISION_TOLERANCE[dtype], (
        f"{reward.name} in {dtype}: off by {error:.3f} of its typical spread ({low:g} to {high:g}); "
        f"allowed {PRECISION_TOLERANCE[dtype]}"
    )


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "options"), variants())
def test_autocast(built, name, options, amp_dtype):
    reward = built(name, options)
    x = images(2).requires_grad_(True)
    prompts = prompts_for(name, reward, x)
    with torch.autocast("cpu", dtype=amp_dtype):
        scores = reward(x, prompts)
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert_gradient(reward, x, scores)
    with torch.no_grad():
        assert_close_in_spread(reward, scores.detach(), reward(x, prompts), amp_dtype)


@pytest.mark.parametrize(("name", "options"), variants())
def test_any_size_and_square(built, name, options):
    reward = built(name, options)
    for h, w in [(32, 32), (512, 512), (100, 37)]:
        x = torch.rand(1, 3, h, w)
        scores = reward(x, prompts_for(name, reward, x))
        assert scores.shape == (1,) and torch.isfinite(scores).all()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options"), full_geometry_variants())
def test_full_geometry_contract(name, options):
    """The real architecture (random weights): gradient and batch == items, in one build. (bf16 and fp16 are
    checked on the tiny variants, which run the same code; bf16 matmuls of a ViT-H take minutes on a 2-core CPU.)"""
    reward = get_reward(name, pretrained=False, **options)
    x = images(2).requires_grad_(True)
    prompts = prompts_for(name, reward, x)
    scores = reward(x, prompts)
    assert_gradient(reward, x, scores)
    with torch.no_grad():
        items = torch.cat([reward(x[i : i + 1], prompts[i : i + 1]) for i in range(2)])
        torch.testing.assert_close(scores.detach(), items, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "options"), variants())
def test_cuda_autocast(name, options):
    reward = get_reward(name, pretrained=False, device="cuda", **options)
    x = torch.rand(2, 3, 512, 512, device="cuda", requires_grad=True)
    prompts = prompts_for(name, reward, x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        scores = reward(x, prompts)
    assert scores.device == x.device
    assert_gradient(reward, x, scores)
    with torch.no_grad():
        assert_close_in_spread(reward, scores.detach(), reward(x, prompts), torch.bfloat16)
