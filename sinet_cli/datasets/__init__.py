"""Dataset readers. Each produces a :class:`DatasetTable`."""

from .demo import load_demo
from .manifest import read_imagefolder, read_manifest
from .table import ClassTable, DatasetTable

__all__ = ["ClassTable", "DatasetTable", "load_demo", "read_imagefolder", "read_manifest"]
