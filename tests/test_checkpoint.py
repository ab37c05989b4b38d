"""tracer.checkpoint and tracer.resolution: resolution, the hand-read safetensors loader, export,
bounded memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

import tracer
from tracer import checkpoint, resolution
from tracer.config import LlamaConfig
from tracer.model import LlamaModel, init_weights


def test_sharded_resolution_lists_shards_in_order(tiny_checkpoint):
    r = resolution.resolve(tiny_checkpoint)
    assert r.sharded and r.origin == "local"
    names = [p.name for p in r.weight_files]
    assert names == sorted(names) and len(names) >= 2
    assert set(r.weight_map.values()) == set(names)


def test_single_file_is_preferred_over_an_index(make_checkpoint, tmp_path):
    folder, _ = make_checkpoint(kv_heads=4)
    assert resolution.resolve(folder).weight_files[0].name == "model.safetensors"
    assert not resolution.resolve(folder).sharded


def test_load_events_report_each_shard(tiny_llm, tiny_checkpoint):
    shards = [e for e in tiny_llm.load_trace.events if e.stage == "load_shard"]
    assert [e.file for e in shards] == [p.name for p in resolution.resolve(tiny_checkpoint).weight_files]
    assert sum(e.num_tensors for e in shards) == len(checkpoint.checkpoint_layout(tiny_llm.config))
    assert all(e.seconds >= 0 and e.bytes_read > 0 and e.device == "cpu" for e in shards)


def test_fp16_checkpoint_loaded_as_fp32_records_the_casts(make_checkpoint):
    folder, _ = make_checkpoint(dtype=torch.float16, shard_size="60KB")
    llm = tracer.load(folder, device="cpu", dtype="float32", progress=False)
    casts = {}
    for e in llm.load_trace.of("load_shard"):
        for k, v in e.casts.items():
            casts[k] = casts.get(k, 0) + v
    assert casts == {"float16->float32": len(checkpoint.checkpoint_layout(llm.config))}
    assert tracer.load(folder, device="cpu", dtype="auto", progress=False).dtype == torch.float32


def test_save_pretrained_round_trip_is_exact(tmp_path):
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaModel(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    files = checkpoint.save_pretrained(model, tmp_path, dtype=torch.float32, max_shard_bytes=8000)
    index = json.loads((tmp_path / resolution.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) >= 2 and "lm_head.weight" not in index["weight_map"]
    assert not list(tmp_path.glob(".saving-*")) and (tmp_path / "config.json") in files
    loaded = LlamaModel(cfg, device="meta").allocate("cpu")
    list(checkpoint.load_weights(loaded, resolution.resolve(tmp_path)))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_host_memory_while_loading_stays_below_one_shard(tmp_path):
    """A ~240 MB fp16 checkpoint in 2 shards: peak RSS beyond the model's own bytes < one shard."""
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, torch_dtype="float16")
    model = LlamaModel(cfg, dtype=torch.float16)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.01)
    shard = cfg.memory_bytes("float16") // 2 + 1
    checkpoint.save_pretrained(model, tmp_path, dtype=torch.float16, max_shard_bytes=shard)
    del model
    script = textwrap.dedent(f"""
        import json, tracer
        def rss():
            return int(open('/proc/self/statm').read().split()[1]) * 4096
        def peak():
            for line in open('/proc/self/status'):
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
        import torch, safetensors, sentencepiece  # imports before the baseline
        base = rss()
        from tracer.checkpoint import load_weights
        from tracer.resolution import resolve
        from tracer.config import LlamaConfig
        from tracer.model import LlamaModel
        r = resolve({str(tmp_path)!r})
        cfg = LlamaConfig.from_file(r.config_file)
        m = LlamaModel(cfg, device='meta', dtype=torch.float16).allocate('cpu')
        list(load_weights(m, r))
        model_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
        print(json.dumps({{"base": base, "peak": peak(), "model": model_bytes}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    m = json.loads(out.stdout.strip().splitlines()[-1])
    shard_bytes = max(p.stat().st_size for p in tmp_path.glob("model-*.safetensors"))
    overhead = m["peak"] - m["base"] - m["model"]
    print(f"model {m['model'] / 1e6:.0f} MB, largest shard {shard_bytes / 1e6:.0f} MB, "
          f"peak RSS above baseline + model: {overhead / 1e6:.1f} MB")
    assert overhead < shard_bytes


def _file_digests(folder):
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.safetensors"))}


def test_same_dtype_cpu_load_maps_the_file_and_matches_a_copying_load(tmp_path):
    """Weights stored as the model wants them become views of the mapped file; the logits are
    bit-identical to reading every tensor."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaModel(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    checkpoint.save_pretrained(model, tmp_path, dtype=torch.float16, max_shard_bytes=12000)
    resolved = resolution.resolve(tmp_path)

    def build(map_files):
        m = LlamaModel(cfg, device="meta", dtype=torch.float16).allocate("cpu")
        reports = list(checkpoint.load_weights(m, resolved, map_files=map_files))
        return m, reports

    mapped, reports = build(True)
    copied, copy_reports = build(False)
    assert sum(r.tensors_mapped for r in reports) > 0 and sum(r.tensors_mapped for r in copy_reports) == 0
    assert sum(r.num_tensors for r in reports) == sum(r.num_tensors for r in copy_reports)
    sizes = {p.stat().st_size for p in resolved.weight_files}
    assert mapped.embed.weight.untyped_storage().nbytes() in sizes  # a view of a whole file
    assert copied.embed.weight.untyped_storage().nbytes() == copied.embed.weight.numel() * 2
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.equal(mapped(ids), copied(ids))


def test_a_same_dtype_cpu_load_maps_every_tensor_of_a_hub_ordered_file(tmp_path):
    """In a hub file the tensors lie in name order (k, o, q, v; down, gate, up), q/k/v apart:
    every one of our parameters is a view of it, so loading copies no weight."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaModel(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    checkpoint.save_pretrained(model, tmp_path, dtype=torch.float16)
    m = LlamaModel(cfg, device="meta", dtype=torch.float16).allocate("cpu")
    (report,) = checkpoint.load_weights(m, resolution.resolve(tmp_path))
    assert report.tensors_mapped == report.num_tensors == len(checkpoint.checkpoint_layout(cfg))
    (weights,) = resolution.resolve(tmp_path).weight_files
    assert all(p.untyped_storage().nbytes() == weights.stat().st_size for p in m.parameters())


def test_editing_a_mapped_weight_never_writes_the_file(make_checkpoint):
    folder, _ = make_checkpoint(dtype=torch.float16, shard_size="60KB")
    before = _file_digests(folder)
    llm = tracer.load(folder, device="cpu", dtype="float16", progress=False)
    assert sum(e.tensors_mapped for e in llm.load_trace.of("load_shard")) > 0
    with torch.no_grad():
        for p in llm.model.parameters():
            p.fill_(0.5)
    del llm
    assert _file_digests(folder) == before


def test_a_cast_load_maps_nothing(make_checkpoint):
    folder, _ = make_checkpoint(dtype=torch.float16, shard_size="60KB")
    llm = tracer.load(folder, device="cpu", dtype="float32", progress=False)
    assert sum(e.tensors_mapped for e in llm.load_trace.of("load_shard")) == 0


# --- the GPU path's logic (tracer.checkpoint.StagedUpload), run on the CPU with a fake device ----


class FakeGPU:
    """StagedUpload's device operations on the CPU. An upload copies at once but stays "in flight"
    until waited for (its event's ``synchronize``) or until ``synchronize``: a staging buffer
    refilled while its upload is in flight is caught, as on a GPU it would corrupt the weights."""

    def __init__(self):
        self.allocations = self.uploads = self.syncs = 0
        self.in_flight: list[tuple[torch.Tensor, torch.Tensor]] = []  # (pinned source, its bytes then)
        self.refilled_in_flight = 0

    def pinned(self, nbytes):
        self.allocations += 1
        return torch.empty(nbytes, dtype=torch.uint8)

    def upload(self, dst, src):
        dst.copy_(src)
        self.uploads += 1
        entry = (src, src.clone())
        self.in_flight.append(entry)
        fake = self

        class Done:
            def synchronize(self):
                fake._complete([entry])

        return Done()

    def synchronize(self):
        self.syncs += 1
        self._complete(list(self.in_flight))

    def _complete(self, entries):
        for entry in entries:
            if any(entry is e for e in self.in_flight):
                self.in_flight = [e for e in self.in_flight if e is not entry]
                self.refilled_in_flight += not torch.equal(entry[0], entry[1])


def _fake_gpu_load(model, resolved, staging_bytes):
    gpu = FakeGPU()
    upload = checkpoint.StagedUpload("cpu", staging_bytes=staging_bytes, pinned=gpu.pinned, upload=gpu.upload,
                                     synchronize=gpu.synchronize)
    reports = list(checkpoint.load_weights(model, resolved, map_files=False, upload=upload))
    gpu._complete(list(gpu.in_flight))  # anything still in flight is checked too
    return gpu, reports


def test_staged_upload_reuses_two_pinned_buffers_and_synchronises_once_per_shard(tmp_path):
    """Device: a fake GPU on the CPU. Tensors larger than a staging buffer go up in pieces through
    the same two buffers; the weights equal a plain CPU load's, same dtype or cast on the device."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaModel(cfg)
    init_weights(model, torch.Generator().manual_seed(0))
    checkpoint.save_pretrained(model, tmp_path, dtype=torch.float16, max_shard_bytes=12000)
    resolved = resolution.resolve(tmp_path)
    shards = len(resolved.weight_files)
    assert shards >= 2
    for dtype in (torch.float16, torch.float32):  # uploaded as stored; float32: cast on the device
        plain = LlamaModel(cfg, device="meta", dtype=dtype).allocate("cpu")
        list(checkpoint.load_weights(plain, resolved, map_files=False))
        staged = LlamaModel(cfg, device="meta", dtype=dtype).allocate("cpu")
        gpu, reports = _fake_gpu_load(staged, resolved, staging_bytes=1000)
        for (name, a), b in zip(plain.state_dict().items(), staged.state_dict().values()):
            assert torch.equal(a, b), (dtype, name)
        assert gpu.allocations == 2 and gpu.syncs == shards and gpu.refilled_in_flight == 0
        tensors = sum(r.num_tensors for r in reports)
        assert gpu.uploads > tensors  # the embedding (64 x 32 x 2 bytes) alone takes 5 pieces
        assert sum(r.tensors_mapped for r in reports) == 0


def test_staged_upload_waits_before_refilling_a_buffer_in_flight():
    """Device: a fake GPU. Pieces alternate between the two buffers, each refilled only after its
    last upload is done; a loader that forgot that wait is caught by the fake (so the load tests
    above can fail)."""

    class Forgetful(checkpoint.StagedUpload):
        def _next_buffer(self):
            self._in_flight[self._turn ^ 1] = None  # drop the upload reading the buffer to refill
            return super()._next_buffer()

    src = torch.arange(10, dtype=torch.float16)
    pieces = -(-src.numel() * src.element_size() // 8)
    for kind, refilled in ((checkpoint.StagedUpload, 0), (Forgetful, pieces - 2)):
        gpu = FakeGPU()
        upload = kind("cpu", staging_bytes=8, pinned=gpu.pinned, upload=gpu.upload, synchronize=gpu.synchronize)
        dest = torch.empty(10, dtype=torch.float32)
        upload.put(dest, src)
        upload.finish()
        assert torch.equal(dest, src.float()) and gpu.uploads == pieces and gpu.allocations == 2
        assert gpu.refilled_in_flight == refilled and gpu.syncs == 1


def test_a_gguf_through_the_staged_upload_equals_the_cpu_load(gguf_file):
    """Device: a fake GPU. Dequantized rows go through the same staging buffers and cast there."""
    resolved = resolution.resolve(gguf_file("gpt2-q4_0-tied").path)
    cfg = checkpoint.read_config(resolved)
    plain = LlamaModel(cfg, device="meta", dtype=torch.float16).allocate("cpu")
    list(checkpoint.load_weights(plain, resolved, map_files=False))
    staged = LlamaModel(cfg, device="meta", dtype=torch.float16).allocate("cpu")
    gpu, _ = _fake_gpu_load(staged, resolved, staging_bytes=4096)
    for (name, a), b in zip(plain.state_dict().items(), staged.state_dict().values()):
        assert torch.equal(a, b), name
    assert gpu.allocations == 2 and gpu.syncs == 1 and gpu.refilled_in_flight == 0
