"""Learn coefficients on the tiny BERT family; run under torchrun. Writes num_processes and coefficients."""

import json
import sys

import torch
from accelerate import Accelerator

from supermerge_hf import SuperMergeConfig, SuperMerger


def main(config_path: str, examples_path: str, out_path: str) -> None:
    accelerator = Accelerator(cpu=True)
    config = SuperMergeConfig.from_file(config_path)
    examples = torch.load(examples_path)
    merger = SuperMerger(config, accelerator=accelerator).fit(examples)
    merger.save_pretrained()  # every process calls it; only the main process writes
    if accelerator.is_main_process:
        result = {"num_processes": accelerator.num_processes, "raw": merger.coefficients.raw.tolist()}
        with open(out_path, "w") as f:
            json.dump(result, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group before exit


if __name__ == "__main__":
    main(*sys.argv[1:4])
