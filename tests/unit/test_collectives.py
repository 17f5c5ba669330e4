"""Device-correct collectives (issue #17): under NCCL only CUDA tensors have a backend, so a CPU tensor
(the RNG state FSDP's rank-0 build broadcasts) crashed the first GPU run. Every tensor collective goes
through fft_dist/dist.py's helpers, which put the tensor on the device the group serves.
"""
from __future__ import annotations

import ast

from helpers import REPO


COLLECTIVES = {"broadcast", "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
               "all_to_all", "all_to_all_single", "broadcast_object_list", "all_gather_object",
               "gather_object", "scatter_object_list"}


def direct_collective_calls() -> list[str]:
    """`dist.<collective>(...)` / `torch.distributed.<collective>(...)` anywhere in the package but dist.py."""
    found = []
    for path in sorted((REPO / "fft_dist").rglob("*.py")):
        if path == REPO / "fft_dist" / "dist.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                owner = ast.unparse(node.func.value)
                if owner in ("dist", "torch.distributed", "_dist"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}: {ast.unparse(node.func)}")
    return found


def test_every_tensor_collective_goes_through_the_helpers_in_dist_py():
    assert direct_collective_calls() == []
