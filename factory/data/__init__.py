"""Corpora, the byte tokenizer and the MAD synthetic tasks."""

from factory.data.corpus import Corpus, default_corpus_path, load_corpus
from factory.data.tokenizer import ByteTokenizer

__all__ = ["ByteTokenizer", "Corpus", "default_corpus_path", "load_corpus"]
