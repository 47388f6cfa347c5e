"""ONNX export of rewards, and scoring with onnxruntime (the optional ``[onnx]`` extra).

:func:`export_onnx` writes a reward's scoring graph: input ``images``, float32 ``[N, 3, H, W]`` in [0, 1], output
``scores``, float32 ``[N]`` (a weighted mix also outputs ``member_scores``, ``[N, members]``). ``N`` is dynamic;
``H`` and ``W`` are fixed when exporting, because the reward's preprocessing (resize, crop) is traced for one input
size. :class:`OnnxReward` loads such a file and scores with onnxruntime: inference only, no gradients.

Prompt rewards export too. Their prompt processor (``rewards.text``: a tokenizer, or the shapes caption parser)
stays in Python and is stored in the file's metadata; its tensors are extra graph inputs, ``[N, ...]`` like the
images (``input_ids``, or ``pickscore/input_ids`` for a member of a mix), and everything after it, text encoder
included, is in the graph. :class:`OnnxReward` rebuilds the processor, so scoring needs no torch model.
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

from rewards.base import Prompts, Reward, check_images, check_prompts
from rewards.combine import CombinedReward
from rewards.text import PromptProcessor, processor_from_json, processor_to_json, prompt_tensors

INPUT, OUTPUT, MEMBERS_OUTPUT = "images", "scores", "member_scores"
NAME_KEY, MEMBERS_KEY, PROMPTS_KEY = "rewards.name", "rewards.members", "rewards.prompt_processors"
"""Metadata entries: the reward's name, ``{member name: weight}`` as JSON (``{name: 1.0}`` for a single reward), and
the prompt processors as JSON ``{input name prefix: processor}`` (absent for rewards that read no prompts)."""
DEFAULT_IMAGE_SIZE = 512
"""Export size of rewards that take any size (``input_size is None``): Stable Diffusion 1.5's output."""
EXTERNAL_DATA_THRESHOLD = 2 * 10**9
"""Weights above this many bytes go to a ``FILE.data`` file next to the graph (protobuf caps a file at 2 GiB)."""


class OnnxExportError(ValueError):
    """A reward cannot be exported to ONNX (it reads prompts without a prompt processor, or its graph cannot be
    traced or translated)."""


