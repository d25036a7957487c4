"""Coverage-guided fuzz targets for openherd's parsers, run with atheris (libFuzzer).

    python tests/fuzz_targets.py TARGET [libFuzzer flags: -runs=N -seed=S -max_total_time=T ...]

Each target feeds one input to one parser. A HerdError is a parser saying no, which is
fine; any other exception, or an input running past libFuzzer's -timeout, is a crash:
atheris prints the input and exits non-zero. tests/test_fuzz_atheris.py runs every
target briefly in CI; a longer run is ``pytest -m fuzz_long tests/test_fuzz_atheris.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["openherd"]):
    from openherd.chat_template import ChatTemplate
    from openherd.errors import HerdError
    from openherd.gguf import read_gguf
    from openherd.personas.bundle import Persona, PersonaStore
    from openherd.personas.knowledge import check_document
    from openherd.settings import Settings
    from openherd.tune.data import read_jsonl as read_tune_jsonl
    from openherd.untrusted import check_json, load_yaml, loads_json

WORK = Path(tempfile.mkdtemp(prefix="herd-atheris-"))
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def _file(name: str, data: bytes) -> Path:
    path = WORK / name
    path.write_bytes(data)
    return path


def json_target(data: bytes) -> None:
    check_json(data)
    loads_json(data)


def yaml_target(data: bytes) -> None:
    load_yaml(data, "fuzz.yaml")


def persona_yaml_target(data: bytes) -> None:
    Persona.from_yaml(data)


def gguf_target(data: bytes) -> None:
    read_gguf(_file("x.gguf", data), load_arrays=True)


_STORE = PersonaStore(Settings(home=WORK / "home"))


def archive_target(data: bytes) -> None:
    result = _STORE.import_bytes(data)
    _STORE.remove(result.persona.name)


def tune_target(data: bytes) -> None:
    read_tune_jsonl(_file("data.jsonl", data))


def template_target(data: bytes) -> None:
    ChatTemplate(data.decode("utf-8", errors="replace")).render(MESSAGES)


def document_target(data: bytes) -> None:
    if not data:
        return
    ext = ("txt", "md", "html", "pdf")[data[0] % 4]
    check_document(f"doc.{ext}", data[1:])


TARGETS = {
    "json": json_target,
    "yaml": yaml_target,
    "persona_yaml": persona_yaml_target,
    "gguf": gguf_target,
    "archive": archive_target,
    "tune": tune_target,
    "template": template_target,
    "document": document_target,
}


def main() -> None:
    target = TARGETS[sys.argv[1]]

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except HerdError as e:
            if "\n" in e.message.strip():
                raise AssertionError(f"a multi-line error: {e.message!r}") from None

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("HERD_HOME", str(WORK / "home"))
    main()
