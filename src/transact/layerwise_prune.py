"""Where the layer-wise prune job lived before it moved to ``transact.jobs.prune_layerwise`` (and its loop to
``transact.core.layerwise``); its names stay importable from here."""

from transact.jobs.prune_layerwise import (
    PROGRESS,
    PROGRESS_FORMAT,
    SEQUENTIAL_DEFAULT,
    check_layerwise,
    sequential_of,
    work_dir,
)
from transact.jobs.prune_layerwise import run as run_layerwise_prune

__all__ = ["PROGRESS", "PROGRESS_FORMAT", "SEQUENTIAL_DEFAULT", "check_layerwise", "run_layerwise_prune",
           "sequential_of", "work_dir"]
