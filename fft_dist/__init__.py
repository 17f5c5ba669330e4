"""fft-dist: distributed full-parameter fine-tuning."""
__version__ = "0.1.0"
