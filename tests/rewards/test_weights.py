"""The shared weight resolver: file formats, strictness, hub ids, URL downloads (over file://)."""

import json

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
    with pytest.raises(MissingWeightsError, match=r"file 'w\.pth' of hub repo 'someone/other'.*not in the local cache"):
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
    with pytest.raises(MissingWeightsError, match=r"component .head.*sha256 mismatch"):
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


def test_partial_snapshot_in_cache_gives_the_full_offline_error(monkeypatch, tmp_path):
    """A cached snapshot holding only tokenizer files (common for SD users) is not taken for weights."""
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "tokenizer_config.json").write_text("{}")
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snapshot))
    with pytest.raises(MissingWeightsError) as info:
        resolve("aesthetic", "clip", WeightSource(repo_id="openai/clip-vit-large-patch14"), None)
    message = str(info.value)
    assert "holds no *.safetensors" in message and "hf download openai/clip-vit-large-patch14" in message
    assert "weights={'clip': 'DIR'}" in message


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
