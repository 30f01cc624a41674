"""Spans of prompts (subjects, placeholders, source positions) are found on token boundaries, on real
tokenizers: the embedded SmolLM2 tokenizer (byte-level BPE, spaces inside tokens, digits one by one)
and the word-level tokenizer of the tiny test models. Never a piece of another word (" Texas" for the
placeholder "x", " Parisian" for "Paris"); an absent or repeated span is refused in one line."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

import lenscope
from lenscope.errors import ConfigError
from lenscope.lenses.patchscope import (
    Patchscope,
    Source,
    Span,
    Target,
    find_span,
    token_ending,
    token_position,
)
from lenscope.model.loading import embedded_model_dir
from lenscope.patchscopes.causal_tracing import subject_tokens
from lenscope.patchscopes.lre import queried
from tests.conftest import make_tokenizer


@pytest.fixture(scope="module")
def smollm2():
    """The embedded model's own tokenizer (only the tokenizer is loaded)."""
    return AutoTokenizer.from_pretrained(embedded_model_dir())


@pytest.fixture(scope="module")
def words():
    return make_tokenizer()


@pytest.fixture(params=["smollm2", "words"])
def tokenizer(request):
    return request.getfixturevalue(request.param)


def tokens_of(tokenizer, text: str, span: tuple[int, int]) -> str:
    """The text of the tokens [start, end) of ``text``, by their offsets."""
    offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
    return text[offsets[span[0]][0]:offsets[span[1] - 1][1]]


def test_the_placeholder_x_is_not_the_end_of_texas(tokenizer):
    text = "x is a city in Texas"
    ids = tokenizer(text)["input_ids"]
    # the substring search found the "x" of " Texas"
    assert text.rfind("x") > text.index(" Texas")
    assert find_span(tokenizer, text, "x", "placeholder") == (0, 1)
    assert token_position(tokenizer, text, ids, "x", "placeholder") == 0
    with pytest.raises(ConfigError, match="occurs in the prompt 'Texas' only inside a word or token"):
        find_span(tokenizer, "Texas", "x", "placeholder")


def test_paris_is_not_found_inside_parisian(tokenizer):
    text = "Paris is home to many Parisian cafes"
    assert find_span(tokenizer, text, "Paris", "subject") == (0, 1)  # the substring search took " Parisian"
    with pytest.raises(ConfigError, match="subject 'Paris' occurs in the prompt 'A Parisian cafe' only inside") as info:
        find_span(tokenizer, "A Parisian cafe", "Paris", "subject")
    assert "\n" not in str(info.value)


def test_smollm2_splits_parisian_after_paris_and_the_word_still_decides(smollm2):
    """" Parisian" is " Paris" + "ian" for SmolLM2: a token boundary, yet inside a word."""
    text = "A Parisian cafe"
    pieces = [smollm2.decode([i]) for i in smollm2(text)["input_ids"]]
    assert pieces[1:3] == [" Paris", "ian"]
    with pytest.raises(ConfigError, match="only inside a word or token"):
        find_span(smollm2, text, "Paris", "subject")
    assert token_ending(smollm2, text, len("A Paris")) is None
    assert token_ending(smollm2, text, len("A Parisian")) == 2


@pytest.mark.parametrize("span", ["Paris", " Paris", "Paris ", Span(" Paris")])
def test_a_leading_space_belongs_to_the_token_it_starts(smollm2, span):
    text = "We spent a week in Paris last spring"
    start, end = find_span(smollm2, text, span, "subject")
    assert end - start == 1 and smollm2.decode([smollm2(text)["input_ids"][start]]) == " Paris"


def test_a_subject_at_the_start_of_the_prompt_has_no_leading_space(tokenizer):
    text = "Paris is the capital of France"
    for span in ("Paris", " Paris"):
        start, end = find_span(tokenizer, text, span, "subject")
        assert (start, end) == (0, 1) and tokens_of(tokenizer, text, (start, end)) == "Paris"
    assert subject_tokens(tokenizer, text, "Paris is") == (0, 2)


