"""What identifies a measurement: the machine it ran on, a fingerprint of the model's files, and a short label for
each model in tables and plots."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

import torch

from transact.io.models import ModelSource

RESULT_FORMAT = 1


def machine() -> dict:
    device = {"device": "cpu"}
    if torch.cuda.is_available():
        device = {"device": "cuda", "gpu": torch.cuda.get_device_name()}
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), **device}


def fingerprint(source: ModelSource) -> str:
    """Identifies a model's files (config and weight file names and sizes) without hashing gigabytes."""
    h = hashlib.sha256(source.spec.encode())
    folder = Path(source.path)
    if source.gguf_file:
        names = [source.gguf_file]
    else:
        names = ["config.json", *sorted(p.name for p in folder.glob("*.safetensors"))]
    for name in names:
        path = folder / name
        if path.is_file():
            h.update(name.encode())
            h.update(str(path.stat().st_size).encode())
            if name == "config.json":
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def model_label(spec: str, taken: set[str]) -> str:
    """A short unique name for a model in tables and plots: the directory or file name."""
    label = spec.split(":", 1)[1] if spec.startswith("builtin:") else Path(spec.rstrip("/")).name or spec
    base, n = label, 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    taken.add(label)
    return label
