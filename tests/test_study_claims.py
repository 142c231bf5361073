"""BENCHMARKS.md and the README say no more than the stored runs show (issue 24).

Each setting's section and the claims table are regenerated here from the committed runs
(``bench/results``) and compared with the documents; every interval quoted in the hand-written
prose must be one of the generated ones (to the precision quoted; either sign, as "A - B" or
"B - A"), and the words around it must not state a verdict that the interval does not support
(a difference "within noise" whose interval excludes zero, a method that "beats" another by an
interval that includes it). The word check is a guard, not a parser: it reads the words since
the previous interval of the sentence and those after it up to the next punctuation."""
import json
import re
import sys

import pytest

from util import REPO

sys.path.insert(0, str(REPO / "bench"))
import study  # noqa: E402

BENCH = REPO / "BENCHMARKS.md"
README = REPO / "README.md"
INTERVAL = re.compile(r"\[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]")
# verdict words: for an interval that excludes zero, and for one that includes it
# (a word preceded by "not", "no" or "n't" is read as negated and passes)
NO_DIFFERENCE = ("within noise", "no difference", "not distinguishable", "indistinguishable", "level with",
                 "are level", "not resolved", "consistent with", "no gain", "equals", "changes nothing")
A_DIFFERENCE = ("beats", "beat", "better", "worse", "wins", "ahead", "outperforms", "above zero", "below zero",
                "a gain", "gains", "loses", "reproduces")


def _block(text: str, tag: str) -> str:
    m = re.search(rf"<!-- {re.escape(tag)} -->\n(.*?)<!-- /{re.escape(tag)} -->", text, re.S)
    assert m, f"no <!-- {tag} --> block"
    return m.group(1)


def _without_blocks(text: str) -> str:
    return re.sub(r"<!-- ([\w:.-]+) -->\n.*?<!-- /\1 -->", "", text, flags=re.S)


@pytest.fixture(scope="module")
def regenerated():
    return {name: study.report_text(study.SETTINGS[name]) for name in study.CLAIMS}


@pytest.fixture(scope="module")
def generated_intervals(regenerated):
    """Every interval the generated text holds, in points."""
    text = "".join(t for t, _ in regenerated.values()) + _block(BENCH.read_text(), "claims")
    return [(float(lo), float(hi)) for lo, hi in INTERVAL.findall(text)]


def _prose():
    """(document, text) of the hand-written study prose: BENCHMARKS.md's study part and the
    README's Status section, without generated blocks and code."""
    bench = BENCH.read_text()
    bench = bench[bench.index("## Reproducing the paper's claims"):bench.index("## Restart reliability")]
    readme = README.read_text()
    readme = readme[readme.index("## Status"):]
    for name, text in (("BENCHMARKS.md", bench), ("README.md", readme)):
        yield name, re.sub(r"```.*?```", "", _without_blocks(text), flags=re.S)


def _sentences(text: str):
    return re.split(r"(?<=[.!?])\s+(?=[A-Z(*`])|\n\s*\n|\n\s*- ", text)


def test_each_settings_section_is_what_its_stored_runs_give(regenerated):
    doc = BENCH.read_text()
    for name, (text, _) in regenerated.items():
        block = re.sub(r"^!\[.*\n", "", _block(doc, f"study:{name}"), flags=re.M)
        assert block == text, f"BENCHMARKS.md's {name} section is stale: run bench/study.py {name} --report-only"


def test_the_claims_table_and_the_readme_summary_are_generated(regenerated):
    summaries = json.loads(json.dumps({n: d["summary"] for n, (_, d) in regenerated.items()}, default=float))
    assert _block(BENCH.read_text(), "claims") == study.claims_table(summaries)
    assert _block(README.read_text(), "claims") == study.claims_summary(summaries)
    assert len(study.claims(summaries)) == len(study.CLAIMS), "a setting has no complete summary"


def _matches(lo: str, hi: str, generated) -> bool:
    digits = max(len(lo.split(".")[1]), len(hi.split(".")[1]))
    tol = 0.5 * 10 ** -digits + 1e-9
    a, b = float(lo), float(hi)
    return any((abs(glo - a) <= tol and abs(ghi - b) <= tol) or (abs(-ghi - a) <= tol and abs(-glo - b) <= tol)
               for glo, ghi in generated)


def test_every_interval_in_the_prose_is_a_generated_one(generated_intervals):
    stale = [f"{doc}: [{lo}, {hi}]" for doc, text in _prose() for lo, hi in INTERVAL.findall(text)
             if not _matches(lo, hi, generated_intervals)]
    assert not stale, "intervals quoted in the prose that no stored run gives:\n" + "\n".join(stale)


def _says(clause: str, word: str) -> bool:
    """``word`` occurs in ``clause`` as a word, not negated ("does not beat", "no gain")."""
    return any(not re.search(r"\b(not|no|n't)\s+(\w+\s+)?$", clause[:m.start()])
               for m in re.finditer(rf"\b{re.escape(word)}\b", clause))


def test_no_sentence_states_a_verdict_its_interval_does_not_support():
    wrong = []
    for doc, text in _prose():
        for sentence in _sentences(text):
            found = list(INTERVAL.finditer(sentence))
            for i, m in enumerate(found):
                # the words since the previous interval, and after it up to the next punctuation
                after = re.match(r"[^;:,)]*", sentence[m.end():found[i + 1].start() if i + 1 < len(found) else None])
                clause = sentence[found[i - 1].end() if i else 0:m.end()] + after.group(0)
                lo, hi = float(m.group(1)), float(m.group(2))
                words = NO_DIFFERENCE if lo > 0 or hi < 0 else A_DIFFERENCE
                said = [w for w in words if _says(clause.lower(), w)]
                if said:
                    wrong.append(f"{doc}: {m.group(0)} ({study.verdict(lo, hi)}) with {said}: {' '.join(clause.split())}")
    assert not wrong, "sentences that claim more (or less) than their interval:\n" + "\n".join(wrong)
