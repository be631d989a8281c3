"""Find model weights: a local directory, the Hugging Face cache, or a download that fails fast."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from captionkit.errors import ModelNotFoundError, ModelUnavailableError

REACHABILITY_TIMEOUT_S = 3.0
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth")
IGNORED_WEIGHTS = ["*.h5", "*.msgpack", "*.onnx", "*.ot", "*.tflite", "flax_model*", "tf_model*",
                   "coreml/*", "onnx/*", "openvino/*"]


def hub_offline() -> bool:
    """True when the user asked for no network (`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE`)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def hub_reachable(timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """A TCP connect to the Hub endpoint, so an unreachable Hub costs seconds, not minutes."""
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def looks_like_path(name: str) -> bool:
    """Names a user meant as a directory: Hub ids are `name` or `org/name`, nothing deeper."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def cache_dir() -> Path:
    """The Hub cache, read from the environment now (huggingface_hub reads it once at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot directory of a Hub repo, without touching the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir()))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError, OSError):
        return None
    return path if (path / "config.json").exists() or any(path.iterdir()) else None


def fingerprint(folder: Path) -> str:
    """A digest of the names, sizes and modification times of a checkpoint folder's weights and
    JSON files (model, generation, processor and tokenizer configs): it changes when the checkpoint
    is replaced in place, for a few stat calls instead of reading gigabytes."""
    digest = hashlib.sha256()
    files = {found for pattern in (*WEIGHT_FILES, "*.json") for found in folder.glob(pattern)}
    for path in sorted(files):
        try:
            stat = path.stat()
        except OSError:  # a dangling link: loading the checkpoint says what is missing
            continue
        digest.update(os.fsencode(path.name) + f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:12]


def resolve(name: str, download: bool = True, option: str = "--model") -> Path:
    """A directory holding the model `name`: itself if local, else the Hub cache (filled if allowed).

    `option` is the command-line flag that named the model, for the error messages.
    """
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise ModelNotFoundError(f"{name}: a file, not a model directory; {option} takes the folder "
                                 "holding config.json and the weights")
    if looks_like_path(name):
        raise ModelNotFoundError(f"{name}: no such model directory")
    cached = cached_snapshot(name)
    if cached is not None:
        return cached
    how_to = (f"download it where the Hub is reachable (`hf download {name}`) and copy the "
              f"cache (~/.cache/huggingface), or pass a local model directory with {option}")
    if not download or hub_offline():
        raise ModelUnavailableError(f"{name} is not in the Hugging Face cache and the Hub is "
                                    f"offline (HF_HUB_OFFLINE): {how_to}")
    if not hub_reachable():
        raise ModelUnavailableError(f"{name} is not in the Hugging Face cache and the Hub cannot "
                                    f"be reached: {how_to}")
    return _download(name)


def _download(repo_id: str) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        files = [s.rfilename for s in HfApi().model_info(repo_id).siblings or []]
        ignored = list(IGNORED_WEIGHTS)
        if any(f.endswith(".safetensors") for f in files):
            ignored.append("*.bin")
        return Path(snapshot_download(repo_id, ignore_patterns=ignored, cache_dir=cache_dir()))
    except GatedRepoError as err:
        raise ModelUnavailableError(f"{repo_id} is gated: accept its terms on the Hub and log in "
                                    "(`hf auth login` or HF_TOKEN)") from err
    except RepositoryNotFoundError as err:
        raise ModelNotFoundError(f"{repo_id}: no such model on the Hugging Face Hub (or it is "
                                 "private: log in with `hf auth login` or set HF_TOKEN)") from err
