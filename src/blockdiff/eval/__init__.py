"""Metrics only: generative perplexity under a reference model with NFEs and entropy (genppl), task
items and their checkers (tasks, questions), HumanEval in a sandbox. Runs that train models and
then evaluate them live in `experiments/`, which uses this package, never the reverse."""
