"""CLI for the infer stage (filled in by its issue)."""


def register(sub) -> None:
    pass
