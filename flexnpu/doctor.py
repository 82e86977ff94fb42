"""`flexnpu doctor` (placeholder until implemented)."""
import typer


def doctor_command() -> None:
    """Check prerequisites."""
    raise typer.Exit(1)
