"""Corpora and tasks, each with how it is obtained."""

from .corpus import Corpus, load_corpus, pack

__all__ = ["Corpus", "load_corpus", "pack"]
