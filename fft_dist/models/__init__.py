"""One home per model family: what fft-dist needs to know about an architecture, asked of transformers first."""
