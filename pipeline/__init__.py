"""The Ray-distributed continual-learning chain: streams, models, preprocessing, training, evaluation, tracking.

Orchestration only: the method itself lives in `procl`.
"""
