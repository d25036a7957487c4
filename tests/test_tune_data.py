"""openherd.tune.data: JSONL reading, chat-template rendering with assistant-only
targets (checked against llama.cpp's own tokenization), truncation, packing, batching."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from openherd.errors import InvalidRequest
from openherd.model import load_torch_model
from openherd.tune.data import (
    IGNORE,
    ChatRenderer,
    Example,
    batches,
    collate,
    pack_rows,
    read_jsonl,
    single_rows,
    split_eval,
    tokenize_all,
)


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tok(tiny_gguf):
    return load_torch_model(tiny_gguf)[1]


@pytest.fixture(scope="module")
def spm_tok(tmp_path_factory):
    from tinymodels import write_tiny_gguf

    return load_torch_model(write_tiny_gguf(tmp_path_factory.mktemp("spm") / "spm.gguf", vocab="spm"))[1]


# --------------------------------------------------------------------------- reading


def test_both_formats_parse(tmp_path):
    f = write_lines(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        "",
        {"prompt": "2+2?", "completion": "4", "system": "Be brief."},
    ])  # fmt: skip
    ex = read_jsonl(f)
    assert [e.where for e in ex] == [f"{f}:1", f"{f}:3"]
    assert ex[1].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"messages": [', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"text": "hi"}', 'expected "messages" or "prompt"/"completion"'),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role must be one of"),
        ('{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
        ('{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant message"),
        ('{"prompt": "q", "completion": 5}', "must both be strings"),
        ('{"prompt": "q", "completion": ""}', "nothing to learn"),
    ],
)
def test_a_bad_line_is_reported_with_its_line_number(tmp_path, line, problem):
    good = json.dumps({"prompt": "a", "completion": "b"})
    f = write_lines(tmp_path / "bad.jsonl", [good, good, line, good])
    with pytest.raises(InvalidRequest) as e:
        read_jsonl(f)
    assert e.value.message.startswith(f"{f}:3: ")
    assert problem in e.value.message


def test_missing_empty_and_non_utf8_files(tmp_path):
    with pytest.raises(InvalidRequest, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(InvalidRequest, match="no examples"):
        read_jsonl(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(InvalidRequest, match=r"latin1.jsonl:2: not UTF-8"):
        read_jsonl(tmp_path / "latin1.jsonl")


# --------------------------------------------------------------------------- rendering


def test_only_the_assistant_turn_is_trained_and_the_prompt_matches_llama_cpp(tok, tiny_gguf):
    from openherd.engine import Engine, EngineConfig

    ex = Example([{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "Paris."}], "x:1")  # fmt: skip
    t = ChatRenderer(tok).tokenize(ex)
    prompt = [i for i, tr in zip(t.ids, t.trained, strict=True) if not tr]
    answer = [i for i, tr in zip(t.ids, t.trained, strict=True) if tr]
    assert tok.decode(prompt) == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(answer) == "Paris.<|im_end|>\n"  # the end-of-turn token is learned: the model learns to stop
    assert t.trained == [False] * len(prompt) + [True] * len(answer)  # prompt first, then the answer
    # The prompt tokens are exactly what the engine feeds llama.cpp at inference time.
    e = Engine.load(str(tiny_gguf), EngineConfig(n_ctx=128, n_parallel=1, n_threads=1))
    try:
        assert prompt == e.encode_chat(ex.messages[:1])
    finally:
        e.close()


def test_multi_turn_trains_every_assistant_turn(tok):
    ex = Example([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye."},
    ], "x:1")  # fmt: skip
    t = ChatRenderer(tok).tokenize(ex)
    runs, cur = [], []
    for i, tr in zip(t.ids, t.trained, strict=True):
        if tr:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    assert runs == ["Hello.<|im_end|>\n", "Goodbye.<|im_end|>\n"]
    assert tok.decode(t.ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_bos_is_added_once_like_the_engine(spm_tok):
    ex = Example([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "x:1")
    t = ChatRenderer(spm_tok).tokenize(ex)
    assert t.ids[0] == spm_tok.bos_id and t.ids.count(spm_tok.bos_id) == 1
    assert not t.trained[0]


def test_long_examples_are_truncated_with_a_warning(tok, tmp_path, caplog):
    f = write_lines(tmp_path / "d.jsonl", [
        {"prompt": "short", "completion": "fine"},
        {"prompt": "q", "completion": "word " * 200},
        {"prompt": "word " * 200, "completion": "unreachable"},
    ])  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="openherd.tune"):
        out = tokenize_all(read_jsonl(f), ChatRenderer(tok), seq_len=64)
    assert [len(t) <= 64 for t in out] == [True, True]
    assert out[1].truncated and not out[0].truncated
    text = caplog.text
    assert "1 example(s) longer than --seq-len 64 tokens were truncated" in text and f"{f}:2" in text
    assert "no assistant tokens within --seq-len 64" in text and f"{f}:3" in text


# --------------------------------------------------------------------------- rows and batches


def _tokenized(tok, n: int, seq_len: int = 128):
    ex = [Example([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}], f"x:{i}")
          for i in range(n)]  # fmt: skip
    return tokenize_all(ex, ChatRenderer(tok), seq_len)


def test_targets_are_next_trained_tokens_and_never_cross_examples(tok):
    ts = _tokenized(tok, 5)
    rows = pack_rows(ts, seq_len=3 * len(ts[0]) + 1)
    assert [len(set(r.doc)) for r in rows] == [3, 2]
    b = collate(rows, pad_id=0, packed=True)
    for r, ids, tgt, pos, doc in zip(rows, b.input_ids, b.targets, b.positions, b.doc_ids, strict=True):
        n = len(r)
        for t in range(ids.shape[0] - 1):
            want = r.ids[t + 1] if t + 1 < n and r.trained[t + 1] and r.doc[t + 1] == r.doc[t] else IGNORE
            assert int(tgt[t]) == want
        assert int(tgt[-1]) == IGNORE
        # Positions restart at 0 for every packed example.
        starts = [t for t in range(n) if t == 0 or r.doc[t] != r.doc[t - 1]]
        assert [int(pos[s]) for s in starts] == [0] * len(starts)
        assert int(doc[n - 1]) == r.doc[-1] and (doc[n:] == -1).all()
    assert b.n_targets == sum(int((x != IGNORE).sum()) for x in b.targets)
    assert b.n_tokens == sum(len(t) for t in ts)


def test_unpacked_rows_pad_on_the_right(tok):
    ts = _tokenized(tok, 3)
    b = collate(single_rows(ts), pad_id=2, packed=False)
    assert b.positions is None and b.doc_ids is None
    for t, ids, tgt in zip(ts, b.input_ids, b.targets, strict=True):
        assert ids[: len(t)].tolist() == t.ids
        assert (ids[len(t) :] == 2).all() and (tgt[len(t) - 1 :] == IGNORE).all()


def test_eval_split_and_batch_order_are_seeded_and_resumable():
    items = list(range(20))
    tr1, ev1 = split_eval(items, 0.1, seed=3)
    tr2, ev2 = split_eval(items, 0.1, seed=3)
    assert (tr1, ev1) == (tr2, ev2) and len(ev1) == 2 and sorted(tr1 + ev1) == items
    assert split_eval(items[:1], 0.5, seed=0) == ([0], [])  # at least one training item stays
    rows = [[i] for i in range(10)]
    stream = batches(rows, 3, seed=1)
    first = [next(stream) for _ in range(9)]  # 4 micro-batches per epoch, so this spans epochs
    resumed = batches(rows, 3, seed=1, start=5)
    assert [next(resumed) for _ in range(4)] == first[5:]
    assert sorted(x for b in first[:4] for x in b) == rows  # one epoch sees every row once
