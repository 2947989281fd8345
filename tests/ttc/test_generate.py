import pytest
import torch

from scrimp.ttc.generate import HFGenerator, ReplayGenerator


def test_replay_never_repeats_and_enforces_limits(esc_prompts):
    prompts = esc_prompts[:3]
    gen = ReplayGenerator(prompts, seed=5)
    pid = prompts[0].id
    drawn = []
    for n in (3, 10, 27):
        drawn += gen.sample([pid], n)[0]
    assert len({id(s) for s in drawn}) == 40 == len(prompts[0].samples)
    assert sorted(map(id, drawn)) == sorted(map(id, prompts[0].samples))
    with pytest.raises(ValueError, match="0 of its 40 recorded samples left"):
        gen.sample([pid], 1)
    # all-or-nothing: a failing request hands out nothing for the other prompts either
    with pytest.raises(ValueError, match="recorded samples left"):
        gen.sample([prompts[1].id, pid], [2, 1])
    assert gen.remaining(prompts[1].id) == 40
    # same seed, same order; different seed, different order
    a = ReplayGenerator(prompts, seed=1).sample([pid], 40)[0]
    b = ReplayGenerator(prompts, seed=1).sample([pid], 40)[0]
    c = ReplayGenerator(prompts, seed=2).sample([pid], 40)[0]
    assert [id(s) for s in a] == [id(s) for s in b] != [id(s) for s in c]


def _tiny_lm():
    from tokenizers import Tokenizer, decoders, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = ["\n", "</s>"] + list("abcdefghij .")
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
    tok.decoder = decoders.Fuse()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(chars), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval(), hf_tok


def test_hf_generator_greedy_matches_manual_loop():
    model, tok = _tiny_lm()
    gen = HFGenerator(model, tok, max_new_tokens=6, temperature=0.0)
    out = gen.sample(["abc", "ab"], 2)
    assert [len(o) for o in out] == [2, 2]
    # reference: argmax decoding by hand on the unpadded prompt
    ids = tok("abc", return_tensors="pt").input_ids
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(ids).logits[0, -1].argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            if nxt == tok.eos_token_id:
                break
    assert out[0][0].text == tok.decode(new, skip_special_tokens=True) and out[0][0].tokens == len(new)


def test_hf_generator_sampling_and_step_delimiter():
    model, tok = _tiny_lm()
    gen = HFGenerator(model, tok, max_new_tokens=5, temperature=1.0, top_p=0.9)
    out = gen.sample(["a", "b", "c"], [1, 3, 0])
    assert [len(o) for o in out] == [1, 3, 0] and all(1 <= s.tokens <= 5 for o in out for s in o)
    # make "\n" (id 0) the argmax everywhere: every step is exactly the delimiter "\n\n", 2 tokens
    with torch.no_grad():
        model.lm_head.weight.zero_()
    steps = HFGenerator(model, tok, max_step_tokens=8, temperature=0.0).extend("ab", ["c", "d"], 2)
    assert [[(s.text, s.tokens, s.finished) for s in row] for row in steps] == [[("\n\n", 2, False)] * 2] * 2
    with pytest.raises(ValueError, match="top_p"):
        HFGenerator(model, tok, top_p=0.0)


def test_replay_generator_bad_input_is_one_sentence(esc_prompts):
    import numpy as np

    with pytest.raises(ValueError, match="prompts must hold ReplayPrompt objects .* got a str"):
        ReplayGenerator(["a", "b"])  # was an AttributeError
    gen = ReplayGenerator(esc_prompts[:2])
    ids = [p.id for p in esc_prompts[:2]]
    for n in (1.0, True, -1, [2, 1.5]):  # 1.0 was "'float' object is not iterable"; True drew one sample
        with pytest.raises(ValueError, match="n must be a non-negative integer or one per prompt"):
            gen.sample(ids, n)
    assert [len(s) for s in gen.sample(ids, np.array([2, 3]))] == [2, 3]  # numpy counts are counts
    assert [len(s) for s in gen.sample(ids, np.int64(1))] == [1, 1]
