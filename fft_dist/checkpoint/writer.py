"""The write phase of a save: one rank streams what it staged into its own safetensors files.

Each rank writes ``model/`` and ``optim/`` shards into the save's temporary folder; every byte is
hashed while it is written and each file is fsynced (:func:`write_safetensors`), so the commit
needs no second pass over the data. With ``checkpoint.async_save`` this runs in the rank's background
writer thread, on the staging buffer's copy. The fault points of this phase (``mid_model_shard``,
``after_model_shards``, ``after_optim_shards``) are where the crash-safety tests kill a rank.

Why not ``torch.distributed.checkpoint`` (DCP) with ``HuggingFaceStorageWriter``: DCP names files
``shard-0000r-model-0000k-of-0000n.safetensors`` in one folder (not model/ + optim/ per rank),
keeps its own offset metadata in the safetensors header rather than our index, would make us
describe our uneven 1-D ranges as ShardedTensor/DTensor chunks for its planner, pickles plans
through gather_object, and writes files without a checksum, so every byte would have to be read
back to hash it. Writing 1-D ranges is simple with the safetensors layout, and hashing while
writing saves the extra pass. Every file we write is an ordinary safetensors file that
``safe_open`` reads.
"""
from __future__ import annotations

from pathlib import Path

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.faults import fault_point
from fft_dist.checkpoint.safetensors_io import write_safetensors
from fft_dist.checkpoint.stage import Staged, check_finite


def write_shards(staged: Staged, tmp: Path) -> list[dict]:
    """Write this rank's model and optimizer shards into `tmp`; returns their {path, size, sha256}
    records for the manifest. Local (no collective): errors go to the caller, which shares them.
    NaN/inf in what was staged is refused first (:func:`check_finite`), before a byte is written."""
    check_finite(staged)
    meta = {"format": "pt", "fft_dist_format": str(fmt.FORMAT_VERSION), "rank": str(staged.rank),
            "world_size": str(staged.world), "step": str(staged.step)}
    step = staged.step
    mid = len(staged.model_items) // 2

    def model_hook(i: int) -> None:
        if i == mid:
            fault_point("mid_model_shard", step)

    records = [write_safetensors(tmp / staged.model_file, staged.model_items, metadata=meta, rel=staged.model_file,
                                 on_tensor=model_hook)]
    fault_point("after_model_shards", step)
    records.append(write_safetensors(tmp / staged.optim_file, staged.optim_items, metadata=meta,
                                     rel=staged.optim_file))
    fault_point("after_optim_shards", step)
    return [r.__dict__ for r in records]
