"""`herd redact`: PII and secret redaction as a filter (stdin -> stdout)."""

from __future__ import annotations

import argparse

KINDS_HELP = "email,phone,credit_card,iban,ip_address,api_key,private_key"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "redact",
        help="redact PII and secrets from stdin",
        description=(
            "Read text from stdin and write it to stdout with emails, phone numbers, payment cards, IBANs, "
            "IP addresses, API keys and private keys replaced by [EMAIL], [PHONE], ... placeholders. "
            "Input is processed as it arrives, so it works on large files and on `tail -f` pipes."
        ),
    )
    p.add_argument(
        "--kinds",
        metavar="LIST",
        default=None,
        help=f"comma-separated kinds to redact (default: all of {KINDS_HELP})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per finding ({kind, start, end}: character offsets into the input) "
        "instead of the redacted text; the values themselves are never printed",
    )
    p.set_defaults(func=cmd_redact)


def cmd_redact(args: argparse.Namespace) -> int:
    import codecs
    import json
    import sys

    from ..safety.pii import StreamRedactor, parse_kinds

    redactor = StreamRedactor(parse_kinds(args.kinds))
    # Bytes in, bytes out: undecodable bytes pass through unchanged (surrogateescape), and each
    # undecodable byte counts as one character in the offsets.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    src, dst = sys.stdin.buffer, sys.stdout.buffer

    def emit(text: str) -> None:
        if args.json:
            for f in redactor.pop_findings():
                dst.write(json.dumps({"kind": f.kind, "start": f.start, "end": f.end}).encode() + b"\n")
        elif text:
            dst.write(text.encode("utf-8", "surrogateescape"))

    while True:
        # read1 returns what is available (a pipe's pending lines) instead of waiting for a full
        # buffer, so interactive pipelines see their lines promptly.
        data = src.read1(1 << 16)
        if not data:
            break
        emit(redactor.feed(decoder.decode(data)))
        dst.flush()
    emit(redactor.feed(decoder.decode(b"", final=True)) + redactor.finish())
    dst.flush()
    return 0
