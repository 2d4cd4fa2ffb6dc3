"""supermerge_hf.hub against the Hub test double of tests/hub_server.py (no network)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

from tests.hub_server import HubServer, hub_server_fixture, isolate_client  # noqa: F401  (fixture `hub_server`)
from supermerge_hf.hub import ResolvedSource, push_folder, resolve


REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_secret_test_token_123"
INPUT_IDS = [[1, 5, 9, 33, 2, 63, 7, 0]]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A saved tiny random BERT (plus a non-model file that `resolve` must skip) and its output on INPUT_IDS."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64)
    model = BertModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(folder)
    (folder / "optimizer.pt").write_bytes(b"not a weight file")
    with torch.no_grad():
        hidden = model(torch.tensor(INPUT_IDS)).last_hidden_state  # (1, T, 32)
    return folder, hidden


def _hidden(path: str | Path, **kwargs) -> torch.Tensor:
    model = AutoModel.from_pretrained(path, **kwargs).eval()
    with torch.no_grad():
        return model(torch.tensor(INPUT_IDS)).last_hidden_state  # (1, T, 32)


def _run_python(code: str, **env: str) -> str:
    """Run `code` in a fresh interpreter (huggingface_hub reads HF_* variables at import) and return its stdout."""
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    result = subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_push_then_resolve_pinned_revision(hub_server: HubServer, tiny_bert, tmp_path):
    folder, reference = tiny_bert
    oid = push_folder(folder, "user/tiny-bert", token=TOKEN, endpoint=hub_server.url, commit_message="tiny")
    assert oid == hub_server.repos["user/tiny-bert"].branches["main"]

    source = resolve("user/tiny-bert", revision=oid, token=TOKEN, endpoint=hub_server.url)
    assert source == ResolvedSource(path=source.path, commit=oid, repo_id="user/tiny-bert", revision=oid)
    # weights and config only: no .gitattributes, no optimizer state
    assert sorted(p.name for p in source.path.iterdir()) == ["config.json", "model.safetensors"]
    assert (source.path / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    torch.testing.assert_close(_hidden(source.path), reference, rtol=0, atol=0)

    # a later commit moves `main` but not a pull pinned to the first commit
    changed = tmp_path / "changed"
    torch.manual_seed(1)
    BertModel(BertConfig.from_pretrained(folder)).save_pretrained(changed)
    (changed / "README.md").write_text("---\nlicense: apache-2.0\n---\n# changed\n")
    new_oid = push_folder(changed, "user/tiny-bert", token=TOKEN, endpoint=hub_server.url)
    assert new_oid != oid
    assert any(r.path == "/api/validate-yaml" for r in hub_server.requests)  # README.md metadata is checked first
    assert resolve("user/tiny-bert", token=TOKEN, endpoint=hub_server.url).commit == new_oid
    pinned = resolve("user/tiny-bert", revision=oid, token=TOKEN, endpoint=hub_server.url)
    assert pinned.path == source.path
    assert (pinned.path / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert "README.md" not in {p.name for p in resolve("user/tiny-bert", endpoint=hub_server.url).path.iterdir()}


def test_push_to_new_branch_leaves_main(hub_server: HubServer, tiny_bert, tmp_path):
    folder, _ = tiny_bert
    main_oid = push_folder(folder, "user/branchy", token=TOKEN, endpoint=hub_server.url)
    (extra := tmp_path / "extra").mkdir()
    (extra / "config.json").write_text(json.dumps({"note": "dev"}))
    dev_oid = push_folder(extra, "user/branchy", token=TOKEN, revision="dev", endpoint=hub_server.url)
    repo = hub_server.repos["user/branchy"]
    assert repo.branches == {"main": main_oid, "dev": dev_oid}
    assert repo.commits[dev_oid].parent == main_oid
    assert resolve("user/branchy", revision="dev", endpoint=hub_server.url).commit == dev_oid


def test_token_is_sent_but_never_written_or_logged(hub_server: HubServer, tiny_bert, tmp_path, caplog):
    folder, _ = tiny_bert
    # transformers' loggers do not propagate to the root logger that caplog listens on
    names = ("supermerge_hf", "huggingface_hub", "transformers", "httpx2", "httpcore2")
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.propagate = True
    try:
        with caplog.at_level(logging.DEBUG):
            oid = push_folder(folder, "user/secret", token=TOKEN, private=True, endpoint=hub_server.url)
            source = resolve("user/secret", revision="main", token=TOKEN, endpoint=hub_server.url)
            _hidden(source.path)
    finally:
        for lg, level, propagate in saved:
            lg.setLevel(level)
            lg.propagate = propagate
    assert source.commit == oid
    assert hub_server.repos["user/secret"].private
    sent = [r for r in hub_server.requests if r.path != "/api/agent-harnesses"]
    assert sent and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in sent)
    assert caplog.records and TOKEN not in caplog.text
    written = [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert written == []
    # without the token the private repo is invisible (with a fresh cache: snapshot_download falls back to a cached
    # copy when the Hub answers 401/404)
    with pytest.raises(FileNotFoundError, match="private or gated"):
        resolve("user/secret", token=False, endpoint=hub_server.url, cache_dir=tmp_path / "other_cache")


def test_offline_resolve_from_cache_after_server_stopped(tiny_bert, tmp_path, monkeypatch):
    folder, reference = tiny_bert
    with HubServer() as server:
        isolate_client(monkeypatch, tmp_path / "hf_home", server.url)
        oid = push_folder(folder, "user/offline", token=TOKEN, endpoint=server.url)
        online = resolve("user/offline", revision=oid, token=TOKEN, endpoint=server.url)
    code = f"""
