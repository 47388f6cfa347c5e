"""ONNX export of rewards, and scoring with onnxruntime (the optional ``[onnx]`` extra).

:func:`export_onnx` writes a reward's scoring graph: input ``images``, float32 ``[N, 3, H, W]`` in [0, 1], output
``scores``, float32 ``[N]`` (a weighted mix also outputs ``member_scores``, ``[N, members]``). ``N`` is dynamic;
``H`` and ``W`` are fixed when exporting, because the reward's preprocessing (resize, crop) is traced for one input
size. :class:`OnnxReward` loads such a file and scores with onnxruntime: inference only, no gradients.

Only rewards that score images alone export: a prompt reward turns its prompts into tensors in Python (a
tokenizer and a cached text encoder, or a caption parser), outside the image graph.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rewards.base import Reward, check_images
from rewards.combine import CombinedReward

INPUT, OUTPUT, MEMBERS_OUTPUT = "images", "scores", "member_scores"
NAME_KEY, MEMBERS_KEY = "rewards.name", "rewards.members"
"""Metadata entries: the reward's name, and ``{member name: weight}`` as JSON (``{name: 1.0}`` for a single reward)."""
DEFAULT_IMAGE_SIZE = 512
"""Export size of rewards that take any size (``input_size is None``): Stable Diffusion 1.5's output."""
EXTERNAL_DATA_THRESHOLD = 2 * 10**9
"""Weights above this many bytes go to a ``FILE.data`` file next to the graph (protobuf caps a file at 2 GiB)."""
IMAGE_ONLY = (
    "aesthetic",
    "aesthetic-v1",
    "brightness",
    "contrast",
    "owlvit",
    "resnet50",
    "saturation",
    "shapes (objectives other than 'prompt')",
    "target-color",
    "yolo",
)
"""Registered rewards that export (each checked in tests/rewards/test_onnx.py), named in error messages."""


class OnnxExportError(ValueError):
    """A reward cannot be exported to ONNX (it needs prompts, or its graph cannot be traced or translated)."""


class _ScoringGraph(nn.Module):
    """What the exported graph computes: validated images to scores (and per-member scores for a mix)."""

    def __init__(self, reward: Reward) -> None:
        super().__init__()
        self.reward = reward

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        scores = self.reward.compute(images, None)
        if isinstance(self.reward, CombinedReward):
            return scores, torch.stack(list(self.reward.last_scores.values()), dim=1)
        return scores


