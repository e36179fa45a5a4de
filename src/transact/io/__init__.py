"""What goes in and out: model sources and loading, offline assets, text, files written atomically, and
checkpoints."""
