"""The tokenizer of a PyTorch-loaded model, from a Hugging Face directory or a GGUF file.

One small wrapper, ``Tokenizer``, over a ``tokenizers.Tokenizer`` (the Rust library
behind transformers' fast tokenizers), so the torch side of openherd never needs
transformers at run time:

    tok = Tokenizer.from_hf_dir("path/to/hf")        # tokenizer.json + tokenizer_config.json
    tok = Tokenizer.from_gguf_metadata(info.metadata)  # tokenizer.ggml.* keys of a GGUF
    ids = tok.encode("Hello", add_special=True)      # BOS added when the model wants it
    tok.decode(ids), tok.chat_template, tok.eos_ids

A GGUF carries no tokenizer.json, only llama.cpp's description of one (vocabulary,
merges or scores, token types, a pre-tokenizer *name*). We rebuild it so that it
tokenizes exactly as llama.cpp does (``llama-vocab.cpp``), because the engine that
serves the model afterwards is llama.cpp: a LoRA trained on other token ids than
the ones it will see at inference is trained on the wrong data.

Two vocabulary types cover the Llama family:

* ``gpt2``: byte-level BPE (Llama 3, SmolLM2, Qwen2). The only per-model piece is
  the pre-tokenizer regex, which llama.cpp selects from ``tokenizer.ggml.pre``;
  ``PRE_TOKENIZER_SPLITS`` copies those regexes.
* ``llama``: SentencePiece BPE with byte fallback (Llama 2, TinyLlama, Mistral).
  The file has scores instead of merges; llama.cpp merges the adjacent pair whose
  joined piece has the highest score, which is BPE with merges ranked by score.

This module imports no torch.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidModelFile

__all__ = ["PRE_TOKENIZER_SPLITS", "Tokenizer"]

# GGUF token types (llama.cpp `llama_token_type`).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# GPT-2's regex; llama.cpp's default for byte-level vocabularies.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> the regexes llama.cpp applies in order (llama-vocab.cpp,
# `llm_tokenizer_bpe`). Each regex splits every piece the previous one produced.
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt2": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    # SmolLM, StarCoder & co. split every digit on its own first.
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "refact": (r"\p{N}", _GPT2_SPLIT),
    "codeshell": (r"\p{N}", _GPT2_SPLIT),
    "llama3": (_LLAMA3_SPLIT,),
    "llama-v3": (_LLAMA3_SPLIT,),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "smaug-bpe": (_LLAMA3_SPLIT,),
    "falcon3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
    "deepseek-r1-qwen": (_QWEN2_SPLIT,),
    "tekken": (_TEKKEN_SPLIT,),
}

# llama.cpp looks a whole pre-token up in the vocabulary before merging for these
# (`ignore_merges`, llama-vocab.cpp), as tiktoken-trained vocabularies expect.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3"}


@dataclass
class Tokenizer:
    """Text <-> token ids for one model, plus what chat formatting needs."""

    backend: Any  # tokenizers.Tokenizer; its post-processor adds BOS/EOS when add_special
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()  # every id that ends a turn; eos_ids[0] is the EOS proper
    chat_template: str | None = None  # the model's own Jinja chat template
    add_bos: bool = False  # whether encode(add_special=True) prepends BOS
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # ----------------------------------------------------------------- encode / decode

    def encode(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, as llama.cpp's tokenize(text, add_special, parse_special).

        add_special: add BOS/EOS where the model wants them. parse_special: read control
        tokens written in the text (`<|im_start|>`) as those tokens; turn it off for
        untrusted text, which then cannot forge turn boundaries.
        """
        if parse_special:
            return list(self.backend.encode(text, add_special_tokens=add_special).ids)
        with self._lock:  # the switch lives on the shared backend
            self.backend.encode_special_tokens = True
            try:
                return list(self.backend.encode(text, add_special_tokens=add_special).ids)
            finally:
                self.backend.encode_special_tokens = False

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        return self.eos_ids[0] if self.eos_ids else None

    @property
    def bos_token(self) -> str:
        return (self.id_to_token(self.bos_id) or "") if self.bos_id is not None else ""

    @property
    def eos_token(self) -> str:
        return (self.id_to_token(self.eos_id) or "") if self.eos_id is not None else ""

    # ----------------------------------------------------------------- Hugging Face directory

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer | None:
        """The tokenizer of a Hugging Face model directory, or None when it has no tokenizer.json."""
        import tokenizers

        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            return None
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise InvalidModelFile(f"cannot read tokenizer.json in {path.name}: {e}") from None
        tok_cfg = _read_json(path / "tokenizer_config.json")
        config = _read_json(path / "config.json")
        gen_cfg = _read_json(path / "generation_config.json")

        def token_id(value: Any) -> int | None:
            # tokenizer_config writes special tokens as a string or an AddedToken dict.
            if isinstance(value, dict):
                value = value.get("content")
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos_id = token_id(tok_cfg.get("bos_token"))
        if bos_id is None:
            bos_id = _first_int(config.get("bos_token_id"))
        eos: list[int] = []
        # Llama 3 lists several ids that end a turn (<|end_of_text|>, <|eot_id|>, <|eom_id|>).
        for value in (
            token_id(tok_cfg.get("eos_token")),
            gen_cfg.get("eos_token_id"),
            config.get("eos_token_id"),
        ):
            for i in value if isinstance(value, list) else [value]:
                if isinstance(i, int) and i not in eos:
                    eos.append(i)

        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja = path / "chat_template.jinja"  # transformers >= 4.49 writes it to its own file
        if not template and jinja.is_file():
            template = jinja.read_text(encoding="utf-8")

        # Whether encode() adds BOS is the post-processor's business; report what it does.
        add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
        return cls(backend, bos_id, tuple(eos), template if isinstance(template, str) else None, add_bos)

    # ----------------------------------------------------------------- GGUF metadata

    @classmethod
    def from_gguf_metadata(cls, md: dict[str, Any]) -> Tokenizer | None:
        """Rebuild the tokenizer llama.cpp would use from a GGUF's tokenizer.ggml.* metadata.

        Returns None when the file carries no vocabulary. Raises InvalidModelFile for a
        vocabulary type or pre-tokenizer this module cannot reproduce exactly.
        """
        tokens = md.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            return None
        kind = md.get("tokenizer.ggml.model", "llama")
        types = md.get("tokenizer.ggml.token_type")
        if not isinstance(types, list) or len(types) != len(tokens):
            types = [TOKEN_NORMAL] * len(tokens)
        if kind == "gpt2":
            backend = _byte_level_bpe(md, tokens, types)
            add_bos_default = False
        elif kind == "llama":
            backend = _sentencepiece_bpe(md, tokens, types)
            add_bos_default = True  # llama.cpp adds BOS to SPM vocabularies unless told otherwise
        else:
            raise InvalidModelFile(
                f"unsupported GGUF tokenizer type {kind!r}: the torch loader reads 'gpt2' (byte-level BPE) and 'llama' (SentencePiece)"
            )

        # Control/user-defined/unknown tokens are matched whole in the text, never split
        # (llama.cpp `tokenizer_st_partition`); control ones are "special" (skippable in decode).
        from tokenizers import AddedToken

        added = [
            AddedToken(tok, special=t != TOKEN_USER_DEFINED, normalized=False)
            for tok, t in zip(tokens, types, strict=True)
            if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)
        ]
        backend.add_special_tokens([a for a in added if a.special])
        backend.add_tokens([a for a in added if not a.special])

        bos_id = _valid_id(md.get("tokenizer.ggml.bos_token_id"), len(tokens))
        eos: list[int] = []
        for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
            i = _valid_id(md.get(f"tokenizer.ggml.{key}"), len(tokens))
            if i is not None and i not in eos:
                eos.append(i)
        add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos_id is not None
        add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and bool(eos)
        _set_post_processor(backend, tokens, bos_id if add_bos else None, eos[0] if add_eos else None)

        template = md.get("tokenizer.chat_template")
        return cls(
            backend, bos_id, tuple(eos), template if isinstance(template, str) and template else None, add_bos
        )


