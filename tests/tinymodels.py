"""Tiny random Llama-family models for tests: a GGUF for llama.cpp, an HF directory for torch.

Both writers draw the same weights for the same config and seed, so
``write_tiny_gguf(p, seed=3)`` and ``write_tiny_hf_dir(d, seed=3)`` are one model in
two formats: llama.cpp on the GGUF and transformers / openherd.model on the HF
directory give the same logits (up to float error). That is what parity tests need.

Two real 512-token tokenizers, both learned on first use from a small built-in
English text, both covering every UTF-8 byte so emoji/CJK round-trip exactly:

* ``vocab="bpe"`` (default, like SmolLM2): byte-level BPE over GPT-2's
  ``bytes_to_unicode`` alphabet, ChatML specials ``<|endoftext|>`` = 0 (unk),
  ``<|im_start|>`` = 1 (bos), ``<|im_end|>`` = 2 (eos, pad), no BOS added.
  Pre-tokenization is SmolLM2's (single digits, then the GPT-2 regex): llama.cpp's
  ``tokenizer.ggml.pre = "smollm"`` and the tokenizers ``Digits`` + ``ByteLevel`` sequence.
* ``vocab="spm"`` (like Llama 2 / TinyLlama): SentencePiece pieces with "▁" for spaces
  and ``<0xNN>`` byte fallback, ``<unk>`` = 0, ``<s>`` = 1 (added), ``</s>`` = 2.

llama.cpp and the HF tokenizer produce the same ids for both (tests/test_gguf.py).

Only numpy, gguf, safetensors and tokenizers are needed (no torch).
"""

from __future__ import annotations

import functools
import itertools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ChatML, as SmolLM2-Instruct uses it, without SmolLM2's built-in default system prompt
# so tests can predict the rendered prompt exactly.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # the "bpe" vocab's
SPM_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # the "spm" vocab's
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2  # the same ids in both vocabularies
PAD_ID = EOS_ID  # as in SmolLM2 ("bpe"); the "spm" vocab has no pad token, like Llama 2
N_SPECIAL = 3
N_VOCAB = 512  # specials + 256 byte tokens + learned merges
VOCABS = ("bpe", "spm")
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_BYTE = 1, 2, 3, 6  # gguf.TokenType

ARCHS = ("llama", "qwen2")
GGUF_DTYPES = ("f32", "f16", "q8_0")
HF_DTYPES = ("float32", "float16")

# The text the tokenizer's merges are learned from. Its content only shapes which
# merges exist; any UTF-8 still tokenizes through the byte tokens.
_CORPUS = """\
The herd moved slowly across the high plain, and the llamas kept close to one another
as the wind came down from the mountains. A llama is a calm animal, but it will spit
when it is angry. The people who keep them say that a good herd needs water, grass,
shelter from the cold, and a patient keeper who knows every animal by name.
In the morning the keeper counts the herd: one, two, three, four, five, six, seven.
She writes the number in a small book, then she opens the gate and they walk out to
the fields. When the sun is high they rest in the shade of the old stone wall.
Models are like herds too. You pull them, you run them, you serve them, and you
teach them new things with a little data and a lot of care. A small model can answer
simple questions, write a short story, or explain what a function does:
    def add(a, b):
        return a + b
The question is not whether the model is large, but whether it is useful for the task
that you have. Test it, measure it, and keep the results in a table that others can read.
What is the capital of France? The capital of France is Paris. What is two plus two?
Two plus two is four. Hello! How are you today? I am fine, thank you for asking.
"""

