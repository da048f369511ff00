"""What the settings' checks share: the one-line refusal, and the ranges of numeric fields."""


def fail(name: str, value, allowed: str) -> None:
    """Refuse `--name=value`, saying what is allowed."""
    raise ValueError(f"--{name}={value!r} is not valid: {allowed}")


def check_ranges(args, positive=(), non_negative=(), positive_or_unset=()) -> None:
    """Integers >= 1 (`positive`), numbers >= 0 (`non_negative`), and integers >= 1 or None."""
    for name in positive:
        if getattr(args, name) < 1:
            fail(name, getattr(args, name), "an integer >= 1")
    for name in non_negative:
        if getattr(args, name) < 0:
            fail(name, getattr(args, name), "a number >= 0")
    for name in positive_or_unset:
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(name, value, "an integer >= 1, or leave it unset")


__all__ = ["check_ranges", "fail"]
