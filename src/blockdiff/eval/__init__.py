"""Honest numbers: generative perplexity under a reference model, with NFEs and entropy."""
