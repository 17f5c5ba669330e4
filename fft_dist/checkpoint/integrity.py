"""Is a checkpoint complete and uncorrupted? The cheap check (manifest + sizes + the metadata
files' specs), the full one (+ sha256 + the shards' headers against the index), and the summary
behind ``fft-dist ckpt info``."""
from __future__ import annotations

from pathlib import Path

from fft_dist.checkpoint import format as fmt
from fft_dist.checkpoint.format import CheckpointError
from fft_dist.checkpoint.layout import resolve_checkpoint
from fft_dist.checkpoint.safetensors_io import hash_file
from fft_dist.checkpoint.schema import check_agree, read_index, read_manifest, read_train_state_file


def check_files(path: Path, manifest: dict, *, checksums: bool, only: list[str] | None = None) -> list[str]:
    """Problems with the files a (validated) manifest lists: missing, wrong size, wrong sha256."""
    problems = []
    for rel in (list(manifest["files"]) if only is None else only):
        rec = manifest["files"][rel]
        f = Path(path) / rel
        if not f.is_file():
            problems.append(f"{f}: missing (listed in {fmt.MANIFEST_FILE})")
            continue
        size = f.stat().st_size
        if size != rec["size"]:
            what = "truncated" if size < rec["size"] else "too long"
            problems.append(f"{f}: {what}: {size} bytes, the manifest says {rec['size']}")
            continue
        if checksums:
            try:
                _, digest = hash_file(f)
            except OSError as e:
                problems.append(f"{f}: unreadable: {e.strerror or e}")
                continue
            if digest != rec["sha256"]:
                problems.append(f"{f}: sha256 mismatch (file changed or corrupted): {digest[:16]}..., "
                                f"the manifest says {rec['sha256'][:16]}...")
    return problems


def quick_problems(path: Path) -> list[str]:
    """The cheap check: a valid manifest, every file it lists present with its size, and a
    well-formed index and train state (JSON only; no hashing, no tensor data read)."""
    try:
        manifest = read_manifest(path)
        problems = check_files(path, manifest, checksums=False)
        if not problems:
            problems = _structure_problems(path, manifest)
        return problems
    except CheckpointError as e:
        return [str(e)]


def _structure_problems(path: Path, manifest: dict) -> list[str]:
    """The index (its spec, safe paths listed in the manifest, exact tiling), the train state (its
    spec, restorable RNG states) and their agreement, for a checkpoint whose files are all present."""
    try:
        index = read_index(path, manifest=manifest)
        state = read_train_state_file(path)
        check_agree(path, manifest, index, state)
    except CheckpointError as e:
        return [str(e)]
    return []


def shard_problems(path: Path, index: dict, manifest: dict) -> list[str]:
    """Do the shards hold what the index says? Every range's key with its length and dtype, and no
    tensor the index does not list (an index edited to drop one would export a model without it).
    Reads only the safetensors headers."""
    from safetensors import safe_open

    shards = sorted(f for f in manifest["files"] if f.endswith(".safetensors")
                    and f.split("/", 1)[0] in (fmt.MODEL_DIR, fmt.OPTIM_DIR))
    held: dict[str, dict[str, tuple[str, list[int]]]] = {}
    for file in shards:
        try:
            with safe_open(str(path / file), framework="pt") as h:
                held[file] = {k: (h.get_slice(k).get_dtype(), h.get_slice(k).get_shape()) for k in h.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            return [f"{path / file}: not a readable safetensors file: {str(e)[:200]}"]
    for name, t in index["tensors"].items():
        for kind, k in t["kinds"].items():
            want_dtype = fmt.safetensors_dtype(fmt.dtype_from_name(k["dtype"]))
            for start, stop, file, key in k["ranges"]:
                got = held.get(file, {}).get(key)
                if got != (want_dtype, [stop - start]):
                    found = "is missing" if got is None else f"is {got[0]} {got[1]}"
                    return [f"{path / file}: {key} {found}; {fmt.INDEX_FILE} says {want_dtype} [{stop - start}] "
                            f"({name} ({kind}) {start}..{stop})"]
    for file, keys in held.items():
        for key in keys:
            name = key.rsplit(fmt.KEY_SEP, 2)[0]
            if name not in index["tensors"]:
                return [f"{path / file}: holds tensor {name} ({key}), which {fmt.INDEX_FILE} does not list"]
    return []


def is_complete(path: Path) -> bool:
    """True when :func:`quick_problems` finds nothing: what resume and pruning call *intact*."""
    return not quick_problems(path)


def verify_checkpoint(path: Path, *, checksums: bool = True) -> list[str]:
    """Every problem with a checkpoint (empty list: complete, every checksum matches, index and
    train state well-formed, the shards hold what the index says). `path` may be a step-N folder, a
    checkpoint root or its ``latest``."""
    try:
        path = resolve_checkpoint(path)
        manifest = read_manifest(path)
    except CheckpointError as e:
        return [str(e)]
    problems = check_files(path, manifest, checksums=checksums) or _structure_problems(path, manifest)
    return problems or shard_problems(path, read_index(path, manifest=manifest), manifest)


def checkpoint_info(path: Path) -> dict:
    """Step, backend, world size, tensors and bytes of a checkpoint (validated; no hashing)."""
    path = resolve_checkpoint(path)
    manifest = read_manifest(path)
    state = read_train_state_file(path)
    index = read_index(path, manifest=manifest)
    check_agree(path, manifest, index, state)
    tensors = index["tensors"]
    kinds: dict[str, int] = {}
    param_elems = 0
    for t in tensors.values():
        param_elems += fmt.numel(t["shape"])
        for kind in t["kinds"]:
            kinds[kind] = kinds.get(kind, 0) + 1
    files = manifest["files"]
    model_bytes = sum(r["size"] for f, r in files.items() if f.startswith(fmt.MODEL_DIR + "/"))
    optim_bytes = sum(r["size"] for f, r in files.items() if f.startswith(fmt.OPTIM_DIR + "/"))
    return {
        "path": str(path), "step": state["step"], "backend": state["backend"],
        "world_size": state["world_size"], "format_version": state["format_version"],
        "fft_dist_version": state["fft_dist_version"], "created": state["created"],
        "tensors": len(tensors), "parameters": param_elems, "state_kinds": kinds,
        "model_bytes": model_bytes, "optim_bytes": optim_bytes,
        "bytes": sum(r["size"] for r in files.values()), "files": len(files),
        "complete": not check_files(path, manifest, checksums=False),
        "train_state": state["train_state"],
    }
