"""`pocketlm data list` and `pocketlm data show SPEC`: see what each source gives before training on it."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pocketlm.data.sources import COMMON_KEYS, DATA_DIR_ENV, SOURCES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="list data sources, or print a source's records")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", parser_class=type(p))
    data_sub.required = True

    lst = data_sub.add_parser("list", help="the sources, their record kind, and what each needs")
    lst.set_defaults(handler=list_sources)

    show = data_sub.add_parser("show", help="print records as JSON lines (stdout) and counts (stderr)")
    show.add_argument("spec", metavar="SPEC", help="name[:key=value,...], e.g. oasst1:lang=en,branches=best")
    show.add_argument("--data-dir", default=None,
                      help=f"local mirror root with one folder per source (default: ${DATA_DIR_ENV}, else the hub)")
    show.add_argument("--take", type=int, default=None, help="stop after N records (same as the spec key take=N)")
    show.add_argument("--skip-bad", action="store_true",
                      help="skip and count bad lines/records instead of stopping (spec key skip_bad=1)")
    show.set_defaults(handler=show_records)


def list_sources(args: argparse.Namespace) -> int:
    print(f"{'source':<12} {'kind':<5} {'keys (besides ' + ', '.join(COMMON_KEYS) + ')':<42} needs")
    for s in SOURCES.values():
        print(f"{s.name:<12} {s.kind:<5} {', '.join(s.keys) or '-':<42} {s.needs}")
    return 0


def show_records(args: argparse.Namespace) -> int:
    from pocketlm.data.sources import SourceStats, open_source, parse_spec

    spec = parse_spec(args.spec)
    if args.take is not None:
        spec.options["take"] = str(args.take)
    if args.skip_bad:
        spec.options["skip_bad"] = "1"
    stats = SourceStats()
    try:
        for record in open_source(spec, data_dir=args.data_dir, stats=stats):
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader (e.g. `| head`) has what it wanted; point stdout at devnull so exit does not complain.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.stderr.write(stats.summary(str(spec)) + "\n")
    return 0
