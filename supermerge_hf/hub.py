"""The one place that talks to the Hugging Face Hub: resolve a source to a local folder, push a folder.

Everything else in supermerge_hf works on local paths: `resolve` turns a Hub repo id into a folder of the local cache
with one `snapshot_download` (safetensors, config, tokenizer and adapter files only), and records the commit it was
pinned to; `push_folder` uploads a folder with `HfApi`.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


logger = logging.getLogger(__name__)

SAFE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_WEIGHT_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin"]
# config.json, generation_config.json, adapter_config.json, tokenizer.json / vocab.json and friends are all `*.json`.
CONFIG_AND_TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


@dataclass(frozen=True)
class ResolvedSource:
    """A model or adapter source resolved to a local folder.

    Args:
        path (`Path`):
            Local folder holding the files (a snapshot folder of the Hub cache for Hub repos).
        commit (`str`, *optional*):
            Commit sha the files were taken from; `None` for a local folder.
        repo_id (`str`, *optional*):
            Hub repo id; `None` for a local folder.
        revision (`str`, *optional*):
            Revision as requested (branch, tag or commit sha); `None` for a local folder or the default branch.
    """

    path: Path
    commit: str | None = None
    repo_id: str | None = None
    revision: str | None = None


def resolve(
    path_or_repo_id: str | Path,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    allow_pickle: bool = False,
) -> ResolvedSource:
    """Resolve a local folder or a Hub repo id to a local folder, pinned to a commit.

    A local directory is returned as is. Anything else is a Hub model repo id: its weights (safetensors; pickle `.bin`
    only with `allow_pickle=True`), config, tokenizer and adapter files at `revision` are downloaded into the cache
    (nothing else), or read from it in offline mode (`HF_HUB_OFFLINE=1`).

    Args:
        path_or_repo_id (`str` or `Path`):
            A local folder, or a Hub repo id such as `"username/my-finetune"`.
        revision (`str`, *optional*):
            Branch, tag or commit sha of a Hub repo. Defaults to the default branch. Pin a commit sha for reproducible
            merges and for offline use. Must be `None` for a local folder.
        token (`str` or `bool`, *optional*):
            Hub token. `None` reads the locally saved token, `False` sends none.
        cache_dir (`str` or `Path`, *optional*):
            Hub cache folder. Defaults to `HF_HUB_CACHE`.
        endpoint (`str`, *optional*):
            Hub endpoint. Defaults to `HF_ENDPOINT` (https://huggingface.co).
        allow_pickle (`bool`, *optional*, defaults to `False`):
            Also download pickle `.bin` weights. Pickle files can run code when loaded: only for trusted repos.

    Returns:
        [`ResolvedSource`]: the local folder, with the resolved commit sha for Hub repos.

    Raises:
        `FileNotFoundError`:
            If a local-looking path is not a directory, the repo or revision does not exist (or is private and the
            token does not give access), or the files are not cached in offline mode.
        `ValueError`:
            If `revision` is given for a local folder, the id is neither a folder nor a valid repo id, or the repo has
            only pickle `.bin` weights and `allow_pickle=False`.
    """
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(
                f"`revision={revision!r}` was given for the local folder {str(local)!r}: revisions only apply to Hub "
                "repos. Pass `revision=None`, or check out the wanted version of the folder yourself."
            )
        return ResolvedSource(path=local.resolve())
    repo_id = str(path_or_repo_id)
    if repo_id.startswith(("./", "../", "/", "~", ".\\")) or local.exists():
        raise FileNotFoundError(
            f"{repo_id!r} looks like a local path but is not a directory. Pass the folder that holds the checkpoint "
            "(config.json and weights), or a Hub repo id such as 'username/model'."
        )

    endpoint_name = endpoint or constants.ENDPOINT
    patterns = SAFE_WEIGHT_PATTERNS + CONFIG_AND_TOKENIZER_PATTERNS + (PICKLE_WEIGHT_PATTERNS if allow_pickle else [])
    where = f"{repo_id!r} at revision {revision or constants.DEFAULT_REVISION!r} (endpoint {endpoint_name})"
    logger.debug("Resolving %s", where)
    try:
        folder = snapshot_download(
            repo_id, revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint, allow_patterns=patterns
        )
    except HFValidationError as e:
        raise ValueError(
            f"{repo_id!r} is neither an existing local folder nor a valid Hub repo id ('namespace/name'): {e}"
        ) from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(
            f"Revision {revision!r} not found in Hub repo {repo_id!r} (endpoint {endpoint_name}). Check the branch, "
            "tag or commit sha (list them with `HfApi().list_repo_refs(repo_id)`)."
        ) from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(
            f"Hub repo {repo_id!r} not found at endpoint {endpoint_name} (or it is private or gated and the token does "
            "not give access). Check the repo id, pass `token=` or log in with `hf auth login`, or pass a local folder."
        ) from e
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"Cannot resolve {where}: the Hub could not be reached (or offline mode HF_HUB_OFFLINE=1 is on) and the "
            "files are not complete in the local cache. Run once online to fill the cache, and pin `revision` to a "
            f"commit sha for offline use. Cause: {e}"
        ) from e

    path = Path(folder)
    commit = path.name  # snapshot folders are named after the commit sha they hold
    _check_weights(repo_id, path, commit, cache_dir, allow_pickle)
    logger.info("Resolved %r to commit %s (%s)", repo_id, commit, path)
    return ResolvedSource(path=path, commit=commit, repo_id=repo_id, revision=revision)


def _check_weights(repo_id: str, path: Path, commit: str, cache_dir: str | Path | None, allow_pickle: bool) -> None:
    """Refuse a repo whose only weights are pickle files, unless `allow_pickle`; the full listing is in the cache."""
    if allow_pickle:
        return
    try:
        repo_files = [f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir)]
    except CachedRepoTreeNotFoundError:
        repo_files = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
    has_safetensors = any(name.endswith(".safetensors") for name in repo_files)
    pickles = [name for name in repo_files if any(fnmatch.fnmatch(name, p) for p in PICKLE_WEIGHT_PATTERNS)]
    if pickles and not has_safetensors:
        raise ValueError(
            f"Hub repo {repo_id!r} (commit {commit}) has only pickle .bin weights ({', '.join(sorted(pickles))}), and "
            "pickle files can run arbitrary code when loaded. Pass `allow_pickle=True` only if you trust this repo, "
            "or convert it to safetensors first (load it and `save_pretrained` it)."
        )


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload the content of a local folder to a Hub model repo, creating the repo and branch when missing.

    Args:
        folder (`str` or `Path`):
            Local folder to upload (e.g. the output of `save_pretrained`).
        repo_id (`str`):
            Target repo id, such as `"username/my-merge"`.
        private (`bool`, *optional*):
            Visibility of a repo that gets created; `None` uses the namespace default. An existing repo is unchanged.
        token (`str` or `bool`, *optional*):
            Hub token with write access. `None` reads the locally saved token.
        revision (`str`, *optional*):
            Branch to commit to, created from the default branch when missing. Defaults to the default branch.
        commit_message (`str`, *optional*):
            Commit message. Defaults to `"Upload folder using huggingface_hub"`.
        endpoint (`str`, *optional*):
            Hub endpoint. Defaults to `HF_ENDPOINT` (https://huggingface.co).

    Returns:
        `str`: the sha of the commit created (pass it as `revision=` to `resolve` to pull exactly this upload).

    Raises:
        `FileNotFoundError`:
            If `folder` is not a directory.
        [`~huggingface_hub.errors.HfHubHTTPError`]:
            If the Hub refuses a request (e.g. no write access to the namespace).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot push {str(folder)!r} to {repo_id!r}: it is not a directory.")
    api = HfApi(endpoint=endpoint, token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None and revision != constants.DEFAULT_REVISION:
        api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_url.repo_id, folder_path=folder, revision=revision, commit_message=commit_message
    )
    logger.info("Pushed %s to %s (commit %s)", folder, info.commit_url, info.oid)
    return info.oid
