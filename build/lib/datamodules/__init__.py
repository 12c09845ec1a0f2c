"""Data: ViLT-format arrow files -> datasets, transforms and loaders (datamodules.prepare
writes them from the raw images and the Karpathy split JSON)."""
from datamodules.arrow import ArrowSplit, DataError, check_data_root, open_split

__all__ = ["ArrowSplit", "DataError", "check_data_root", "open_split"]
