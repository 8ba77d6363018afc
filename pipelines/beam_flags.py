"""The flags a command hands on to Beam, checked: one that neither lookalike nor Beam knows is a mistake.

Beam itself only logs "Unparseable argument" for such a flag and runs on: `lookalike embed --batch-sise 32` would
embed a whole catalog at the default batch size. Beam is imported only when there are flags to check.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["check_beam_args"]


def check_beam_args(args: Sequence[str], ours: Iterable[str] = (), hints: Mapping[str, str] | None = None) -> None:
    """Refuse `args` (handed on to Beam) if one is an option Beam does not define, or a word that no option takes;
    `ours` (the command's own options, e.g. `--batch-size`) are offered with Beam's as what was meant, and `hints`
    say where an option of another command belongs.

    Raises:
        ValueError: names the first unknown option, and the closest known one.
    """
    if not args:
        return
    from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

    parser = _BeamArgumentParser(allow_abbrev=False)  # as `PipelineOptions.get_all_options` parses them
    for cls in {str(cls): cls for cls in PipelineOptions.__subclasses__()}.values():
        cls._add_argparse_args(parser)
    _, unknown = parser.parse_known_args([str(arg) for arg in args])
    if not unknown:
        return
    flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
    if not flags:
        raise ValueError(f"unexpected argument {unknown[0]!r}")
    if hints and flags[0] in hints:
        raise ValueError(f"unknown option {flags[0]}: {hints[flags[0]]}")
    known = [*ours, *(option for action in parser._actions for option in action.option_strings)]
    close = difflib.get_close_matches(flags[0], known, n=1)
    raise ValueError(
        f"unknown option {flags[0]}: neither lookalike's nor Beam's" + (f"; did you mean {close[0]}?" if close else "")
    )
