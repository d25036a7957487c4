"""PII and secret detection and redaction, for whole texts and token streams.

Each kind has one compiled regular expression that proposes candidates and,
where the kind has one, a checksum or structural check that confirms them, so
look-alikes survive: a 16-digit number that fails Luhn, an IBAN that fails
mod-97, ``999.1.1.1``. Overlapping findings are resolved longest first, then
by how specific the kind is (private key > API key > IBAN > card > email >
IP > phone).

Decisions worth knowing (they are tested in tests/test_safety_pii.py):

* Dotted quads are IPv4 addresses only when every octet is 0-255 without
  leading zeros, and they are not a version: not preceded by ``v`` (``v1.2.3.4``),
  ``version``/``ver.``/``release`` (``version 1.2.3.4``) or a requirement
  operator (``==1.2.3.4``). A bare ``1.2.3.4`` *is* treated as an address: in
  prose it is usually one, and redacting a version by mistake costs little.
* IPv6 candidates are confirmed by :mod:`ipaddress` and must contain a decimal
  digit and at least three hex digits (so ``::``, ``::1`` and ``dead::beef``
  in code or prose survive).
* Phones: international numbers written with ``+`` (8-15 digits, E.164);
  North-American ``(555) 123-4567`` / ``555-123-4567`` / ``1-800-555-1234``;
  national numbers with a trunk ``0`` written in groups (``020 7946 0958``,
  ``06 12 34 56 78``, 9-12 digits, or ``00`` international prefix, 10-17
  digits) with one kind of separator. Plain digit runs without separators
  (``4155552671``) are not phones: they are indistinguishable from order and
  account numbers. Dates, years, versions, ISBNs and card-length digit runs
  do not match these shapes. A run of digit groups yields its longest valid
  prefix ending at a group boundary, so "+44 20 7946 0958 10.1.2.3" is a phone
  and an address; a prefix followed by ``.``/``-`` and a digit is the head of
  a longer number and never matches.
* Cards: 13-19 digits, optionally in groups of four (or Amex/Diners 4-6-x)
  separated by one kind of separator, a plausible issuer prefix for the
  length, and a valid Luhn checksum. Card- and IBAN-shaped strings that fail
  their checksum stay whole: no phone number is carved out of them.
* Emails: ASCII local part and domain with a letter TLD (``user@localhost``
  and internationalised addresses are not matched).
* API keys need the vendor prefix at a token boundary (``task-list`` is not an
  OpenAI key) and enough randomness: an ``sk-`` key needs a 16+ character
  segment mixing letters and digits, a ``Bearer`` token 16+ characters with a
  digit.
* A private key block runs from its ``-----BEGIN ... PRIVATE KEY-----`` line
  to the matching END line, or to the end of the text when the END line never
  comes (a truncated key is still a secret).

:class:`StreamRedactor` gives byte-for-byte the same output as :func:`redact`
on the concatenated text, for any chunking, while holding back only the tail
that could still grow into a finding (usually the last word; a few digit
groups; a private key block until its END line). See its docstring.
"""

from __future__ import annotations

import bisect
import ipaddress
import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import InvalidRequest

__all__ = ["KINDS", "PLACEHOLDERS", "Finding", "StreamRedactor", "find_pii", "parse_kinds", "redact"]

# Most specific first: when two candidates have the same length, the earlier kind wins.
KINDS = ("private_key", "api_key", "iban", "credit_card", "email", "ip_address", "phone")
PLACEHOLDERS = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "credit_card": "[CREDIT_CARD]",
    "iban": "[IBAN]",
    "ip_address": "[IP_ADDRESS]",
    "api_key": "[API_KEY]",
    "private_key": "[PRIVATE_KEY]",
}
_RANK = {k: i for i, k in enumerate(KINDS)}


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    start: int  # character offsets into the text, end exclusive
    end: int
    text: str  # the matched value; never log or store it (audit.py keeps kinds and counts)

    def __repr__(self) -> str:  # keep raw values out of logs and tracebacks
        return f"Finding(kind={self.kind!r}, start={self.start}, end={self.end})"