# --------------------------------------------------------------------------- builders


def _byte_level_bpe(md: dict[str, Any], tokens: list[str], types: list[int]):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    pre = md.get("tokenizer.ggml.pre") or "default"
    splits = PRE_TOKENIZER_SPLITS.get(pre)
    if splits is None:
        raise InvalidModelFile(
            f"unsupported GGUF pre-tokenizer {pre!r}; the torch loader knows: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}"
        )
    merges = md.get("tokenizer.ggml.merges")
    if not isinstance(merges, list):
        raise InvalidModelFile("GGUF byte-level vocabulary has no tokenizer.ggml.merges")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    model = models.BPE(
        vocab=vocab, merges=[_split_merge(m) for m in merges], ignore_merges=pre in _IGNORE_MERGES
    )
    backend = Backend(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(s), behavior="isolated") for s in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _split_merge(merge: str) -> tuple[str, str]:
    # llama.cpp splits at the first space after position 0 (a piece may itself start with one).
    pos = merge.find(" ", 1)
    if pos < 0:
        raise InvalidModelFile(f"malformed GGUF merge {merge[:40]!r}")
    return merge[:pos], merge[pos + 1 :]


def _sentencepiece_bpe(md: dict[str, Any], tokens: list[str], types: list[int]):
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers

    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = md.get("tokenizer.ggml.merges")
    if isinstance(merges, list) and merges:
        pairs = [_split_merge(m) for m in merges]
    else:
        scores = md.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise InvalidModelFile("GGUF SentencePiece vocabulary has neither merges nor one score per token")
        pairs = _merges_from_scores(tokens, scores, types, vocab)
    unk_id = _valid_id(md.get("tokenizer.ggml.unknown_token_id"), len(tokens))
    model = models.BPE(
        vocab=vocab,
        merges=pairs,
        unk_token=tokens[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,  # characters outside the vocabulary become <0xNN> byte tokens
    )
    backend = Backend(model)
    # llama.cpp escapes spaces as U+2581 and, with add_space_prefix, puts one more in
    # front of every run of text that starts the input or follows a special token. A
    # normalizer runs once per such run (added tokens are cut out first); Metaspace
    # would not do, as it skips the prefix when the text already starts with a space.
    prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    steps_in = [normalizers.Prepend("\u2581")] if prefix else []
    backend.normalizer = normalizers.Sequence([*steps_in, normalizers.Replace(" ", "\u2581")])
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    return backend


def _merges_from_scores(
    tokens: list[str], scores: list[float], types: list[int], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """Every way to build a normal piece from two pieces, best-scored piece first.

    llama.cpp's SPM tokenizer repeatedly joins the adjacent pair whose joined piece
    has the highest score (leftmost on ties); BPE with merges in this order does the same.
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    for tok, score, t in zip(tokens, scores, types, strict=True):
        if t != TOKEN_NORMAL or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            li, ri = vocab.get(left), vocab.get(right)
            if li is not None and ri is not None:
                ranked.append((-float(score), li, ri, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _set_post_processor(backend, tokens: list[str], bos_id: int | None, eos_id: int | None) -> None:
    from tokenizers import processors

    if bos_id is None and eos_id is None:
        return
    single, special = "$A", []
    if bos_id is not None:
        single = f"{tokens[bos_id]}:0 {single}"
        special.append((tokens[bos_id], bos_id))
    if eos_id is not None:
        single = f"{single} {tokens[eos_id]}:0"
        if eos_id != bos_id:
            special.append((tokens[eos_id], eos_id))
    pair = single + " " + single.replace("$A", "$B").replace(":0", ":1")
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _valid_id(value: Any, n: int) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n else None


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidModelFile(f"cannot parse {path.name}: {e}") from None
    return data if isinstance(data, dict) else {}
