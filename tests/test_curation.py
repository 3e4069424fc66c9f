"""Data curation (`nebula.curation`, `nebula data`): exact and MinHash dedup, Tülu 3 n-gram
decontamination, length / language / predicate filters, stats, and the CLI on jsonl and
parquet with its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from nebula.curation import CurationError
from nebula.curation.decontam import build_index, decontaminate
from nebula.curation.dedup import (MinHashParams, dedup, exact_dedup, near_dedup,
                                   shingle_hashes, signatures)
from nebula.curation.filters import filter_rows, load_predicate, load_tokenizer
from nebula.curation.stats import dataset_stats, percentile
from nebula.curation.text import normalize, split_texts, words
from services.cli_data import data_app

FOX = "The quick brown fox jumps over the lazy dog while the farmer watches from the old red barn."
FOX_EDIT = FOX.replace("lazy dog", "lazy cat")
DISTINCT = [
    "Write a short poem about the sea, the wind and a lighthouse keeper who never sleeps.",
    "The slow green turtle walks under the busy bridge while the children play near the river.",
    "Explain how photosynthesis converts sunlight, water and carbon dioxide into sugar.",
]
# Ten words: one shared 8-gram covers 8/10 of it (> 0.5).
EVAL_10 = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
# Twenty words, for the 13-gram option.
EVAL_20 = ("one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
           "fifteen sixteen seventeen eighteen nineteen twenty")


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- text ---------------------------------------------------------------------------------

def test_normalisation() -> None:
    assert normalize("  Hello,  World!\n") == normalize("hello world") == "hello world"
    assert normalize("“Ünïcode” — ok…") == "ünïcode ok"
    assert normalize("2+3=5") != normalize("2-3=5")  # symbols stay, punctuation goes
    assert words("It's a dog-eat-dog world.") == ["it", "s", "a", "dog", "eat", "dog", "world"]
    chat = {"messages": [{"role": "user", "content": "question"},
                         {"role": "assistant", "content": "answer"}]}
    assert split_texts(chat, "messages", [], "f row 0") == ["question", "answer"]
    assert split_texts(chat, "messages", [], "f row 0", assistant_turns=False) == ["question"]


# -- dedup --------------------------------------------------------------------------------

def test_exact_dedup_keeps_first_and_reports_clusters() -> None:
    texts = ["Hello world", "Other", "hello,   WORLD!", "third", "Other.", "hello world"]
    keep, clusters = exact_dedup(texts)
    assert keep == [0, 1, 3]
    assert [c.to_json() for c in clusters] == [{"kept": 0, "removed": [2, 5]},
                                               {"kept": 1, "removed": [4]}]


def test_near_dedup_one_word_edit_at_0_7() -> None:
    rows = [{"prompt": t} for t in [FOX, *DISTINCT, FOX_EDIT]]
    res = dedup(rows, "prompt", "both", MinHashParams(threshold=0.7))
    assert res.keep == [0, 1, 2, 3]
    assert res.exact == [] and [c.to_json() for c in res.near] == [{"kept": 0, "removed": [4]}]
    rep = res.report()
    assert rep["near"]["removed"] == 1 and rep["near"]["threshold"] == 0.7
    # word 1-grams also catch it; at threshold 0.95 it is kept (J ~ 0.9)
    assert near_dedup([FOX, FOX_EDIT], MinHashParams(0.7, shingle="word", shingle_size=1))[0] == [0]
    assert near_dedup([FOX, FOX_EDIT], MinHashParams(0.95))[0] == [0, 1]


def test_signatures_equal_datasketch_minhash() -> None:
    from datasketch import MinHash

    for p in (MinHashParams(), MinHashParams(shingle="word", shingle_size=3, num_perm=64)):
        texts = [FOX, "", "ab", DISTINCT[0]]
        sig, empty, _ = signatures(texts, p)
        assert empty.tolist() == [False, True, False, False]
        for i, t in enumerate(texts):
            m = MinHash(num_perm=p.num_perm, seed=p.seed, hashfunc=lambda x: x, scheme="affine32")
            m.update_batch(shingle_hashes(t, p))
            assert (m.hashvalues == sig[i]).all()


# -- decontamination ----------------------------------------------------------------------

def test_decontam_8gram_rule_and_report() -> None:
    index = build_index([("evals/a.jsonl", ["unrelated eval text here", EVAL_10])])
    shared8 = " ".join(EVAL_10.split()[:8])
    shared7 = " ".join(EVAL_10.split()[1:8])
    rows = [{"prompt": f"Please answer: {shared8}, thanks."},   # one 8-gram: 8/10 covered
            {"prompt": f"Please answer: {shared7} x {EVAL_10.split()[8]}"},  # only 7 in a row
            {"prompt": "nothing in common"}]
    res = decontaminate(rows, index, "prompt")
    assert res.keep == [1, 2]
    rep = res.report()
    assert rep["removed"] == 1 and rep["ngram"] == 8 and rep["threshold"] == 0.5
    assert rep["contaminated"] == [{"row": 0, "matches": [
        {"eval_file": "evals/a.jsonl", "eval_row": 1, "overlap": 0.8}]}]
    assert rep["eval"][0]["rows_matched"] == 1
    # a chat SFT row: its assistant turns are the response
    chat = [{"messages": [{"role": "user", "content": "say it"},
                          {"role": "assistant", "content": EVAL_10}]}]
    assert decontaminate(chat, index, "messages").keep == []
    assert decontaminate(chat, index, "messages", assistant_turns=False).keep == [0]


def test_decontam_13gram_option_threshold_and_responses() -> None:
    toks = EVAL_20.split()
    rows = [{"prompt": " ".join(toks[:12])}, {"prompt": " ".join(toks[3:16])},
            {"prompt": "clean prompt", "response": "so: " + " ".join(toks[:15])}]
    idx8, idx13 = build_index([("e", [EVAL_20])], 8), build_index([("e", [EVAL_20])], 13)
    assert decontaminate(rows, idx8, "prompt").keep == [2]               # no response checked
    assert decontaminate(rows, idx8, "prompt", ["response"]).keep == []
    assert decontaminate(rows, idx13, "prompt").keep == [0, 2]            # 12 < 13 in a row
    assert decontaminate(rows, idx13, "prompt", ["response"]).keep == [0]
    # Tülu's 50% is of the eval item's tokens: 9 of 20 covered passes only at threshold 0
    nine = [{"prompt": " ".join(toks[:9])}]
    assert decontaminate(nine, idx8, "prompt").keep == [0]
    assert decontaminate(nine, idx8, "prompt", threshold=0.0).keep == []
    # an eval item shorter than n is matched whole
    short = build_index([("e", ["rev abc="])], 8)
    assert decontaminate([{"prompt": "Rev ABC="}, {"prompt": "rev abd="}], short).keep == [1]


# -- filters ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy model's character tokenizer (one token per character), saved as a dir."""
    from nebula.toy_model import build_char_tokenizer

    path = tmp_path_factory.mktemp("toy-tok")
    build_char_tokenizer().save_pretrained(path)
    return path


