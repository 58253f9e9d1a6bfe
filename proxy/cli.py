"""The ``weir`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, json_schema, load_config


def cmd_run(args: argparse.Namespace) -> int:
    from .app import run

    return run(args.config)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{args.config}: valid ({len(config.services)} service(s))")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    json.dump(json_schema(), sys.stdout, indent=2)
    print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weir", description="Traffic-splitting HTTP proxy "
                                     "for zero-downtime deployments.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", required=True, help="YAML config file")
    run.set_defaults(func=cmd_run)
    validate = sub.add_parser("validate", help="check a config file; exit 2 if invalid")
    validate.add_argument("-c", "--config", required=True, help="YAML config file")
    validate.set_defaults(func=cmd_validate)
    schema = sub.add_parser("schema", help="print the config's JSON Schema")
    schema.set_defaults(func=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
