"""One sharded-safetensors checkpoint format for every backend and world size.

The format (layout, key naming, index and manifest schemas, version) is documented in
:mod:`fft_dist.checkpoint.format`. Public API (functions marked *collective* are called by
every rank of the process group; the others run in one process):

- :func:`save_checkpoint` (collective): each rank writes its own fragments; rank 0 writes
  index.json, train_state.json and MANIFEST.json (last), renames ``step-N.tmp`` to ``step-N``,
  replaces ``latest`` atomically and prunes to ``keep_last``.
- :func:`find_resume`: ``'none'`` / ``'auto'`` / a path -> the checkpoint folder to resume.
- :func:`load_checkpoint` (collective): verify sizes and sha256, check names and shapes,
  ``strategy.load_fragments``, restore RNG; returns the saved ``train_state``.
- :class:`CheckpointReader`: a ``FragmentSource`` over a checkpoint (any range of any tensor).
- :class:`HFFolderSource` and :func:`load_pretrained` (collective): sharded load of a pretrained
  Hugging Face folder, each rank reading only the rows it owns.
- :func:`export_hf`: a Hugging Face folder (config, generation config, tokenizer, sharded
  safetensors + index), streamed tensor by tensor.
- :func:`verify_checkpoint` / :func:`checkpoint_info`: for ``fft-dist ckpt verify|info``.

Every failure is a :class:`CheckpointError` whose message names the file or tensor.
"""
from fft_dist.checkpoint.export import export_hf
from fft_dist.checkpoint.format import FORMAT_NAME, FORMAT_VERSION, CheckpointError
from fft_dist.checkpoint.hf_source import HFFolderSource, load_pretrained
from fft_dist.checkpoint.reader import (
    CheckpointReader,
    checkpoint_info,
    find_resume,
    is_complete,
    load_checkpoint,
    newest_complete,
    read_train_state,
    verify_checkpoint,
)
from fft_dist.checkpoint.writer import save_checkpoint

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointReader",
    "HFFolderSource",
    "checkpoint_info",
    "export_hf",
    "find_resume",
    "is_complete",
    "load_checkpoint",
    "load_pretrained",
    "newest_complete",
    "read_train_state",
    "save_checkpoint",
    "verify_checkpoint",
]
