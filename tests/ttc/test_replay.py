import json

import pytest

from scrimp.ttc.replay import convert_esc, load_replay, replay_stats, save_replay


def test_esc_extraction_rate(esc_prompts):
    stats = replay_stats(esc_prompts)
    assert stats["prompts"] == 500 and stats["samples"] == 20000
    assert stats["extraction_rate"] > 0.95
    # an independent check of correctness marks: the README's simple regex measured 0.79 mean accuracy
    assert abs(stats["sample_accuracy"] - 0.79) < 0.02


def test_roundtrip(esc_prompts, tmp_path):
    path = tmp_path / "replay.jsonl"
    save_replay(esc_prompts[:5], path)
    assert load_replay(path) == esc_prompts[:5]


def test_malformed_line_names_the_line(tmp_path):
    good = {"id": "a", "prompt": "q", "reference": "x", "samples": [{"text": "t", "answer": "x", "correct": True,
                                                                  "score": None, "tokens": 3}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + "{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        load_replay(path)
    path.write_text(json.dumps({**good, "samples": []}) + "\n")
    with pytest.raises(ValueError, match="zero recorded samples"):
        load_replay(path)
    esc = tmp_path / "esc.jsonl"
    esc.write_text(json.dumps({"question": "q", "answer": "x", "generated_answer": ["The answer is x."]}) + "\n[1]\n")
    with pytest.raises(ValueError, match="line 2"):
        convert_esc(esc)


def test_text_only_samples_are_extracted_and_judged(tmp_path):
    # Another tool's samples with text but no answer/correct keys: extracted and judged on load;
    # an explicit null answer stays "no answer" (and so is not correct).
    rows = [{"id": "a", "prompt": "p", "reference": "She had 3 + 4 = 7.\n#### 7",
             "samples": [{"text": "3 + 4 = 7\nThe answer is 7."}, {"text": "The answer is 8."},
                         {"text": "The answer is 7.", "answer": None}]}]
    path = tmp_path / "text_only.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    (prompt,) = load_replay(path)
    assert prompt.reference == "7"
    assert [(s.answer, s.correct) for s in prompt.samples] == [("7", True), ("8", False), (None, False)]


def test_esc_references_that_are_whole_solutions_are_reduced_to_their_answer(tmp_path):
    rows = [{"question": "q1", "answer": "Natalia sold 48/2 = 24 clips.\n48+24 = 72.\n#### 72",
             "generated_answer": ["The answer is 72.", "#### 72.00", "The answer is 70."]},
            {"question": "q2", "answer": "so the answer is $\\boxed{\\frac{3}{4}}$",
             "generated_answer": ["The answer is \\boxed{0.75}.", "\\boxed{\\dfrac34}", "The answer is 3/5"]}]
    path = tmp_path / "esc_gsm8k.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    prompts = convert_esc(path)
    assert [[s.correct for s in p.samples] for p in prompts] == [[True, True, False], [True, True, False]]


def test_scores_must_be_finite(tmp_path):
    path = tmp_path / "inf.jsonl"
    path.write_text('{"id": "a", "prompt": "q", "samples": [{"text": "t", "answer": "x", "score": Infinity}]}\n')
    with pytest.raises(ValueError, match="inf.jsonl line 1: sample 'score' must be a finite number or null"):
        load_replay(path)


def test_a_line_that_is_not_utf8_is_named_with_its_file(tmp_path):
    good = json.dumps({"id": "a", "prompt": "q", "samples": [{"text": "t"}]}).encode()
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(good + b"\n\n" + '{"id": "b", "prompt": "caf\xe9", "samples": [{"text": "t"}]}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.jsonl line 3 is not valid UTF-8"):  # was a raw UnicodeDecodeError
        load_replay(path)
    esc = tmp_path / "esc_latin1.jsonl"
    esc.write_bytes('{"question": "caf\xe9", "answer": "x", "generated_answer": ["t"]}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="esc_latin1.jsonl line 1 is not valid UTF-8"):
        convert_esc(esc)


@pytest.mark.filterwarnings("ignore:'scrimp.ttc.replay' found in sys.modules")  # runpy re-runs an imported module
@pytest.mark.parametrize("argv,message", [(["/nonexistent.jsonl"], "error: ESC file not found"),
                                          (["--help"], "usage: python -m scrimp.ttc.replay")])
def test_the_converter_command_ends_with_one_sentence(monkeypatch, argv, message):
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", ["replay", *argv])
    with pytest.raises(SystemExit, match=message):
        runpy.run_module("scrimp.ttc.replay", run_name="__main__")


_SAMPLE = {"text": "The answer is 7.", "answer": "7", "correct": True, "score": 0.5, "tokens": 3}


@pytest.mark.parametrize("prompt,sample,message", [
    ({}, {"answer": 42}, "sample 'answer' must be a string or null, got 42"),  # was a TypeError in exact_match
    ({}, {"answer": 4.5, "correct": None}, "sample 'answer' must be a string or null, got 4.5"),
    ({}, {"answer": ["7"]}, "sample 'answer' must be a string or null"),
    ({"reference": 7}, {}, "'reference' must be a string or null"),
    ({}, {"correct": "yes"}, "sample 'correct' must be true, false or null"),
    ({}, {"score": True}, "sample 'score' must be a finite number or null"),
    ({}, {"score": "high"}, "sample 'score' must be a finite number or null"),
    ({}, {"tokens": -1}, "sample 'tokens' must be a non-negative integer or null"),
    ({}, {"tokens": 2.5}, "sample 'tokens' must be a non-negative integer or null"),
    ({}, {"text": 7}, "each sample must be an object with a string 'text'"),
    ({"prompt": 7}, {}, "each line must be an object with 'id' and a string 'prompt'"),
    ({"samples": "The answer is 7."}, None, "'samples' must be a list"),
])
def test_a_wrong_type_in_a_replay_file_is_one_sentence_naming_the_line(tmp_path, prompt, sample, message):
    # The second line is bad; the first is good, so the sentence must name line 2 of this file.
    good = {"id": "a", "prompt": "q", "reference": "7", "samples": [_SAMPLE]}
    bad = {**good, "id": "b", "samples": [{**_SAMPLE, **sample}] if sample is not None else None, **prompt}
    path = tmp_path / "typed.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError) as err:
        load_replay(path)
    assert str(err.value).startswith("typed.jsonl line 2: ") and message in str(err.value), str(err.value)


def test_answers_a_file_states_are_kept_as_written_so_that_case_distinct_answers_vote_apart(tmp_path):
    # CRUXEval output prediction: 'O' is right and 'o' is wrong. Normalizing the stated answers merged them
    # into one vote group flagged right, so maj@3 counted the two wrong samples as right (it was 1.0).
    from scrimp.ttc.crossfit import uniform_exact

    samples = [{"text": "t", "answer": "'o'", "correct": False}] * 2 + [{"text": "t", "answer": "'O'", "correct": True}]
    path = tmp_path / "case.jsonl"
    path.write_text(json.dumps({"id": "c", "prompt": "q", "reference": "'O'", "samples": samples}) + "\n")
    prompt = load_replay(path)[0]
    assert [s.answer for s in prompt.samples] == ["'o'", "'o'", "'O'"]
    assert uniform_exact([prompt], 3)[0] == 0.0  # 'o' holds the plurality of all three
    assert uniform_exact([prompt], 1)[0] == pytest.approx(1 / 3)
