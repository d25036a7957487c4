"""Training data for `herd tune`: JSONL in, token rows with assistant-only targets out.

    read_jsonl(path)                  -> [Example]    one per line, errors name file:line
    ChatRenderer(tokenizer).tokenize  -> Tokenized    the base model's own chat template,
                                                      trained flag on assistant tokens only
    tokenize_all(...)                 -> [Tokenized]  truncation to --seq-len with a warning
    split_eval / pack_rows / single_rows / batches / collate

Two line formats (one JSON object per line, blank lines ignored):

    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    {"prompt": "Hi", "completion": "Hello!", "system": "optional"}

A prompt/completion line is the same as a user turn followed by an assistant turn,
so both formats are rendered by the model's own chat template, exactly as
``herd run`` will render the prompt at inference time (the engine's
``encode_chat``): a model trained on another prompt format than the one it is
served with learns the wrong thing.

Only assistant turns are trained on: each assistant turn's tokens are the text the
template adds after the generation prompt (``<|im_start|>assistant\\n``), i.e. the
answer and its end-of-turn marker, which is what teaches the model to stop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..chat_template import ChatTemplate
from ..errors import HerdError, InvalidRequest
from ..untrusted import JSONRefused, NotJSON, loads_json

log = logging.getLogger("openherd.tune")

IGNORE = -100  # target id that contributes no loss (F.cross_entropy's ignore_index)
ROLES = ("system", "user", "assistant", "tool")

__all__ = [
    "IGNORE",
    "Batch",
    "ChatRenderer",
    "Example",
    "Row",
    "Tokenized",
    "batches",
    "collate",
    "file_sha256",
    "pack_rows",
    "read_jsonl",
    "single_rows",
    "split_eval",
    "tokenize_all",
]


# --------------------------------------------------------------------------- reading


@dataclass
class Example:
    messages: list[dict[str, Any]]  # OpenAI-shaped chat, ending with at least one assistant turn
    where: str  # "data.jsonl:12", for messages that point at the line


def read_jsonl(path: str | Path) -> list[Example]:
    """Parse a chat or prompt/completion JSONL file. Any bad line is an InvalidRequest
    naming ``file:line`` and what is wrong with it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InvalidRequest(f"data file not found: {path}", param="data") from None
    except IsADirectoryError:
        raise InvalidRequest(f"--data must be a JSONL file, {path} is a directory", param="data") from None
    except OSError as e:
        raise InvalidRequest(f"cannot read {path}: {e.strerror or e}", param="data") from None
    examples: list[Example] = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRequest(f"{where}: not UTF-8 text (byte {e.start + 1})", param="data") from None
        try:
            obj = loads_json(text, where)
        except NotJSON as e:
            raise InvalidRequest(f"{where}: invalid JSON ({e.problem})", param="data") from None
        except JSONRefused as e:  # too deep, a number too long, a lone surrogate
            raise InvalidRequest(f"{where}: {e.problem}", param="data") from None
        examples.append(Example(parse_record(obj, where), where))
    if not examples:
        raise InvalidRequest(f"{path} has no examples (expected one JSON object per line)", param="data")
    return examples


def parse_record(obj: Any, where: str) -> list[dict[str, Any]]:
    """One JSONL record -> a list of messages, checked."""

    def bad(problem: str) -> InvalidRequest:
        return InvalidRequest(f"{where}: {problem}", param="data")

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise bad('"messages" must be a non-empty list')
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise bad(f"messages[{i}] must be an object with role and content")
            role = m.get("role")
            if role not in ROLES:
                raise bad(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}")
            content = m.get("content")
            if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
                raise bad(f"messages[{i}].content must be a string")
            out.append(dict(m))
        if not any(m["role"] == "assistant" and (m.get("content") or m.get("tool_calls")) for m in out):
            raise bad("no assistant message to learn from")
        return out
    if "prompt" in obj or "completion" in obj:
        prompt, completion, system = obj.get("prompt"), obj.get("completion"), obj.get("system")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise bad('"prompt" and "completion" must both be strings')
        if not completion:
            raise bad('"completion" is empty: nothing to learn from')
        if system is not None and not isinstance(system, str):
            raise bad('"system" must be a string')
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    keys = ", ".join(sorted(map(str, obj))[:5]) or "none"
    raise bad(f'expected "messages" or "prompt"/"completion" keys, found {keys}')


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------- rendering