def test_a_repeated_span_is_refused_unless_an_occurrence_is_named(tokenizer):
    text = "Paris then Lyon then Paris again"
    with pytest.raises(ConfigError, match=r"subject 'Paris' occurs 2 times in the prompt .* \(ending at tokens \[0, ") as info:
        find_span(tokenizer, text, "Paris", "subject")
    assert "Span('Paris', occurrence=k)" in str(info.value) and "\n" not in str(info.value)
    first, last = find_span(tokenizer, text, Span("Paris", 0)), find_span(tokenizer, text, Span("Paris", -1))
    assert first == (0, 1) and last[0] > first[0] and tokens_of(tokenizer, text, last).strip() == "Paris"
    assert find_span(tokenizer, text, Span("Paris", 1)) == last
    with pytest.raises(ConfigError, match="occurs 2 time\\(s\\) in the prompt .*, so there is no occurrence 2"):
        find_span(tokenizer, text, Span("Paris", 2))
    # a longer span that occurs once needs no occurrence
    assert find_span(tokenizer, text, "then Paris")[1] == last[1]


def test_a_repetition_inside_other_words_does_not_make_a_span_ambiguous(tokenizer):
    text = "Parisians love Paris"
    start, end = find_span(tokenizer, text, "Paris", "subject")
    assert tokens_of(tokenizer, text, (start, end)).strip() == "Paris" and end == len(tokenizer(text)["input_ids"])


@pytest.mark.parametrize(("text", "span"), [
    ("He moved to Zürich in 1984.", "Zürich"),
    ("She flew from 東京 to 京都 last week.", "東京"),
    ("Café Müller in Köln", "Müller"),
])
def test_non_ascii_spans(tokenizer, text, span):
    found = find_span(tokenizer, text, span, "subject")
    assert tokens_of(tokenizer, text, found).strip() == span


def test_a_script_without_spaces_is_cut_where_the_tokens_are(smollm2):
    """Japanese writes no spaces between words: there the tokens alone decide."""
    text = "東京は日本の首都です"
    assert tokens_of(smollm2, text, find_span(smollm2, text, "東京", "subject")) == "東京"


def test_non_ascii_words_are_not_cut(smollm2):
    with pytest.raises(ConfigError, match="only inside a word or token"):
        find_span(smollm2, "He moved to Zürichberg.", "Zürich", "subject")


def test_a_number_is_several_smollm2_tokens_and_is_found_whole(smollm2):
    text = "Orwell published the novel in 1984."
    start, end = find_span(smollm2, text, "1984", "subject")
    ids = smollm2(text)["input_ids"][start:end]
    assert [smollm2.decode([i]) for i in ids] == ["1", "9", "8", "4"]
    assert token_position(smollm2, text, smollm2(text)["input_ids"], "1984", "subject") == end - 1
    with pytest.raises(ConfigError, match="'198' occurs in the prompt .* only inside a word or token"):
        find_span(smollm2, text, "198", "subject")  # the tokens of "198" exist, but the number is 1984


def test_absent_and_empty_spans_are_one_line_errors(tokenizer):
    with pytest.raises(ConfigError, match="subject 'Lyon' is not in the prompt 'Paris is lovely'; name a span"):
        find_span(tokenizer, "Paris is lovely", "Lyon", "subject")
    with pytest.raises(ConfigError, match="subject ' ' is empty"):
        find_span(tokenizer, "Paris is lovely", " ", "subject")


def test_token_ending_is_the_token_that_ends_a_prefix(smollm2):
    query = "The capital city of the country of the city of Toronto"
    at = token_ending(smollm2, query, len("The capital city of"))
    assert smollm2.decode([smollm2(query)["input_ids"][at]]) == " of" and at == 3
    assert token_ending(smollm2, query, len("The capital ci")) is None
    assert token_ending(smollm2, query, 0) is None


def test_the_lre_query_is_its_last_occurrence(smollm2):
    prompt = "The capital of France is Paris\nThe capital of Texas is Austin\nThe country of Paris is"
    start, _ = find_span(smollm2, prompt, queried("Paris"))
    assert start == len(smollm2(prompt)["input_ids"]) - 2  # " Paris", then " is"


