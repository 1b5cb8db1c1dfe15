"""How every ``softprompt-kernels`` command prints its help: each option's default once, where it says something."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help with its default once: ``(default: X)`` is added unless the help already says what the
    default is, the option is a flag (store_true / store_false: the help says what giving it does), or there is no
    default to show (None, an empty list: a required option, or one whose absence the help explains)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default in (None, argparse.SUPPRESS, [], ()):
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        return text + " (default: %(default)s)"
