"""Constrained decoding with llguidance, applied per sequence inside the batch.

For a constrained sequence, before sampling we ask its matcher for the set of
allowed next tokens and set every other logit to -inf in llama.cpp's logits
buffer (a zero-copy numpy view), then let the normal sampler chain run. The
sampled token is fed back with ``consume_token``. Output therefore always
parses: no retries.
"""

from __future__ import annotations

import json
import threading
import warnings

import numpy as np

from ..errors import InvalidRequest
from .types import GrammarSpec

_tokenizers: dict[int, object] = {}
_tok_lock = threading.Lock()


def _tokenizer_for(model) -> object:
    """llguidance's view of a llama.cpp vocab; ~1 s to build, so cached per model."""
    key = id(model)
    with _tok_lock:
        tok = _tokenizers.get(key)
        if tok is None:
            import llama_cpp
            from llguidance.llamacpp import lltokenizer_from_vocab

            eos = llama_cpp.llama_vocab_eot(model.vocab)
            if eos < 0:
                eos = llama_cpp.llama_vocab_eos(model.vocab)
            with warnings.catch_warnings():  # it calls a llama.cpp API deprecated upstream
                warnings.simplefilter("ignore", DeprecationWarning)
                tok = lltokenizer_from_vocab(model.vocab, eos_token=eos)
            _tokenizers[key] = tok
        return tok


def forget_model(model) -> None:
    with _tok_lock:
        _tokenizers.pop(id(model), None)


def compile_grammar(spec: GrammarSpec) -> str:
    from llguidance import LLMatcher

    try:
        if spec.kind == "json":
            # Any JSON object, like OpenAI's json_object mode.
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults={"whitespace_flexible": False})
        if spec.kind == "json_schema":
            schema = spec.value if isinstance(spec.value, (dict, str)) else None
            if schema is None:
                raise InvalidRequest("json_schema must be an object", param="response_format")
            return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        if spec.kind == "lark":
            return LLMatcher.grammar_from_lark(str(spec.value))
        return LLMatcher.grammar_from_regex(str(spec.value))
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"invalid {spec.kind} grammar: {e}", param="response_format") from None


def validate(spec: GrammarSpec, model) -> None:
    """Reject a bad schema/grammar at submit time with a 400, not mid-generation."""
    from llguidance import LLMatcher

    grammar = compile_grammar(spec)
    is_error, msgs = LLMatcher.validate_grammar_with_warnings(grammar, _tokenizer_for(model))
    if is_error:
        raise InvalidRequest(f"invalid {spec.kind} constraint: {msgs[0] if msgs else 'unsupported'}", param="response_format")


class Constraint:
    def __init__(self, spec: GrammarSpec, model, n_vocab: int):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(_tokenizer_for(model), compile_grammar(spec), log_level=0)
        if self.matcher.is_error():
            raise InvalidRequest(f"invalid {spec.kind} constraint: {self.matcher.get_error()}", param="response_format")
        self.n_vocab = n_vocab
        self._words = (n_vocab + 31) // 32
        self._mask = np.zeros(self._words, dtype=np.int32)

    def apply(self, logits: np.ndarray) -> None:
        """Set disallowed logits to -inf, in place."""
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        allowed = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: self.n_vocab].view(bool)
        logits[~allowed] = -np.inf

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


def schema_text(spec: GrammarSpec) -> str:
    return json.dumps(spec.value) if spec.kind == "json_schema" else str(spec.value)