def parse_kinds(kinds: Iterable[str] | str | None) -> frozenset[str]:
    """None/empty -> every kind; 'email,phone' or ['email', 'phone'] -> that subset (validated)."""
    if kinds is None:
        return frozenset(KINDS)
    if isinstance(kinds, str):
        kinds = [k for k in kinds.split(",")]
    out = set()
    for k in kinds:
        k = k.strip().lower().replace("-", "_")
        if not k:
            continue
        if k not in PLACEHOLDERS:
            raise InvalidRequest(
                f"unknown PII kind {k!r}; choose from {', '.join(sorted(PLACEHOLDERS))}", param="kinds"
            )
        out.add(k)
    return frozenset(out) if out else frozenset(KINDS)


# ---------------------------------------------------------------------------
# Patterns. All ASCII (re.ASCII): \d is 0-9 and \w is [A-Za-z0-9_], so text in
# other scripts never looks like digits or key material.
#
# A match may only begin at a token boundary. Each pattern first consumes a
# character (a literal or a small class) and then checks the character before
# it with a fixed-width lookbehind, e.g. r"\+(?<![\w+]\+)" rather than
# r"(?<![\w+])\+": same language, but sre can then skip impossible start
# positions in C instead of trying every position (5-20x faster on prose).
# Possessive quantifiers (Python 3.11+) keep failing attempts linear.
# ---------------------------------------------------------------------------
_A = re.ASCII

# Emails are found from their '@' (see _emails): these are the local part's characters and the domain.
_EMAIL_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")
_EMAIL_AT = re.compile(r"@(?:[A-Za-z0-9-]{1,63}+\.)+[A-Za-z]{2,63}(?![A-Za-z0-9-]|\.[A-Za-z0-9])", _A)

# Digit-group chains (international and national phones, cards) match as far as the groups go; the
# candidate is then the longest prefix, cut at a group boundary, that validates (_chain_end). So
# '+44 20 7946 0958 10.1.2.3' yields the phone and the address, and '4111 1111 1111 1111 2024' the card.

# +CC then groups; one optional parenthesised area/trunk part: +44 (0)20 7946 0958, +1 (555) 123-4567.
_PHONE_INTL = re.compile(
    r"\+(?<![\w+]\+)[1-9]\d{0,2}(?:[ .-]?\(\d{1,4}\))?[ .-]?\d{1,14}+(?:[ .-]\d{1,14}+){0,6}+",
    _A,
)
# North America: (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-1234. Area codes start 2-9.
_PHONE_NANP = re.compile(
    r"[(\d](?<![\w.+-][(\d])"
    r"(?:(?<=1)[ .-](?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])|(?<=\()[2-9]\d{2}\) ?|(?<=[2-9])\d{2}[ .-])"
    r"\d{3}[ .-]\d{4}(?![\w]|[.-]\d)",
    _A,
)
# National numbers with a trunk 0 (or 00 international prefix), always grouped: 020 7946 0958.
_PHONE_NATIONAL = re.compile(
    r"[(0](?<![\w.+/-][(0])(?:(?<=\()0\d{1,4}\) ?|(?<=0)\d{1,4}[ .\-/])\d{2,8}+(?:[ .-]\d{2,8}+){0,4}+",
    _A,
)

# Every card layout starts with four digits (4-4-4-4, 4-6-5, or no separators at all).
_CARD = re.compile(r"\d(?<![\w+.-]\d)\d{3}(?:[ -]?\d){9,15}+", _A)

