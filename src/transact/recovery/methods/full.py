"""Full fine-tuning: every parameter of the pruned model trains on the next-token loss of the training blocks."""

from __future__ import annotations

from transact.recovery.methods import RecoveryMethod, register_method

METHOD = register_method(RecoveryMethod(
    "full", "every parameter trains on the next-token loss (the default)", lighter=("lora",)))
