"""Finding and loading reward weights: hub id, URL, local directory or file; strict loading; offline errors.

Every model-backed reward describes each of its components with a :class:`WeightSource` (where the reference
weights are published) and loads them through :func:`load_component`, so the rules are the same everywhere:

* ``weights=None`` and ``pretrained=True``: fetch the reference weights (Hugging Face cache or hub, or a URL
  cached under torch's hub directory); offline and not cached raises :class:`MissingWeightsError` naming what to
  download and the ``weights=`` argument that points at a local copy.
* ``weights=`` a local file or directory (in the reference layout) or a hub id: load that instead.
* Loading is strict: missing, unexpected or mis-shaped tensors raise :class:`WeightsMismatchError`. The only
  keys ever skipped are listed explicitly per component (e.g. the text tower of a full CLIP checkpoint when
  only the image tower is used).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

WeightsArg = str | os.PathLike
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRANSFORMERS_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json")
_WEIGHT_SUFFIXES = {".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".json"}
MAIN = "main"
"""Component name of a single-component reward (``weights=PATH`` rather than ``weights={name: PATH}``)."""


class MissingWeightsError(FileNotFoundError):
    """Reference weights are neither cached nor reachable (offline), or a given path does not exist."""


class WeightsMismatchError(ValueError):
    """A checkpoint does not match the architecture it is loaded into (strict loading failed)."""


@dataclass(frozen=True)
class WeightSource:
    """Where the reference weights of one reward component are published.

    ``repo_id`` (+ ``filename`` for a single file; no filename means a transformers ``save_pretrained``
    directory) on the Hugging Face hub, or a plain ``url`` (``filename`` then names the cached file).
    ``sha256`` is checked after a URL download.
    """

    repo_id: str | None = None
    filename: str | None = None
    url: str | None = None
    sha256: str | None = None

    def describe(self) -> str:
        if self.repo_id and self.filename:
            return f"file '{self.filename}' of hub repo '{self.repo_id}'"
        if self.repo_id:
            return f"hub repo '{self.repo_id}' (config.json and *.safetensors)"
        return f"'{self.url}'"

    def download_hint(self) -> str:
        if self.repo_id and self.filename:
            return f"hf download {self.repo_id} {self.filename} --local-dir DIR"
        if self.repo_id:
            return f"hf download {self.repo_id} --include 'config.json' '*.safetensors' --local-dir DIR"
        return f"curl -L -o 'DIR/{self.filename}' '{self.url}'"


def resolve(reward: str, component: str, source: WeightSource, override: WeightsArg | None) -> Path:
    """Return a local path for a component: ``override`` if given (path or hub id), else the reference source."""
    if override is not None:
        path = Path(override).expanduser()
        if path.exists():
            return path
        text = str(override)
        if not _HUB_ID.match(text) or path.suffix in _WEIGHT_SUFFIXES:
            raise MissingWeightsError(
                f"weights for '{reward}' component '{component}': {text!r} is neither an existing file or "
                f"directory nor a hub id of the form 'owner/name'"
            )
        source = WeightSource(repo_id=text, filename=source.filename)
    try:
        return _fetch(source)
    except Exception as err:  # offline, not cached, unreachable host, missing file on the hub
        local = f"DIR/{source.filename}" if source.filename else "DIR"
        arg = repr(local) if component == MAIN else f"{{{component!r}: {local!r}}}"
        raise MissingWeightsError(
            f"cannot load the weights of reward '{reward}' (component '{component}'): {source.describe()} is "
            f"not in the local cache and could not be downloaded ({_first_line(err)}). On a machine with "
            f"access run `{source.download_hint()}`, copy DIR to this machine and use "
            f"get_reward('{reward}', ..., weights={arg}); or fill the cache it is read from ({_cache_of(source)})."
        ) from err


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


def _cache_of(source: WeightSource) -> str:
    if source.repo_id:
        from huggingface_hub import constants

        return f"HF_HUB_CACHE={constants.HF_HUB_CACHE}"
    return f"{Path(torch.hub.get_dir()) / 'checkpoints' / (source.filename or '')}"


def _fetch(source: WeightSource) -> Path:
    if source.repo_id:
        from huggingface_hub import hf_hub_download, snapshot_download

        if source.filename:
            return Path(hf_hub_download(source.repo_id, source.filename))
        snapshot = Path(snapshot_download(source.repo_id, allow_patterns=list(_TRANSFORMERS_FILES)))
        if not any(snapshot.glob("*.safetensors")):  # older repositories only have a torch pickle
            snapshot = Path(snapshot_download(source.repo_id, allow_patterns=["config.json", "pytorch_model.bin"]))
        if not any(snapshot.glob("*.safetensors")) and not (snapshot / "pytorch_model.bin").exists():
            # offline, a cached snapshot may hold only tokenizer files
            raise FileNotFoundError(f"cached snapshot {snapshot} holds no *.safetensors weights")
        return snapshot
    if source.url and source.filename:
        return _fetch_url(source.url, source.filename, source.sha256)
    raise ValueError("WeightSource needs a repo_id, or a url and a filename")


def _fetch_url(url: str, filename: str, sha256: str | None) -> Path:
    """Download ``url`` into torch's hub checkpoint cache (atomically), or return the cached copy."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    target = cache / filename
    if target.exists():
        return target
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ConnectionError("offline mode (HF_HUB_OFFLINE=1) and not cached")
    cache.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=cache, prefix=f".{filename}.", suffix=".partial")  # one per process
    os.close(fd)
    tmp = Path(name)
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
        if sha256 and file_sha256(tmp) != sha256:
            raise ValueError(f"sha256 mismatch for {url}: the download is not the reference file")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path, nested_key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a file (.safetensors, or a torch pickle read with ``weights_only=True``) or a
    transformers-style directory (``model.safetensors``, sharded safetensors, or ``pytorch_model.bin``).

    ``nested_key``: checkpoints that wrap the state dict (e.g. HPS's ``{"state_dict": ...}``) are unwrapped."""
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(read_state_dict(path / shard))
            return state
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).exists():
                return read_state_dict(path / name)
        raise MissingWeightsError(f"no model.safetensors or pytorch_model.bin in directory {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsMismatchError(f"cannot read {path} as a state dict: {err}") from err
    if nested_key is not None:
        if not isinstance(state, dict) or nested_key not in state:
            raise WeightsMismatchError(f"{path} has no {nested_key!r} entry; expected {{{nested_key!r}: state dict}}")
        state = state[nested_key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsMismatchError(f"{path} does not hold a plain state dict of tensors")
    return state


def load_state_dict_strict(
    module: nn.Module, state: dict[str, torch.Tensor], what: str, ignore: Sequence[str] = ()
) -> None:
    """Load ``state`` into ``module``; every key must match in name and shape.

    ``ignore`` lists glob patterns of checkpoint keys that are known not to belong to ``module`` (and only
    those) -- e.g. ``"text_model.*"`` when loading CLIP's image tower from a full CLIP checkpoint.
    """
    state = {k: v for k, v in state.items() if not any(fnmatch.fnmatchcase(k, p) for p in ignore)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or mis_shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mis_shaped)):
            if keys:
                shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
                parts.append(f"{label}: {shown}")
        raise WeightsMismatchError(
            f"{what} does not match the expected architecture ({'; '.join(parts)}). Check that the file is the "
            f"one the reward expects (see its model card) and not a different model or layout."
        )
    module.load_state_dict(state, strict=True)


def needs_weights(reward: str, pretrained: bool, override: WeightsArg | None, tiny: bool = False) -> bool:
    """Whether a component loads weights (``pretrained`` or given explicitly) rather than keeping its random
    initialisation; tiny test variants have no published weights, so asking for them is an error."""
    if tiny and pretrained and override is None:
        raise ValueError(f"reward '{reward}': tiny=True has no pretrained weights; use pretrained=False")
    return pretrained or override is not None


def build_model(
    model_class: type[nn.Module],
    config: object,
    *,
    reward: str,
    component: str,
    source: WeightSource,
    pretrained: bool,
    override: WeightsArg | None,
    tiny: bool = False,
    ignore: Sequence[str] = ("*.position_ids",),
    read_config: Callable[[Path], object] | None = None,
) -> nn.Module:
    """A transformers model: random at ``config`` unless weights are wanted (:func:`needs_weights`); a
    ``save_pretrained`` directory brings its own ``config.json`` (read with ``read_config``, by default the model's
    config class), a single state-dict file is loaded into ``config``. Loading is strict, skipping only ``ignore``
    (by default the legacy ``position_ids`` buffers that current transformers does not use)."""
    if not needs_weights(reward, pretrained, override, tiny):
        return model_class(config)
    path = resolve(reward, component, source, override)
    if path.is_dir() and (path / "config.json").exists():
        config = (read_config or model_class.config_class.from_pretrained)(path)
    model = model_class(config)
    what = f"checkpoint {path} for '{reward}' component '{component}'"
    load_state_dict_strict(model, read_state_dict(path), what, ignore)
    return model


def load_component(
    module: nn.Module,
    *,
    reward: str,
    component: str,
    source: WeightSource,
    pretrained: bool,
    override: WeightsArg | None,
    ignore: Sequence[str] = (),
) -> nn.Module:
    """Load a component's weights into ``module`` when ``pretrained`` or when given explicitly; else leave the
    random initialisation. Returns ``module``."""
    if not needs_weights(reward, pretrained, override):
        return module
    path = resolve(reward, component, source, override)
    load_state_dict_strict(
        module, read_state_dict(path), f"checkpoint {path} for '{reward}' component '{component}'", ignore
    )
    return module
