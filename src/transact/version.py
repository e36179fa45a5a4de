"""The package version and the library versions recorded with every plan and report."""

from __future__ import annotations

import platform

__version__ = "0.1.0"


def library_versions() -> dict[str, str]:
    """transact, torch, transformers and Python versions, as plan.json and report.json record them."""
    import torch
    import transformers

    return {"transact": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
