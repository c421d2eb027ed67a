"""Core of the SD3.5 FP8 project: the one loader, the FP8 compute paths, GPU stats and image metrics."""
