"""Command-line plumbing shared by the scripts: dashed option names whose old underscore spellings keep working as
hidden aliases, and a clean exit (message, status 2) for bad input instead of a traceback."""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

# What bad input raises (a wrong value, a missing or malformed file); a crash during training is none of these
# and keeps its traceback.
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def flag(name: str) -> list[str]:
    """`"--max-seq-len"` → `["--max-seq-len", "--max_seq_len"]`: both parse, --help shows only the first."""
    dashed = "--" + name[2:].replace("_", "-")
    underscored = "--" + name[2:].replace("-", "_")
    return [dashed] if dashed == underscored else [dashed, underscored]


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and lists only the dashed spelling of each option."""

    def _format_action_invocation(self, action):
        shown = [s for s in action.option_strings if "_" not in s]
        if shown and len(shown) < len(action.option_strings):
            action = copy.copy(action)
            action.option_strings = shown
        return super()._format_action_invocation(action)


def exit_on_input_error(fn, *args, **kwargs):
    """`fn(*args, **kwargs)`; bad input ends the program like an argparse error: `prog: error: message`, status 2."""
    try:
        return fn(*args, **kwargs)
    except INPUT_ERRORS as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        sys.exit(2)
