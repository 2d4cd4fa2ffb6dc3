"""The built-in `supermerge demo`: offline tasks from PyPI packages, the fine-tuning recipe, and the command."""
