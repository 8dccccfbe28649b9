"""CLI for the tokenizer stage (filled in by its issue)."""


def register(sub) -> None:
    pass