# --- where the spans are used -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return lenscope.load_model(str(tiny_model_dir))


def test_the_patchscope_reads_and_writes_whole_tokens(model):
    # "w7" is a piece of the token "w70" (before it) and of "w17"; the substring search took the last
    source = Patchscope(Source(["w7 w8 w70", "w17 w7 w9"], [1], position="w7"))
    _, own = source.read(model)
    assert [len(ids) - 1 for ids in own] == [0, 1]
    scope = Patchscope(Source(["w1 w2"], [1]), Target("w30 w31 w3", layers="same", placeholder="w3"))
    assert scope._groups(model, 1, 1, None)[0].write_at == 2
    with pytest.raises(ConfigError, match="source 'w7' occurs 2 times in the prompt 'w7 w8 w7'"):
        Patchscope(Source(["w7 w8 w7"], [1], position="w7")).read(model)
    _, own = Patchscope(Source(["w7 w8 w7"], [1], position=Span("w7", occurrence=-1))).read(model)
    assert len(own[0]) == 3


def test_causal_tracing_corrupts_the_whole_subject_tokens(words):
    assert subject_tokens(words, "w7 w8 w70 w9", "w7") == (0, 1)  # the substring search: the "w7" of "w70"
    assert subject_tokens(words, "w5 w6 w7 w8 w9", "w7 w8") == (2, 4)
    with pytest.raises(ConfigError, match="subject 'w7' occurs 2 times"):
        subject_tokens(words, "w7 w8 w7", "w7")


def test_the_command_line_refuses_an_ambiguous_span_in_one_line(tiny_model_dir, tmp_path, capsys):
    from lenscope import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["patchscope", "trace", "--prompt", "w7 w8 w7 w9", "--subject", "w7", "--model", str(tiny_model_dir),
                  "--out", str(tmp_path / "trace")])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and "subject 'w7' occurs 2 times" in err, err


@pytest.mark.parametrize("command,answer_file", [("trace", "trace.json"), ("knockout", "knockout.json")])
def test_trace_and_knockout_name_an_occurrence_of_a_repeated_subject(tiny_model_dir, tmp_path, command, answer_file):
    """The refusal above names an occurrence as the fix; the command line can give one."""
    from lenscope import cli

    out = tmp_path / command
    cli.main(["patchscope", command, "--prompt", "w7 w8 w7 w9", "--subject", "w7", "--subject_occurrence", "-1",
              "--model", str(tiny_model_dir), "--out", str(out), "--layers", "[0]"])
    # the word-level tokenizer: w7 w8 w7 w9 are tokens 0..3, the last w7 is token 2
    assert json.loads((out / answer_file).read_text())["subject"] == [2, 3]


def test_a_yaml_position_can_name_an_occurrence(tiny_model_dir, tmp_path):
    from lenscope import cli

    config = tmp_path / "scope.yaml"
    config.write_text(f"model: {tiny_model_dir}\nsource:\n  prompts: ['w2 w1 w2 w3']\n  layers: [1]\n"
                      "  position: {text: w2, occurrence: -1}\ntarget:\n  layers: last\n"
                      f"out: {tmp_path / 'scope.json'}\n")
    cli.main(["patchscope", "run", "--config", str(config)])
    rows = json.loads((tmp_path / "scope.json").read_text())["rows"]
    model = lenscope.load_model(str(tiny_model_dir))

    def top_tokens(position: int) -> list[str]:
        scope = Patchscope(Source(["w2 w1 w2 w3"], [1], position=position), Target(layers="last"))
        return scope.run(model).top_tokens(model.tokenizer, k=5)[0][0]

    # read where the second "w2" is (token 2), not the first
    assert rows[0]["top_tokens"] == top_tokens(2) != top_tokens(0)


