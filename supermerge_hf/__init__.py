"""supermerge_hf: merge fine-tunes of one base with learned per-tensor coefficients (SuperMerge)."""

from importlib.metadata import PackageNotFoundError, version

from .checkpoint import PickleCheckpointError
from .config import HierarchicalConfig, SourceConfig, SuperMergeConfig
from .data import read_examples
from .export import load_task_model
from .generative import read_generative, tokenize_examples
from .merger import SuperMerger
from .methods import METHODS, Hyperparameter, get_method, register_method
from .results import Coefficients
from .sources import IncompatibleSourceError

try:
    __version__ = version("supermerge_hf")
except PackageNotFoundError:  # a source checkout that is not installed
    __version__ = "0.0.0"

__all__ = [
    "METHODS", "Coefficients", "HierarchicalConfig", "Hyperparameter", "IncompatibleSourceError",
    "PickleCheckpointError", "SourceConfig", "SuperMergeConfig", "SuperMerger", "get_method", "load_task_model",
    "read_examples", "read_generative", "register_method", "tokenize_examples",
]
