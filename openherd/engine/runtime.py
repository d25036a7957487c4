"""A thin, owned wrapper over llama.cpp's C API (through llama-cpp-python's ctypes).

We use the low-level API rather than ``llama_cpp.Llama`` because the scheduler
needs what the high-level class hides: one ``llama_batch`` carrying tokens of
many sequences, per-sequence KV operations (``llama_memory_seq_*``) for prefix
caching, and direct access to the logits buffer for constrained decoding.

Every ctypes call into libllama releases the GIL, so the scheduler thread that
drives ``decode`` does not block the asyncio server thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidModelFile
from .types import ModelInfo

log = logging.getLogger("openherd.engine")

_backend_lock = threading.Lock()
_backend_ready = False
_log_callback = None  # keep a reference: ctypes callbacks must outlive their registration


def _llama():
    # Imported lazily: `herd --help` and the store never pay for loading libllama.
    import llama_cpp

    return llama_cpp


def init_backend() -> None:
    """Initialise libllama once per process and route its logging."""
    global _backend_ready, _log_callback
    with _backend_lock:
        if _backend_ready:
            return
        ll = _llama()

        @ll.llama_log_callback
        def _cb(level, text, user_data):
            # llama.cpp prints every load detail at INFO on stderr; route it to
            # logging instead (DEBUG), keeping warnings and errors visible there.
            # ggml_log_level: 1 DEBUG, 2 INFO, 3 WARN, 4 ERROR, 5 CONT(inuation).
            msg = text.decode("utf-8", "replace").rstrip()
            sink = getattr(_log_capture, "lines", None)
            if sink is not None and msg:  # see capture_log(): buffer sizes exist only in the log
                sink.append(msg)
            if msg:
                log.log({3: logging.WARNING, 4: logging.ERROR}.get(level, logging.DEBUG), msg)

        _log_callback = _cb
        ll.llama_log_set(_cb, ctypes.c_void_p(0))
        ll.llama_backend_init()
        _backend_ready = True


class LlamaModel:
    """Owns a ``llama_model`` (weights) and its vocabulary."""

    def __init__(self, path: str, *, n_gpu_layers: int = 0):
        init_backend()
        ll = _llama()
        if not os.path.isfile(path):
            raise InvalidModelFile(f"model file not found: {os.path.basename(path)}")
        params = ll.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        self.path = path
        self.ptr = ll.llama_model_load_from_file(path.encode(), params)
        if not self.ptr:
            raise InvalidModelFile(f"llama.cpp could not load {os.path.basename(path)} (unsupported architecture or corrupt file)")
        self.vocab = ll.llama_model_get_vocab(self.ptr)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self._pieces: list[bytes | None] = [None] * self.n_vocab
        self._piece_buf = ctypes.create_string_buffer(256)
        self._lock = threading.Lock()  # tokenize/detokenize may be called from many threads

    # --- metadata -----------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        ll = _llama()
        buf = ctypes.create_string_buffer(1 << 16)
        n = ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):  # long values such as chat templates
            buf = ctypes.create_string_buffer(n + 1)
            ll.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def info(self, name: str, n_ctx: int) -> ModelInfo:
        ll = _llama()
        v = self.vocab
        eog = frozenset(t for t in range(self.n_vocab) if ll.llama_vocab_is_eog(v, t))
        desc = ctypes.create_string_buffer(256)
        ll.llama_model_desc(self.ptr, desc, len(desc))
        bos, eos = ll.llama_vocab_bos(v), ll.llama_vocab_eos(v)
        tmpl = ll.llama_model_chat_template(self.ptr, None)
        return ModelInfo(
            name=name,
            path=self.path,
            architecture=self.meta("general.architecture") or "unknown",
            n_ctx=n_ctx,
            n_ctx_train=ll.llama_model_n_ctx_train(self.ptr),
            n_vocab=self.n_vocab,
            n_embd=ll.llama_model_n_embd(self.ptr),
            n_layer=ll.llama_model_n_layer(self.ptr),
            n_params=ll.llama_model_n_params(self.ptr),
            size_bytes=ll.llama_model_size(self.ptr),
            bos=bos,
            eos=eos,
            eog_tokens=eog,
            add_bos=bool(ll.llama_vocab_get_add_bos(v)),
            bos_text=self.token_text(bos) if bos >= 0 else "",
            eos_text=self.token_text(eos) if eos >= 0 else "",
            chat_template=tmpl.decode("utf-8", "replace") if tmpl else None,
            description=desc.value.decode("utf-8", "replace"),
        )

    # --- tokens -------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        ll = _llama()
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """Raw bytes of one token (may be a partial UTF-8 character). Cached."""
        p = self._pieces[token] if 0 <= token < self.n_vocab else b""
        if p is None:
            ll = _llama()
            with self._lock:
                n = ll.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
                if n < 0:
                    big = ctypes.create_string_buffer(-n)
                    n = ll.llama_token_to_piece(self.vocab, token, big, -n, 0, False)
                    p = big.raw[:n]
                else:
                    p = self._piece_buf.raw[:n]
            self._pieces[token] = p
        return p

    def token_text(self, token: int) -> str:
        """The token's text including special tokens (for templates: bos/eos strings)."""
        ll = _llama()
        buf = ctypes.create_string_buffer(256)
        n = ll.llama_token_to_piece(self.vocab, token, buf, 256, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return bool(_llama().llama_vocab_is_eog(self.vocab, token))

    @property
    def recurrent(self) -> bool:
        """Whether sequences carry recurrent state (Mamba-style or hybrid models): such
        state cannot be cut back to a prefix, so cached prefixes are never reused or copied."""
        ll = _llama()
        return bool(ll.llama_model_is_recurrent(self.ptr) or ll.llama_model_is_hybrid(self.ptr))

    def close(self):
        if self.ptr:
            _llama().llama_model_free(self.ptr)
            self.ptr = None


@dataclass
class ContextConfig:
    n_ctx: int  # total KV cells (shared by all sequences: unified KV)
    n_seq_max: int  # sequences that may live in the cache at once
    n_batch: int  # max tokens per decode call
    n_threads: int
    embeddings: bool = False
    pooling: int = -1  # LLAMA_POOLING_TYPE_*; -1 = model default
    kv_unified: bool = True  # lets sequences share prefix cells (seq_cp is free)


class LlamaContext:
    """A ``llama_context``: KV cache + compute buffers for one model."""

    def __init__(self, model: LlamaModel, cfg: ContextConfig):
        ll = _llama()
        p = ll.llama_context_default_params()
        p.n_ctx = cfg.n_ctx
        p.n_batch = cfg.n_batch
        # Pooled embeddings need each sequence whole in one micro-batch (llama.cpp
        # asserts otherwise), so the embedding context's micro-batch is its batch.
        p.n_ubatch = cfg.n_batch if cfg.embeddings else min(cfg.n_batch, 512)
        p.n_seq_max = cfg.n_seq_max
        p.n_threads = cfg.n_threads
        p.n_threads_batch = cfg.n_threads
        p.embeddings = cfg.embeddings
        p.kv_unified = cfg.kv_unified
        p.no_perf = True
        if cfg.embeddings:
            p.pooling_type = cfg.pooling
        self.model = model
        self.cfg = cfg
        with capture_log() as lines:
            self.ptr = ll.llama_init_from_model(model.ptr, p)
        self._reported = ReportedBuffers.parse(lines)
        if not self.ptr:
            raise InvalidModelFile("llama.cpp could not create a context for this model (out of memory?)")
        self.mem = ll.llama_get_memory(self.ptr)
        self.n_ctx = ll.llama_n_ctx(self.ptr)
        self.n_vocab = model.n_vocab
        self.batch = Batch(cfg.n_batch, cfg.n_seq_max)

    def decode(self) -> int:
        """Run the pending batch. 0 = ok, 1 = no KV slot, <0 = error."""
        return _llama().llama_decode(self.ptr, self.batch.raw)

    def logits(self, i: int) -> np.ndarray:
        """Zero-copy float32 view of the logits of batch output ``i`` ([n_vocab])."""
        ptr = _llama().llama_get_logits_ith(self.ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def embedding(self, seq: int, n_embd: int) -> np.ndarray:
        ptr = _llama().llama_get_embeddings_seq(self.ptr, seq)
        if not ptr:
            raise RuntimeError("no pooled embedding for sequence")
        return np.ctypeslib.as_array(ptr, shape=(n_embd,)).copy()

    # --- KV cache per sequence --------------------------------------------------
    def seq_rm(self, seq: int, p0: int = 0, p1: int = -1) -> bool:
        return bool(_llama().llama_memory_seq_rm(self.mem, seq, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        _llama().llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def copy_prefix(self, src: int, dst: int, n: int) -> bool:
        """Make sequence ``dst`` hold exactly the KV of ``src``'s positions [0, n).

        Whatever ``dst`` held before is dropped. With a unified cache the cells are
        shared (``seq_cp`` only tags them: free). With split KV every sequence has
        its own stream, and llama.cpp's ``seq_cp`` across streams copies the *whole*
        stream buffer (it asserts the range covers all of it: n_ctx cells per layer,
        however few are used), so instead the source's used cells are serialised and
        restored into ``dst``'s stream: bytes proportional to ``src``'s length, the
        values bit-identical and at the same cell indices as if ``dst`` had computed
        them. Returns False (``dst`` left empty) if llama.cpp refused.
        """
        ll = _llama()
        if self.cfg.kv_unified:
            self.seq_rm(dst, 0, -1)
            self.seq_cp(src, dst, 0, n)
            return True
        size = ll.llama_state_seq_get_size(self.ptr, src)
        try:
            buf = np.empty(size, dtype=np.uint8)  # not zero-filled: llama.cpp writes every byte it reports
        except MemoryError:
            self.seq_rm(dst, 0, -1)
            return False
        ptr = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        written = ll.llama_state_seq_get_data(self.ptr, ptr, size, src)
        restored = written > 0 and ll.llama_state_seq_set_data(self.ptr, ptr, written, dst) > 0
        if not (restored and self.seq_rm(dst, n, -1)):  # keep the prefix: the source may hold more
            self.seq_rm(dst, 0, -1)
            return False
        return True

    def clear(self) -> None:
        _llama().llama_memory_clear(self.mem, True)

    def set_adapters(self, adapters: list, scales: list[float]) -> None:
        ll = _llama()
        n = len(adapters)
        arr = (ll.llama_adapter_lora_p_ctypes * n)(*adapters) if n else None
        sc = (ctypes.c_float * n)(*scales) if n else None
        ll.llama_set_adapters_lora(self.ptr, arr, n, sc)

    def close(self):
        if self.ptr:
            self.batch.close()
            _llama().llama_free(self.ptr)
            self.ptr = None

    def memory(self) -> ContextMemory:
        """Bytes this context allocated: KV cache and compute buffers (read-only; no C call
        touches the context itself, so it is safe from any thread while the context lives)."""
        exact = kv_cache_bytes(self.model, self.n_ctx)
        reported = self._reported.kv_cache
        # The computed figure is exact to the byte but knows only plain attention caches;
        # llama.cpp's own report covers every cache kind but is rounded to 0.01 MiB. Trust
        # the computation where the report confirms it (a quantized KV type or per-layer
        # head counts would make the two disagree), llama.cpp's report everywhere else.
        if exact is not None and (reported is None or abs(exact - reported) <= _REPORT_ROUNDING):
            kv = exact
        else:
            kv = reported
        return ContextMemory(kv_cache=kv, compute=self._reported.compute)


class Batch:
    """A reusable ``llama_batch``; ``add`` writes straight into its C arrays."""

    def __init__(self, capacity: int, n_seq_max: int):
        ll = _llama()
        self.capacity = capacity
        self.raw = ll.llama_batch_init(capacity, 0, 1)
        self.n = 0

    def clear(self) -> None:
        self.n = 0
        self.raw.n_tokens = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index (for ``LlamaContext.logits``)."""
        i = self.n
        r = self.raw
        r.token[i] = token
        r.pos[i] = pos
        r.n_seq_id[i] = 1
        r.seq_id[i][0] = seq
        r.logits[i] = logits
        self.n = i + 1
        r.n_tokens = self.n
        return i

    @property
    def free(self) -> int:
        return self.capacity - self.n

    def close(self):
        if self.raw is not None:
            _llama().llama_batch_free(self.raw)
            self.raw = None


def load_lora(model: LlamaModel, path: str):
    ll = _llama()
    ptr = ll.llama_adapter_lora_init(model.ptr, path.encode())
    if not ptr:
        raise InvalidModelFile(f"llama.cpp could not load the LoRA adapter {os.path.basename(path)} for this base model")
    return ptr


# --- memory accounting --------------------------------------------------------------
# llama.cpp's C API has no call that returns what a context allocated: the breakdown
# (llama_get_memory_breakdown) is C++-only, and llama_state_get_size is the size of a
# *saved* state (used cells only: 17 bytes for an empty cache), not of the allocation.
# But llama.cpp logs every backend buffer it allocates, as "<backend> <what> buffer
# size = <MiB> MiB", on the thread that creates the context. capture_log() collects
# those lines for that thread only, so contexts created concurrently on other threads
# never mix their reports.

_log_capture = threading.local()
_MIB = 1024 * 1024
_REPORT_ROUNDING = _MIB // 100 + 1  # one unit of llama.cpp's "%.2f MiB" (rounding + tensor padding)
_BUFFER_LINE = re.compile(r"(\S+) (KV|RS|compute) buffer size =\s*([0-9]+(?:\.[0-9]+)?) MiB")
# Bytes per element of the unquantized KV types (ggml_type ids: F32, F16, BF16).
_KV_TYPE_BYTES = {0: 4, 1: 2, 30: 2}


@contextlib.contextmanager
def capture_log():
    """Collect this thread's llama.cpp log lines (as they are also logged) while inside."""
    lines: list[str] = []
    outer = getattr(_log_capture, "lines", None)
    _log_capture.lines = lines
    try:
        yield lines
    finally:
        _log_capture.lines = outer


@dataclass(frozen=True)
class ReportedBuffers:
    """Buffer sizes llama.cpp logged while creating a context, in bytes (None: not reported)."""

    kv_cache: int | None  # attention KV ("KV") plus recurrent state ("RS"), every backend
    compute: int | None  # the scheduler's graph buffers, every backend

    @classmethod
    def parse(cls, lines: list[str]) -> ReportedBuffers:
        cache: list[float] = []
        compute: dict[str, float] = {}
        for line in lines:
            for backend, what, mib in _BUFFER_LINE.findall(line):
                if what == "compute":
                    # One scheduler buffer per backend: a later reservation replaces it.
                    compute[backend] = float(mib)
                else:
                    cache.append(float(mib))  # an iSWA or hybrid model has one cache of each kind
        return cls(
            kv_cache=round(sum(cache) * _MIB) if cache else None,
            compute=round(sum(compute.values()) * _MIB) if compute else None,
        )


@dataclass(frozen=True)
class ContextMemory:
    kv_cache: int | None  # bytes; None where llama.cpp could not tell
    compute: int | None


def kv_cache_bytes(
    model: LlamaModel, n_cells: int, type_k: int | None = None, type_v: int | None = None
) -> int | None:
    """Exact bytes of a plain attention KV cache of ``n_cells`` cells (all sequences and
    streams together: llama_n_ctx), as llama_kv_cache allocates it: per layer, K is
    [n_embd_head_k * n_head_kv, cells] and V is [n_embd_head_v * n_head_kv, cells].

    None for the caches this formula does not describe: recurrent state, hybrid and
    sliding-window models, and quantized KV types (their rows are block-packed).
    The types default to what our contexts use: llama.cpp's default (F16).
    """
    ll = _llama()
    m = model.ptr
    if not m or ll.llama_model_is_recurrent(m) or ll.llama_model_is_hybrid(m) or ll.llama_model_n_swa(m) > 0:
        return None
    if type_k is None or type_v is None:
        defaults = ll.llama_context_default_params()
        type_k = defaults.type_k if type_k is None else type_k
        type_v = defaults.type_v if type_v is None else type_v
    if type_k not in _KV_TYPE_BYTES or type_v not in _KV_TYPE_BYTES:
        return None
    n_head = ll.llama_model_n_head(m)
    n_head_kv = ll.llama_model_n_head_kv(m)
    if n_head <= 0 or n_head_kv <= 0:
        return None
    arch = model.meta("general.architecture") or ""
    head_k = _meta_int(model, f"{arch}.attention.key_length") or ll.llama_model_n_embd(m) // n_head
    head_v = _meta_int(model, f"{arch}.attention.value_length") or ll.llama_model_n_embd(m) // n_head
    per_cell = n_head_kv * (head_k * _KV_TYPE_BYTES[type_k] + head_v * _KV_TYPE_BYTES[type_v])
    return n_cells * ll.llama_model_n_layer(m) * per_cell


def _meta_int(model: LlamaModel, key: str) -> int | None:
    v = model.meta(key)
    try:
        return int(v) if v is not None else None
    except ValueError:  # an array (per-layer values) prints as "arr[i32,N]": not one number
        return None
