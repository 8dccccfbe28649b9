"""CLI for the serve stage (filled in by its issue)."""


def register(sub) -> None:
    pass
