"""Finding and loading reward weights: hub id, URL, local directory or file; strict loading; offline errors.

Every model-backed reward describes each of its components with a :class:`WeightSource` (where the reference
weights are published) and loads them through :func:`load_component`, so the rules are the same everywhere:

* ``weights=None`` and ``pretrained=True``: fetch the reference weights (Hugging Face cache or hub, or a URL
  cached under torch's hub directory); offline and not cached raises :class:`MissingWeightsError` naming what to
  download and the ``weights=`` argument that points at a local copy.
* ``weights=`` a local file or directory (in the reference layout) or a hub id (``owner/name@revision`` to pick a
  revision): load that instead.
* Downloads fetch exactly the files a component needs, from a pinned hub revision, or from a URL checked against
  its size and sha256; nothing half-written is ever left under a name a later run would trust.
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
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeVar

import torch
from torch import nn

from rewards import hints

WeightsArg = str | os.PathLike
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")
_WEIGHT_SUFFIXES = {".pth", ".pt", ".bin", ".safetensors", ".ckpt", ".json"}
CONFIG_FILE = "config.json"
TRANSFORMERS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
"""The weight files of a transformers ``save_pretrained`` directory, tried in this order at the source's revision;
the first one present is downloaded (an index brings exactly the shards it lists)."""
M = TypeVar("M", bound=nn.Module)
MAIN = "main"
"""Component name of a single-component reward (``weights=PATH`` rather than ``weights={name: PATH}``)."""


class MissingWeightsError(FileNotFoundError):
    """Reference weights are neither cached nor reachable (offline), or a given path does not exist.

    Raised by :func:`resolve` with the failing ``component``, its ``source`` and the ``reason``, so that the
    registry can name every file of a reward with several components (:func:`missing_weights_message`)."""

    def __init__(
        self,
        message: str,
        *,
        reward: str | None = None,
        component: str | None = None,
        source: WeightSource | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reward, self.component, self.source, self.reason = reward, component, source, reason


class WeightsMismatchError(ValueError):
    """A checkpoint does not match the architecture it is loaded into (strict loading failed)."""


@dataclass(frozen=True)
class WeightSource:
    """Where the reference weights of one reward component are published.

    ``repo_id`` on the Hugging Face hub at ``revision`` (a commit id, so that every user gets the same files;
    ``None`` is the hub's ``main``), with ``filename`` for a single file, or, without it, exactly the files of a
    transformers ``save_pretrained`` directory (``config.json`` and the first of :data:`TRANSFORMERS_WEIGHTS`
    present). Or a plain ``url`` (``filename`` then names the cached file), checked against ``size`` and ``sha256``.
    """

    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None
    url: str | None = None
    sha256: str | None = None
    size: int | None = None

    def files(self) -> str:
        """The file(s) this source provides, for messages."""
        if self.filename:
            return self.filename
        return f"{CONFIG_FILE} and {TRANSFORMERS_WEIGHTS[0]} (or {TRANSFORMERS_WEIGHTS[-1]})"

    def describe(self) -> str:
        at = f" at revision {self.revision}" if self.revision else ""
        if self.repo_id and self.filename:
            return f"file '{self.filename}' of hub repo '{self.repo_id}'{at}"
        if self.repo_id:
            return f"hub repo '{self.repo_id}'{at} ({self.files()})"
        return f"'{self.url}'"

    def download_hint(self, directory: str = "DIR") -> str:
        """A shell command that downloads this source's file(s) into ``directory``."""
        revision = f" --revision {self.revision}" if self.revision else ""
        if self.repo_id and self.filename:
            return f"hf download {self.repo_id} {self.filename}{revision} --local-dir {directory}"
        if self.repo_id:
            files = f"{CONFIG_FILE} {TRANSFORMERS_WEIGHTS[0]}"
            return f"hf download {self.repo_id} {files}{revision} --local-dir {directory}"
        return f"curl -L -o '{directory}/{self.filename}' '{self.url}'"

    def at_hub_id(self, hub_id: str) -> WeightSource:
        """The same file(s) from ``owner/name`` or ``owner/name@revision``. Without a revision, the reference repo
        keeps its pinned revision and any other repo is read at ``main``."""
        repo_id, _, revision = hub_id.partition("@")
        pinned = self.revision if repo_id == self.repo_id else None
        return WeightSource(repo_id=repo_id, filename=self.filename, revision=revision or pinned)


def resolve(reward: str, component: str, source: WeightSource, override: WeightsArg | None) -> Path:
    """Return a local path for a component: ``override`` if given (path, or hub id with an optional
    ``@revision``), else the reference source."""
    if override is not None:
        path = Path(override).expanduser()
        if path.exists():
            return path
        text = str(override)
        if not _HUB_ID.match(text) or path.suffix in _WEIGHT_SUFFIXES:
            raise MissingWeightsError(
                f"weights for '{reward}' component '{component}': {text!r} is neither an existing file or "
                f"directory nor a hub id of the form 'owner/name' (or 'owner/name@revision')"
            )
        source = source.at_hub_id(text)
    try:
        return _fetch(source)
    except Exception as err:  # offline, not cached, unreachable host, missing file on the hub
        reason = _reason(err)
        if override is not None:
            reason += f"; nor is there a local file or folder {str(override)!r}"
        raise MissingWeightsError(
            missing_weights_message(reward, component, source, reason),
            reward=reward,
            component=component,
            source=source,
            reason=reason,
        ) from err


def missing_weights_message(
    reward: str,
    component: str,
    source: WeightSource,
    reason: str,
    sources: Mapping[str, WeightSource] | None = None,
    given: Mapping[str, WeightsArg] | None = None,
) -> str:
    """Why ``component`` could not be loaded, how to download it elsewhere and how to point the reward at the
    copy. With ``sources`` (every component of the reward) the commands and the argument name every file, keeping
    the paths already ``given`` for other components."""
    given = {c: str(path) for c, path in (given or {}).items() if c != component}
    sources = {c: s for c, s in {**(sources or {}), component: source}.items() if c not in given}
    several = len(sources) + len(given) > 1
    directories = {c: f"{c.upper()}_DIR" if several else "DIR" for c in sources}
    local = {c: f"{directories[c]}/{s.filename}" if s.filename else directories[c] for c, s in sources.items()}
    local = {**given, **local}
    commands = " and ".join(f"`{s.download_hint(directories[c])}`" for c, s in sources.items())
    argument = hints.weights(local[MAIN] if list(local) == [MAIN] else local)
    return (
        f"cannot load the weights of reward '{reward}' (component '{component}'): {source.describe()} is not in "
        f"the local cache and could not be downloaded ({reason}). On a machine with access run {commands}, copy "
        f"{' and '.join(directories.values())} to this machine and use {hints.usage(reward, '...', argument)}; "
        f"or fill the cache it is read from ({_cache_of(source)})."
    )


def _reason(err: Exception, limit: int = 300) -> str:
    """The error's type and first line, shortened at a word boundary if it is very long."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    text = lines[0]
    if len(text) > limit:
        text = text[: text.rfind(" ", 0, limit)] + " ..."
    return f"{type(err).__name__}: {text}"


def _cache_of(source: WeightSource) -> str:
    if source.repo_id:
        from huggingface_hub import constants

        return f"HF_HUB_CACHE={constants.HF_HUB_CACHE}"
    return f"{Path(torch.hub.get_dir()) / 'checkpoints' / (source.filename or '')}"


def _fetch(source: WeightSource) -> Path:
    if source.repo_id:
        return _fetch_hub(source)
    if source.url and source.filename:
        return _fetch_url(source)
    raise ValueError("WeightSource needs a repo_id, or a url and a filename")


def _fetch_hub(source: WeightSource) -> Path:
    """Download (or find in the hub cache) exactly the file(s) of ``source`` at its revision; a directory source
    returns the snapshot folder holding them. huggingface_hub writes each file to a temporary name, checks it
    against the hub's hash and moves it into place, so an interrupted download is never taken for a file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def get(filename: str) -> Path:
        return Path(hf_hub_download(source.repo_id, filename, revision=source.revision))

    if source.filename:
        return get(source.filename)
    snapshot = get(CONFIG_FILE).parent
    errors = []
    for name in TRANSFORMERS_WEIGHTS:
        try:
            path = get(name)
        except EntryNotFoundError as err:  # not in this repo at this revision (online), or not cached (offline)
            errors.append(err)
            continue
        if name.endswith(".index.json"):
            for shard in sorted(set(json.loads(path.read_text())["weight_map"].values())):
                get(shard)
        return snapshot
    raise FileNotFoundError(f"none of {', '.join(TRANSFORMERS_WEIGHTS)} is available ({_reason(errors[0])})")


def _fetch_url(source: WeightSource) -> Path:
    """The file at ``source.url`` in torch's hub checkpoint cache: a cached copy is used only if it has the
    expected size and sha256; otherwise the file is streamed to a temporary file in the same folder, checked, and
    moved into place atomically. Any failure (a dropped connection, a wrong size or hash, Ctrl-C) removes the
    temporary file, so the cache never holds a partial file under the real name."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    target = cache / str(source.filename)
    problem = _check_file(target, source) if target.exists() else "is not cached"
    if problem is None:
        return target
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ConnectionError(f"offline mode (HF_HUB_OFFLINE=1) and {target} {problem}")
    cache.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=cache, prefix=f".{source.filename}.", suffix=".partial")  # one per process
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            _stream(str(source.url), out, source.size)
        problem = _check_file(tmp, source)
        if problem is not None:
            raise ValueError(f"the download of {source.url} {problem}: it is not the reference file")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _check_file(path: Path, source: WeightSource) -> str | None:
    """Why ``path`` is not the file ``source`` describes (size, then sha256), or ``None`` if it is."""
    size = path.stat().st_size
    if source.size is not None and size != source.size:
        return f"has {size} bytes, not {source.size}"
    if source.sha256 is not None and file_sha256(path) != source.sha256:
        return "has the wrong sha256"
    return None


def _stream(url: str, out: BinaryIO, size: int | None) -> None:
    """Copy ``url`` to ``out`` in blocks (never more than ``size`` bytes, when known), with a progress bar."""
    from urllib.request import Request, urlopen

    from tqdm.auto import tqdm

    with urlopen(Request(url, headers={"User-Agent": "draft-rewards"}), timeout=60) as response:
        length = response.headers.get("Content-Length")
        total = size or (int(length) if length else None)
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, file=sys.stderr) as bar:
            written = 0
            for block in iter(lambda: response.read(1 << 20), b""):
                written += len(block)
                if size is not None and written > size:
                    raise ValueError(f"{url} sent more than the expected {size} bytes")
                out.write(block)
                bar.update(len(block))
        if length and written != int(length):
            raise ConnectionError(f"{url}: the connection closed after {written} of {length} bytes")


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
        raise ValueError(f"reward '{reward}': tiny=True has no pretrained weights; use {hints.random_weights()}")
    return pretrained or override is not None


def uninitialised(factory: Callable[..., M], *args: object, **kwargs: object) -> M:
    """``factory(*args, **kwargs)`` without its random initialisation, for a model whose every parameter and
    persistent buffer a strict load (:func:`load_state_dict_strict`) overwrites next: that initialisation takes 10
    to 25 s for the 1B-parameter CLIP-H rewards on a CPU, for values that are thrown away. Non-persistent buffers
    (position ids, attention masks) are computed in the modules' constructors, which still run, so they are right."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        return factory(*args, **kwargs)


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
    model = uninitialised(model_class, config)
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