def test_filter_length_bounds_with_toy_tokenizer(toy_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(str(toy_tokenizer_dir))
    rows = [{"prompt": "abc"}, {"prompt": "abc def"}, {"prompt": "a b c d e f g h i j k"}]
    res = filter_rows(rows, "prompt", min_tokens=4, max_tokens=10, tokenizer=tok)
    assert res.keep == [1]
    assert res.removed == [{"row": 0, "reason": "too_short", "tokens": 3},
                           {"row": 2, "reason": "too_long", "tokens": 21}]
    # without a tokenizer: whitespace words
    assert filter_rows(rows, "prompt", max_tokens=2).keep == [0, 1]


def test_filter_language_and_predicate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"prompt": "The weather is nice today and we are going to the park.", "id": 0},
            {"prompt": "Das Wetter ist heute schön und wir gehen in den Park.", "id": 1},
            {"prompt": "Il fait beau aujourd'hui et nous allons au parc avec les enfants.",
             "id": 2},
            {"prompt": "We will bring sandwiches, lemonade and a football with us.", "id": 3}]
    res = filter_rows(rows, "prompt", languages=["en"])
    assert res.keep == [0, 3]
    assert [(r["row"], r["language"]) for r in res.removed] == [(1, "de"), (2, "fr")]
    assert filter_rows(rows, "prompt", languages=["en", "de"]).keep == [0, 1, 3]

    (tmp_path / "my_preds.py").write_text("def even(row):\n    return row['id'] % 2 == 0\n"
                                          "def boom(row):\n    raise KeyError('nope')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    even = load_predicate("my_preds:even")
    assert filter_rows(rows, "prompt", predicate=even).keep == [0, 2]
    with pytest.raises(CurationError, match="f.jsonl row 0: predicate raised KeyError"):
        filter_rows(rows, "prompt", predicate=load_predicate("my_preds:boom"), source="f.jsonl")
    for bad, msg in (("my_preds", "not of the form"), ("no_such_mod_x:f", "cannot import"),
                     ("my_preds:missing", "has no 'missing'")):
        with pytest.raises(CurationError, match=msg):
            load_predicate(bad)


# -- stats --------------------------------------------------------------------------------

def test_stats_numbers() -> None:
    assert [percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], p) for p in (50, 90, 99)] == [5, 9, 10]
    rows = [{"prompt": t} for t in [FOX, FOX.upper(), FOX_EDIT, *DISTINCT, EVAL_10]]
    st = dataset_stats(rows, "prompt", params=MinHashParams(0.7),
                       index=build_index([("ev.jsonl", [EVAL_10])]))
    n_words = sorted(len(r["prompt"].split()) for r in rows)
    assert st["rows"] == 7 and st["length_unit"] == "words"
    assert st["length"]["max"] == n_words[-1] == 18 and st["length"]["p50"] == n_words[3]
    assert (st["exact_duplicates"], st["near_duplicates"], st["contaminated"]) == (1, 1, 1)


