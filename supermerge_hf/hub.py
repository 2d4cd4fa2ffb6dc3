"""The one place that talks to the Hub: `resolve` a source to a local folder at a commit, and `push_folder`."""

import fnmatch
import logging
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, errors, get_cached_repo_tree, snapshot_download

logger = logging.getLogger(__name__)

SAFE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PICKLE_WEIGHT_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json", "adapter_model.bin"]
CONFIG_AND_TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja"]  # *.json: configs, tokenizer


@dataclass(frozen=True)
class ResolvedSource:
    """A source as a local folder (a Hub cache snapshot); `commit`, `repo_id`, `revision` are `None` for a folder."""

    path: Path
    commit: str | None = None
    repo_id: str | None = None
    revision: str | None = None


def resolve(path_or_repo_id: str | Path, *, revision: str | None = None, token: str | bool | None = None,
            cache_dir: str | Path | None = None, endpoint: str | None = None,
            allow_pickle: bool = False) -> ResolvedSource:
    """A local folder (as is) or a Hub repo id as a local folder pinned to a commit: only its weights (pickle `.bin`
    with `allow_pickle`), config, tokenizer and adapter files are downloaded into `cache_dir` (or read from it
    offline). `token=None` reads the saved token, `False` sends none. Raises `FileNotFoundError` (no such folder,
    repo, revision, or not cached offline) and `ValueError` (`revision` for a folder, an invalid id, pickle only).
    """
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ValueError(f"`revision={revision!r}` was given for the local folder {str(local)!r}: revisions only "
                             "apply to Hub repos. Pass `revision=None`, or check out the wanted version yourself.")
        return ResolvedSource(path=local.resolve())
    repo_id = str(path_or_repo_id)
    if repo_id.startswith(("./", "../", "/", "~", ".\\")) or local.exists():
        raise FileNotFoundError(f"{repo_id!r} looks like a local path but is not a directory. Pass the folder that "
                                "holds the checkpoint (config.json, weights), or a Hub repo id such as 'user/model'.")
    host = endpoint or constants.ENDPOINT
    where = f"{repo_id!r} at revision {revision or constants.DEFAULT_REVISION!r} (endpoint {host})"
    patterns = SAFE_WEIGHT_PATTERNS + CONFIG_AND_TOKENIZER_PATTERNS + (PICKLE_WEIGHT_PATTERNS if allow_pickle else [])
    logger.debug("Resolving %s", where)
    try:
        path = Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                      endpoint=endpoint, allow_patterns=patterns))
    except errors.HFValidationError as e:
        raise ValueError(f"{repo_id!r} is neither an existing local folder nor a valid Hub repo id: {e}") from e
    except errors.RevisionNotFoundError as e:
        raise FileNotFoundError(f"Revision {revision!r} not found in Hub repo {repo_id!r} (endpoint {host}). Check "
                                "the branch, tag or commit sha (`HfApi().list_repo_refs(repo_id)` lists them).") from e
    except errors.RepositoryNotFoundError as e:
        raise FileNotFoundError(f"Hub repo {repo_id!r} not found at endpoint {host} (or private or gated without "
                                "access). Check the repo id, pass `token=` or `hf auth login`, or a folder.") from e
    except errors.LocalEntryNotFoundError as e:
        raise FileNotFoundError(f"Cannot resolve {where}: the Hub is unreachable (or HF_HUB_OFFLINE=1) and the files "
                                f"are not all cached. Run once online, pin `revision` to a sha. Cause: {e}") from e
    commit = path.name  # snapshot folders are named after the commit sha they hold
    if not allow_pickle:  # refuse pickle-only weights; the cache holds the repo's full file listing
        try:
            files = [f.path for f in get_cached_repo_tree(repo_id, revision=commit, cache_dir=cache_dir)]
        except errors.CachedRepoTreeNotFoundError:
            files = [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()]
        pickles = sorted(f for f in files if any(fnmatch.fnmatch(f, p) for p in PICKLE_WEIGHT_PATTERNS))
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise ValueError(f"Hub repo {repo_id!r} (commit {commit}) has only pickle .bin weights {pickles}, which "
                             "can run code when loaded. Pass `allow_pickle=True` only if you trust it, or convert it "
                             "to safetensors (load it and `save_pretrained` it).")
    logger.info("Resolved %r to commit %s (%s)", repo_id, commit, path)
    return ResolvedSource(path=path, commit=commit, repo_id=repo_id, revision=revision)


def repo_url(repo_id: str, endpoint: str | None = None) -> str:
    """The web address of a Hub model repo."""
    return f"{(endpoint or constants.ENDPOINT).rstrip('/')}/{repo_id}"


def push_folder(folder: str | Path, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                revision: str | None = None, commit_message: str | None = None, endpoint: str | None = None) -> str:
    """Upload a local folder to a Hub model repo, creating the repo (`private`) and the branch `revision` when
    missing; returns the commit sha (pass it as `revision=` to `resolve` to pull exactly this upload)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"Cannot push {str(folder)!r} to {repo_id!r}: it is not a directory.")
    api = HfApi(endpoint=endpoint, token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and revision != constants.DEFAULT_REVISION:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message)
    logger.info("Pushed %s to %s (commit %s)", folder, info.commit_url, info.oid)
    return info.oid
