"""Data: ViLT-format arrow files -> datasets, transforms and loaders."""
from datamodules.arrow import ArrowSplit, DataError, check_data_root, open_split

__all__ = ["ArrowSplit", "DataError", "check_data_root", "open_split"]
