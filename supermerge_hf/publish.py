"""`PushMixin`: how `SuperMerger` writes from one process and pushes to the Hub (as transformers' `PushToHubMixin`).

It reads what the façade holds (`result` through `_done()`, `plan`, `config`, `method`, `accelerator`, `_hub`) and
writes nothing into it."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .export import check_adapter_export, save_combined_adapter, save_merge
from .hub import push_folder, repo_url

logger = logging.getLogger(__name__)


class PushMixin:
    """Writing on the main process only, and `push_to_hub` / `push_adapter_to_hub`."""

    def _on_main(self, write: Callable[[], Any]) -> Any:
        """`write()` on the main process only (one writer), the others waiting for it; its result there."""
        out = write() if self.accelerator is None or self.accelerator.is_main_process else None
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        return out

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    revision: str | None = None, commit_message: str | None = None) -> str | None:
        """Save the merge for the Hub (as `save_pretrained(push_to_hub=True)` does, in a temporary folder) and
        upload it to the model repo `repo_id` (created with `private` if missing) on branch `revision`; `token` is
        never logged or written. Returns the commit sha (`None` on the other processes of a multi-process run)."""
        result = self._done()
        return self._push(lambda folder: save_merge(result, folder, repo_id=repo_id), repo_id, commit_message,
                          private=private, token=token, revision=revision)

    def push_adapter_to_hub(self, repo_id: str, *, rank: int | None = None, private: bool | None = None,
                            token: str | bool | None = None, revision: str | None = None) -> str | None:
        """Save the combined LoRA or IA³ adapter (as `save_adapter` does) and upload it; see `push_to_hub`."""
        result = self._done()
        check_adapter_export(self.plan, self.config, self.method)
        return self._push(lambda folder: save_combined_adapter(result, folder, rank=rank, repo_id=repo_id), repo_id,
                          f"Upload combined adapter of {', '.join(self.plan.tasks)}", private=private,
                          token=token, revision=revision)

    def _push(self, save: Callable[[Path], Path], repo_id: str, message: str | None, **hub: Any) -> str | None:
        def push() -> str:
            with tempfile.TemporaryDirectory() as tmp:
                return self._upload(save(Path(tmp) / "out"), repo_id, commit_message=message, **hub)

        return self._on_main(push)

    def _upload(self, folder: str | Path, repo_id: str, *, private: bool | None = None,
                token: str | bool | None = None, revision: str | None = None,
                commit_message: str | None = None) -> str:
        message = commit_message or f"Upload {self.config.method} merge of {', '.join(self.plan.tasks)}"
        sha = push_folder(folder, repo_id, private=private, token=token if token is not None else self._hub["token"],
                          revision=revision, commit_message=message, endpoint=self._hub["endpoint"])
        logger.info("Pushed the merge to %s", repo_url(repo_id, self._hub["endpoint"]))
        return sha
