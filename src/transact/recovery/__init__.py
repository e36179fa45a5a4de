"""Recovery between and after pruning shots (``transact run``): the training data stream, one training
phase, the resumable run state, the run loop, the helpers its processes share, and its report."""
