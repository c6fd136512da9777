"""The ``shardex`` command: up | engine | feed | status | audit | bench KIND.

Each subcommand imports its implementation lazily so ``shardex --help`` stays instant and the
feed half never imports Ray.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import re
import signal
import sys

BENCHES = ("engine", "feed", "api", "durability", "live", "chaos", "footprint", "latency")


def _port(text: str) -> int:
    """A TCP port, 1..65535, in ASCII digits (int() also takes "9_092" and other scripts'
    digits); argparse prints the usage and exits 2 for anything else."""
    if not (re.fullmatch(r"[0-9]{1,5}", text) and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r} is not a port in 1..65535")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole platform in the foreground (Ctrl-C stops it)")
    engine = sub.add_parser("engine", help="start everything but the feed source")
    feed = sub.add_parser("feed", help="run the market data service alone (source -> Kafka)")
    for command in (up, engine, feed):
        command.add_argument("--broker-port", type=_port, metavar="PORT",
                             help="port of the embedded broker (default 9092; not used with "
                                  "KAFKA_BROKERS, nor by a feed that finds a platform's "
                                  "broker recorded in DATA_DIR)")
    sub.add_parser("status", help="print the live layout: actors, nodes, tick ages, positions")
    audit = sub.add_parser("audit", help="check the ledger invariant; exit 1 on a difference")
    audit.add_argument("--json", action="store_true", help="print the totals as JSON")
    audit.add_argument("--offline", action="store_true",
                       help="audit the state recovered from DATA_DIR instead of a live cluster")
    bench = sub.add_parser("bench", help="run a benchmark; prints a JSON line last")
    bench.add_argument("kind", choices=BENCHES)
    bench.add_argument("options", nargs=argparse.REMAINDER, metavar="OPTION",
                       help="options of that benchmark (shardex bench KIND --help lists them)")
    for command in sub.choices.values():
        command.set_defaults(usage_of=command)  # whose usage a mistake in its arguments shows
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "bench":
        module = importlib.import_module(f"bench.{args.kind}")
        return int(module.main(args.options) or 0)
    from cluster.config import Settings

    settings = Settings.from_env()
    if args.command == "feed":
        from feed.service import run_feed_service

        return run_feed_service(settings, settings.data_dir, broker_port=args.broker_port)
    from cluster.actors import launcher

    if args.command in ("up", "engine"):
        code = launcher.up(settings, with_feed=args.command == "up", broker_port=args.broker_port)
        # all is stopped: the interpreter's last collection would walk every object Ray, Serve
        # and FastAPI made (0.3-0.4 s before the process ends); frozen, none (atexit still runs)
        gc.freeze()
        return code
    if args.command == "status":
        return launcher.status(settings)
    return launcher.audit(settings, as_json=args.json, offline=args.offline)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse would print the top level's usage: `up --bogus` is a mistake about `up`
        args.usage_of.error(f"unrecognized arguments: {' '.join(unknown)}")
    from cluster.config import ConfigError

    try:
        return _run(args)
    except BrokenPipeError:
        # the reader went away (`shardex status | head`): what it did not read is not an error;
        # stdout goes to /dev/null so the interpreter's last flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except ConfigError as exc:
        # one line naming the variable and its range: a bad setting is not a crash
        print(f"shardex: configuration error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
