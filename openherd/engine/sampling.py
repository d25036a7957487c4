"""Per-sequence sampling on llama.cpp's native sampler chain.

The chain runs in C over the logits buffer, so the per-token Python cost is one
ctypes call. Order follows llama.cpp's common sampler (and therefore Ollama and
llama-server): logit bias -> penalties -> top-k -> top-p -> min-p -> temperature
-> seeded draw. Temperature 0 is plain argmax.

Penalties look at generated tokens only (vLLM's semantics for OpenAI's
presence/frequency penalties); prompt tokens are not fed to the window.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

from .types import SamplingParams, TopLogprob


def _llama():
    import llama_cpp

    return llama_cpp


class Sampler:
    def __init__(self, params: SamplingParams, n_vocab: int, suppress: tuple[int, ...] = ()):
        """``suppress``: tokens never to sample (end-of-generation under ``ignore_eos``);
        done in C as a -inf logit bias, so it costs nothing per token in Python."""
        ll = _llama()
        self.params = params
        self.seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = lambda s: ll.llama_sampler_chain_add(chain, s)  # noqa: E731
        bias = {t: b for t, b in params.logit_bias.items() if 0 <= t < n_vocab}
        bias.update({t: float("-inf") for t in suppress if 0 <= t < n_vocab})
        if bias:
            arr = (ll.llama_logit_bias * len(bias))(*[ll.llama_logit_bias(t, b) for t, b in bias.items()])
            add(ll.llama_sampler_init_logit_bias(n_vocab, len(bias), arr))
        if params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            last_n = params.repeat_last_n if params.repeat_last_n >= 0 else 1 << 20
            add(ll.llama_sampler_init_penalties(
                n_vocab, last_n, params.repeat_penalty, params.frequency_penalty, params.presence_penalty
            ))
        if params.greedy:
            add(ll.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(ll.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                add(ll.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                add(ll.llama_sampler_init_min_p(params.min_p, 1))
            add(ll.llama_sampler_init_temp(params.temperature))
            add(ll.llama_sampler_init_dist(self.seed & 0xFFFFFFFF))
        self.chain = chain

    def sample(self, ctx_ptr, idx: int) -> int:
        """Sample from batch output ``idx`` and record it in the penalty window."""
        return _llama().llama_sampler_sample(self.chain, ctx_ptr, idx)

    def close(self) -> None:
        if self.chain:
            _llama().llama_sampler_free(self.chain)
            self.chain = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = float(logits.max())
    shifted = logits - m
    return shifted - np.log(np.exp(shifted).sum())


def token_logprobs(logits: np.ndarray, token: int, k: int, piece) -> tuple[float, list[TopLogprob]]:
    """Log-probability of ``token`` under the model's raw distribution, plus the top ``k``.

    Uses the unprocessed logits (before bias, penalties, grammar or temperature),
    which is what OpenAI and vLLM report.
    """
    lp = log_softmax(logits.astype(np.float32, copy=False))
    top: list[TopLogprob] = []
    if k > 0:
        idx = np.argpartition(-lp, k)[:k] if k < lp.shape[0] else np.arange(lp.shape[0])
        idx = idx[np.argsort(-lp[idx], kind="stable")]
        for t in idx.tolist():
            top.append(TopLogprob(token=t, text=piece(t).decode("utf-8", "replace"), logprob=float(lp[t])))
    return float(lp[token]), top


_c_float_p = ctypes.POINTER(ctypes.c_float)