def export_onnx(
    reward: Reward,
    path: str | os.PathLike,
    image_size: int | tuple[int, int] | None = None,
    *,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Export ``reward``'s scoring graph to ``path`` (ONNX, traced with ``torch.export``) and return the path.

    The batch dimension is dynamic; the image size is fixed: ``image_size`` (a side, or ``(height, width)``),
    by default the reward's ``input_size``, or :data:`DEFAULT_IMAGE_SIZE` for rewards that take any size. The
    graph includes the reward's resize and crop for that size, so it scores exactly as the torch reward does on
    images of that size, and only those. Weights over ``external_data_threshold`` bytes are written to
    ``path + ".data"`` (ONNX external data). The files appear only once complete; an existing export at ``path``
    is replaced. Raises :class:`OnnxExportError` for rewards that need prompts or that cannot be traced or translated.
    """
    _require_onnx()
    import onnx_ir

    if reward.needs_prompts:
        raise OnnxExportError(
            f"cannot export reward '{reward.name}' to ONNX: it needs prompts, which it turns into tensors in Python "
            f"(a tokenizer and a cached text encoder, or a caption parser) outside the image graph, and the exported "
            f"graph takes images only. Rewards that score images alone export: {', '.join(IMAGE_ONLY)}."
        )
    height, width = _size_pair(image_size or reward.input_size or DEFAULT_IMAGE_SIZE)
    state = next((t for t in (*reward.parameters(), *reward.buffers()) if t.is_floating_point()), None)
    device = state.device if state is not None else torch.device("cpu")
    example = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    model = _convert(reward, example).model
    members = reward.weights if isinstance(reward, CombinedReward) else {reward.name: 1.0}
    model.metadata_props.update({NAME_KEY: reward.name, MEMBERS_KEY: json.dumps(members)})
    model.doc_string = f"reward '{reward.name}': images [N, 3, {height}, {width}] in [0, 1] -> scores [N]"
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    path = Path(path)
    data = f"{path.name}.data" if weight_bytes > external_data_threshold else None
    _write_atomically(path, lambda staged: onnx_ir.save(model, staged, external_data=data))
    if data is None:
        (path.parent / f"{path.name}.data").unlink(missing_ok=True)  # left by an earlier export at this path
    return path


def _convert(reward: Reward, example: torch.Tensor) -> torch.onnx.ONNXProgram:
    """Trace the scoring graph with ``torch.export`` (batch dimension symbolic) and translate it to ONNX; any
    failure becomes an :class:`OnnxExportError` naming the reward."""
    last_scores = getattr(reward, "last_scores", None)  # a mix records its member scores: keep the caller's
    outputs = [OUTPUT, MEMBERS_OUTPUT] if isinstance(reward, CombinedReward) else [OUTPUT]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tensors that modules keep as plain attributes (a mix's last_scores, YOLO's anchor cache) are traced
            # as computed values, which is what scoring needs; torch.export warns about each one.
            warnings.filterwarnings("ignore", message=".* were assigned during export")
            batch = torch.export.Dim("batch", min=1)
            program = torch.export.export(_ScoringGraph(reward).eval(), (example,), dynamic_shapes=({0: batch},))
        return torch.onnx.export(program, (example,), input_names=[INPUT], output_names=outputs, verbose=False)
    except Exception as err:  # torch.export's and the ONNX translator's errors have no common base class
        if "specialized it to be a constant" in str(err):
            reason = (
                "its code fixes the batch size to the example's (e.g. with len(images), where images.shape[0] "
                "would keep it symbolic), and the graph's batch dimension must stay dynamic"
            )
        else:
            reason = f"tracing or translating its graph failed ({_summary(err)})"
        raise OnnxExportError(f"cannot export reward '{reward.name}' to ONNX: {reason}") from err
    finally:
        if last_scores is not None:
            reward.last_scores = last_scores


class OnnxReward:
    """A reward graph written by :func:`export_onnx`, scored with onnxruntime.

    ``reward(images)`` takes a float ``[N, 3, H, W]`` batch in [0, 1] (torch tensor or numpy array) at the size
    the graph was exported for, and returns float32 scores ``[N]`` (on the images' device for a tensor, else the
    CPU). Images of another size are an error rather than resized here: resizing to the exported size first
    would not match the torch reward, whose own resize and crop keep the aspect ratio. ``last_scores`` holds the
    member scores of a mix after each call, as :class:`~rewards.combine.CombinedReward` does.

    ``device``: ``"cpu"`` (CPUExecutionProvider) or ``"cuda"`` (CUDAExecutionProvider, from onnxruntime-gpu).
    ``num_threads``: onnxruntime's intra-op threads (default: onnxruntime's choice, the physical cores).
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", num_threads: int | None = None) -> None:
        _require_onnx()
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"ONNX reward file {path} does not exist; export one with rewards.onnx.export_onnx(reward, path) "
                f"or `python -m rewards export NAME --output {path}`"
            )
        providers = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
        if device not in providers:
            raise ValueError(f"device must be 'cpu' or 'cuda'; got {device!r}")
        if providers[device][0] not in onnxruntime.get_available_providers():
            raise ValueError(
                f"this onnxruntime has no {providers[device][0]} (available: "
                f"{', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu or use device='cpu'"
            )
        options = onnxruntime.SessionOptions()
        if num_threads is not None:
            options.intra_op_num_threads = num_threads
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=providers[device])
        except Exception as err:  # onnxruntime raises its own untyped errors for unreadable files
            raise ValueError(
                f"{path} is not a readable ONNX model ({_summary(err)}); re-export it with export_onnx (a graph "
                f"with external data also needs its {path.name}.data file next to it)"
            ) from err
        inputs = self.session.get_inputs()
        outputs = [o.name for o in self.session.get_outputs()]
        metadata = self.session.get_modelmeta().custom_metadata_map
        if [i.name for i in inputs] != [INPUT] or outputs[0] != OUTPUT or not {NAME_KEY, MEMBERS_KEY} <= set(metadata):
            raise ValueError(f"{path} is an ONNX model but not a reward graph written by rewards.onnx.export_onnx")
        self.path = path
        self.members: dict[str, float] = json.loads(metadata[MEMBERS_KEY])
        self.name = metadata[NAME_KEY]
        self.image_size: tuple[int, int] = tuple(inputs[0].shape[2:])  # type: ignore[assignment]
        self.last_scores: dict[str, torch.Tensor] = {}

    def __call__(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
        check_images(tensor)
        if tuple(tensor.shape[-2:]) != self.image_size:
            height, width = self.image_size
            raise ValueError(
                f"{self.path} scores {height}x{width} images; got {tensor.shape[-2]}x{tensor.shape[-1]}. Export "
                f"the reward at that size (export_onnx(reward, path, image_size=({tensor.shape[-2]}, "
                f"{tensor.shape[-1]}))), or resize the images to {height}x{width} yourself"
            )
        feed = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
        results = self.session.run(None, {INPUT: feed})
        scores = torch.from_numpy(results[0]).to(tensor.device)
        if len(results) > 1:
            members = torch.from_numpy(results[1]).to(tensor.device)
            self.last_scores = {key: members[:, i] for i, key in enumerate(self.members)}
        return scores

    def __repr__(self) -> str:
        height, width = self.image_size
        return f"OnnxReward({str(self.path)!r}, name={self.name!r}, image_size={height}x{width})"


def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(staged)`` with a path of the same name in a fresh folder next to ``path``, then move what it
    wrote into place, the file named ``path`` last: a failed or interrupted write leaves nothing at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        write(staging / path.name)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == path.name):
            os.replace(item, path.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"image_size must be positive; got {size!r}")
    return int(height), int(width)


def _summary(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch's exporter; it brings onnx_ir)
    except ImportError:
        raise ImportError("ONNX export and scoring need the optional extra: pip install -e '.[onnx]'") from None
