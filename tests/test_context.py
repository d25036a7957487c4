"""openherd.context: the one context policy, on a counting encoder (one token per word and
two per message), so every number below can be worked out by hand."""

from __future__ import annotations

import pytest

from openherd.context import DROP_OLDEST, ERROR, ContextPolicy, fit_messages, fit_prompt
from openherd.errors import ContextOverflow


def encode(messages: list[dict]) -> list[int]:
    n = sum(2 + len(str(m["content"]).split()) for m in messages)
    return list(range(n))


def msg(role: str, words: int, tag: str = "") -> dict:
    return {"role": role, "content": " ".join([tag or role] * words)}


SYSTEM = msg("system", 8)  # 10 tokens
CONVERSATION = [SYSTEM, msg("user", 18, "u1"), msg("assistant", 18, "a1"), msg("tool", 8, "t1"),
                msg("user", 18, "u2"), msg("assistant", 18, "a2"), msg("user", 8, "last")]  # 10+20+20+10+20+20+10


def test_a_conversation_that_fits_is_left_alone():
    for policy in (ERROR, DROP_OLDEST):
        f = fit_messages(encode, CONVERSATION, 200, 10, policy)
        assert f.messages == CONVERSATION and f.dropped == 0 and len(f.prompt) == 110


def test_error_refuses_with_the_numbers():
    with pytest.raises(ContextOverflow) as e:
        fit_messages(encode, CONVERSATION, 100, None, ERROR)
    assert "110" in e.value.message and "100" in e.value.message and e.value.code == "context_length_exceeded"
    with pytest.raises(ContextOverflow) as e:
        fit_messages(encode, CONVERSATION, 115, 10, ERROR)  # the prompt fits, the completion does not
    assert "120 were requested" in e.value.message and "10 for the completion" in e.value.message


def test_drop_oldest_keeps_the_system_prompt_and_restarts_at_a_user_turn():
    f = fit_messages(encode, CONVERSATION, 100, 10, DROP_OLDEST)
    # u1 goes, then a1 and t1 with it (the history must start at a user turn): 110 - 50 = 60.
    assert f.messages == [SYSTEM, CONVERSATION[4], CONVERSATION[5], CONVERSATION[6]]
    assert f.dropped == 3 and len(f.prompt) == 60
    f = fit_messages(encode, CONVERSATION, 40, 10, DROP_OLDEST)
    assert f.messages == [SYSTEM, CONVERSATION[6]] and f.dropped == 5


def test_the_last_message_is_never_dropped():
    with pytest.raises(ContextOverflow) as e:
        fit_messages(encode, CONVERSATION, 25, 10, DROP_OLDEST)  # system + last = 20, + 10 > 25
    assert "25" in e.value.message


def test_the_room_for_the_answer_is_max_tokens_else_the_reserve():
    assert len(fit_messages(encode, CONVERSATION, 111, None, DROP_OLDEST).prompt) == 110  # one token of room
    assert len(fit_messages(encode, CONVERSATION, 111, None, ContextPolicy(True, reserve=20)).prompt) == 60
    with pytest.raises(ValueError):
        ContextPolicy(True, reserve=0)


def test_a_raw_prompt_has_nothing_to_drop():
    assert fit_prompt([1, 2, 3], 10, 7) == [1, 2, 3]
    for policy in (ERROR, DROP_OLDEST):
        with pytest.raises(ContextOverflow) as e:
            fit_prompt([1, 2, 3], 10, 8, policy)
        assert "11 were requested" in e.value.message
    with pytest.raises(ContextOverflow) as e:
        fit_prompt(list(range(12)), 10, None)
    assert "12 tokens" in e.value.message and "10 tokens" in e.value.message
