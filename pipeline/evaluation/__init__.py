"""The evaluate stage's parts (`stages/evaluate.py` is the short stage that runs them).

Why a package: one question (is the adapter better for the people who gave feedback, and no
worse for anyone else?) takes several independent measurements. Each lives in its own file
so it can be read, tested and reused on its own:

    conditions   the ways of answering (base, in_context, memory, adapter) and their replies
    metrics      adherence / firing, degeneration, reward models, the LLM judge's win rate
    drift        KL to the base and log-likelihood of reference answers
    users        simulated users' satisfaction on held-out needs
    summary      the summary JSON (intervals, cost), manifest metrics, `metric_value`
    report       the run report's table and bars

Nothing heavy is imported here or at the top of these modules: torch and transformers load
inside the functions that need them (tests/test_import_light.py).
"""
