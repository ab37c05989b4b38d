"""The public face: ``tracer.load()`` and the :class:`Llama` it returns.

``load`` walks stages 1-3 (config -> resolve -> construct on the meta device -> load shard by shard)
and records each as a trace event; ``Llama.generate`` walks stages 4-7 and returns a
:class:`Generation` whose ``trace`` holds the load events followed by its own.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from . import dtypes, fast, knobs, quant, sampling
from .checkpoint import checkpoint_layout, load_weights, read_config
from .config import GenerationDefaults, LlamaConfig
from .errors import CheckpointError, DeviceError, GenerationError, TokenizerError
from .generate import CaptureOptions, Decoder
from .gguf_file import GGUFFile
from .gguf_tokenizer import load_gguf_tokenizer
from .hooks import point_shapes
from .model import LlamaModel
from .resolution import ResolvedCheckpoint, resolve
from .tokenizer import Encoding, Tokenizer, load_tokenizer
from .trace import (
    ConfigEvent,
    DetokenizeEvent,
    LoadShardEvent,
    ResolveEvent,
    TokenizeEvent,
    Trace,
    memory_snapshot,
)

DTYPES = {name: dtypes.torch_dtype(name) for name in dtypes.RUNTIME}  # what tracer.load(dtype=...) takes


def embedded_path() -> Path:
    """Folder of the small Llama shipped inside the package (the embedded default)."""
    return Path(str(resources.files("tracer") / "embedded"))


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; an absent CUDA device is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use 'auto', 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} asked for, but CUDA is not available here (no GPU, or a CPU-only "
                "torch build); use device='cpu' or 'auto'"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type != "cpu":
        raise DeviceError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return dev


def pick_dtype(dtype: str | torch.dtype, cfg: LlamaConfig, device: torch.device) -> torch.dtype:
    """The runtime dtype. 'auto' on CUDA is the checkpoint's dtype (a GGUF: its 16-bit type); on
    the CPU it is float32 (what a CPU reference computes in), unless the float32 weights would take
    more than half of the machine's memory: then the checkpoint's 16-bit type, so that a 7B model
    (27 GB in float32, 13.5 GB in float16) still loads on a 16 GB laptop."""
    if dtype == dtypes.AUTO:
        stored = DTYPES.get(cfg.torch_dtype, torch.float32)
        if device.type == "cuda" or cfg.memory_bytes(dtypes.FLOAT32.name) <= physical_memory() // 2:
            return stored if device.type == "cuda" else torch.float32
        return stored if stored != torch.float32 else torch.float16
    name = dtypes.name_of(dtype)
    if name not in DTYPES:
        *first, last = map(repr, (dtypes.AUTO, *DTYPES))
        raise DeviceError(f"dtype {dtype!r} is not supported; use {', '.join(first)} or {last}")
    return DTYPES[name]


def physical_memory() -> int:
    """Bytes of RAM on this machine (a large default where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


# A load checks that, besides the weights, a generation this long fits (a longer one is checked
# when it is asked for): enough for a chat turn, without refusing a 7B float16 model on a 16 GB GPU.
LOAD_FIT_TOKENS = 1024
# What no tensor of ours names: the caching allocator's rounding, cuBLAS workspaces, the loader's
# cast scratch (tracer.checkpoint.StagedUpload).
FIT_MARGIN_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class DeviceMemory:
    """A GPU's memory as a new allocation sees it: the driver's ``free`` of ``total``, plus
    ``cached``, what torch's caching allocator reserved but holds unused (free to us, not to the
    driver: a notebook that dropped its last model has it)."""

    free: int
    total: int
    cached: int = 0

    @property
    def available(self) -> int:
        return self.free + self.cached


def cuda_memory(device: torch.device) -> DeviceMemory:
    """``device``'s memory now (the default reading of :func:`check_fits`)."""
    free, total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return DeviceMemory(free, total, max(cached, 0))


def activation_bytes(cfg: LlamaConfig, tokens: int, dtype: str) -> int:
    """A prefill's largest live tensors for ``tokens`` tokens: the residual and its norm, q/k/v and
    the attention output, the MLP's stacked gate/up and its activation; float32 logits of one position."""
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_token = 2 * cfg.hidden_size + 2 * q + 2 * kv + 3 * cfg.intermediate_size
    return tokens * per_token * dtypes.BY_NAME[dtype].bytes + 4 * cfg.vocab_size


def check_fits(cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, *, tokens: int | None = None,
               weights_loaded: bool = False, memory=cuda_memory) -> None:
    """Before allocating on a GPU: the weights (unless ``weights_loaded``), a KV cache of ``tokens``
    positions (default: LOAD_FIT_TOKENS, or the model's whole context if shorter), a prefill's
    activations and a margin must fit in what is free there (``memory(device)``: a
    :class:`DeviceMemory`, read from CUDA unless given). The CPU is not checked."""
    if device.type != "cuda":
        return
    name = dtypes.name_of(dtype)
    tokens = min(cfg.max_position_embeddings, LOAD_FIT_TOKENS) if tokens is None else tokens
    parts = {
        f"weights in {name}": 0 if weights_loaded else cfg.memory_bytes(name),
        f"KV cache for {tokens} tokens": cfg.kv_cache_bytes(tokens, name),
        "activations": activation_bytes(cfg, tokens, name),
        "margin": FIT_MARGIN_BYTES,
    }
    need, mem = sum(parts.values()), memory(device)
    if need <= mem.available:
        return
    shown = " + ".join(f"{part} {n / 1e9:.1f} GB" for part, n in parts.items() if n)
    f16, bf16, f32 = dtypes.FLOAT16.name, dtypes.BFLOAT16.name, dtypes.FLOAT32.name
    halves = f" ({f16} or {bf16} halves {f32}'s size)" if name == f32 else ""
    shorter = "a shorter prompt or fewer max_new_tokens, " if weights_loaded else ""
    cached = (f" ({mem.free / 1e9:.1f} GB on the device + {mem.cached / 1e9:.1f} GB torch's allocator "
              "holds unused)") if mem.cached else ""
    raise DeviceError(
        f"{device} needs {need / 1e9:.1f} GB ({shown}) but has {mem.available / 1e9:.1f} GB free of "
        f"{mem.total / 1e9:.1f} GB{cached}; use {shorter}a smaller dtype{halves}, free GPU memory, or device='cpu'"
    )


@dataclass
class Generation:
    """The result of :meth:`Llama.generate`."""

    prompt_ids: list[int]
    new_ids: list[int]
    text: str
    finish_reason: str
    trace: Trace
    steps: list


class Llama:
    """A loaded model with its tokenizer, generation defaults and load trace."""

    def __init__(
        self,
        model: LlamaModel,
        tokenizer: Tokenizer,
        defaults: GenerationDefaults,
        resolved: ResolvedCheckpoint | None,
        load_trace: Trace,
    ) -> None:
        self.model = model
        self.config: LlamaConfig = model.config
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.resolved = resolved
        self.load_trace = load_trace
        self.fast_step = None  # set by load(compile=True): a tracer.fast.CompiledStep

    def compile_step(self) -> Llama:
        """Make decode steps with capture="off" run a compiled step (:class:`tracer.fast.CompiledStep`).

        Regional compilation: the blocks are compiled as one graph spanning a run of a few
        consecutive layers (5 of SmolLM2's 30), and that graph serves every run, since parameters
        are graph inputs and each layer passes in its own KV cache tensors. The first step so
        compiles in seconds however deep the model is; the embedding, final norm and lm_head stay
        eager around it. Static shapes: the Decoder rounds cache sizes up to multiples of 256
        slots, so only a generation reaching a new multiple compiles again. Prefill, traced runs
        and hooks keep the eager model.

        Trace meta: ``"step"`` says which path decode steps take ("compiled-block" here; "eager"
        without compile, and in every traced run). ``"compile_seconds"`` is the wall time of the
        steps that compiled (the compile and that one step): in the meta of the generation that
        paid it, and the first (cold) one in ``load_trace.meta`` from then on.

        On the CPU guards on the model's modules are skipped (checked at every call they would cost
        more than fusing saves); the step itself checks the model's device, dtype and products
        before each call and recompiles if they changed. On CUDA every guard is kept and the step
        replays CUDA graphs. The graph reads the weights at each call, so in-place edits show; a
        hook attached to a point is seen only because the Decoder then takes the eager model.
        """
        meta = self.load_trace.meta
        meta["step"] = fast.CompiledStep.kind
        self.fast_step = fast.CompiledStep(self.model, on_compile=lambda seconds: meta.setdefault("compile_seconds", seconds))
        return self

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def __repr__(self) -> str:
        c = self.config
        src = self.resolved.source if self.resolved else "?"
        return (f"Llama({src!r}, {c.num_parameters / 1e6:.1f}M params, {c.num_hidden_layers} layers, "
                f"{c.attention_kind}, {self.dtype}, {self.device})")

    # --- forward ------------------------------------------------------------------------------
    @torch.inference_mode()
    def logits(self, ids) -> torch.Tensor:
        """Logits [len(ids), V] in float32 for one sequence: a full forward, no cache."""
        ids = [int(i) for i in ids]
        if not ids:
            raise GenerationError("logits() needs at least one token id")
        if len(ids) > self.config.max_position_embeddings:
            raise GenerationError(
                f"{len(ids)} tokens exceed max_position_embeddings ({self.config.max_position_embeddings})"
            )
        x = torch.tensor([ids], device=self.device)
        return self.model(x)[0].float()

    def hook_points(self, tokens: int = 1, cached: int = 0) -> dict[str, tuple[int, ...]]:
        """Every hook point, in forward order, with its shape for a forward of ``tokens`` new
        tokens after ``cached`` cached ones (see tracer.hooks for what each point is)."""
        shapes = point_shapes(self.config, tokens, cached + tokens)
        return {name: shapes[name] for name in self.model.hooks}

    # --- generation ---------------------------------------------------------------------------
    def settings(self, **overrides) -> tuple[sampling.SamplingSettings, int | None]:
        """The sampling knobs (``tracer/knobs.py``): transformers' defaults, then
        generation_config.json, then the caller's values (None: keep the default)."""
        unknown = sorted(set(overrides) - set(knobs.NAMES))
        if unknown:
            raise GenerationError(f"unknown sampling knob(s) {unknown}; the knobs are {list(knobs.NAMES)}")
        values = knobs.values(self.defaults)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return sampling.SamplingSettings(**values), self.defaults.max_new_tokens

    def encode_prompt(self, prompt, *, chat: bool = False, system: str | None = None) -> Encoding:
        """Prompt text (or ids) -> the :class:`~tracer.tokenizer.Encoding` the ``tokenize`` event shows.

        Text is tokenized as transformers' ``tokenizer(text)`` (BOS/EOS as the checkpoint's
        tokenizer adds them). ``chat=True`` makes the text one user turn (after ``system``, if
        given) in the checkpoint's own chat template, ready for the answer
        (:meth:`Tokenizer.chat`: transformers' ``apply_chat_template(..., add_generation_prompt=True)``,
        or Llama 2's [INST] format for a Llama 2 vocabulary without a template). Ids are used as given.
        """
        if system is not None and not chat:
            raise GenerationError("system= is a chat message: pass chat=True with it")
        if isinstance(prompt, str):
            if not prompt:
                raise GenerationError("the prompt is empty: give some text, or a list of token ids")
            if chat:
                messages = ([{"role": "system", "content": system}] if system else []) + [
                    {"role": "user", "content": prompt}
                ]
                return self.tokenizer.chat(messages)
            return self.tokenizer.tokenize(prompt)
        if chat:
            raise GenerationError("chat=True needs the prompt as text (ids are used as given)")
        ids = [int(i) for i in prompt]
        return Encoding(self.tokenizer.decode(ids, skip_special_tokens=False), ids, self.tokenizer.pieces(ids),
                        added_bos=False)

    def decoder(
        self,
        prompt,
        *,
        max_new_tokens: int | None = None,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        capture: str = "light",
        points=(),
        budget_bytes: int | None = None,
        lens: bool = False,
        top_n: int = 20,
        chat: bool = False,
        system: str | None = None,
    ) -> Decoder:
        """A step-by-step generation (what the notebook stepper drives); see :meth:`generate`."""
        settings, default_max = self.settings(
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            repetition_penalty=repetition_penalty,
        )
        max_new = max_new_tokens if max_new_tokens is not None else (default_max or 64)
        opts = CaptureOptions(capture, tuple([points] if isinstance(points, str) else points),
                              **({"budget_bytes": budget_bytes} if budget_bytes else {}),
                              top_n=top_n, lens=lens)
        trace = self.load_trace.copy() if capture != "off" else Trace(meta=self.load_trace.meta)
        # What computes this run's products (fast.use_kernels may have changed it since the load).
        trace.meta = {**trace.meta, "matvec": fast.products(self.model)}
        with trace.stage("tokenize") as stage:
            enc = self.encode_prompt(prompt, chat=chat, system=system)
            if capture != "off":
                stage.event = TokenizeEvent.from_encoding(enc)
        ids = enc.ids
        if isinstance(max_new, int):  # (else the Decoder names the mistake) this generation's KV
            # cache and activations must fit beside the weights already there
            check_fits(self.config, self.device, self.dtype, tokens=len(ids) + max_new, weights_loaded=True)
        return Decoder(
            self.model, ids, settings, max_new_tokens=max_new, eos_ids=self.defaults.eos_token_ids,
            seed=seed, capture=opts, trace=trace, piece=self.tokenizer.id_to_piece,
            fast_step=self.fast_step,
        )

    def generate(self, prompt, *, max_new_tokens: int | None = None, **kwargs) -> Generation:
        """Generate a continuation of ``prompt`` (text or ids).

        Sampling knobs (``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``repetition_penalty``) default to transformers' GenerationConfig defaults overridden by the
        checkpoint's generation_config.json; ``seed`` seeds a ``torch.Generator`` that draws the sample
        as ``torch.multinomial`` does (the same tokens for the same seed). ``capture`` is "off", "light" (default) or "full" (with ``points``).
        """
        dec = self.decoder(prompt, max_new_tokens=max_new_tokens, **kwargs)
        dec.run()
        return self.finish(dec)

    def continuation_text(self, prompt_ids: list[int], new_ids: list[int]) -> str:
        """The new text as it reads after the prompt (as transformers' pipeline cuts it): decode the
        whole sequence and drop the prompt's text, so a leading space is kept."""
        head = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        full = self.tokenizer.decode(list(prompt_ids) + list(new_ids), skip_special_tokens=True)
        if full.startswith(head):
            return full[len(head):]
        return self.tokenizer.decode(new_ids, skip_special_tokens=True)

    def finish(self, dec: Decoder) -> Generation:
        """Detokenize a decoder's new ids into a :class:`Generation` (adds the ``detokenize`` event)."""
        with dec.trace.stage("detokenize") as stage:
            text = self.continuation_text(dec.prompt_ids, dec.new_ids)
            if dec.capture.policy != "off":
                stage.event = DetokenizeEvent(new_ids=list(dec.new_ids), pieces=self.tokenizer.pieces(dec.new_ids),
                                              text=text, finish_reason=dec.finish_reason or "stopped")
        return Generation(dec.prompt_ids, list(dec.new_ids), text, dec.finish_reason or "stopped",
                          dec.trace, list(dec.history))


def load(
    source: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    revision: str | None = None,
    token: str | bool | None = None,
    gguf_file: str | None = None,
    progress: bool = True,
    compile: bool = False,
    matvec: str = "auto",
    quantized: bool | str = quant.AUTO,
) -> Llama:
    """Load a Llama checkpoint: None (the embedded default model), a short name from
    ``tracer.catalog`` ("smollm2": a real chat model, offline), a folder, a ``.gguf`` file, or a
    hub repo id (``gguf_file=`` picks one GGUF in a folder or repo that holds several).

    The model is built on the meta device (no memory), allocated once on the target device in
    the target dtype, then filled shard by shard, tensor by tensor (on the CPU, weights stored in
    the target dtype are mapped from the file instead of copied). Each stage is a trace event in
    ``llm.load_trace``. ``compile=True`` makes untraced generation (capture="off") use a
    torch.compile'd static-shape decode step (:meth:`Llama.compile_step`); it compiles on first use.
    ``matvec`` picks what computes batch-1 decode's one-row products on the CPU: "auto" (our
    AVX2 kernels where they can be built, see ``tracer.kernels``), "kernel" or "torch"
    (:func:`tracer.fast.use_kernels`); ``llm.load_trace.meta["matvec"]`` says which is in use.
    ``quantized``: whether a GGUF's quantized layers (``tracer.quant.TYPES``) stay as the file's
    blocks, multiplied by the CPU kernels (:class:`tracer.quant.KeepQuantized`), or are dequantized
    at load as transformers does: "auto" keeps them on a CPU float32 load (:func:`keeps_blocks`),
    True insists, False dequantizes. ``load_trace.meta["quantized"]`` says what each layer took.
    """
    dev = pick_device("cpu" if quantized is True and str(device) == dtypes.AUTO else device)
    trace = Trace()
    # Resolution finds config.json, so it runs first; the trace still lists the config first.
    resolved = _resolve(trace, source, dev, revision=revision, token=token, gguf_file=gguf_file)
    keeps = keeps_blocks(quantized, resolved, dev, dtype)
    # Quantized weights are small, so the float32 activations the kernels take fit even where
    # pick_dtype would halve a dequantized 7B to float16.
    cfg, torch_dtype = _read_config(trace, resolved, dtypes.FLOAT32.name if keeps and dtype == dtypes.AUTO
                                    else dtype, dev)
    if keeps:
        _check_quantized(resolved, dev, torch_dtype)
    check_fits(cfg, dev, torch_dtype)
    # The tokenizer before the weights: a checkpoint without a usable one fails before any is read.
    tokenizer = _tokenizer(resolved, cfg)
    model = _build_model(cfg, dev, torch_dtype, matvec)
    keep = quant.KeepQuantized(model, kernel=fast.products(model) == "kernel") if keeps else None
    _load_shards(trace, model, resolved, progress, keep)
    if keep is not None:
        trace.meta["quantized"] = dict(keep.paths)
    defaults = GenerationDefaults.from_file(resolved.generation_config_file, cfg.eos_token_ids)
    trace.meta.update(source=str(resolved.source), device=str(dev), dtype=dtypes.name_of(torch_dtype),
                      matvec=fast.products(model), prompt_products=fast.prompt_products(model),
                      format=resolved.format)
    llm = Llama(model, tokenizer, defaults, resolved, trace)
    if compile:
        llm.compile_step()
    else:
        trace.meta["step"] = "eager"  # compile_step() says "compiled-block"
    return llm


def _resolve(trace: Trace, source, dev: torch.device, **where) -> ResolvedCheckpoint:
    """Stage 2: which files ``source`` means (the ``resolve`` event)."""
    with trace.stage("resolve", memory=dev) as stage:
        resolved = resolve(embedded_path() if source is None else source, **where)
        stage.event = ResolveEvent(**resolved.summary())
    return resolved


def _read_config(trace: Trace, resolved: ResolvedCheckpoint, dtype, dev: torch.device) -> tuple[LlamaConfig, torch.dtype]:
    """Stage 1: the typed config and the runtime dtype it implies here (the ``config`` event)."""
    with trace.stage("config") as stage:
        cfg = read_config(resolved)
        torch_dtype = pick_dtype(dtype, cfg, dev)
        stage.event = ConfigEvent.from_config(cfg, str(resolved.config_file), dtypes.name_of(torch_dtype))
    return cfg, torch_dtype


def _build_model(cfg: LlamaConfig, dev: torch.device, dtype: torch.dtype, matvec: str) -> LlamaModel:
    """The network, constructed without allocating (meta), then given uninitialised storage on
    the device, its products' kernels chosen before any weight is read (an impossible choice fails fast)."""
    model = LlamaModel(cfg, device="meta", dtype=dtype).allocate(dev)
    model.eval()
    fast.use_kernels(model, matvec)
    return model


def keeps_blocks(quantized: bool | str, resolved: ResolvedCheckpoint, dev: torch.device, dtype) -> bool:
    """Whether a load keeps the GGUF's quantized blocks (``quantized``: True, False or "auto";
    "auto": a GGUF with layers in ``tracer.quant.TYPES``, on the CPU, in float32 or dtype 'auto')."""
    if quantized is True or quantized is False:
        return quantized
    if quantized != quant.AUTO:
        raise DeviceError(f"quantized={quantized!r} is not one of {quant.AUTO!r}, True or False")
    if resolved.format != "gguf" or dev.type != "cpu" or dtypes.name_of(dtype) not in (dtypes.AUTO, dtypes.FLOAT32.name):
        return False
    return any(kind in quant.TYPES for kind in GGUFFile.open(resolved.weight_files[0]).type_counts())


def _check_quantized(resolved: ResolvedCheckpoint, dev: torch.device, dtype: torch.dtype) -> None:
    """A quantized load needs a GGUF's blocks, the CPU kernels' device and float32 activations."""
    if resolved.format != "gguf":
        raise CheckpointError(f"{resolved.source}: quantized=True keeps a GGUF file's quantized blocks, but this "
                              f"checkpoint is {resolved.format}; load it without quantized=True")
    if dev.type != "cpu" or dtype != torch.float32:
        raise DeviceError(f"quantized=True runs on the CPU in float32, not on {dev} in {dtypes.name_of(dtype)}; "
                          "use device='cpu' and dtype='float32' (or 'auto'), or load without quantized=True")


def _load_shards(trace: Trace, model: LlamaModel, resolved: ResolvedCheckpoint, progress: bool, keep=None) -> None:
    """Stage 3: the weights, file by file (one ``load_shard`` event each, from the loader's report);
    ``keep``: a quantized load's :class:`tracer.quant.KeepQuantized`."""
    with _progress(resolved, model.config, progress, kept=keep is not None) as tick:
        for report in load_weights(model, resolved, on_tensor=tick, keep=keep):
            trace.add(LoadShardEvent.from_report(report, memory=memory_snapshot(model.device)))


def _tokenizer(resolved: ResolvedCheckpoint, cfg: LlamaConfig) -> Tokenizer:
    """The checkpoint's tokenizer (its folder's files, or the GGUF's metadata), checked against
    the embedding table it must index."""
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None
    if resolved.format == "gguf":
        tokenizer = load_gguf_tokenizer(resolved.weight_files[0], bos_id=cfg.bos_token_id, eos_id=eos)
    else:
        tokenizer = load_tokenizer(resolved.folder, bos_id=cfg.bos_token_id, eos_id=eos)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise TokenizerError(
            f"{resolved.source}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding "
            f"table has only {cfg.vocab_size} rows (vocab_size): they do not belong together"
        )
    return tokenizer


@contextmanager
def _progress(resolved: ResolvedCheckpoint, cfg: LlamaConfig, enabled: bool, kept: bool = False):
    """A tqdm bar over the load, as transformers shows one: per shard for safetensors, per tensor
    for a GGUF (one file, whose tensors are dequantized, or ``kept`` as blocks, one by one). Yields the
    per-tensor tick."""
    if not enabled:
        yield None
        return
    from tqdm.auto import tqdm

    if resolved.format == "gguf":
        bar = tqdm(total=len(checkpoint_layout(cfg)), unit="tensor",
                   desc="Mapping GGUF tensors (quantized blocks kept)" if kept else "Dequantizing GGUF tensors")
        tick = bar.update
    else:
        bar = tqdm(total=len(resolved.weight_files), desc="Loading checkpoint shards", unit="shard")
        tick = None
    try:
        yield tick
        if tick is None:
            bar.update(bar.total - bar.n)
    finally:
        bar.close()
