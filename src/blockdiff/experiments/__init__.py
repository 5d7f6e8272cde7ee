"""Runs that train and evaluate (the comparison table): they use `eval/`, never the reverse."""
