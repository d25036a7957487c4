"""Task files (YAML + JSONL), their validation errors, the scoring helpers, and run_task's request semantics."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from openherd.errors import NotFound
from openherd.evals import scoring
from openherd.evals.runner import GenRequest, run_task
from openherd.evals.tasks import TaskError, builtin_tasks, load_task

ROOT = Path(__file__).resolve().parents[1]


def _task_dir(tmp_path: Path, yaml_text: str, rows=None, data_name: str = "data.jsonl") -> Path:
    (tmp_path / "task.yaml").write_text(yaml_text)
    if rows is not None:
        (tmp_path / data_name).write_text(
            "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
        )
    return tmp_path / "task.yaml"


MC_YAML = """\
name: tiny-mc
type: multiple_choice
data: data.jsonl
prompt: "Q: {{ q }}\\nA:"
choices: options
gold: label
"""
MC_ROWS = [
    {"q": "2+2?", "options": ["3", "4", "22"], "label": 1},
    {"q": "Colour of the sky?", "options": ["blue", "green"], "label": "blue"},
    {"q": "Largest?", "options": ["ant", "elephant", "cat"], "label": 1},
]


# ---------------------------------------------------------------- built-in tasks


def test_builtin_tasks_load_and_validate():
    assert set(builtin_tasks()) >= {"basics-mc", "capitals", "humaneval"}
    mc = load_task("basics-mc")
    assert mc.type == "multiple_choice" and len(mc.docs) == 20
    assert all(0 <= mc.gold(d) < len(mc.choices(d)) for d in mc.docs)
    gen = load_task("capitals")
    assert gen.type == "generation" and gen.spec.fewshot == 3 and gen.spec.stop == ["\n", "Q:"]
    he = load_task("humaneval")
    assert he.type == "humaneval" and he.spec.k == [1, 10, 100] and he.spec.timeout == 3.0


def test_multiple_choice_context_is_lm_eval_shaped():
    task = load_task("basics-mc")
    doc = task.docs[10]
    assert task.context(doc) == (
        "The following are multiple choice questions with answers.\n\n"
        "Question: What is the capital of France?\nAnswer:"
    )
    assert task.choices(doc) == ["Berlin", "Madrid", "Paris", "Rome"] and task.gold(doc) == 2


def test_fewshot_examples_are_deterministic_and_exclude_the_item():
    task = load_task("capitals")
    doc = task.docs[0]
    ctx = task.context(doc)
    blocks = ctx.split("\n\n")
    assert len(blocks) == 4 and blocks[-1] == "Q: What is the capital of France?\nA:"
    for block in blocks[:3]:
        q, a = block.split("\n")
        assert q.startswith("Q: What is the capital of ") and a.startswith("A: ")  # target_delimiter " "
        assert "France" not in q
    assert task.context(doc) == ctx
    # Per-item seeding: --limit does not change the examples an item gets.
    limited = load_task("capitals", limit=1)
    assert limited.context(limited.docs[0]) == ctx
    assert task.context(doc, fewshot=0) == "Q: What is the capital of France?\nA:"


def test_custom_task_with_gold_by_index_or_text(tmp_path):
    task = load_task(str(_task_dir(tmp_path, MC_YAML, MC_ROWS)))
    assert [task.gold(d) for d in task.docs] == [1, 0, 1]
    assert task.docs[2].source == f"{tmp_path / 'data.jsonl'}:3"


def test_choices_as_a_list_of_templates(tmp_path):
    yaml_text = MC_YAML.replace("choices: options", 'choices: ["{{ a }}", "{{ b }}"]')
    rows = [{"q": "x", "a": "yes", "b": "no", "label": 0}]
    task = load_task(str(_task_dir(tmp_path, yaml_text, rows)))
    assert task.choices(task.docs[0]) == ["yes", "no"]


def test_gzip_data_and_limit(tmp_path):
    import gzip

    yaml_text = MC_YAML.replace("data.jsonl", "data.jsonl.gz")
    with gzip.open(tmp_path / "data.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in MC_ROWS)
    task = load_task(str(_task_dir(tmp_path, yaml_text)), limit=2)
    assert len(task.docs) == 2


# ---------------------------------------------------------------- validation errors


@pytest.mark.parametrize(
    "yaml_text, rows, expected",
    [
        ("name: x\ntype: [unclosed\n", None, "task.yaml:3: malformed YAML"),
        (MC_YAML + "promt: hi\n", MC_ROWS, "task.yaml:7: unknown field 'promt' (did you mean 'prompt'?)"),
        (
            MC_YAML.replace("gold: label\n", ""),
            MC_ROWS,
            "task.yaml: a multiple_choice task needs the field 'gold'",
        ),
        (MC_YAML.replace("name: tiny-mc\n", ""), MC_ROWS, "task.yaml: missing required field 'name'"),
        (
            MC_YAML.replace("type: multiple_choice", "type: mcq"),
            MC_ROWS,
            "task.yaml:2: unknown task type 'mcq'; use one of multiple_choice, generation, humaneval, perplexity",
        ),
        (MC_YAML + "fewshot: three\n", MC_ROWS, "task.yaml:7: field 'fewshot' must be a int"),
        (MC_YAML + "max_tokens: 0\n", MC_ROWS, "task.yaml:7: 'max_tokens' must be > 0"),
        (
            MC_YAML.replace("name: tiny-mc", "name: ../evil"),
            MC_ROWS,
            "task.yaml:1: task name '../evil' must be",
        ),
        (
            "name: g\ntype: generation\ndata: data.jsonl\nprompt: p\ntarget: t\nmetric: bleu\n",
            [{"t": "x"}],
            "task.yaml:6: unknown metric 'bleu'; use one of exact_match, regex, f1",
        ),
        (
            "name: g\ntype: generation\ndata: data.jsonl\nprompt: p\ntarget: t\nmetric: regex\n",
            [{"t": "x"}],
            "task.yaml:6: metric 'regex' needs a 'regex' field",
        ),
        (
            "name: g\ntype: generation\ndata: data.jsonl\nprompt: p\ntarget: t\nmetric: regex\nregex: '(['\n",
            [{"t": "x"}],
            "task.yaml:7: bad regular expression",
        ),
        ("- just\n- a list\n", None, "task.yaml: a task file must be a YAML mapping"),
        (MC_YAML.replace("data: data.jsonl", "data: missing.jsonl"), None, "missing.jsonl does not exist"),
        (MC_YAML.replace('"Q: {{ q }}\\nA:"', '"Q: {{ q }"'), MC_ROWS, "task.yaml: prompt template:"),
    ],
)
def test_task_file_errors_name_file_and_line(tmp_path, yaml_text, rows, expected):
    path = _task_dir(tmp_path, yaml_text, rows)
    with pytest.raises(TaskError) as e:
        load_task(str(path))
    assert expected in e.value.message
    assert str(tmp_path) in e.value.message


@pytest.mark.parametrize(
    "rows, expected",
    [
        (MC_ROWS[:2] + ["{oops"], "data.jsonl:3: invalid JSON"),
        (MC_ROWS[:1] + ["", "[1]"], "data.jsonl:3: each line must be a JSON object"),
        (MC_ROWS[:1] + [{"options": ["a"], "label": 0}], "data.jsonl:2: prompt template: 'q' is undefined"),
        (
            [{"q": "x", "options": ["a", "b"], "label": 5}],
            "data.jsonl:1: gold index 5 is out of range for 2 choices",
        ),
        (
            [{"q": "x", "options": ["a", "b"], "label": "c"}],
            "data.jsonl:1: gold answer 'c' is not one of the choices",
        ),
        (
            [{"q": "x", "options": "ab", "label": 0}],
            "data.jsonl:1: field 'options' must be a non-empty list of strings",
        ),
        ([{"q": "x", "options": ["a"], "label": True}], "data.jsonl:1: field 'label' must be a choice index"),
        (["", "  "], "has no items"),
    ],
)
def test_data_errors_name_file_and_line(tmp_path, rows, expected):
    path = _task_dir(tmp_path, MC_YAML, rows)
    with pytest.raises(TaskError) as e:
        load_task(str(path))
    assert expected in e.value.message


def test_templates_are_sandboxed(tmp_path):
    yaml_text = MC_YAML.replace('"Q: {{ q }}\\nA:"', '"{{ q.__class__.__mro__[1].__subclasses__() }}"')
    with pytest.raises(TaskError, match="prompt template"):
        load_task(str(_task_dir(tmp_path, yaml_text, MC_ROWS)))


def test_unknown_task_name_lists_the_known_ones():
    with pytest.raises(NotFound) as e:
        load_task("capitols")
    assert "unknown task 'capitols' (did you mean 'capitals'?)" in e.value.message
    assert "known tasks: basics-mc, capitals, humaneval" in e.value.message
    with pytest.raises(NotFound, match="does not exist"):
        load_task("/nonexistent/task.yaml")


# ---------------------------------------------------------------- scoring


def test_squad_normalization_and_f1():
    assert scoring.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert scoring.f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert scoring.f1("Paris", "London") == 0.0
    assert scoring.f1("", "anything") == 0.0
    assert scoring.best_over_references(scoring.f1, "New Delhi", ["Delhi", "New Delhi"]) == 1.0


def test_exact_match_and_regex():
    assert scoring.exact_match(" Paris\n", "Paris") == 1.0
    assert scoring.exact_match("paris", "Paris") == 0.0
    assert scoring.exact_match("paris", "Paris", ignore_case=True) == 1.0
    assert scoring.exact_match("The Paris.", "paris", normalize=True) == 1.0
    pattern = r"answer is (-?\d+)"
    assert scoring.regex_extract("so the answer is 42.", pattern) == "42"
    assert scoring.regex_match("so the answer is 42.", "42", pattern) == 1.0
    assert scoring.regex_match("no number here", "42", pattern) == 0.0
    assert scoring.regex_extract("x=7", r"\d+") == "7"  # no group: the whole match


def test_acc_and_acc_norm_follow_lm_eval():
    # lm-eval: pred = argmax(lls); pred_norm = argmax(lls / len(choice)) with len() of the
    # choice *without* the target delimiter. Here the long choice has the lower total
    # log-probability but the higher per-character one.
    choices = ["no", "absolutely yes"]
    lls = [-3.0, -7.0]
    assert scoring.mc_predictions(lls, choices) == (0, 1)
    assert scoring.acc(lls, choices, gold=1) == 0.0 and scoring.acc_norm(lls, choices, gold=1) == 1.0
    # Characters, not UTF-8 bytes: "é" is one character (lm-eval's len(str)).
    assert scoring.mc_predictions([-2.0, -2.1], ["ab", "éé"]) == (0, 0)
    assert scoring.mc_predictions([-2.0, -2.0], ["a", "b"]) == (0, 0)  # ties go to the first choice


def test_perplexity_aggregates_like_lm_eval():
    lls = [-10.0, -20.0]
    texts = ["hello world", "foo bar baz"]
    words = [scoring.count_words(t) for t in texts]
    nbytes = [scoring.count_bytes(t) for t in texts]
    assert words == [2, 3] and nbytes == [11, 11]
    assert scoring.weighted_perplexity(lls, words) == pytest.approx(math.exp(30 / 5))
    assert scoring.bits_per_byte(lls, nbytes) == pytest.approx(30 / 22 / math.log(2))


def test_bootstrap_intervals():
    scores = [1.0] * 70 + [0.0] * 30
    ci = scoring.bootstrap_ci(scores, seed=1)
    assert ci.low < 0.7 < ci.high and 0.55 < ci.low and ci.high < 0.85
    assert scoring.bootstrap_ci(scores, seed=1) == ci  # seeded
    assert scoring.mean_stderr(scores) == pytest.approx(np.std(scores, ddof=1) / 10)


def test_paired_bootstrap_separates_real_from_null_differences():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, size=300).astype(float)
    same = scoring.paired_bootstrap(base, base)
    assert same.diff == 0.0 and same.p_value == 1.0
    better = base.copy()
    flip = np.where(base == 0)[0][:60]  # model A fixes 60 items model B gets wrong
    better[flip] = 1.0
    cmp = scoring.paired_bootstrap(better, base)
    assert cmp.diff == pytest.approx(0.2) and cmp.low > 0 and cmp.p_value < 0.01
    noise = rng.permutation(base)
    assert scoring.paired_bootstrap(noise, base).low < 0 < scoring.paired_bootstrap(noise, base).high
    with pytest.raises(ValueError):
        scoring.paired_bootstrap([1.0], [1.0, 0.0])


# ---------------------------------------------------------------- run_task request semantics


class ScriptedLM:
    """A language model whose answers are a fixed function of the request, recording every request."""

    name = "scripted"

    def __init__(self, ll=None, gen=None, rolling=None):
        self.ll, self.gen, self.rolling = ll, gen, rolling
        self.requests: list = []

    def loglikelihood(self, requests):
        self.requests += list(requests)
        return [(self.ll(c, x), False) for c, x in requests]

    def loglikelihood_rolling(self, texts):
        return [self.rolling(t) for t in texts]

    def generate(self, requests):
        self.requests += list(requests)
        return [self.gen(r) for r in requests]


def test_run_multiple_choice_scores_acc_and_acc_norm(tmp_path):
    task = load_task(str(_task_dir(tmp_path, MC_YAML, MC_ROWS)))
    # Log-probability -2 per character of the continuation (delimiter included): short answers win acc.
    lm = ScriptedLM(ll=lambda ctx, cont: -2.0 * len(cont) - (0.5 if cont.strip() == "4" else 0))
    res = run_task(lm, task)
    assert lm.requests[:3] == [("Q: 2+2?\nA:", " 3"), ("Q: 2+2?\nA:", " 4"), ("Q: 2+2?\nA:", " 22")]
    preds = [r["pred"] for r in res.records]
    assert preds == [0, 0, 0]  # the shortest continuation always has the highest total
    assert res.summary.metrics["acc"] == pytest.approx(1 / 3)  # only "blue" (first, shortest) is gold
    # acc_norm divides by len(choice) (without the " "): -2*(len+1)/len favours longer choices.
    assert [r["pred_norm"] for r in res.records] == [2, 1, 1]
    assert res.scores["acc"] == [0.0, 1.0, 0.0]
    assert res.scores["acc_norm"] == [0.0, 0.0, 1.0]
    assert res.summary.metrics["acc_norm"] == pytest.approx(1 / 3)


def test_run_generation_exact_match_with_stop_and_references():
    task = load_task("capitals", limit=4)
    answers = {"France": "Paris", "Germany": "berlin", "Italy": "Milan", "Spain": " Madrid"}

    def gen(req: GenRequest) -> str:
        country = req.prompt.rsplit("capital of ", 1)[1].split("?")[0]
        return answers[country]

    lm = ScriptedLM(gen=gen)
    res = run_task(lm, task)
    assert all(r.stop == ["\n", "Q:"] and r.max_tokens == 16 and r.temperature == 0.0 for r in lm.requests)
    assert res.summary.metrics == {"exact_match": 0.75}  # ignore_case; whitespace stripped; Milan wrong
    assert [r["exact_match"] for r in res.records] == [1.0, 1.0, 0.0, 1.0]


def test_run_perplexity(tmp_path):
    path = _task_dir(
        tmp_path,
        "name: ppl\ntype: perplexity\ndata: data.jsonl\ntext: body\n",
        [{"body": "hello world"}, {"body": "good morning all"}],
    )
    lm = ScriptedLM(rolling=lambda t: (-float(len(t)), len(t) // 2))
    res = run_task(lm, load_task(str(path)))
    assert res.summary.metrics["bits_per_byte"] == pytest.approx(1 / math.log(2))
    assert res.summary.metrics["word_perplexity"] == pytest.approx(math.exp(27 / 5))
    assert res.summary.metrics["token_perplexity"] == pytest.approx(math.exp(27 / 13))
    assert res.summary.metrics["byte_perplexity"] == pytest.approx(math.e)
    # Per-document bits per byte, weighted by bytes, is what a comparison resamples.
    assert res.scores["bits_per_byte"] == pytest.approx([1 / math.log(2)] * 2)
    assert res.weights["bits_per_byte"] == [11.0, 16.0]


def test_run_humaneval_through_the_sandbox():
    from openherd.evals.humaneval import load_problems

    problems = load_problems()
    # The model sees the prompt without trailing whitespace; the program is prompt + completion.
    by_prompt = {p["prompt"].rstrip(): "\n" + p["canonical_solution"] for p in problems.values()}
    task = load_task("humaneval", limit=3)
    task.spec.samples = 2
    task.spec.k = [1, 2]
    calls = {"n": 0}

    def gen(req: GenRequest) -> str:
        calls["n"] += 1
        # Second sample of each problem is wrong: pass@1 = 0.5, pass@2 = 1.
        return by_prompt[req.prompt] if req.seed == 0 else "    return None\n"

    res = run_task(ScriptedLM(gen=gen), task, workers=2)
    assert calls["n"] == 6
    assert res.summary.metrics == {"pass@1": 0.5, "pass@2": 1.0}
    assert res.summary.counts == {"problems": 3, "samples": 6, "sandbox_errors": 0}


# ---------------------------------------------------------------- CLI


def _herd(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HERD_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "openherd", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )


def test_cli_lists_tasks(tmp_path):
    r = _herd("eval", "--list", home=tmp_path)
    assert r.returncode == 0
    assert "basics-mc" in r.stdout and "humaneval" in r.stdout


def test_cli_reports_task_errors_in_one_line(tmp_path):
    path = _task_dir(tmp_path, MC_YAML + "promt: x\n", MC_ROWS)
    r = _herd("eval", "--task", str(path), "--model", "whatever", home=tmp_path)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"herd: error: {path}:7: unknown field 'promt' (did you mean 'prompt'?)\n"
    r = _herd("eval", "--task", "nosuchtask", "--model", "whatever", home=tmp_path)
    assert r.returncode == 1 and "known tasks: basics-mc, capitals, humaneval" in r.stderr
    # A valid task with a model goes as far as the model: whatever fails there is one line too.
    r = _herd("eval", "--task", "basics-mc", "--model", "no-such-model", home=tmp_path)
    assert r.returncode != 0 and r.stderr.startswith("herd: error: ") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- text files, perplexity tasks, comparisons


def test_a_text_file_is_a_perplexity_task(tmp_path):
    path = tmp_path / "My Notes.txt"
    path.write_text("line one\nline two\n")
    task = load_task(str(path))
    assert (task.type, task.name, len(task.docs)) == ("perplexity", "ppl-My-Notes", 1)
    assert task.text(task.docs[0]) == "line one\nline two\n"
    # A perplexity YAML may point at a text file (no `text` field needed) ...
    (tmp_path / "t.yaml").write_text("name: t\ntype: perplexity\ndata: My Notes.txt\n")
    assert load_task(str(tmp_path / "t.yaml")).docs[0].fields == {"text": "line one\nline two\n"}
    # ... but a JSONL one must say which field holds the text.
    (tmp_path / "j.yaml").write_text("name: j\ntype: perplexity\ndata: d.jsonl\n")
    with pytest.raises(TaskError, match="j.yaml: a perplexity task needs the field 'text'"):
        load_task(str(tmp_path / "j.yaml"))


def test_text_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nstill fine\n\xff\xfe broken\n")
    with pytest.raises(TaskError) as e:
        load_task(str(bad))
    assert e.value.message == f"{bad}:3: not UTF-8 text"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(TaskError, match="empty.txt: the text file is empty"):
        load_task(str(empty))
    with pytest.raises(NotFound, match="does not exist"):
        load_task(str(tmp_path / "missing.txt"))


def test_description_is_prepended_verbatim_like_lm_eval(tmp_path):
    task = load_task(str(_task_dir(tmp_path, MC_YAML + 'description: "Answer briefly. "\n', MC_ROWS)))
    assert task.context(task.docs[0]) == "Answer briefly. Q: 2+2?\nA:"


def test_many_samples_at_temperature_zero_is_an_error(tmp_path):
    path = _task_dir(tmp_path, "name: he\ntype: humaneval\nsamples: 5\n")
    with pytest.raises(TaskError) as e:
        load_task(str(path))
    assert e.value.message.startswith(f"{path}:3: 5 samples per problem at temperature 0")


def test_weighted_paired_bootstrap_is_the_corpus_statistic():
    rng = np.random.default_rng(3)
    a, b = rng.random(50), rng.random(50)
    w = rng.integers(1, 100, 50).astype(float)
    cmp = scoring.paired_bootstrap(a, b, weights=w, n_resamples=500, seed=1)
    assert cmp.diff == pytest.approx(((a - b) * w).sum() / w.sum())
    assert cmp.low < cmp.diff < cmp.high
    unweighted = scoring.paired_bootstrap(a, b, n_resamples=500, seed=1)
    assert unweighted.diff == pytest.approx((a - b).mean())
    assert scoring.paired_bootstrap(a, b, weights=np.ones(50), n_resamples=500, seed=1) == unweighted
    with pytest.raises(ValueError, match="weights"):
        scoring.paired_bootstrap(a, b, weights=np.zeros(50))


def test_compare_results_is_b_minus_a_with_direction(tmp_path):
    from openherd.evals.compare import compare_results, comparison_table

    task = load_task(str(_task_dir(tmp_path, MC_YAML, MC_ROWS * 4)))
    # A always prefers the first choice, B the gold one.
    first = ScriptedLM(ll=lambda ctx, cont: -1.0 if cont.strip() in ("3", "blue", "ant") else -5.0)
    gold = ScriptedLM(ll=lambda ctx, cont: -1.0 if cont.strip() in ("4", "blue", "elephant") else -5.0)
    first.name, gold.name = "first", "gold"
    cmp = compare_results(run_task(first, task), run_task(gold, task))
    acc = cmp.metrics[0]
    assert (acc.metric, acc.a, acc.b, acc.n) == ("acc", pytest.approx(1 / 3), 1.0, 12)
    assert acc.diff == pytest.approx(2 / 3) and acc.improvement == acc.diff and acc.low > 0
    assert "| acc | 0.3333 | 1.0000 | +0.6667 ↑ |" in comparison_table(cmp)
    # Perplexity: lower is better, so a lower bits-per-byte is an improvement.
    (tmp_path / "ppl").mkdir()
    ppl = load_task(
        str(
            _task_dir(
                tmp_path / "ppl",
                "name: p\ntype: perplexity\ndata: p.jsonl\ntext: t\n",
                [{"t": "hello world"}, {"t": "good morning all"}],
                "p.jsonl",
            )
        )
    )
    worse = ScriptedLM(rolling=lambda t: (-2.0 * len(t), len(t)))
    better = ScriptedLM(rolling=lambda t: (-1.0 * len(t), len(t)))
    (bpb,) = compare_results(run_task(worse, ppl), run_task(better, ppl)).metrics
    assert bpb.metric == "bits_per_byte" and bpb.diff < 0 and bpb.improvement > 0
    with pytest.raises(ValueError, match="same --limit"):
        compare_results(
            run_task(first, task), run_task(gold, load_task(str(tmp_path / "task.yaml"), limit=3))
        )
