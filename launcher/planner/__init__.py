"""Placement: `plan(gpus, models, settings) -> Plan`, pure, every choice and rejection explained.

    plan.py        the pipeline: candidates -> filters -> scorers -> pick
    fit.py         filters: do these models fit these cards, and will Ollama keep them loaded?
    slots.py       candidates and scorers: where a copy of a model could go, best first
    output.py      the reasons, warnings and the `Plan` itself
    placement.py   the plan's backends: which cards, which models, which env
"""