# Electronic (DE89370400440532013000) or print form in groups of four (DE89 3704 0044 0532 0130 00).
_IBAN = re.compile(
    r"[A-Z](?<![A-Za-z0-9][A-Z])[A-Z]\d{2}(?:[A-Z0-9]{11,30}|(?: [A-Z0-9]{4}){2,7}(?: [A-Z0-9]{1,3})?)"
    r"(?![A-Za-z0-9])",
    _A,
)

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# The first octet is spelled out after its first digit: 0-255, no leading zeros.
_IPV4 = re.compile(
    r"\d(?<![\w.]\d)(?:(?<=2)(?:5[0-5]|[0-4]\d|\d)?|(?<=1)(?:\d\d?)?|(?<=[3-9])\d?|(?<=0))"
    rf"\.(?:{_OCTET}\.){{2}}{_OCTET}(?![\w]|\.\d)",
    _A,
)
# Text just before a dotted quad that makes it a version number, not an address.
_VERSION_BEFORE = re.compile(
    r"(?:\b(?:versions?|ver\.?|release|rel\.?)\s*[:=]?\s*|[=<>~!]=\s*)\Z", re.IGNORECASE | _A
)
# A run of hex digits and colons holding at least two colons; ipaddress decides.
_IPV6 = re.compile(
    r"[0-9A-Fa-f:](?<![\w:.][0-9A-Fa-f:])(?:(?<=:)(?=[0-9A-Fa-f]*:)|(?<!:)(?=[0-9A-Fa-f]*:[0-9A-Fa-f]*:))"
    r"[0-9A-Fa-f:]{1,38}(?:(?<=:)(?:\d{1,3}\.){3}\d{1,3})?(?:%[A-Za-z0-9_]{1,16})?(?![\w:]|\.\d)",
    _A,
)

# Vendor-prefixed credentials. One pattern each: an alternation would defeat the literal-prefix scan.
_API_KEYS = [
    ("openai", re.compile(r"sk-(?<![A-Za-z0-9_-]sk-)[A-Za-z0-9_-]{20,400}+", _A)),  # sk-..., sk-proj-...
    ("aws", re.compile(r"A[KS]IA(?<![A-Za-z0-9_-]A[KS]IA)[A-Z0-9]{16}(?![A-Za-z0-9])", _A)),
    ("github", re.compile(r"gh[pousr]_(?<![A-Za-z0-9_-]gh[pousr]_)[A-Za-z0-9]{36,255}+", _A)),
    ("github", re.compile(r"github_pat_(?<![A-Za-z0-9_-]github_pat_)[A-Za-z0-9_]{22,255}+", _A)),
    ("slack", re.compile(r"xox[abpr]-(?<![A-Za-z0-9_-]xox[abpr]-)[A-Za-z0-9-]{10,250}+", _A)),
    ("google", re.compile(r"AIza(?<![A-Za-z0-9_-]AIza)[0-9A-Za-z_-]{35}(?![A-Za-z0-9_-])", _A)),
    (
        "jwt",
        re.compile(r"eyJ(?<![A-Za-z0-9_-]eyJ)[A-Za-z0-9_-]{4,}+\.eyJ[A-Za-z0-9_-]{4,}+\.[A-Za-z0-9_-]*+", _A),
    ),
    # Only the token is redacted: 'Authorization: Bearer [API_KEY]'.
    (
        "bearer",
        re.compile(r"[Bb](?i:earer) (?<![A-Za-z0-9_-][Bb](?i:earer) )([A-Za-z0-9._~+/=-]{16,1024}+)", _A),
    ),
]

_PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----", _A)
_PEM_END = re.compile(r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----", _A)
_PEM = re.compile(_PEM_BEGIN.pattern + r".*?(?:" + _PEM_END.pattern + r"|\Z)", _A | re.DOTALL)

# ---------------------------------------------------------------------------
# Validators
# ---------------------------------------------------------------------------


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


# (low prefix, high prefix, allowed lengths): issuer identification numbers of the card schemes
# still in circulation. Prefixes compare on the same number of leading digits as `low`.
_IIN = [
    (4, 4, (13, 16, 19)),  # Visa
    (51, 55, (16,)),  # Mastercard
    (2221, 2720, (16,)),  # Mastercard 2-series
    (34, 34, (15,)),  # American Express
    (37, 37, (15,)),
    (6011, 6011, (16, 17, 18, 19)),  # Discover
    (644, 649, (16, 17, 18, 19)),
    (65, 65, (16, 17, 18, 19)),
    (300, 305, (14, 15, 16, 17, 18, 19)),  # Diners Club
    (36, 36, (14, 15, 16, 17, 18, 19)),
    (38, 39, (14, 15, 16, 17, 18, 19)),
    (3528, 3589, (16, 17, 18, 19)),  # JCB
    (62, 62, (16, 17, 18, 19)),  # UnionPay
    (2200, 2204, (16, 17, 18, 19)),  # Mir
    (5018, 5018, (13, 14, 15, 16, 17, 18, 19)),  # Maestro
    (5020, 5020, (13, 14, 15, 16, 17, 18, 19)),
    (5038, 5038, (13, 14, 15, 16, 17, 18, 19)),
    (5893, 5893, (13, 14, 15, 16, 17, 18, 19)),
    (6304, 6304, (13, 14, 15, 16, 17, 18, 19)),
    (6759, 6759, (13, 14, 15, 16, 17, 18, 19)),
    (6761, 6763, (13, 14, 15, 16, 17, 18, 19)),
    (60, 60, (16,)),  # RuPay
    (508, 508, (16,)),
    (9792, 9792, (16,)),  # Troy
]


def _iin_ok(digits: str) -> bool:
    n = len(digits)
    for low, high, lengths in _IIN:
        width = len(str(low))
        if n in lengths and low <= int(digits[:width]) <= high:
            return True
    return False


def _card_layout_ok(s: str) -> bool:
    """Written like a card: no separators, or one kind of separator in groups of four (or 4-6-x)."""
    seps = {c for c in s if c in " -"}
    if not seps:
        return True
    if len(seps) > 1:
        return False
    groups = [len(g) for g in re.split(r"[ -]", s)]
    fours = all(g == 4 for g in groups[:-1]) and 1 <= groups[-1] <= 4
    amex_diners = len(groups) == 3 and groups[0] == 4 and groups[1] == 6 and groups[2] in (4, 5, 6)
    return fours or amex_diners


def _card_ok(s: str) -> bool:
    digits = s.replace(" ", "").replace("-", "")
    return _card_layout_ok(s) and _iin_ok(digits) and luhn_ok(digits)


# IBAN lengths by country (SWIFT IBAN registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21,
    "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28,
    "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip


def iban_ok(compact: str) -> bool:
    """ISO 13616: known country, its exact length, and mod-97 of the rearranged number == 1."""
    if IBAN_LENGTHS.get(compact[:2]) != len(compact):
        return False
    rearranged = compact[4:] + compact[:4]
    # Letters become 10..35; int() of the digit string is exact and fast for <= 70 digits.
    numeric = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(numeric) % 97 == 1


def _iban_span(s: str) -> int:
    """Length of the valid IBAN at the start of match `s`, or 0. The print form may have swallowed a
    following short uppercase word ('... 0130 00 AND'), so try every group boundary."""
    expected = IBAN_LENGTHS.get(s[:2])
    if expected is None:
        return 0
    if " " not in s:
        return len(s) if iban_ok(s) else 0
    compact_len, end = 0, 0
    for group in s.split(" "):
        compact_len += len(group)
        end += len(group) + (1 if end else 0)
        if compact_len == expected:
            return end if iban_ok(s[:end].replace(" ", "")) else 0
        if compact_len > expected:
            return 0
    return 0


_DIGITS = frozenset("0123456789")


def _chain_end(text: str, start: int, raw_end: int, endpos: int, ok: Callable[[str], bool]) -> int:
    """End of the longest valid prefix of the digit-group chain text[start:raw_end], or 0.

    Prefixes end at the chain's end or just before a separator. One directly followed by a letter or
    digit, or by '.'/'-' and a digit, is the head of a longer number (a decimal, a date, a version)
    and is never a candidate; one followed by a space and more digits is (a phone, then a number).
    """
    ends = [raw_end] + [
        i for i in range(raw_end - 1, start, -1) if text[i] in " .-" and text[i + 1] in _DIGITS
    ]
    for e in ends:
        nxt = text[e] if e < endpos else ""
        if nxt and (nxt.isascii() and (nxt.isalnum() or nxt == "_")):
            continue
        if nxt in (".", "-") and e + 1 < endpos and text[e + 1] in _DIGITS:
            continue
        if ok(text[start:e]):
            return e
    return 0


def _phone_ok(s: str, national: bool) -> bool:
    digits = sum(ch.isdigit() for ch in s)
    if not national:
        return 8 <= digits <= 15  # E.164 allows at most 15 digits with the country code
    if s.startswith("00"):
        ok = 10 <= digits <= 17
    else:
        ok = 9 <= digits <= 12
    # One kind of separator between groups (a '/' or ') ' may follow the area code): '03.04.2024 10.30'
    # mixes '.' and ' ' and is a timestamp, not a phone.
    body = re.sub(r"^(?:\(0\d{1,4}\) ?|0\d{1,4}[ .\-/])", "", s)
    return ok and len({c for c in body if c in " .-"}) <= 1


def _ipv6_ok(s: str) -> bool:
    if not any(c.isdigit() for c in s) or sum(c in "0123456789abcdefABCDEF" for c in s.split("%")[0]) < 3:
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _openai_ok(s: str) -> bool:
    # Real keys carry a long random segment; kebab-case words after 'sk-' (sk-learn-2024-notes) do not.
    return any(
        len(seg) >= 16 and re.search(r"\d", seg) and re.search(r"[A-Za-z]", seg)
        for seg in re.split(r"[-_]", s[3:])
    )


# ---------------------------------------------------------------------------
# Finding candidates and resolving overlaps
# ---------------------------------------------------------------------------


def _emails(text: str, pos: int, endpos: int) -> list[tuple[int, int, str]]:
    """Emails, found from each '@' that is followed by a dotted domain: the local part is the whole
    run of local-part characters before the '@' (1-64 of them, not starting before `pos` or inside
    an earlier email)."""
    out: list[tuple[int, int, str]] = []
    floor = pos  # a match may not start before here; the character just before it must not be local
    for m in _EMAIL_AT.finditer(text, pos, endpos):
        at = m.start()
        if at < floor:
            continue
        start = at
        while start > floor and at - start <= 64 and text[start - 1] in _EMAIL_LOCAL:
            start -= 1
        if start == floor and floor > 0 and text[floor - 1] in _EMAIL_LOCAL:
            continue  # the local part would start in the middle of a longer run
        if 0 < at - start <= 64:
            out.append((start, m.end(), "email"))
            floor = m.end()
    return out


def _candidates(text: str, pos: int, endpos: int, kinds: frozenset[str]) -> list[tuple[int, int, str]]:
    out: list[tuple[int, int, str]] = []
    # Card- and IBAN-shaped strings that fail their checksum are left alone as a whole: no phone
    # number is carved out of them ('DE89 3704 0044 0532 0130 01' is not a UK number '0044 ...').
    shadows: list[tuple[int, int]] = []  # (start, end), sorted by start before use
    for m in _CARD.finditer(text, pos, endpos):
        if _card_layout_ok(m.group()):
            shadows.append(m.span())
            if "credit_card" in kinds:
                end = _chain_end(text, m.start(), m.end(), endpos, _card_ok)
                if end:
                    out.append((m.start(), end, "credit_card"))
    for m in _IBAN.finditer(text, pos, endpos):
        shadows.append(m.span())
        n = _iban_span(m.group()) if "iban" in kinds else 0
        if n:
            out.append((m.start(), m.start() + n, "iban"))
    if "email" in kinds:
        out += _emails(text, pos, endpos)
    if "phone" in kinds:
        shadows.sort()
        shadow_starts = [a for a, _ in shadows]
        reach = list(itertools.accumulate((b for _, b in shadows), max))  # furthest end so far

        def _shadowed(s: int, e: int) -> bool:  # inside a card- or IBAN-shaped string
            i = bisect.bisect_right(shadow_starts, s)
            return i > 0 and reach[i - 1] >= e

        for m in _PHONE_NANP.finditer(text, pos, endpos):
            if not _shadowed(m.start(), m.end()):
                out.append((m.start(), m.end(), "phone"))
        for pat, national in ((_PHONE_INTL, False), (_PHONE_NATIONAL, True)):
            for m in pat.finditer(text, pos, endpos):
                end = _chain_end(text, m.start(), m.end(), endpos, lambda s, n=national: _phone_ok(s, n))
                if end and not _shadowed(m.start(), end):
                    out.append((m.start(), end, "phone"))
    if "ip_address" in kinds:
        for m in _IPV4.finditer(text, pos, endpos):
            if not _VERSION_BEFORE.search(text, max(0, m.start() - 24), m.start()):
                out.append((m.start(), m.end(), "ip_address"))
        for m in _IPV6.finditer(text, pos, endpos):
            if _ipv6_ok(m.group()):
                out.append((m.start(), m.end(), "ip_address"))
    if "api_key" in kinds:
        for vendor, pat in _API_KEYS:
            for m in pat.finditer(text, pos, endpos):
                if vendor == "openai" and not _openai_ok(m.group()):
                    continue
                if vendor == "bearer" and not re.search(r"\d", m.group(1)):
                    continue
                span = m.span(1) if vendor == "bearer" else m.span()
                out.append((span[0], span[1], "api_key"))
    return out


def _resolve(cands: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Non-overlapping subset, sorted: longest first, ties to the more specific kind.

    Greedy per cluster of mutually overlapping candidates (a connected component), which is the
    same as greedy over everything but linear in the number of candidates.
    """
    cands.sort()
    out: list[tuple[int, int, str]] = []
    i = 0
    while i < len(cands):
        j, end = i + 1, cands[i][1]
        while j < len(cands) and cands[j][0] < end:
            end = max(end, cands[j][1])
            j += 1
        if j == i + 1:
            out.append(cands[i])
        else:
            chosen: list[tuple[int, int, str]] = []
            for c in sorted(cands[i:j], key=lambda c: (c[0] - c[1], _RANK[c[2]], c[0])):
                if all(c[1] <= d[0] or d[1] <= c[0] for d in chosen):
                    chosen.append(c)
            out += sorted(chosen)
        i = j
    return out


def _find_span(text: str, pos: int, endpos: int, kinds: frozenset[str]) -> list[Finding]:
    """Findings in text[pos:endpos] with no private-key block inside (lookbehind still sees text[:pos])."""
    return [Finding(k, s, e, text[s:e]) for s, e, k in _resolve(_candidates(text, pos, endpos, kinds))]


def find_pii(text: str, kinds: Iterable[str] | str | None = None) -> list[Finding]:
    """Every PII/secret finding in `text`, non-overlapping, sorted by position."""
    want = parse_kinds(kinds)
    if "private_key" not in want:
        return _find_span(text, 0, len(text), want)
    # Private key blocks win over everything inside them; the rest is scanned between them.
    findings: list[Finding] = []
    pos = 0
    for m in _PEM.finditer(text):
        findings += _find_span(text, pos, m.start(), want)
        findings.append(Finding("private_key", m.start(), m.end(), m.group()))
        pos = m.end()
    findings += _find_span(text, pos, len(text), want)
    return findings


def apply_findings(text: str, findings: list[Finding], offset: int = 0) -> str:
    parts, pos = [], 0
    for f in findings:
        parts.append(text[pos : f.start - offset])
        parts.append(PLACEHOLDERS[f.kind])
        pos = f.end - offset
    parts.append(text[pos:])
    return "".join(parts)


def redact(text: str, kinds: Iterable[str] | str | None = None) -> str:
    """`text` with each finding replaced by its typed placeholder ([EMAIL], [PHONE], ...)."""
    return apply_findings(text, find_pii(text, kinds))


# ---------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------

# Characters that can occur inside some finding (outside private-key blocks). Anything else, like
# newlines, tabs, quotes, commas, brackets and every non-ASCII character, ends any finding.
_SOFT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-@:()/=~ ")
_PHONEISH = frozenset("0123456789+()./-")
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_UPPER_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_LETTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_CTX = 64  # raw characters kept before the pending text, for lookbehinds and the version check
_PEM_TAIL = 256  # raw characters of a private key body kept to find an END line split across chunks


def _joinable(word: str) -> bool:
    """Could `word` be a non-final part of a finding that spans a single space?

    Multi-word findings are phones and cards (digit groups, '+44', '(0)20'), IBANs in print form
    (groups of at most four uppercase letters/digits) and 'Bearer <token>'. A single space after
    any other word ends every finding, so the stream may release the text up to it.
    """
    i = len(word)
    while i and word[i - 1] in _PHONEISH:  # trailing run of phone/card characters holding a digit
        if word[i - 1].isdigit():
            return True
        i -= 1
    i = len(word)
    while i and word[i - 1] in _ALNUM:
        i -= 1
    run = word[i:]
    if 1 <= len(run) <= 4 and all(c in _UPPER_ALNUM for c in run):
        return True
    i = len(word)
    while i and word[i - 1] in _LETTERS:
        i -= 1
    return word[i:].lower() == "bearer"


def _pem_prefix(s: str) -> bool:
    """Could `s` (which starts at a '-') still become a private-key BEGIN line?"""
    head = "-----BEGIN "
    if len(s) <= len(head):
        return head.startswith(s)
    if not s.startswith(head) or len(s) > 96:
        return False
    return re.fullmatch(r"[A-Z0-9 ]*-{0,4}", s[len(head) :]) is not None


class StreamRedactor:
    """Redact a stream of text chunks (model output, log lines) as they arrive.

    ``feed(chunk)`` returns the text that is now safe to emit and ``finish()`` the rest; their
    concatenation equals ``redact(whole_text)`` for every chunking. Text is held back only while it
    could still be part of a finding: the current word, a run of digit groups or short uppercase
    groups joined by single spaces (phones, cards, IBANs), ``Bearer`` and its token, a possible
    ``-----BEGIN`` line, and a private key block until its END line (its body is not kept: it will be
    replaced by [PRIVATE_KEY] either way). A newline, tab, double space, punctuation such as ``,;!?"'``
    or any non-ASCII character releases everything before it.

    Bound: a pending run longer than ``max_hold`` characters (default 4096, e.g. a huge base64 blob
    with no whitespace) is released redacted as it stands; a finding straddling that forced cut may
    be missed, the only case where the stream and :func:`redact` can differ.
    """

    def __init__(self, kinds: Iterable[str] | str | None = None, max_hold: int = 4096):
        self.kinds = parse_kinds(kinds)
        self.max_hold = max_hold
        self.findings: list[Finding] = []  # every finding so far, absolute offsets; callers may clear it
        self._ctx = ""  # raw text already released (its tail), for lookbehinds
        self._buf = ""  # raw text not yet released
        self._base = 0  # absolute offset of _buf[0]
        self._checked = 0  # positions 1.._checked of _buf are known not to be cut points
        self._pem_start: int | None = None  # absolute offset of an open private key block
        self._pem_body_from = 0  # absolute offset from which to look for the END line

    # -- public -----------------------------------------------------------
    def feed(self, chunk: str) -> str:
        if not chunk:
            return ""
        self._buf += chunk
        return self._drain(final=False)

    def finish(self) -> str:
        out = self._drain(final=True)
        self._ctx, self._buf, self._base, self._checked = "", "", 0, 0
        return out

    @property
    def pending(self) -> int:
        """Characters received but not yet released (a private key body being dropped is not counted)."""
        return len(self._buf) if self._pem_start is None else 0

    def pop_findings(self) -> list[Finding]:
        out, self.findings = self.findings, []
        return out

    # -- internals --------------------------------------------------------
    def _drain(self, final: bool) -> str:
        out: list[str] = []
        while True:
            if self._pem_start is not None:
                if not self._drain_pem(out, final):
                    return "".join(out)
                continue
            limit = len(self._buf)
            if "private_key" in self.kinds:
                begin = self._find_pem_begin(final)
                if begin is not None and begin[1]:  # a complete BEGIN line: everything before it is final
                    b = begin[0]
                    out.append(self._release(b, endpos=b))
                    self._pem_start = self._base
                    self._pem_body_from = self._base + len(_PEM_BEGIN.match(self._buf).group())
                    continue
                if begin is not None:
                    limit = begin[0]  # a possible BEGIN line: hold it until it resolves
            if final:
                cut = limit
            else:
                cut = self._last_cut(limit)
                if cut == 0 and limit > self.max_hold:
                    cut = limit
            if cut:
                out.append(self._release(cut, endpos=None if not final else cut))
            return "".join(out)

    def _find_pem_begin(self, final: bool) -> tuple[int, bool] | None:
        """First '-----BEGIN ...PRIVATE KEY-----' in the pending text: (index, complete) or None."""
        buf, i = self._buf, 0
        while True:
            i = buf.find("-", i)
            if i < 0:
                return None
            if _PEM_BEGIN.match(buf, i):
                return i, True
            if not final and _pem_prefix(buf[i : i + 100]):
                return i, False
            i += 1

    def _drain_pem(self, out: list[str], final: bool) -> bool:
        """Inside a private key block. Returns True when the block closed and draining may go on."""
        rel = self._pem_body_from - self._base
        m = _PEM_END.search(self._buf, rel)
        if m is None:
            if final:
                self._emit_pem(out, self._base + len(self._buf))
                self._buf = ""
                return False
            # Drop the body, keep a tail in which an END line split across chunks can still be found.
            keep_from = max(rel, len(self._buf) - _PEM_TAIL)
            self._ctx = (self._ctx + self._buf[:keep_from])[-_CTX:]
            self._buf = self._buf[keep_from:]
            self._base += keep_from
            self._pem_body_from = max(self._pem_body_from, self._base)
            return False
        end = self._base + m.end()
        self._emit_pem(out, end)
        consumed = m.end()
        self._ctx = (self._ctx + self._buf[:consumed])[-_CTX:]
        self._buf = self._buf[consumed:]
        self._base += consumed
        self._checked = 0
        return True

    def _emit_pem(self, out: list[str], end: int) -> None:
        assert self._pem_start is not None
        # The raw value is not kept (it can be kilobytes and it is a secret): text is left empty.
        self.findings.append(Finding("private_key", self._pem_start, end, ""))
        out.append(PLACEHOLDERS["private_key"])
        self._pem_start = None

    def _char(self, i: int) -> str:
        """_buf[i]; negative i reaches back into the released context (a newline before the start)."""
        if i >= 0:
            return self._buf[i]
        return self._ctx[i] if -i <= len(self._ctx) else "\n"

    def _is_cut(self, p: int) -> bool:
        """May the stream be cut before _buf[p]? Depends only on the text before p, so a position
        once found not to be a cut point never becomes one."""
        c = self._char(p - 1)
        if c not in _SOFT:
            return True  # no finding contains this character (and no lookahead looks past it)
        if c != " ":
            return False
        prev = self._char(p - 2)
        if prev == " " or prev not in _SOFT:
            return True  # multi-word findings join words with exactly one space
        # The word before this single space (its last 64 characters are all _joinable looks at).
        chars, i = [], p - 2
        while len(chars) < 64:
            ch = self._char(i)
            if ch == " " or ch not in _SOFT:
                break
            chars.append(ch)
            i -= 1
        return not _joinable("".join(reversed(chars)))

    def _last_cut(self, limit: int) -> int:
        start = max(self._checked, 0)
        for p in range(limit, start, -1):
            if self._is_cut(p):
                self._checked = 0
                return p
        self._checked = max(self._checked, limit)
        return 0

    def _release(self, cut: int, endpos: int | None) -> str:
        """Emit _buf[:cut] redacted. Detection sees the real text after the cut (up to `endpos`, a
        hard end such as a BEGIN line or the end of the stream) exactly as redact() would."""
        text = self._ctx + self._buf
        off = len(self._ctx)
        end = off + (len(self._buf) if endpos is None else endpos)
        found = [f for f in _find_span(text, off, end, self.kinds) if f.end <= off + cut]
        for f in found:
            self.findings.append(
                Finding(f.kind, f.start - off + self._base, f.end - off + self._base, f.text)
            )
        out = apply_findings(text[off : off + cut], found, offset=off)
        self._ctx = (self._ctx + self._buf[:cut])[-_CTX:]
        self._buf = self._buf[cut:]
        self._base += cut
        self._checked = 0
        return out
