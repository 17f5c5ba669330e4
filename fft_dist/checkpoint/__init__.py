"""One sharded-safetensors checkpoint format for every backend and world size.

The format (layout, key naming, index and manifest schemas, version, damaged checkpoints,
path rules) is documented in :mod:`fft_dist.checkpoint.format`. Public API (functions marked
*collective* are called by every rank of the process group; the others run in one process).
Wherever a checkpoint path is taken, it may be a ``step-N`` folder, a checkpoint root or the
root's ``latest`` file (:func:`resolve_checkpoint`).

- :func:`check_writable`: create the checkpoint root and prove it is writable, before training.
- :class:`Checkpointer` (collective): a run's saves, as phases (stage, write, commit) on a process
  group of its own, with ``save`` / ``wait`` / ``close``; it keeps the run's last and best
  checkpoints and returns each save's timings (:class:`SaveResult`).
- :func:`save_checkpoint` (collective): a one-off save. Each rank writes its own fragments; rank 0 writes
  index.json, train_state.json and MANIFEST.json (last, naming the run), renames
  ``step-N.<run id>.tmp`` to ``step-N``, replaces ``latest`` atomically and prunes this run's
  checkpoints to ``keep_last`` intact ones (``protect`` keeps named ones). Refuses NaN/inf and an
  existing ``step-N``; a failed save removes its temporary folder.
- :func:`find_resume`: ``'none'`` / ``'auto'`` / a path -> the checkpoint folder to resume by the
  cheap check; ``auto`` picks the newest intact one, skips damaged ones with a warning and refuses
  when none is intact. :func:`choose_verified` (collective) also hashes it, falling back to the
  next older intact one; :func:`clear_the_way` keeps a resumed run from saving over newer folders.
- :mod:`.ownership`: what fft-dist made (run ids in manifests, names and markers) and
  :func:`~fft_dist.checkpoint.ownership.remove`, the only function that deletes.
- :func:`load_checkpoint` (collective): verify sizes and sha256, check names and shapes,
  ``strategy.load_fragments``, restore RNG; returns the saved ``train_state``.
- :class:`CheckpointReader`: a ``FragmentSource`` over a checkpoint (any range of any tensor).
- :class:`HFFolderSource` and :func:`load_pretrained` (collective): sharded load of a pretrained
  Hugging Face folder, each rank reading only the rows it owns.
- :func:`export_hf`: a Hugging Face folder (config, generation config, tokenizer, sharded
  safetensors + index), streamed tensor by tensor, swapped into place only when complete.
- :func:`verify_checkpoint` / :func:`checkpoint_info`: for ``fft-dist ckpt verify|info``.

Every failure is a :class:`CheckpointError` whose message names the file or tensor.
"""
from fft_dist.checkpoint.export import ExportTargetError, export_hf
from fft_dist.checkpoint.format import FORMAT_NAME, FORMAT_VERSION, CheckpointError
from fft_dist.checkpoint.hf_source import HFFolderSource, load_pretrained
from fft_dist.checkpoint.integrity import checkpoint_info, is_complete, verify_checkpoint
from fft_dist.checkpoint.layout import check_writable, resolve_checkpoint
from fft_dist.checkpoint.reader import CheckpointReader, load_checkpoint, read_train_state
from fft_dist.checkpoint.resume import choose_verified, clear_the_way, find_resume, newest_complete
from fft_dist.checkpoint.checkpointer import Checkpointer, SaveResult, SaveTimings, save_checkpoint

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointReader",
    "Checkpointer",
    "ExportTargetError",
    "HFFolderSource",
    "check_writable",
    "checkpoint_info",
    "choose_verified",
    "clear_the_way",
    "export_hf",
    "find_resume",
    "is_complete",
    "load_checkpoint",
    "load_pretrained",
    "newest_complete",
    "read_train_state",
    "resolve_checkpoint",
    "SaveResult",
    "SaveTimings",
    "save_checkpoint",
    "verify_checkpoint",
]
