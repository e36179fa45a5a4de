"""Where ``transact export``'s job and the llama.cpp agreement check lived before they moved to
``transact.jobs.export`` and ``transact.deploy.agreement``; their names stay importable from here."""

from transact.deploy.agreement import TOLERANCE, VERIFY_PROMPTS, compare_predictions
from transact.jobs.export import ExportResult, GgufExportJob, check_gguf_output
from transact.jobs.export import run as run_gguf_export

__all__ = ["TOLERANCE", "VERIFY_PROMPTS", "ExportResult", "GgufExportJob", "check_gguf_output", "compare_predictions",
           "run_gguf_export"]
