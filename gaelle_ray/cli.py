"""The `gaelle` command.

Each subcommand parses its arguments here and calls one library function; heavy imports
(torch, Ray) happen inside the handlers so `gaelle --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from gaelle_ray.config import ConfigError, dump_yaml, load_config

_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="experiment YAML (see experiments/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.base_lr=0.3 (repeatable)")


def _config_show(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    sys.stdout.write(dump_yaml(config))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gaelle",
        description="GAELLE self-supervised multi-label pretraining on Ray: data preparation, "
                    "distributed pretraining, evaluation and sweeps.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    config = sub.add_parser("config", help="inspect and validate experiment configs")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved, validated config as YAML")
    _add_config_args(show)
    show.set_defaults(handler=_config_show)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return handler(args)
    except (ConfigError, ValueError) as exc:
        print(f"gaelle {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
