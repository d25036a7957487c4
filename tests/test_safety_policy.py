"""merge_policies: the server's global policy is a floor that a persona's own policy can only raise.

Checked field by field against hand-written cases, as a property over random policy pairs
(the merge is at least as strict as either side on every shield, and idempotent), and by
behaviour: the merged policy's input and output shields block what either side blocks.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openherd.safety.policy import (
    DEFAULT_REFUSAL,
    INJECTION_MODES,
    PII_INPUT_MODES,
    PII_OUTPUT_MODES,
    OutputGuard,
    SafetyPolicy,
    apply_input,
    merge_policies,
    refusal,
)

GLOBAL = SafetyPolicy(
    pii_input="redact",
    pii_kinds=["email"],
    blocked_topics=["forbidden lore"],
    refusal_message="Off limits.",
    injection="flag",
)


def test_none_on_either_side_gives_the_other():
    persona = SafetyPolicy(blocked_topics=["x"])
    assert merge_policies(None, None) is None
    assert merge_policies(GLOBAL, None) is GLOBAL
    assert merge_policies(None, persona) is persona


def test_a_persona_cannot_switch_a_global_shield_off():
    # Everything off, as a persona that "replaced" the global policy used to get.
    lax = SafetyPolicy(pii_input="off", pii_output="off", blocked_topics=[], injection="off")
    merged = merge_policies(GLOBAL, lax)
    assert merged.pii_input == "redact" and merged.pii_kinds == ["email"]
    assert merged.blocked_topics == ["forbidden lore"]
    assert merged.injection == "flag"
    assert merged.refusal_message == "Off limits."  # the persona set none of its own


@pytest.mark.parametrize(
    ("field", "modes"),
    [("pii_input", PII_INPUT_MODES), ("pii_output", PII_OUTPUT_MODES), ("injection", INJECTION_MODES)],
)
def test_modes_take_the_stricter_side(field, modes):
    for i, a in enumerate(modes):
        for j, b in enumerate(modes):
            merged = merge_policies(SafetyPolicy(**{field: a}), SafetyPolicy(**{field: b}))
            assert getattr(merged, field) == modes[max(i, j)], (a, b)


def test_pii_kinds_union_where_empty_means_all():
    email = SafetyPolicy(pii_input="redact", pii_kinds=["email"])
    phone = SafetyPolicy(pii_output="redact", pii_kinds=["phone"])
    every = SafetyPolicy(pii_input="block")  # [] = every kind
    assert merge_policies(email, phone).pii_kinds == ["email", "phone"]
    assert merge_policies(email, every).pii_kinds == [] and merge_policies(every, email).pii_kinds == []
    # A side that screens no PII has no kinds to add: its default [] must not widen "email" to all.
    assert merge_policies(email, SafetyPolicy(blocked_topics=["x"])).pii_kinds == ["email"]
    assert merge_policies(SafetyPolicy(), email).pii_kinds == ["email"]


def test_llama_guard_floor_model_categories_and_custom():
    floor = SafetyPolicy(
        llama_guard="guard-a",
        llama_guard_categories=["S10", "S2"],
        llama_guard_custom=[{"name": "Pets", "description": "talk about pets"}],
        llama_guard_fail_closed=False,
    )
    persona = SafetyPolicy(
        llama_guard="guard-b",
        llama_guard_categories=["S1"],
        llama_guard_custom=[{"name": "pets.", "description": "dup"}, {"name": "Lottery", "description": "numbers"}],
    )
    merged = merge_policies(floor, persona)
    assert merged.llama_guard == "guard-a"  # the operator's guard stays; one guard model per policy
    assert merged.llama_guard_categories == ["S1", "S2", "S10"]  # numeric order, as the prompt lists them
    assert [c["name"] for c in merged.llama_guard_custom] == ["Pets", "Lottery"]
    assert merged.llama_guard_fail_closed is True
    # [] = all of S1-S14, which absorbs any list.
    assert merge_policies(floor, SafetyPolicy(llama_guard="g")).llama_guard_categories == []
    # A side without a guard contributes neither model, categories nor custom categories.
    no_guard = SafetyPolicy(llama_guard_categories=["S5"], llama_guard_custom=[{"name": "x", "description": ""}])
    merged = merge_policies(no_guard, persona)
    assert merged.llama_guard == "guard-b" and merged.llama_guard_categories == ["S1"]
    assert [c["name"] for c in merged.llama_guard_custom] == ["pets.", "Lottery"]
    assert merge_policies(floor, SafetyPolicy()).llama_guard_fail_closed is False  # the floor's own choice


def test_topics_union_and_refusal_in_the_personas_voice():
    persona = SafetyPolicy(blocked_topics=["FORBIDDEN lore", "lottery numbers"], refusal_message="Lighthouse only.")
    merged = merge_policies(GLOBAL, persona)
    assert merged.blocked_topics == ["forbidden lore", "lottery numbers"]
    assert merged.refusal_message == "Lighthouse only."
    assert merge_policies(SafetyPolicy(), SafetyPolicy()).refusal_message == DEFAULT_REFUSAL


def test_inputs_are_not_mutated_and_the_result_validates():
    persona = SafetyPolicy(blocked_topics=["b"], pii_kinds=["phone"], pii_input="block")
    before = (GLOBAL.to_dict(), persona.to_dict())
    merged = merge_policies(GLOBAL, persona)
    assert (GLOBAL.to_dict(), persona.to_dict()) == before
    assert SafetyPolicy.from_dict(merged.to_dict()) == merged


def test_the_merged_shields_block_what_either_side_blocks():
    persona = SafetyPolicy(blocked_topics=["lottery numbers"], refusal_message="Lighthouse only.")
    merged = merge_policies(GLOBAL, persona)
    for text in ("tell me the forbidden lore", "the lottery numbers, please"):
        _, decisions = apply_input(merged, [{"role": "user", "content": text}])
        assert refusal(decisions) == "Lighthouse only.", text
    messages, _ = apply_input(merged, [{"role": "user", "content": "mail me at bq@ex.io"}])
    assert messages[0]["content"] == "mail me at [EMAIL]"
    guard = OutputGuard(merged)
    out = guard.feed("Here is some forbidden lore: ") + guard.finish()
    assert guard.blocked and "forbidden" not in out


# ---------------------------------------------------------------------------- as a property

_topic = st.sampled_from(["lore", "herd", "lottery numbers", "Tax advice"])
policies = st.builds(
    SafetyPolicy,
    pii_input=st.sampled_from(PII_INPUT_MODES),
    pii_output=st.sampled_from(PII_OUTPUT_MODES),
    pii_kinds=st.lists(st.sampled_from(["email", "phone", "credit_card", "ip_address"]), unique=True, max_size=2),
    llama_guard=st.sampled_from([None, "guard-a", "guard-b"]),
    llama_guard_categories=st.lists(st.sampled_from(["S1", "S2", "S10", "S14"]), unique=True, max_size=3),
    llama_guard_fail_closed=st.booleans(),
    blocked_topics=st.lists(_topic, unique=True, max_size=3),
    refusal_message=st.sampled_from([DEFAULT_REFUSAL, "No.", "Lighthouse only."]),
    injection=st.sampled_from(INJECTION_MODES),
)


def _covers(merged: list[str], side: list[str]) -> bool:
    """Does the merged list (empty = all) cover everything the side's list (empty = all) does?"""
    return not merged or (bool(side) and set(side) <= set(merged))


@settings(max_examples=300, deadline=None)
@given(floor=policies, persona=policies)
def test_the_merge_is_at_least_as_strict_as_either_side(floor, persona):
    merged = merge_policies(floor, persona)
    for side in (floor, persona):
        for name, modes in (("pii_input", PII_INPUT_MODES), ("pii_output", PII_OUTPUT_MODES),
                            ("injection", INJECTION_MODES)):  # fmt: skip
            assert modes.index(getattr(merged, name)) >= modes.index(getattr(side, name))
        assert {t.casefold() for t in side.blocked_topics} <= {t.casefold() for t in merged.blocked_topics}
        if side.pii_input != "off" or side.pii_output != "off":
            assert _covers(merged.pii_kinds, side.pii_kinds)
        if side.llama_guard:
            assert merged.llama_guard and _covers(merged.llama_guard_categories, side.llama_guard_categories)
    if floor.llama_guard:
        assert merged.llama_guard == floor.llama_guard
    assert merge_policies(merged, merged) == merged  # idempotent
    assert merged.active == (floor.active or persona.active)