import json, torch
from transformers import AutoModel
from supermerge_hf.hub import resolve
source = resolve("user/offline", revision="{oid}")
model = AutoModel.from_pretrained(source.path).eval()
with torch.no_grad():
    hidden = model(torch.tensor({INPUT_IDS})).last_hidden_state
try:
    resolve("user/never-downloaded", revision="{oid}")
    missing = None
except FileNotFoundError as e:
    missing = str(e)
print(json.dumps({{"path": str(source.path), "commit": source.commit, "hidden": hidden.tolist(), "missing": missing}}))
"""
    out = json.loads(_run_python(code, HF_HUB_OFFLINE="1").strip().splitlines()[-1])
    assert out["commit"] == oid and out["path"] == str(online.path)
    torch.testing.assert_close(torch.tensor(out["hidden"]), reference, rtol=0, atol=1e-6)
    assert out["missing"].startswith("Cannot resolve 'user/never-downloaded'") and "HF_HUB_OFFLINE=1" in out["missing"]


def test_resolve_errors(hub_server: HubServer, tiny_bert, tmp_path):
    folder, _ = tiny_bert
    push_folder(folder, "user/exists", token=TOKEN, endpoint=hub_server.url)
    url = hub_server.url
    with pytest.raises(FileNotFoundError, match=rf"'user/missing' not found at endpoint {url}.*Check the repo id"):
        resolve("user/missing", token=False, endpoint=url)
    with pytest.raises(FileNotFoundError, match=r"Revision 'v9' not found in Hub repo 'user/exists'"):
        resolve("user/exists", revision="v9", token=False, endpoint=url)
    with pytest.raises(FileNotFoundError, match=r"Revision '0{40}' not found"):
        resolve("user/exists", revision="0" * 40, token=False, endpoint=url)

    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, buffer)
    config = (folder / "config.json").read_bytes()
    hub_server.commit_files("user/pickled", {"config.json": config, "pytorch_model.bin": buffer.getvalue()})
    match = r"'user/pickled' .* has only pickle \.bin weights.*allow_pickle=True.*safetensors"
    with pytest.raises(ValueError, match=match):
        resolve("user/pickled", token=False, endpoint=url)
    trusted = resolve("user/pickled", token=False, endpoint=url, allow_pickle=True)
    assert sorted(p.name for p in trusted.path.iterdir()) == ["config.json", "pytorch_model.bin"]


def test_resolve_local_paths(tiny_bert, tmp_path):
    folder, _ = tiny_bert
    assert resolve(folder) == ResolvedSource(path=folder.resolve())
    with pytest.raises(ValueError, match="revision='main'.*local folder"):
        resolve(folder, revision="main")
    with pytest.raises(FileNotFoundError, match="looks like a local path but is not a directory"):
        resolve("./no/such/folder")
    with pytest.raises(ValueError, match="neither an existing local folder nor a valid Hub repo id"):
        resolve("not/a/valid/id")
    with pytest.raises(FileNotFoundError, match="looks like a local path but is not a directory"):
        resolve(folder / "config.json")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        push_folder(tmp_path / "missing", "user/x", endpoint="http://127.0.0.1:9")


def test_transformers_from_pretrained_repo_id(hub_server: HubServer, tiny_bert, tmp_path):
    """transformers downloads from the server: in-process (patched constants) and in a subprocess (HF_ENDPOINT)."""
    folder, reference = tiny_bert
    oid = push_folder(folder, "user/tf-load", token=TOKEN, endpoint=hub_server.url)
    torch.testing.assert_close(_hidden("user/tf-load", revision=oid, token=False), reference, rtol=0, atol=0)

    before = len(hub_server.requests)
    code = f"""
import json, torch
from transformers import AutoModel
model = AutoModel.from_pretrained("user/tf-load", token=False).eval()
with torch.no_grad():
    print(json.dumps(model(torch.tensor({INPUT_IDS})).last_hidden_state.tolist()))
"""
    # a fresh HF_HOME, so that the weights really come from the server
    out = _run_python(code, HF_ENDPOINT=hub_server.url, HF_HOME=str(tmp_path / "fresh_home"))
    torch.testing.assert_close(torch.tensor(json.loads(out.strip().splitlines()[-1])), reference, rtol=0, atol=1e-6)
    fetched = {r.path for r in hub_server.requests[before:] if r.method == "GET"}
    assert f"/user/tf-load/resolve/{oid}/model.safetensors" in fetched
    assert hub_server.unhandled == []
