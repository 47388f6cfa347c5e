"""The shared weight resolver: file formats, strictness, hub ids and revisions (a local fake hub and cache), URL
downloads (file:// and a local HTTP server) and what failed or interrupted downloads leave behind."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from rewards import weights as weights_mod
from rewards.weights import (
    MissingWeightsError,
    WeightsMismatchError,
    WeightSource,
    file_sha256,
    load_state_dict_strict,
    read_state_dict,
    resolve,
)


@pytest.fixture
def state():
    return {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3), "b.weight": torch.randn(1, 3)}


def test_read_formats(tmp_path, state):
    torch.save(state, tmp_path / "w.pth")
    save_file(state, tmp_path / "w.safetensors")
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    for path in (tmp_path / "w.pth", tmp_path / "w.safetensors", tmp_path / "bin"):
        loaded = read_state_dict(path)
        assert loaded.keys() == state.keys()
        for k in state:
            torch.testing.assert_close(loaded[k], state[k], rtol=0, atol=0)


def test_read_sharded_safetensors_directory(tmp_path, state):
    save_file({"a.weight": state["a.weight"]}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"a.bias": state["a.bias"], "b.weight": state["b.weight"]}, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {"a.weight": "model-00001-of-00002.safetensors"}
    weight_map.update(dict.fromkeys(("a.bias", "b.weight"), "model-00002-of-00002.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert read_state_dict(tmp_path).keys() == state.keys()


def test_directory_without_weights(tmp_path):
    with pytest.raises(MissingWeightsError, match=r"no model\.safetensors or pytorch_model\.bin"):
        read_state_dict(tmp_path)


def test_pickle_that_is_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(WeightsMismatchError, match="does not hold a plain state dict"):
        read_state_dict(tmp_path / "list.pth")


def test_corrupt_file(tmp_path):
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsMismatchError, match=r"cannot read .*broken\.pth as a state dict"):
        read_state_dict(tmp_path / "broken.pth")


def test_pickled_code_is_refused(tmp_path):
    torch.save({"w": torch.zeros(1), "module": nn.Linear(1, 1)}, tmp_path / "module.pth")
    with pytest.raises(WeightsMismatchError, match="cannot read"):
        read_state_dict(tmp_path / "module.pth")


def test_strict_message_truncates_long_lists():
    module = nn.Sequential(*[nn.Linear(1, 1) for _ in range(5)])
    with pytest.raises(WeightsMismatchError, match=r"missing: 0\.bias, .*\(10 in all\)"):
        load_state_dict_strict(module, {}, "test checkpoint")


def test_ignore_patterns_are_explicit():
    module = nn.Linear(2, 3)
    state = {**nn.Linear(2, 3).state_dict(), "text_model.x": torch.zeros(1)}
    load_state_dict_strict(module, state, "test", ignore=("text_model.*",))
    with pytest.raises(WeightsMismatchError, match=r"unexpected: text_model\.x"):
        load_state_dict_strict(module, state, "test")


def test_resolve_prefers_existing_paths_then_hub_ids(tmp_path):
    source = WeightSource(repo_id="owner/model", filename="w.pth")
    (tmp_path / "w.pth").write_bytes(b"")
    assert resolve("r", "main", source, tmp_path / "w.pth") == tmp_path / "w.pth"
    expected = r"file 'w\.pth' of hub repo 'someone/other'.*not in the local cache.*nor is there a local file or folder"
    with pytest.raises(MissingWeightsError, match=expected):
        resolve("r", "main", source, "someone/other")
    with pytest.raises(MissingWeightsError, match=r"neither an existing file or directory nor a hub id"):
        resolve("r", "main", source, tmp_path / "missing" / "w.pth")


@pytest.fixture
def online(monkeypatch):
    """Let the URL path run (it downloads only file:// URLs in these tests)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_url_download_is_verified_cached_and_atomic(tmp_path, state, online):
    torch.save(state, tmp_path / "remote.pth")
    sha = file_sha256(tmp_path / "remote.pth")
    source = WeightSource(url=(tmp_path / "remote.pth").as_uri(), filename="cached-head.pth", sha256=sha)
    path = resolve("r", "head", source, None)
    assert path.name == "cached-head.pth" and file_sha256(path) == sha
    assert not list(path.parent.glob("*partial"))
    (tmp_path / "remote.pth").unlink()
    assert resolve("r", "head", source, None) == path  # served from the cache


def test_url_download_with_wrong_hash_leaves_nothing(tmp_path, state, online):
    torch.save(state, tmp_path / "remote.pth")
    source = WeightSource(url=(tmp_path / "remote.pth").as_uri(), filename="bad-head.pth", sha256="0" * 64)
    with pytest.raises(MissingWeightsError, match=r"component .head.*wrong sha256"):
        resolve("r", "head", source, None)
    cache = weights_mod.Path(torch.hub.get_dir()) / "checkpoints"
    assert not (cache / "bad-head.pth").exists() and not list(cache.glob("bad-head*"))


def test_url_offline_error_names_url_and_file():
    source = WeightSource(url="https://example.org/x/head.pth", filename="head.pth")
    with pytest.raises(MissingWeightsError) as info:
        resolve("r", "head", source, None)
    message = str(info.value)
    assert "'https://example.org/x/head.pth'" in message
    assert "curl -L -o 'DIR/head.pth'" in message
    assert "weights={'head': 'DIR/head.pth'}" in message


def test_missing_relative_path_is_not_taken_for_a_hub_id(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    source = WeightSource(repo_id="owner/model", filename="model.safetensors")
    with pytest.raises(MissingWeightsError, match=r"'models/resnet50\.pth' is neither an existing file"):
        resolve("r", "main", source, "models/resnet50.pth")


def write_cached_snapshot(cache, repo_id, commit, files, main=True):
    """A hub cache entry as huggingface_hub lays it out: snapshots/COMMIT/FILE, and refs/main naming COMMIT."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "snapshots" / commit).mkdir(parents=True)
    for name, data in files.items():
        (repo / "snapshots" / commit / name).write_bytes(data)
    if main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def hub_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_partial_snapshot_in_cache_gives_the_full_offline_error(hub_cache):
    """A cached snapshot holding only tokenizer files (common for SD users) is not taken for weights."""
    commit = "a" * 40
    write_cached_snapshot(
        hub_cache, "openai/clip-vit-large-patch14", commit, {"tokenizer_config.json": b"{}", "config.json": b"{}"}
    )
    with pytest.raises(MissingWeightsError) as info:
        resolve("aesthetic", "clip", WeightSource(repo_id="openai/clip-vit-large-patch14", revision=commit), None)
    message = str(info.value)
    assert "none of model.safetensors, model.safetensors.index.json, pytorch_model.bin" in message
    assert f"hf download openai/clip-vit-large-patch14 config.json model.safetensors --revision {commit}" in message
    assert "weights={'clip': 'DIR'}" in message


def test_offline_cache_is_read_at_the_pinned_revision(hub_cache, state):
    """The cache holds two revisions; the pinned one is read, not the one main points at."""
    pinned, newer = "1" * 40, "2" * 40
    for commit, scale in ((pinned, 1.0), (newer, 2.0)):
        data = save({k: scale * v for k, v in state.items()})
        write_cached_snapshot(
            hub_cache, "owner/model", commit, {"config.json": b"{}", "model.safetensors": data}, main=commit == newer
        )
    source = WeightSource(repo_id="owner/model", revision=pinned)
    path = resolve("r", "main", source, None)
    assert path.name == pinned
    torch.testing.assert_close(read_state_dict(path)["a.bias"], state["a.bias"])
    assert resolve("r", "main", source, "owner/model@" + newer).name == newer  # a revision override
    assert resolve("r", "main", source, "owner/model").name == pinned  # the reference repo keeps its pin
    with pytest.raises(MissingWeightsError, match=r"hub repo 'owner/model' at revision 3{40}"):
        resolve("r", "main", source, "owner/model@" + "3" * 40)


def save(tensors):
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


class FakeHub(ThreadingHTTPServer):
    """The hub's file endpoint (``/OWNER/NAME/resolve/REVISION/FILE``, HEAD and GET) over local files; it records
    every request, so tests see exactly which files at which revision a download asked for."""

    def __init__(self, repos):
        self.repos = repos  # {(repo_id, commit): {filename: bytes}}; "main" is the last commit of a repo
        self.requests = []
        super().__init__(("127.0.0.1", 0), FakeHubHandler)

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fetched(self):
        """(revision, file) of every GET."""
        return sorted({(rev, name) for method, rev, name in self.requests if method == "GET"})


class FakeHubHandler(BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body):
        owner, name, _, revision, filename = unquote(self.path.split("?")[0]).lstrip("/").split("/", 4)
        repo_id = f"{owner}/{name}"
        commits = [c for r, c in self.server.repos if r == repo_id]
        commit = commits[-1] if revision == "main" and commits else revision
        self.server.requests.append((self.command, revision, filename))
        files = self.server.repos.get((repo_id, commit))
        if files is None or filename not in files:
            self.send_response(404)
            self.send_header("X-Error-Code", "RevisionNotFound" if files is None else "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = files[filename]
        self.send_response(200)
        self.send_header("X-Repo-Commit", commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@contextmanager
def serve(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fake_hub(monkeypatch, hub_cache, online):
    from huggingface_hub import constants

    def start(repos):
        server = FakeHub(repos)
        monkeypatch.setattr(constants, "ENDPOINT", server.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        return serve(server)

    return start


def test_hub_directory_downloads_exactly_its_files_at_the_pinned_revision(fake_hub, state):
    pinned, newer = "1" * 40, "2" * 40
    everything = {
        "config.json": b"{}",
        "model.safetensors": save(state),
        "pytorch_model.bin": b"x" * 1000,
        "tf_model.h5": b"x",
        "flax_model.msgpack": b"x",
        "README.md": b"x",
    }
    repos = {("owner/model", pinned): everything, ("owner/model", newer): {**everything, "config.json": b"{ }"}}
    with fake_hub(repos) as hub:
        path = resolve("r", "main", WeightSource(repo_id="owner/model", revision=pinned), None)
    assert hub.fetched() == [(pinned, "config.json"), (pinned, "model.safetensors")]
    assert path.name == pinned and sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert read_state_dict(path).keys() == state.keys()


def test_hub_directory_falls_back_to_the_exact_legacy_or_sharded_files(fake_hub, state):
    commit, sharded = "1" * 40, "2" * 40
    torch_bin = io.BytesIO()
    torch.save(state, torch_bin)
    shards = {
        "model-00001-of-00002.safetensors": save({"a.weight": state["a.weight"]}),
        "model-00002-of-00002.safetensors": save({k: state[k] for k in ("a.bias", "b.weight")}),
    }
    first, second = shards
    index = {"weight_map": {"a.weight": first, "a.bias": second, "b.weight": second}}
    repos = {
        ("owner/legacy", commit): {"config.json": b"{}", "pytorch_model.bin": torch_bin.getvalue(), "tf_model.h5": b""},
        ("owner/sharded", sharded): {
            "config.json": b"{}",
            "model.safetensors.index.json": json.dumps(index).encode(),
            **shards,
            "pytorch_model.bin": b"unused",
        },
    }
    with fake_hub(repos) as hub:
        legacy = resolve("r", "main", WeightSource(repo_id="owner/legacy", revision=commit), None)
        assert hub.fetched() == [(commit, "config.json"), (commit, "pytorch_model.bin")]
        hub.requests.clear()
        path = resolve("r", "main", WeightSource(repo_id="owner/sharded", revision=sharded), None)
        assert hub.fetched() == sorted(
            [(sharded, "config.json"), (sharded, "model.safetensors.index.json"), *((sharded, name) for name in shards)]
        )
    assert read_state_dict(legacy).keys() == read_state_dict(path).keys() == state.keys()


def test_hub_file_and_revision_override(fake_hub):
    pinned, newer = "1" * 40, "2" * 40
    repos = {
        ("owner/heads", pinned): {"head.pth": b"old", "other.pth": b"x"},
        ("owner/heads", newer): {"head.pth": b"new", "other.pth": b"x"},
        ("someone/fork", "3" * 40): {"head.pth": b"fork"},
    }
    source = WeightSource(repo_id="owner/heads", filename="head.pth", revision=pinned)
    with fake_hub(repos) as hub:
        assert resolve("r", "head", source, None).read_bytes() == b"old"
        assert resolve("r", "head", source, "owner/heads@" + newer).read_bytes() == b"new"
        assert resolve("r", "head", source, "someone/fork").read_bytes() == b"fork"  # another repo: its main
    assert hub.fetched() == [("1" * 40, "head.pth"), ("2" * 40, "head.pth"), ("main", "head.pth")]


def test_concurrent_url_downloads_do_not_collide(tmp_path, state, online):
    from concurrent.futures import ThreadPoolExecutor

    torch.save(state, tmp_path / "remote.pth")
    source = WeightSource(
        url=(tmp_path / "remote.pth").as_uri(), filename="shared.pth", sha256=file_sha256(tmp_path / "remote.pth")
    )
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: resolve("r", "head", source, None), range(8)))
    assert len(set(paths)) == 1 and file_sha256(paths[0]) == source.sha256
    assert not list(paths[0].parent.glob("*.partial"))


class FileServer(ThreadingHTTPServer):
    """Serves ``payload`` over HTTP: ``/full`` as is, ``/truncated`` announcing its full length but closing the
    connection half way, ``/slow`` in small timed pieces (for interrupting); counts the requests."""

    daemon_threads = True

    def __init__(self, payload):
        self.payload, self.hits, self.sending = payload, 0, threading.Event()
        super().__init__(("127.0.0.1", 0), FileHandler)

    def url(self, path):
        return f"http://127.0.0.1:{self.server_address[1]}/{path}"


class FileHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        payload = self.server.payload
        self.server.hits += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            if self.path == "/truncated":
                self.wfile.write(payload[: len(payload) // 2])
            elif self.path == "/slow":
                for start in range(0, len(payload), 1 << 14):
                    self.wfile.write(payload[start : start + (1 << 14)])
                    self.server.sending.set()
                    time.sleep(0.05)
            else:
                self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client went away (the interruption test)
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def torch_cache(tmp_path):
    """An empty torch hub directory (where URL downloads are cached) for one test."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "torch-hub"))
    yield tmp_path / "torch-hub" / "checkpoints"
    torch.hub.set_dir(previous)


def url_source(server, path, payload, **overrides):
    fields = dict(
        url=server.url(path), filename="head.pth", size=len(payload), sha256=hashlib.sha256(payload).hexdigest()
    )
    return WeightSource(**{**fields, **overrides})


def test_url_download_over_http_is_checked_and_cached_once(torch_cache, online):
    payload = os.urandom(300_000)
    with serve(FileServer(payload)) as server:
        path = resolve("r", "head", url_source(server, "full", payload), None)
        assert path == torch_cache / "head.pth" and path.read_bytes() == payload
        assert resolve("r", "head", url_source(server, "full", payload), None) == path
    assert server.hits == 1 and os.listdir(torch_cache) == ["head.pth"]


@pytest.mark.parametrize(
    ("path", "overrides", "message"),
    [
        ("truncated", {"size": None}, "closed after 150000 of 300000 bytes"),  # dropped half way
        ("full", {"size": 1000}, "sent more than the expected 1000 bytes"),
        ("full", {"size": 400_000}, "has 300000 bytes, not 400000"),
        ("full", {"sha256": "0" * 64}, "wrong sha256"),
    ],
)
def test_url_download_that_fails_leaves_nothing(torch_cache, online, path, overrides, message):
    payload = os.urandom(300_000)
    with serve(FileServer(payload)) as server, pytest.raises(MissingWeightsError, match=message):
        resolve("r", "head", url_source(server, path, payload, **overrides), None)
    assert os.listdir(torch_cache) == []


def test_ctrl_c_during_a_url_download_leaves_nothing(torch_cache, tmp_path):
    """A real interruption: SIGINT to a process in the middle of a download."""
    payload = os.urandom(4 << 20)  # 256 pieces of 16 KiB, 0.05 s apart: about 13 s if not interrupted
    script = (  # Python's own Ctrl-C handler, even when the test runs where SIGINT is ignored (a background job)
        "import signal, sys, torch; from rewards.weights import WeightSource, resolve; torch.hub.set_dir(sys.argv[1]); "
        "signal.signal(signal.SIGINT, signal.default_int_handler); "
        "resolve('r', 'head', WeightSource(url=sys.argv[2], filename='head.pth', size=int(sys.argv[3])), None)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with serve(FileServer(payload)) as server:
        process = subprocess.Popen(
            [sys.executable, "-c", script, str(torch_cache.parent), server.url("slow"), str(len(payload))],
            env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.sending.wait(60), "the download did not start"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and "KeyboardInterrupt" in stderr
    assert os.listdir(torch_cache) == []


def test_a_damaged_cached_file_is_not_trusted(torch_cache, online, monkeypatch):
    """A file under the real name with the wrong size (say, copied by hand from a partial download) is fetched
    again, or, offline, reported."""
    payload = os.urandom(300_000)
    torch_cache.mkdir(parents=True)
    (torch_cache / "head.pth").write_bytes(payload[:1000])
    with serve(FileServer(payload)) as server:
        source = url_source(server, "full", payload)
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(MissingWeightsError, match=r"head\.pth has 1000 bytes, not 300000"):
            resolve("r", "head", source, None)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        assert resolve("r", "head", source, None).read_bytes() == payload


def test_reference_sources_are_pinned():
    """Every reference hub source names a commit, every URL source a commit, a size and a sha256; the two hub
    sources whose commit could not be confirmed offline are listed (their model cards say so)."""
    from rewards import aesthetic, clip, hps, imagereward, owlvit, pickscore, resnet

    hub = {
        "clip": clip.CLIP_VIT_L_14_SOURCE,
        "owlvit": owlvit.OWLVIT_SOURCE,
        "pickscore": pickscore.PICKSCORE_SOURCE,
        "imagereward tokenizer": imagereward.TOKENIZER_SOURCE,
        "resnet50 v1": resnet.SOURCES["v1"],
        **hps.SOURCES,
    }
    unpinned = {"imagereward model": imagereward.IMAGEREWARD_SOURCE, "resnet50 v2": resnet.SOURCES["v2"]}
    for name, source in hub.items():
        assert source.revision is not None and len(source.revision) == 40, name
        int(source.revision, 16)
    assert all(source.revision is None for source in unpinned.values())
    for source in (aesthetic.V1_HEAD_SOURCE, aesthetic.V2_HEAD_SOURCE):
        assert "/raw/main/" not in source.url and source.size and len(source.sha256) == 64


@pytest.mark.parametrize("family", ["transformers", "open_clip"])
def test_a_loaded_model_skips_the_random_initialisation_and_equals_one_initialised_first(tmp_path, family):
    """A model built for a strict load skips its random initialisation (seconds to tens of seconds for the CLIP-H
    rewards) and ends up identical to one initialised first: every parameter and buffer,
    including the non-persistent ones the state dict does not carry (position ids, attention masks)."""
    if family == "transformers":
        from transformers import CLIPModel

        from rewards.pickscore import pickscore_config

        factory, kwargs = CLIPModel, {"config": pickscore_config(tiny=True)}
    else:
        from open_clip.model import CLIP

        from rewards.hps import vit_h_14

        factory, kwargs = CLIP, vit_h_14(tiny=True)
    torch.manual_seed(0)
    reference = factory(**kwargs)
    torch.manual_seed(0)
    model = weights_mod.uninitialised(factory, **kwargs)
    linears = [name for name, module in reference.named_modules() if isinstance(module, nn.Linear)]
    assert linears and all(  # the initialisation did not run (with the same seed it would give the same values)
        not torch.equal(model.get_submodule(name).weight, reference.get_submodule(name).weight) for name in linears
    )
    load_state_dict_strict(model, reference.state_dict(), "test")
    for tensors in (lambda m: dict(m.named_parameters()), lambda m: dict(m.named_buffers())):
        expected, loaded = tensors(reference), tensors(model)
        assert loaded.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)
