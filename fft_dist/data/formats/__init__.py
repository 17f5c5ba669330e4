"""Data formats: one module per format, each registering one :class:`Format` through :func:`register_format`.

Adding a format without forking: in your own module ::

    from fft_dist.data.formats import Format, register_format

    def encode(enc, batch, indices, out):  # one output row per example, through enc.emit*
        pairs = zip(enc.tokenize(batch["question"]), enc.tokenize(batch["answer"]))
        enc.emit_plain(out, list(pairs), windows=False)

    register_format(Format("qa", encode, fixed_columns={"question": str, "answer": str}))

then run with ``loss.plugins=[my_pkg.my_format] data.format=qa`` (a data group yaml of your own comes
with ``--config-dir``). The same plugin list that adds loss terms is imported on every rank before
the data is built. ``tests/support/plugins/toy_format.py`` is a worked example.
"""
from fft_dist.data.formats.registry import (  # noqa: F401 - the package's API
    OBJECTIVES,
    Format,
    all_formats,
    get_format,
    register_format,
    registered_formats,
)
from fft_dist.data.formats import text, prompt_completion, chat, tokenized, classification  # noqa: F401,E402 - built-ins

__all__ = ["OBJECTIVES", "Format", "all_formats", "get_format", "register_format", "registered_formats"]
