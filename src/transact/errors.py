"""The one exception type transact raises for bad input; the CLI prints its message without a traceback."""


class TransactError(ValueError):
    """Bad input or an impossible request, detected before (or instead of) long computation."""