# -- CLI ----------------------------------------------------------------------------------

runner = CliRunner()


def cli(*args: str) -> Any:
    res = runner.invoke(data_app, [str(a) for a in args])
    assert "Traceback" not in res.output
    return res


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_cli_dedup_decontaminate_filter_stats(tmp_path: Path, fmt: str) -> None:
    rows = [{"prompt": t, "answer": str(i)}
            for i, t in enumerate([FOX, *DISTINCT, FOX + "!", FOX_EDIT, EVAL_10 + " please"])]
    src = tmp_path / f"train.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(src, rows)
    ev = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "x y"}, {"prompt": EVAL_10}])

    out = tmp_path / f"dedup.{fmt}"
    res = cli("dedup", src, out, "--threshold", "0.7")
    assert res.exit_code == 0, res.output
    assert "7 rows -> 5 (exact duplicates -1, near duplicates -1)" in res.output
    import datasets

    kept = datasets.load_dataset("parquet" if fmt == "parquet" else "json",
                                 data_files=str(out), split="train").to_list()
    assert [r["answer"] for r in kept] == ["0", "1", "2", "3", "6"]
    rep = json.loads((tmp_path / "dedup.report.json").read_text())
    assert rep["exact"]["clusters"] == [{"kept": 0, "removed": [4]}]
    assert rep["near"]["clusters"] == [{"kept": 0, "removed": [5]}]

    res = cli("decontaminate", src, tmp_path / "clean.jsonl", "--eval", ev,
              "--report", tmp_path / "dc.json")
    assert res.exit_code == 0, res.output
    assert "7 rows -> 6 (1 contaminated" in res.output
    assert [r["answer"] for r in read_jsonl(tmp_path / "clean.jsonl")] == list("012345")
    rep = json.loads((tmp_path / "dc.json").read_text())
    assert rep["contaminated"] == [{"row": 6, "matches": [
        {"eval_file": str(ev), "eval_row": 1, "overlap": 1.0}]}]

    res = cli("filter", src, tmp_path / "short.jsonl", "--max-tokens", "15")
    assert res.exit_code == 0, res.output
    assert [r["answer"] for r in read_jsonl(tmp_path / "short.jsonl")] == \
        [r["answer"] for r in rows if len(r["prompt"].split()) <= 15] == ["3", "6"]

    res = cli("stats", src, "--eval", ev, "--threshold", "0.7", "--json", tmp_path / "st.json")
    assert res.exit_code == 0, res.output
    assert "exact duplicates" in res.output and "contaminated" in res.output
    st = json.loads((tmp_path / "st.json").read_text())
    assert (st["rows"], st["exact_duplicates"], st["near_duplicates"], st["contaminated"]) == \
        (7, 1, 1, 1)