@dataclass
class Tokenized:
    ids: list[int]  # token ids of the whole conversation
    trained: list[bool]  # True for assistant tokens (what the loss covers)
    where: str
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)


class ChatRenderer:
    """Render conversations with the model's own template and tokenize them with flags.

    `tokenizer` is openherd.tokenizer.Tokenizer (``encode``, ``bos_id``, ``bos_token``,
    ``eos_token``, ``add_bos``, ``chat_template``). Without a template the model gets
    ChatML, as the engine does.
    """

    def __init__(self, tokenizer: Any, template: str | None = None):
        self.tok = tokenizer
        self.template = ChatTemplate(template or tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)

    def render(self, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
        """The full conversation text and the character spans of assistant output."""
        full = self._render(messages, False, where)
        spans: list[tuple[int, int]] = []
        pos = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], True, where) if i else ""
            upto = self._render(messages[: i + 1], False, where)
            if i and upto.startswith(prompt) and full.startswith(upto) and len(prompt) >= pos:
                start, end = len(prompt), len(upto)
            else:
                # A template that rewrites earlier turns (or rejects a conversation that starts
                # with the assistant) is not incremental: train on the answer text itself and the
                # end-of-turn token right after it.
                content = m.get("content") or ""
                start = full.find(content, pos) if content else -1
                if start < 0:
                    raise InvalidRequest(f"{where}: cannot find assistant message {i} in the rendered chat template")
                end = start + len(content)
                eos = self.tok.eos_token
                if eos and full.startswith(eos, end):
                    end += len(eos)
            if end > start:
                spans.append((start, end))
            pos = end
        return full, spans

    def _render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
        try:
            return self.template.render(messages, add_generation_prompt=add_generation_prompt)
        except HerdError as e:
            raise InvalidRequest(f"{where}: {e.message}", param="data") from None

    def tokenize(self, example: Example) -> Tokenized:
        full, spans = self.render(example.messages, example.where)
        ids: list[int] = []
        trained: list[bool] = []
        # Same BOS rule as the engine's encode_chat: add it unless the template wrote it.
        bos = self.tok.bos_token
        if self.tok.add_bos and self.tok.bos_id is not None and not (bos and full.startswith(bos)):
            ids.append(self.tok.bos_id)
            trained.append(False)
        # Tokenize segment by segment so the prompt part gets exactly the tokens the engine
        # will feed at inference (it tokenizes the prompt alone), never a merge across the
        # prompt/answer boundary.
        cuts = [0]
        for s, e in spans:
            cuts += [s, e]
        cuts.append(len(full))
        for k in range(len(cuts) - 1):
            seg = full[cuts[k] : cuts[k + 1]]
            if not seg:
                continue
            seg_ids = self.tok.encode(seg, add_special=False)
            ids += seg_ids
            trained += [k % 2 == 1] * len(seg_ids)
        return Tokenized(ids, trained, example.where)


def tokenize_all(examples: Sequence[Example], renderer: ChatRenderer, seq_len: int) -> list[Tokenized]:
    """Tokenize every example; truncate ones longer than `seq_len` (warning once, with
    where), drop ones with no trained token left (warning)."""
    out: list[Tokenized] = []
    truncated: list[str] = []
    dropped: list[str] = []
    for ex in examples:
        t = renderer.tokenize(ex)
        if len(t.ids) > seq_len:
            t = Tokenized(t.ids[:seq_len], t.trained[:seq_len], t.where, truncated=True)
        # A target is the *next* token, so the first position never is one.
        if not any(t.trained[1:]):
            dropped.append(t.where)
            continue
        if t.truncated:
            truncated.append(t.where)
        out.append(t)
    if truncated:
        log.warning(
            "%d example(s) longer than --seq-len %d tokens were truncated (%s); raise --seq-len to keep them whole",
            len(truncated), seq_len, _first(truncated),
        )  # fmt: skip
    if dropped:
        log.warning(
            "%d example(s) have no assistant tokens within --seq-len %d and were skipped (%s)",
            len(dropped), seq_len, _first(dropped),
        )  # fmt: skip
    if not out:
        raise InvalidRequest(f"no usable training examples: every prompt is longer than --seq-len {seq_len}")
    return out