def test_every_shipped_span_is_found_where_docs_results_says(smollm2):
    """bench/span_positions.py's list: every span of the documented experiments is found on token
    boundaries, at the token the substring search found (docs/results.md: no number moved)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "span_positions.py"
    spec = importlib.util.spec_from_file_location("span_positions", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    found = bench.spans(smollm2)
    assert len(found) == 382 + 11 + 1 + 2 + 1 + 382
    for _, prompt, span, _ in found:
        text = span.text if isinstance(span, Span) else span
        assert find_span(smollm2, prompt, span) == bench.old_range(smollm2, prompt, text), (prompt, span)
    from lenscope.patchscopes.facts import load_facts
    from lenscope.patchscopes.multi_hop import two_hop_queries

    for query in two_hop_queries(load_facts()):
        end = len(query.question)
        assert token_ending(smollm2, query.query, end) == bench.old_ending(smollm2, query.query, end), query.query


def write_fact_set(tmp_path, template: str, facts: list[tuple[str, str, str]]):
    from lenscope.patchscopes.facts import load_facts

    path = tmp_path / "facts.json"
    path.write_text(json.dumps({"relations": {"r": {"template": template}},
                                "facts": [{"relation": "r", "subject": s, "object": o, "source": src} for s, o, src in facts]}))
    return load_facts(path)


def test_attribute_extraction_looks_up_every_subject_before_generating(model, tmp_path, monkeypatch):
    from lenscope.patchscopes import attribute_extraction as module

    def generate(*args, **kwargs):
        raise AssertionError("generated before the spans were checked")

    monkeypatch.setattr(module, "greedy_continuations", generate)
    facts = write_fact_set(tmp_path, "w10 w11 x", [("w5", "w80", "w1 w5 w2"), ("w6", "w81", "w6 w2 w6")])
    with pytest.raises(ConfigError, match="relation 'r': subject 'w6' occurs 2 times in the prompt 'w6 w2 w6'"):
        module.attribute_extraction(model, facts, source_layers=[1], target_layers=[1], max_new_tokens=2)
    facts = write_fact_set(tmp_path, "w10 w11 x", [("w5", "w80", "w1 w50 w2")])  # "w5" only inside "w50"
    with pytest.raises(ConfigError, match="subject 'w5' occurs in the prompt 'w1 w50 w2' only inside a word or token"):
        module.attribute_extraction(model, facts, source_layers=[1], target_layers=[1], max_new_tokens=2)


def test_lre_refuses_a_question_that_does_not_hold_its_subject_whole(model, tmp_path, monkeypatch):
    from lenscope.patchscopes import lre

    def jacobian(*args, **kwargs):
        raise AssertionError("a Jacobian was computed before the spans were checked")

    monkeypatch.setattr(lre, "jacobian_at", jacobian)
    facts = write_fact_set(tmp_path, "w10 w11 x", [(f"w{40 + i}", f"w{80 + i}", f"w1 w{40 + i}") for i in range(4)])
    # without its space, the connector glues onto the subject: only the demonstrations would hold it whole
    with pytest.raises(ConfigError, match="subject 'w4[0-3]' occurs in the prompt 'w10 w11 w4[0-3]is' only inside"):
        lre.fit_relation(model, facts, "r", layer=1, n_train=2, connector="is")


def test_the_tutorial_probe_learns_only_from_subjects_that_are_whole_tokens(model):
    """The word-level tokenizer keeps "Canada," as one token: that fact has no state of "Canada"
    alone, so the tutorial's probe leaves it out (the page says how many it used) instead of the
    section failing, or reading "Canada," as the substring search did."""
    from lenscope.patchscopes.facts import load_facts
    from lenscope.tutorial import sections

    facts = load_facts()
    fact = facts.of("country_capital")[0]
    view = sections.attribute(model, facts, "country_capital", fact.source, fact.subject, layer_step=2, max_new_tokens=2)
    others = [f for f in facts.of("country_capital") if f.subject != fact.subject]
    whole = [f for f in others if f" {f.subject} " in f" {f.source} "]  # whitespace-separated, as this tokenizer splits
    assert 0 < view.probe_facts == len(whole) < len(others)


def test_a_tokenizer_without_offsets_is_one_line():
    class PythonTokenizer:  # a slow tokenizer: no character offsets to place a span on
        is_fast = False

    with pytest.raises(ConfigError, match="PythonTokenizer gives no character offsets; a span of a prompt is found on"):
        find_span(PythonTokenizer(), "Paris is lovely", "Paris", "subject")
