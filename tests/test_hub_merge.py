"""Pull sources by repo id at pinned revisions, merge, push, reload: against the Hub test double only (no network)."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import AutoModel, BertForSequenceClassification

from supermerge_hf import SuperMergeConfig, SuperMerger, load_task_model
from supermerge_hf.cli import main
from supermerge_hf.hub import push_folder, resolve
from tests.hub_server import HubServer, hub_server_fixture  # noqa: F401  (fixture `hub_server`)

from .conftest import family_examples, perturb, write_text_examples

TOKEN = "hf_merge_secret_token_456"
LEARN = {"steps": 4, "eval_every": 2, "batch_size": 4, "learning_rate": 0.3}
PROBE = torch.tensor([[2, 5, 9, 33, 3, 17]])
TASKS = ("sst", "nli")


def push_family(server: HubServer, family, *, private: bool = False) -> dict[str, tuple[str, str]]:
    """Push base and sources as `user/bert-<name>`; returns name -> (repo id, commit sha)."""
    return {name: (f"user/bert-{name}", push_folder(folder, f"user/bert-{name}", token=TOKEN, private=private,
                                                    endpoint=server.url))
            for name, folder in [("base", family.base), *family.sources.items()]}


def hub_config(repos: dict[str, tuple[str, str]], **kwargs) -> SuperMergeConfig:
    sources = [{"task": t, "path": repos[t][0], "revision": repos[t][1]} for t in TASKS]
    return SuperMergeConfig(base=repos["base"][0], base_revision=repos["base"][1], sources=sources, **LEARN | kwargs)


@torch.no_grad()
def body_hidden(path_or_repo_id: str | Path, **kwargs) -> torch.Tensor:
    return AutoModel.from_pretrained(path_or_repo_id, **kwargs).eval()(PROBE).last_hidden_state  # (1, T, 32)


@torch.no_grad()
def sst_logits(folder: Path) -> torch.Tensor:
    return load_task_model(folder, "sst")(PROBE).logits  # (1, 2): merged body + sst's own classifier


@contextlib.contextmanager
def debug_logs(caplog):
    """Every library's DEBUG records reach caplog (transformers' loggers do not propagate by default)."""
    names = ("supermerge_hf", "huggingface_hub", "transformers", "httpx2", "httpcore2")
    loggers = [logging.getLogger(name) for name in names]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.propagate = True
    try:
        with caplog.at_level(logging.DEBUG):
            yield
    finally:
        for lg, level, propagate in saved:
            lg.setLevel(level)
            lg.propagate = propagate


def assert_token_kept_secret(server: HubServer, tmp_path: Path, logs: str, since: int) -> None:
    """The server received the token on every request; no written file, pushed file or log line holds it."""
    sent = [r for r in server.requests[since:] if r.path != "/api/agent-harnesses"]
    assert sent and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in sent)
    assert logs and TOKEN not in logs
    local = [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]  # outputs, HF_HOME
    assert local == []
    pushed = [(repo.repo_id, path) for repo in server.repos.values() for commit in repo.commits.values()
              for path, content in commit.files.items() if TOKEN.encode() in content]
    assert pushed == []


def check_pushed_merge(server: HubServer, repo_id: str, oid: str, repos: dict[str, tuple[str, str]]) -> None:
    """supermerge_config.json and the card of the pushed merge record the resolved commits."""
    files = server.repos[repo_id].commits[oid].files
    info = json.loads(files["supermerge_config.json"])["merge_info"]
    assert info["base_commit"] == repos["base"][1]
    assert info["source_commits"] == {t: repos[t][1] for t in TASKS}
    model_card = ModelCard(files["README.md"].decode())
    assert model_card.data.base_model == [repos[t][0] for t in TASKS] and model_card.data.base_model_relation == "merge"
    assert all(sha in model_card.text for _, sha in repos.values())
    assert files["coefficients.png"].startswith(b"\x89PNG\r\n\x1a\n") and "](coefficients.png)" in model_card.text


def test_pull_pinned_merge_push_reload_matches_local(hub_server: HubServer, bert_family, tmp_path, caplog):
    repos = push_family(hub_server, bert_family)
    examples = family_examples(bert_family)
    since = len(hub_server.requests)
    with debug_logs(caplog):
        merger = SuperMerger(hub_config(repos), endpoint=hub_server.url, token=TOKEN).fit(examples)
        oid = merger.push_to_hub("user/merged", token=TOKEN)
    assert_token_kept_secret(hub_server, tmp_path, caplog.text, since)
    assert merger.resolved_base.commit == repos["base"][1]
    assert [r.commit for r in merger.resolved_sources] == [repos[t][1] for t in TASKS]
    check_pushed_merge(hub_server, "user/merged", oid, repos)

    local = SuperMerger(SuperMergeConfig(base=str(bert_family.base), sources=bert_family.source_list(), **LEARN))
    local.fit(examples).save_pretrained(str(tmp_path / "local"))
    assert torch.equal(merger.coefficients.values, local.coefficients.values)
    before = len(hub_server.requests)
    from_hub = body_hidden("user/merged", token=False)  # transformers downloads the repo id from the test double
    assert any(r.path == f"/user/merged/resolve/{oid}/model.safetensors" for r in hub_server.requests[before:])
    torch.testing.assert_close(from_hub, body_hidden(tmp_path / "local"), rtol=0, atol=0)
    pulled = resolve("user/merged", revision=oid, token=False, endpoint=hub_server.url).path  # body + heads/
    torch.testing.assert_close(sst_logits(pulled), sst_logits(tmp_path / "local"), rtol=0, atol=0)
    assert hub_server.unhandled == []


def test_later_source_commit_does_not_change_pinned_merge(hub_server: HubServer, bert_family, tmp_path):
    repos = push_family(hub_server, bert_family)
    examples = family_examples(bert_family)
    first = SuperMerger(hub_config(repos), endpoint=hub_server.url, token=False).fit(examples)

    newer = tmp_path / "sst-v2"
    perturb(BertForSequenceClassification.from_pretrained(bert_family.sources["sst"]), seed=7).save_pretrained(newer)
    new_sha = push_folder(newer, "user/bert-sst", token=TOKEN, endpoint=hub_server.url)
    assert new_sha != repos["sst"][1]

    again = SuperMerger(hub_config(repos), endpoint=hub_server.url, token=False).fit(examples)
    assert again.result.merge_info()["source_commits"]["sst"] == repos["sst"][1]
    assert again.result.merged.keys() == first.result.merged.keys()
    assert all(torch.equal(again.result.merged[n], t) for n, t in first.result.merged.items())
    # the same recipe following `main` does pick up the new commit (so the pin is what kept the merge unchanged)
    newest = {**repos, "sst": ("user/bert-sst", "main")}
    with pytest.raises(ValueError, match="start_lam"):  # the default learned over TSV-M components at a picked λ
        SuperMerger(hub_config(newest), endpoint=hub_server.url).apply_coefficients(first.coefficients)
    latest = SuperMerger(hub_config(newest, method_kwargs=first.chosen), endpoint=hub_server.url)  # that λ
    latest.apply_coefficients(first.coefficients)
    assert latest.result.merge_info()["source_commits"]["sst"] == new_sha
    assert not torch.equal(latest.result.merged["pooler.dense.weight"], first.result.merged["pooler.dense.weight"])


def test_cli_merge_push_to_hub_keeps_token_secret(hub_server: HubServer, bert_family, tmp_path, caplog, capsys):
    repos = push_family(hub_server, bert_family, private=True)  # private: nothing is pulled without the token
    recipe = hub_config(repos, output_dir="./merged").to_dict()
    recipe.pop("merge_info")
    for i, (source, task) in enumerate(zip(recipe["sources"], TASKS)):
        write_text_examples(tmp_path / f"{task}.jsonl", 16, bert_family.num_labels[task], seed=i)
        source["data"] = {"path": f"{task}.jsonl", "text_field": "text", "label_field": "label"}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    since = len(hub_server.requests)
    with debug_logs(caplog):  # the CLI reads the endpoint from huggingface_hub's constants, patched by the fixture
        code = main(["merge", str(tmp_path / "recipe.yaml"), "--push-to-hub", "user/cli-merge", "--token", TOKEN])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert TOKEN not in printed.out + printed.err
    assert_token_kept_secret(hub_server, tmp_path, caplog.text, since)
    oid = hub_server.repos["user/cli-merge"].branches["main"]
    check_pushed_merge(hub_server, "user/cli-merge", oid, repos)
    assert (tmp_path / "merged" / "coefficients.png").is_file()
    # written once, for the Hub (the card loads the repo id), then uploaded; the repo's address is printed
    assert caplog.text.count("Saved the merge to") == 1
    assert 'from_pretrained("user/cli-merge")' in (tmp_path / "merged" / "README.md").read_text()
    assert f"Pushed to {hub_server.url}/user/cli-merge" in printed.out
    with pytest.raises(FileNotFoundError, match="private or gated"):
        resolve(repos["sst"][0], revision=repos["sst"][1], token=False, endpoint=hub_server.url,
                cache_dir=tmp_path / "no_token_cache")


def test_reloading_a_merge_of_main_gets_the_commits_it_merged(hub_server: HubServer, bert_family, tmp_path):
    """A merge of sources at `main` is saved with their commits; `from_pretrained` pins them, so a later push to a
    source does not change the reloaded merge."""
    repos = push_family(hub_server, bert_family)
    following = {t: (repo, "main") for t, (repo, _) in repos.items()}
    config = hub_config(following)
    merger = SuperMerger(config, endpoint=hub_server.url, token=False).fit(family_examples(bert_family))
    merger.save_pretrained(tmp_path / "merged")
    newer = tmp_path / "sst-v2"
    perturb(BertForSequenceClassification.from_pretrained(bert_family.sources["sst"]), seed=7).save_pretrained(newer)
    push_folder(newer, "user/bert-sst", token=TOKEN, endpoint=hub_server.url)
    reloaded = SuperMerger.from_pretrained(tmp_path / "merged", token=False)
    assert reloaded.config.sources[0].revision == repos["sst"][1]
    assert all(torch.equal(reloaded.merged_tensors[n], t) for n, t in merger.merged_tensors.items())
