"""Deployment: llama.cpp's converter and runtime (``llamacpp``), and GGUF export checked against
transformers (``gguf``)."""
