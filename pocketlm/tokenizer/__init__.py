"""Tokenizer stage: the SentencePiece model (`tokenizer_sp`) and the chat template (`chat_template`).

Import from the submodules: `from pocketlm.tokenizer.tokenizer_sp import Tokenizer`. This package
file stays empty so that `pocketlm --help` does not load sentencepiece and numpy.
"""
