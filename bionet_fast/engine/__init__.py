"""Engine: the trainer, checkpoint I/O, memory measurement, and inference (tiling, loading for
inference, output writers). Imports models, blocks, data, metrics and utils; never the CLIs."""
