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
