"""supermerge_hf: merge fine-tunes of one base with learned per-tensor coefficients (SuperMerge)."""

from .coefficients import Coefficients
from .config import SourceConfig, SuperMergeConfig
from .merger import SuperMerger
from .methods import METHODS, get_method
from .outputs import load_task_model

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "Coefficients",
    "SourceConfig",
    "SuperMergeConfig",
    "SuperMerger",
    "get_method",
    "load_task_model",
]