def _first(wheres: list[str], n: int = 3) -> str:
    return ", ".join(wheres[:n]) + (", ..." if len(wheres) > n else "")


def split_eval(items: Sequence[Any], fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out `fraction` of the items (at least one training item stays); deterministic in `seed`."""
    if not 0.0 <= fraction < 1.0:
        raise InvalidRequest(f"--eval-split must be in [0, 1), got {fraction}", param="eval_split")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(int(len(items) * fraction), len(items) - 1)
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


# --------------------------------------------------------------------------- rows and batches


@dataclass
class Row:
    """One training sequence: a single example, or several packed end to end."""

    ids: list[int] = field(default_factory=list)
    trained: list[bool] = field(default_factory=list)
    doc: list[int] = field(default_factory=list)  # which packed example each token belongs to (0, 1, ...)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, t: Tokenized) -> None:
        d = self.doc[-1] + 1 if self.doc else 0
        self.ids += t.ids
        self.trained += t.trained
        self.doc += [d] * len(t.ids)


def single_rows(examples: Sequence[Tokenized]) -> list[Row]:
    rows = []
    for t in examples:
        r = Row()
        r.add(t)
        rows.append(r)
    return rows


def pack_rows(examples: Sequence[Tokenized], seq_len: int) -> list[Row]:
    """Pack examples end to end into rows of at most `seq_len` tokens (greedy, in order).

    Packed examples do not see each other: the batch carries document ids, attention is
    block-diagonal and positions restart at 0 for every example, so a packed example
    trains exactly as it would alone, with less padding.
    """
    rows: list[Row] = []
    cur = Row()
    for t in examples:
        if len(cur) and len(cur) + len(t) > seq_len:
            rows.append(cur)
            cur = Row()
        cur.add(t)
    if len(cur):
        rows.append(cur)
    return rows


@dataclass
class Batch:
    input_ids: Any  # (B, T) long
    targets: Any  # (B, T) long: the next token where it is trained, IGNORE elsewhere
    positions: Any  # (B, T) long RoPE positions (restarting per packed example), or None = 0..T-1
    doc_ids: Any  # (B, T) long packed-example ids (-1 on padding), or None = one example per row
    n_tokens: int  # real (non-padding) tokens
    n_targets: int  # trained targets


def collate(rows: Sequence[Row], pad_id: int, packed: bool, device: Any = None) -> Batch:
    """Right-pad rows to the longest and build next-token targets that never cross examples."""
    import torch

    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    doc = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r)
        ids[b, :n] = torch.tensor(r.ids)
        doc[b, :n] = torch.tensor(r.doc)
        nxt = torch.tensor(r.ids[1:])
        keep = torch.tensor(r.trained[1:]) & (doc[b, 1:n] == doc[b, : n - 1])
        targets[b, : n - 1] = torch.where(keep, nxt, torch.full_like(nxt, IGNORE))
    n_tokens = sum(len(r) for r in rows)
    positions = None
    if packed:
        # Position of each token within its own example: index minus the example's start.
        idx = torch.arange(T).expand(len(rows), T)
        starts = torch.zeros_like(doc)
        is_start = torch.ones_like(doc, dtype=torch.bool)
        is_start[:, 1:] = doc[:, 1:] != doc[:, :-1]
        starts = torch.where(is_start, idx, torch.zeros_like(idx)).cummax(dim=1).values
        positions = (idx - starts).to(device)
    n_targets = int((targets != IGNORE).sum())
    return Batch(ids.to(device), targets.to(device), positions, doc.to(device) if packed else None, n_tokens, n_targets)


def batches(rows: Sequence[Row], batch_size: int, seed: int, start: int = 0) -> Iterator[list[Row]]:
    """An endless stream of micro-batches: each epoch is a fresh permutation (seeded by
    seed + epoch); the first `start` micro-batches are skipped (resuming)."""
    import torch

    n = len(rows)
    per_epoch = -(-n // batch_size)
    epoch, k = divmod(start, per_epoch)
    while True:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).tolist()
        for i in range(k * batch_size, n, batch_size):
            yield [rows[j] for j in order[i : i + batch_size]]
        epoch, k = epoch + 1, 0