class _ScoringGraph(nn.Module):
    """What the exported graph computes: validated images and the prompt processors' tensors (named ``names``,
    in that order) to scores (and per-member scores for a mix)."""

    def __init__(self, reward: Reward, names: list[str]) -> None:
        super().__init__()
        self.reward, self.names = reward, names

    def forward(self, images: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        scores = self.reward.compute_inputs(images, dict(zip(self.names, inputs, strict=True)))
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
    is replaced. A prompt reward's graph also takes its prompt processors' tensors (see the module docstring).
    Raises :class:`OnnxExportError` for rewards that read prompts without a prompt processor, or that cannot be
    traced or translated.
    """
    _require_onnx()
    import onnx_ir

    unprocessed = _without_processor(reward)
    if unprocessed:
        which = "it" if unprocessed == [reward.name] else f"its member '{unprocessed[0]}'"
        raise OnnxExportError(
            f"cannot export reward '{reward.name}' to ONNX: {which} needs prompts but has no prompt_processor to turn "
            f"them into tensors without a model; set one (rewards.text.PromptProcessor) and score with encode_prompts "
            f"and score_encoded (rewards.base.Reward) instead of score"
        )
    processors = reward.prompt_processors()
    height, width = _size_pair(image_size or reward.input_size or DEFAULT_IMAGE_SIZE)
    state = next((t for t in (*reward.parameters(), *reward.buffers()) if t.is_floating_point()), None)
    device = state.device if state is not None else torch.device("cpu")
    example = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(0)).to(device)
    inputs = {name: t.to(device) for name, t in _example_inputs(processors).items()}
    model = _convert(reward, example, inputs).model
    members = reward.weights if isinstance(reward, CombinedReward) else {reward.name: 1.0}
    model.metadata_props.update({NAME_KEY: reward.name, MEMBERS_KEY: json.dumps(members)})
    if processors:
        specs = {prefix: processor_to_json(processor) for prefix, processor in processors.items()}
        model.metadata_props[PROMPTS_KEY] = json.dumps(specs)
    model.doc_string = f"reward '{reward.name}': images [N, 3, {height}, {width}] in [0, 1] -> scores [N]"
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    path = Path(path)
    data = f"{path.name}.data" if weight_bytes > external_data_threshold else None
    _write_atomically(path, lambda staged: onnx_ir.save(model, staged, external_data=data))
    if data is None:
        (path.parent / f"{path.name}.data").unlink(missing_ok=True)  # left by an earlier export at this path
    return path


def _without_processor(reward: Reward) -> list[str]:
    """Names of the rewards (a mix's members) that need prompts but have no prompt processor."""
    if isinstance(reward, CombinedReward):
        return [name for member in reward.members.values() for name in _without_processor(member)]
    return [reward.name] if reward.needs_prompts and reward.prompt_processor is None else []


def _example_inputs(processors: dict[str, PromptProcessor]) -> dict[str, torch.Tensor]:
    """Each processor's tensors for a batch of two of its example prompts (the batch of the example images)."""
    return {
        prefix + name: t
        for prefix, processor in processors.items()
        for name, t in processor([processor.example] * 2).items()
    }


def _convert(reward: Reward, example: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.onnx.ONNXProgram:
    """Trace the scoring graph with ``torch.export`` (batch dimension symbolic, shared by the images and the prompt
    tensors) and translate it to ONNX; any failure becomes an :class:`OnnxExportError` naming the reward."""
    last_scores = getattr(reward, "last_scores", None)  # a mix records its member scores: keep the caller's
    outputs = [OUTPUT, MEMBERS_OUTPUT] if isinstance(reward, CombinedReward) else [OUTPUT]
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tensors that modules keep as plain attributes (a mix's last_scores, YOLO's anchor cache) are traced
            # as computed values, which is what scoring needs; torch.export warns about each one.
            warnings.filterwarnings("ignore", message=".* were assigned during export")
            batch = torch.export.Dim("batch", min=1)
            graph = _ScoringGraph(reward, list(inputs)).eval()
            arguments = (example, *inputs.values())
            dynamic = ({0: batch}, tuple({0: batch} for _ in inputs)) if inputs else ({0: batch},)  # (images, *inputs)
            program = torch.export.export(graph, arguments, dynamic_shapes=dynamic)
        names = [INPUT, *inputs]
        return torch.onnx.export(program, arguments, input_names=names, output_names=outputs, verbose=False)
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

    ``reward(images, prompts=None)`` takes a float ``[N, 3, H, W]`` batch in [0, 1] (torch tensor or numpy array)
    at the size the graph was exported for, and prompts as a reward does (one str for all, or one per image; a
    prompt reward needs them), and returns float32 scores ``[N]`` (on the images' device for a tensor, else the
    CPU). Prompts become the graph's prompt inputs through the processors stored in the file. Images of another
    size are an error rather than resized here: resizing to the exported size first would not match the torch
    reward, whose own resize and crop keep the aspect ratio. ``last_scores`` holds the member scores of a mix after
    each call, as :class:`~rewards.combine.CombinedReward` does.

    ``device``: ``"cpu"`` (CPUExecutionProvider) or ``"cuda"`` (CUDAExecutionProvider, from onnxruntime-gpu).
    ``num_threads``: onnxruntime's intra-op threads (default: onnxruntime's choice, the physical cores).
    """

    differentiable = False
    """onnxruntime computes no gradients, whatever the exported reward's (so the file records none)."""

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
        if (
            not inputs
            or inputs[0].name != INPUT
            or outputs[0] != OUTPUT
            or not {NAME_KEY, MEMBERS_KEY} <= set(metadata)
        ):
            raise ValueError(f"{path} is an ONNX model but not a reward graph written by rewards.onnx.export_onnx")
        self.path = path
        self.members: dict[str, float] = json.loads(metadata[MEMBERS_KEY])
        self.name = metadata[NAME_KEY]
        specs = json.loads(metadata.get(PROMPTS_KEY, "{}"))
        self.prompt_processors = {prefix: processor_from_json(spec) for prefix, spec in specs.items()}
        self.needs_prompts = bool(self.prompt_processors)
        self.prompt_inputs = [i.name for i in inputs[1:]]
        self.image_size: tuple[int, int] = tuple(inputs[0].shape[2:])  # type: ignore[assignment]
        self.last_scores: dict[str, torch.Tensor] = {}

    def __call__(self, images: torch.Tensor | np.ndarray, prompts: Prompts = None) -> torch.Tensor:
        tensor = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
        check_images(tensor)
        prompt_list = (
            [prompts] * len(tensor) if isinstance(prompts, str) else None if prompts is None else list(prompts)
        )
        check_prompts(prompt_list, len(tensor), self.name, self.needs_prompts)
        if tuple(tensor.shape[-2:]) != self.image_size:
            height, width = self.image_size
            raise ValueError(
                f"{self.path} scores {height}x{width} images; got {tensor.shape[-2]}x{tensor.shape[-1]}. Export "
                f"the reward at that size (export_onnx(reward, path, image_size=({tensor.shape[-2]}, "
                f"{tensor.shape[-1]}))), or resize the images to {height}x{width} yourself"
            )
        feed = {INPUT: tensor.detach().to("cpu", torch.float32).contiguous().numpy()}
        if self.needs_prompts:
            inputs = prompt_tensors(self.prompt_processors, prompt_list)  # type: ignore[arg-type]  (checked above)
            feed.update({name: inputs[name].numpy() for name in self.prompt_inputs})
        results = self.session.run(None, feed)
        scores = torch.from_numpy(results[0]).to(tensor.device)
        if len(results) > 1:
            members = torch.from_numpy(results[1]).to(tensor.device)
            self.last_scores = {key: members[:, i] for i, key in enumerate(self.members)}
        return scores

    def __repr__(self) -> str:
        height, width = self.image_size
        prompts = ", needs_prompts=True" if self.needs_prompts else ""
        return f"OnnxReward({str(self.path)!r}, name={self.name!r}, image_size={height}x{width}{prompts})"


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
