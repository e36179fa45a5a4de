"""The jobs behind the command line, one module per command: ``prune`` (with ``prune_layerwise`` for
``--layerwise``), ``apply_plan``, ``info``, ``eval``, ``bench``, ``compare``, ``export``, ``run``, ``teach``.

Each module has its job value (``PruneJob``, ``EvalJob`` ...), ``run(job)`` that checks every input before any
weights are read and does the work, and a result whose ``summary()`` is the text the command prints. The
libraries they call (``core``, ``io``, ``measure``, ``recovery``, ``deploy``) know nothing of jobs.
"""
