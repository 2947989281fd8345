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
compute_optimal, stop_reallocate, and the published baselines esc and adaptive_consistency), ``options``
((strategy, n) options priced by samples or tokens, chosen by the knapsack over (prompt, option)),
``evaluate`` (unbiased pass@k / maj@k, exact stop-at-first-success, bootstrap, curves, savings),
``crossfit`` (hyper-parameters chosen on calibration folds, reported on disjoint ones), ``run`` (the job
behind ``python -m experiments.ttc``: config in, comparison table and summary.json out).
"""
