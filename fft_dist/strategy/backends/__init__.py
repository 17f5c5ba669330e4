"""The built-in backends, one module each; importing this package registers them in this order
(the order of the estimate table's rows)."""
from fft_dist.strategy.backends import none, fsdp, hsdp, zero  # noqa: F401 - imported to register