# GPT-2's pre-tokenizer regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM applies "\p{N}" first).
_PRETOKEN_RE = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass(frozen=True)
class TinyConfig:
    arch: str = "llama"  # "llama" (Q/K permuted in GGUF, rope NORM) or "qwen2" (q/k/v biases, rope NEOX)
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2  # grouped-query attention: 2 query heads share each K/V head
    n_ff: int = 128
    n_ctx: int = 512  # context_length / max_position_embeddings
    seed: int = 0
    tie_embeddings: bool = False  # no output.weight / lm_head: logits use the embedding matrix
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    quiet_specials: bool = True  # zero the special tokens' output rows (see _tiny_weights)
    vocab: str = "bpe"  # "bpe" (SmolLM2-like byte-level BPE) or "spm" (Llama-2-like SentencePiece)

    def __post_init__(self):
        if self.vocab not in VOCABS:
            raise ValueError(f"vocab must be one of {VOCABS}, got {self.vocab!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError("n_embd must divide by n_head, and n_head by n_head_kv")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_vocab(self) -> int:
        return len(tiny_vocab(self.vocab))


# --------------------------------------------------------------------------- tokenizer


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (openai/gpt-2 encoder.py)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _train_merges(words: Counter[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training (Sennrich et al. 2016): `words` maps a pre-token, spelled in
    base symbols (one character each), to its count.

    Ties go to the lexicographically smallest pair so the result never depends on
    dict ordering. Pair counts are updated incrementally per merge, which keeps
    this well under 0.1 s for the built-in corpus.
    """
    seqs = {w: list(w) for w in words}
    pairs: Counter[tuple[str, str]] = Counter()
    for w, c in words.items():
        for pair in itertools.pairwise(seqs[w]):
            pairs[pair] += c

    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs = +pairs  # drop zero counts
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        a, b = best
        for w, c in words.items():
            s = seqs[w]
            if len(s) < 2 or a not in s:
                continue
            out: list[str] = []
            i = 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            if len(out) != len(s):
                for pair in itertools.pairwise(s):
                    pairs[pair] -= c
                for pair in itertools.pairwise(out):
                    pairs[pair] += c
                seqs[w] = out
    return merges


@dataclass(frozen=True)
class TinyVocab:
    """A tokenizer's vocabulary, shared by the GGUF and HF writers. Treat as read-only (cached)."""

    kind: str  # "bpe" (GPT-2 byte-level, llama.cpp "gpt2") or "spm" (SentencePiece-style, llama.cpp "llama")
    tokens: list[str]  # in id order
    token_types: list[int]  # gguf.TokenType values
    scores: list[float] | None  # SentencePiece piece scores (spm only): higher merges first
    merges: list[tuple[str, str]]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int | None
    add_bos: bool  # whether tokenizing adds BOS (SmolLM2: no; Llama 2: yes)

    def __len__(self) -> int:
        return len(self.tokens)


def _append_merged(tokens: list[str], merges: list[tuple[str, str]]) -> None:
    known = set(tokens)
    for a, b in merges:
        if a + b not in known:  # two merges can produce the same string; keep one id
            tokens.append(a + b)
            known.add(a + b)


@functools.cache
def tiny_vocab(kind: str = "bpe") -> TinyVocab:
    """The 512-token vocabulary of the tiny models.

    bpe: <|endoftext|> <|im_start|> <|im_end|> (CONTROL), then byte b at id 3 + b
         (in bytes_to_unicode spelling), then merged tokens. No BOS added (SmolLM2).
    spm: <unk> <s> </s>, then byte-fallback tokens <0x00>..<0xFF> at id 3 + b (BYTE),
         then the corpus characters and merged pieces with "▁" for spaces. BOS is
         added and a leading space is prepended (Llama 2 / TinyLlama).
    """
    import regex

    if kind == "bpe":
        byte_map = bytes_to_unicode()
        words = Counter(
            "".join(byte_map[b] for b in w.encode("utf-8")) for w in regex.findall(_PRETOKEN_RE, _CORPUS)
        )
        tokens = list(SPECIAL_TOKENS) + [byte_map[b] for b in range(256)]
        merges = _train_merges(words, N_VOCAB - len(tokens))
        _append_merged(tokens, merges)
        types = [TOKEN_CONTROL] * len(SPECIAL_TOKENS) + [TOKEN_NORMAL] * (len(tokens) - len(SPECIAL_TOKENS))
        return TinyVocab("bpe", tokens, types, None, merges, BOS_ID, EOS_ID, UNK_ID, PAD_ID, add_bos=False)
    if kind == "spm":
        # SentencePiece spells a space as "▁" and starts the text with one (add_space_prefix).
        words = Counter("▁" + w for w in _CORPUS.split())
        chars = sorted({c for w in words for c in w})
        tokens = list(SPM_SPECIAL_TOKENS) + [f"<0x{b:02X}>" for b in range(256)] + chars
        merges = _train_merges(words, N_VOCAB - len(tokens))
        n_base = len(tokens)
        _append_merged(tokens, merges)
        types = [TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_CONTROL] + [TOKEN_BYTE] * 256
        types += [TOKEN_NORMAL] * (len(tokens) - len(types))
        # llama.cpp's SPM tokenizer merges the adjacent pair whose result scores highest;
        # scoring merged pieces by merge rank makes it follow the BPE merge order.
        scores = [0.0] * 259 + [-1e6] * (n_base - 259) + [-float(r) for r in range(len(tokens) - n_base)]
        return TinyVocab("spm", tokens, types, scores, merges, BOS_ID, EOS_ID, UNK_ID, None, add_bos=True)
    raise ValueError(f"vocab must be 'bpe' or 'spm', got {kind!r}")


# --------------------------------------------------------------------------- weights


def _tiny_weights(cfg: TinyConfig) -> dict[str, np.ndarray]:
    """Random float32 weights in Hugging Face naming and layout ((out, in) matrices).

    Matrices are N(0, 1/fan_in) (the embedding too, so tied logits are tame) and
    every block starts with an RMSNorm, so activations stay O(1) through the random
    network and logits have a spread of about one: greedy output then depends on
    the prompt instead of collapsing to one token. With ``quiet_specials`` the
    output rows of the special tokens are zero, so their logit is exactly 0 while
    the best of ~500 ordinary logits is ~+3: greedy decoding never emits
    ``<|im_end|>`` / ``</s>`` and tests get outputs of the length they asked for.
    """
    rng = np.random.default_rng(cfg.seed)
    d, hd, v = cfg.n_embd, cfg.head_dim, cfg.n_vocab

    def linear(n_out: int, n_in: int) -> np.ndarray:
        return (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    w: dict[str, np.ndarray] = {"model.embed_tokens.weight": linear(v, d)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm()
        w[p + "self_attn.q_proj.weight"] = linear(cfg.n_head * hd, d)
        w[p + "self_attn.k_proj.weight"] = linear(cfg.n_head_kv * hd, d)
        w[p + "self_attn.v_proj.weight"] = linear(cfg.n_head_kv * hd, d)
        if cfg.arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = (0.1 * rng.standard_normal(cfg.n_head * hd)).astype(np.float32)
            w[p + "self_attn.k_proj.bias"] = (0.1 * rng.standard_normal(cfg.n_head_kv * hd)).astype(
                np.float32
            )
            w[p + "self_attn.v_proj.bias"] = (0.1 * rng.standard_normal(cfg.n_head_kv * hd)).astype(
                np.float32
            )
        w[p + "self_attn.o_proj.weight"] = linear(d, cfg.n_head * hd)
        w[p + "post_attention_layernorm.weight"] = norm()
        w[p + "mlp.gate_proj.weight"] = linear(cfg.n_ff, d)
        w[p + "mlp.up_proj.weight"] = linear(cfg.n_ff, d)
        w[p + "mlp.down_proj.weight"] = linear(d, cfg.n_ff)
    w["model.norm.weight"] = norm()
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = linear(v, d)
    if cfg.quiet_specials:
        out = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
        w[out][:N_SPECIAL] = 0.0
    return w


def _permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout -> llama.cpp's, exactly as convert_hf_to_gguf.py LlamaModel.permute.

    HF Llama rotates the two halves of each head (rotate_half), while llama.cpp's
    LLAMA_ROPE_TYPE_NORM rotates adjacent pairs (the original Meta layout). The HF
    conversion interleaves each head's rows back, so a GGUF stores Q and K rows
    permuted relative to the safetensors. Random weights do not care, but any code
    moving weights between the formats (the torch loader, export) must apply this
    (or its inverse). Qwen2 uses NEOX rope in llama.cpp and is stored unpermuted.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (llama.cpp naming)."""
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_NAMES[rest]}"


def gguf_tensors(cfg: TinyConfig) -> dict[str, np.ndarray]:
    """The float32 tensors write_tiny_gguf stores (llama.cpp names and Q/K layout), before dtype casts."""
    out = {}
    for name, arr in _tiny_weights(cfg).items():
        if cfg.arch == "llama" and name.endswith("q_proj.weight"):
            arr = _permute_qk(arr, cfg.n_head)
        elif cfg.arch == "llama" and name.endswith("k_proj.weight"):
            arr = _permute_qk(arr, cfg.n_head_kv)
        out[gguf_tensor_name(name)] = arr
    return out


# --------------------------------------------------------------------------- GGUF


def write_tiny_gguf(
    path: str | Path,
    *,
    arch: str = "llama",
    vocab: str = "bpe",
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx: int = 512,
    seed: int = 0,
    dtype: str = "f32",
    chat_template: str | None = CHATML_TEMPLATE,
    tie_embeddings: bool = False,
    rope_theta: float = 10000.0,
    quiet_specials: bool = True,
    name: str | None = None,
) -> Path:
    """Write a tiny random model that real llama.cpp loads, tokenizes with and generates from.

    vocab: "bpe" (SmolLM2-like: byte-level BPE, ChatML specials, no BOS added) or
    "spm" (Llama-2-like: SentencePiece pieces with byte fallback, BOS added).
    dtype: "f32", "f16" or "q8_0" for the 2-D weight matrices (norms and biases
    stay F32, as llama.cpp's converters do); general.file_type follows it.
    chat_template=None leaves the template out. Deterministic for a given seed.
    """
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"dtype must be one of {GGUF_DTYPES}, got {dtype!r}")
    cfg = TinyConfig(arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                     n_ctx=n_ctx, seed=seed, tie_embeddings=tie_embeddings, rope_theta=rope_theta,
                     quiet_specials=quiet_specials, vocab=vocab)  # fmt: skip
    path = Path(path)
    voc = tiny_vocab(vocab)

    w = gguf.GGUFWriter(path, arch)
    w.add_name(name or f"tiny-{arch}-{dtype}-s{seed}")
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.n_ff)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_head_kv)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(len(voc))
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]  # fmt: skip
    w.add_file_type(int(file_type))
    if dtype == "q8_0":
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    if voc.kind == "bpe":
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("smollm")
        w.add_token_merges([f"{a} {b}" for a, b in voc.merges])
    else:
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_scores(voc.scores)
        w.add_add_space_prefix(True)
    w.add_token_list(voc.tokens)
    w.add_token_types(voc.token_types)
    w.add_bos_token_id(voc.bos_id)
    w.add_eos_token_id(voc.eos_id)
    w.add_unk_token_id(voc.unk_id)
    if voc.pad_id is not None:
        w.add_pad_token_id(voc.pad_id)
    w.add_add_bos_token(voc.add_bos)
    w.add_add_eos_token(False)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    for tname, arr in gguf_tensors(cfg).items():
        if arr.ndim == 1 or dtype == "f32":
            w.add_tensor(tname, arr)
        elif dtype == "f16":
            w.add_tensor(tname, arr.astype(np.float16))
        else:
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(tname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --------------------------------------------------------------------------- Hugging Face directory


def build_hf_tokenizer(vocab: str = "bpe"):
    """The same vocabulary as a `tokenizers.Tokenizer`.

    bpe: ByteLevel BPE with SmolLM2's pre-tokenizer (single digits, then GPT-2 regex).
    spm: the Llama-2 `tokenizer.json` layout: "▁" prepended and substituted for spaces,
    BPE with byte fallback, and a decoder that undoes both; BOS added on encode.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    voc = tiny_vocab(vocab)
    ids = {t: i for i, t in enumerate(voc.tokens)}
    specials = voc.tokens[:N_SPECIAL]
    if voc.kind == "bpe":
        tok = Tokenizer(models.BPE(vocab=ids, merges=voc.merges, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:
        bos = voc.tokens[voc.bos_id]
        tok = Tokenizer(
            models.BPE(vocab=ids, merges=voc.merges, unk_token=voc.tokens[voc.unk_id], byte_fallback=True,
                       fuse_unk=True)
        )  # fmt: skip
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, voc.bos_id)]
        )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def write_tiny_hf_dir(
    path: str | Path,
    *,
    arch: str = "llama",
    vocab: str = "bpe",
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx: int = 512,
    seed: int = 0,
    dtype: str = "float32",
    chat_template: str | None = CHATML_TEMPLATE,
    tie_embeddings: bool = False,
    rope_theta: float = 10000.0,
    quiet_specials: bool = True,
) -> Path:
    """Write a Hugging Face model directory holding the same model as write_tiny_gguf.

    Files: config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, generation_config.json. dtype "float32" or "float16"
    (numpy has no bfloat16). Needs no torch.
    """
    from safetensors.numpy import save_file

    if dtype not in HF_DTYPES:
        raise ValueError(f"dtype must be one of {HF_DTYPES}, got {dtype!r}")
    cfg = TinyConfig(arch=arch, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_head_kv=n_head_kv, n_ff=n_ff,
                     n_ctx=n_ctx, seed=seed, tie_embeddings=tie_embeddings, rope_theta=rope_theta,
                     quiet_specials=quiet_specials, vocab=vocab)  # fmt: skip
    voc = tiny_vocab(vocab)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = np.float32 if dtype == "float32" else np.float16

    weights = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in _tiny_weights(cfg).items()}
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})

    config = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "vocab_size": cfg.n_vocab,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.n_ff,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_head_kv,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.n_ctx,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": voc.bos_id,
        "eos_token_id": voc.eos_id,
        "pad_token_id": voc.pad_id,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": dtype,
    }
    if arch == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
    _write_json(path / "config.json", config)
    _write_json(
        path / "generation_config.json",
        {"bos_token_id": voc.bos_id, "eos_token_id": voc.eos_id, "pad_token_id": voc.pad_id},
    )

    build_hf_tokenizer(vocab).save(str(path / "tokenizer.json"))
    specials = {
        "bos_token": voc.tokens[voc.bos_id],
        "eos_token": voc.tokens[voc.eos_id],
        "unk_token": voc.tokens[voc.unk_id],
    }
    if voc.pad_id is not None:
        specials["pad_token"] = voc.tokens[voc.pad_id]
    special_tokens = voc.tokens[:N_SPECIAL]
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": voc.add_bos,
        "add_eos_token": False,
        "add_prefix_space": voc.kind == "spm",
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.n_ctx,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(special_tokens)
        },  # fmt: skip
        **specials,
    }
    if voc.kind == "bpe":
        tok_config["additional_special_tokens"] = list(special_tokens)
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    _write_json(path / "tokenizer_config.json", tok_config)
    _write_json(path / "special_tokens_map.json", specials)
    return path


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
