"""The DeciLM / Nemotron-NAS layout (per-layer widths): configuration and modeling files of the project's own,
copied beside every checkpoint saved in this layout (see ``transact.io.per_layer``)."""
