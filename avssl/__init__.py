"""avssl: audio-visual self-supervised speech representation learning on Ray, tracked in MLflow."""

__version__ = "0.1.0"
