"""Learn with a learning-state checkpoint and kill this process with SIGKILL in the middle of step KILL_AT."""

import os
import signal
import sys

import torch

from supermerge_hf import SuperMergeConfig, SuperMerger
from supermerge_hf.functional import FunctionalMerge


def main(config_path: str, examples_path: str, kill_at: str) -> None:
    calls, original = [0], FunctionalMerge.coefficient_grad

    def coefficient_grad(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, *args, **kwargs)

    FunctionalMerge.coefficient_grad = coefficient_grad
    SuperMerger(SuperMergeConfig.from_file(config_path)).fit(torch.load(examples_path))


if __name__ == "__main__":
    main(*sys.argv[1:4])
