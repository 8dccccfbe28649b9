"""CLI for the train stage (filled in by its issue)."""


def register(sub) -> None:
    pass
