"""What the command lines of scripts/*.py share: no abbreviated flags, an unknown flag refused on the
error's first line with the closest real one, and a refused setting or input said in one line with exit
status 2 instead of a traceback.

argparse takes any unambiguous prefix of a flag by default, so `--num_train_epoch 3` silently sets
`--num_train_epochs`; and its errors come after the usage, which for scripts/pretrain.py is dozens of
lines. Nothing here imports the rest of the package.
"""

import argparse
import difflib
import sys
from collections.abc import Callable, Iterable


def closest_flag(flag: str, known: Iterable[str]) -> str | None:
    """The real flag nearest to the unknown `flag` (`--num_train_epoch=3` -> `--num_train_epochs`), or None."""
    name = flag.split("=", 1)[0]
    candidates = [option for option in known if option.startswith("--")]
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if not matches:  # a fragment of a long flag (`--epochs` for `--num_train_epochs`) is far by ratio
        matches = sorted((option for option in candidates if name.strip("-") in option), key=len)[:1]
    return matches[0] if matches else None


def unknown_flags_message(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """The error for the arguments `parser` did not take: each unknown flag with the closest real one."""
    known = parser._option_string_actions  # argparse keeps no public list of its option strings
    hints = []
    for token in unknown:
        if not token.startswith("--"):
            continue
        match = closest_flag(token, known)
        name = token.split("=", 1)[0]
        hints.append(f"{name} (did you mean {match}?)" if match else name)
    message = f"unrecognized arguments: {' '.join(unknown)}"
    if hints:
        message += f"; unknown flags: {', '.join(hints)}. Flags are taken whole, not abbreviated"
    return f"{message}; see --help"


class ScriptArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with abbreviations off, and errors that start with the error line: the
    usage comes after it, and an unknown flag is named with the closest real one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        args = self._known_flags_only(args)
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            self.error(unknown_flags_message(self, unknown))
        return namespace

    def parse_intermixed_args(self, args=None, namespace=None):
        args = self._known_flags_only(args)
        namespace, unknown = self.parse_known_intermixed_args(args, namespace)
        if unknown:
            self.error(unknown_flags_message(self, unknown))
        return namespace

    def _known_flags_only(self, args) -> list[str]:
        """`args` (default: the command line), refused first when it holds an unknown flag: `--mod` for a
        required `--model` is a typo to name, not a missing `--model`."""
        args = sys.argv[1:] if args is None else list(args)
        unknown = [arg for arg in args if arg.startswith("--") and arg != "--" and self._unknown(arg)]
        if unknown:
            self.error(unknown_flags_message(self, unknown))
        return args

    def _unknown(self, arg: str) -> bool:
        return arg.split("=", 1)[0] not in self._option_string_actions

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n{self.format_usage()}")


def run_script(main: Callable[[], object], name: str) -> int:
    """Run a script's `main()`; a `ValueError` (a setting or an input it cannot use, whose message says
    what to change) becomes one line `NAME: error: ...` on stderr and exit status 2, without a traceback."""
    try:
        main()
    except ValueError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    return 0


__all__ = ["ScriptArgumentParser", "closest_flag", "run_script", "unknown_flags_message"]