def test_cli_chat_messages_and_tokenizer(tmp_path: Path, toy_tokenizer_dir: Path) -> None:
    chat = [{"messages": [{"role": "user", "content": c},
                          {"role": "assistant", "content": "ok"}]}
            for c in ["Hi there", "hi, there!", "Bye now"]]
    src = write_jsonl(tmp_path / "chat.jsonl", chat)
    res = cli("dedup", src, tmp_path / "out.jsonl", "--mode", "exact")
    assert res.exit_code == 0, res.output
    assert "3 rows -> 2 (exact duplicates -1)" in res.output
    res = cli("stats", src, "--tokenizer", toy_tokenizer_dir, "--json", tmp_path / "s.json")
    assert res.exit_code == 0, res.output
    # "hi, there!\nok" (contents joined by a newline): 13 characters = 13 tokens
    assert json.loads((tmp_path / "s.json").read_text())["length"]["max"] == 13


def test_cli_bad_input_names_file_and_row(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    res = cli("dedup", missing, tmp_path / "o.jsonl")
    assert res.exit_code == 2 and f"{missing}: file not found" in res.output

    no_field = write_jsonl(tmp_path / "nf.jsonl", [{"prompt": "a"}, {"prompt": "b"},
                                                  {"text": "c"}])
    res = cli("dedup", no_field, tmp_path / "o.jsonl")
    assert res.exit_code == 2 and f"{no_field} row 2: missing field 'prompt'" in res.output
    assert not (tmp_path / "o.jsonl").exists()

    bad_json = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, "{not json"])
    res = cli("stats", bad_json)
    assert res.exit_code == 2 and f"{bad_json} line 2: not valid JSON" in res.output

    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a b c"}])
    res = cli("decontaminate", good, tmp_path / "o.jsonl", "--eval", no_field)
    assert res.exit_code == 2 and f"{no_field} row 2: missing field 'prompt'" in res.output

    pq = write_parquet(tmp_path / "nf.parquet", [{"prompt": "a"}, {"prompt": None}])
    res = cli("filter", pq, tmp_path / "o.parquet", "--max-tokens", "3")
    assert res.exit_code == 2 and f"{pq} row 1: missing field 'prompt'" in res.output

    res = cli("stats", good, "--field", "nope")
    assert res.exit_code == 2 and f"{good}: no field 'nope'" in res.output
    res = cli("filter", good, tmp_path / "o.jsonl")
    assert res.exit_code == 2 and "give at least one of" in res.output
    res = cli("filter", good, tmp_path / "o.jsonl", "--predicate", "nomodule_zz:f")
    assert res.exit_code == 2 and "cannot import module 'nomodule_zz'" in res.output
