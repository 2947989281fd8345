"""Test-time compute: generators (transformers, vLLM, replay of recorded samples), answer checking,
search strategies, per-prompt budget policies, and honest evaluation.

    from scrimp.ttc.replay import convert_esc
    from scrimp.ttc.generate import ReplayGenerator
    from scrimp.ttc.allocate import run_policy

    prompts = convert_esc("../shared/data/ttc/esc_gpt35_last_letters_t0.7.jsonl")
    out = run_policy("sequential", ReplayGenerator(prompts, seed=0), [p.id for p in prompts], 8)

Modules: ``generate`` (Generator protocol, HFGenerator, VLLMGenerator, ReplayGenerator), ``replay``
(canonical JSONL, ESC converter), ``verify`` (extraction, normalization, reward-model scorers),
``strategies`` (best-of-N, majority, weighted majority, beam, adaptive beam, DVTS), ``stopping``
(Adaptive-Consistency, ESC and Dirichlet cap-majority rules), ``allocate`` (uniform, oracle, knapsack, sequential,
compute_optimal), ``evaluate`` (unbiased pass@k / maj@k, bootstrap, curves, savings), ``crossfit``
(hyper-parameters chosen on calibration folds, reported on disjoint ones).
"""
