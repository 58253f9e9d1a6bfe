"""The ``weir`` command line.

``run``, ``validate`` and ``schema`` work on a config file; ``demo`` needs nothing and runs a
canary rollout to watch; every other command is a thin client of a running Weir's admin API
(``--admin URL``, token from ``$WEIR_ADMIN_TOKEN``).
Exit codes: 0 done, 1 the admin API refused or could not be reached, 2 bad usage;
``drain`` and ``undrain``: 0 done, 1 refused or (``--wait``) timed out, 2 bad usage or the admin
API unreachable.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from .adminclient import (
    DEFAULT_ADMIN_URL,
    DEFAULT_TIMEOUT,
    TOKEN_ENV,
    URL_ENV,
    AdminClient,
    AdminError,
    normalize_url,
)
from .wait import USAGE, Target, wait


def cmd_run(args: argparse.Namespace) -> int:
    from ..runtime.main import run

    return run(args.config, args.workers)


def cmd_validate(args: argparse.Namespace) -> int:
    from ..config.loader import load_config
    from ..config.model import ConfigError

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"{args.config}: valid ({len(config.services)} service(s))")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from ..config.model import json_schema

    json.dump(json_schema(), sys.stdout, indent=2)
    print()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo.options import DemoOptions
    from ..demo.script import run

    return run(DemoOptions(speed=args.speed, port=args.port, admin_port=args.admin_port,
                           keep_running=args.keep_running))


# --- admin API clients ------------------------------------------------------------------------


class UsageError(Exception):
    """Bad arguments found after parsing: reported like argparse's own errors (exit 2)."""


_ASSIGNMENT_RE = re.compile(r"^\s*([^=\s]+)\s*=\s*(\S+)\s*$")


def weight_assignment(text: str) -> tuple[str, int]:
    """'green=100' → ('green', 100); an argparse type, so mistakes are usage errors."""
    match = _ASSIGNMENT_RE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected VERSION=WEIGHT like green=100, got {text!r}")
    version, weight = match.groups()
    if not (weight.isascii() and weight.isdigit()):
        raise argparse.ArgumentTypeError(
            f"the weight in {text!r} must be a whole number >= 0, like {version}=100")
    return version, int(weight)


def format_weights(weights: dict[str, Any]) -> str:
    return " ".join(f"{version}={weight}" for version, weight in weights.items()) or "(none)"


def client(args: argparse.Namespace, timeout: float | None = None) -> AdminClient:
    """The admin API client for a command. ``timeout``: each call's, for a command whose own
    --timeout bounds a whole wait; else its --timeout, else the default."""
    try:
        return AdminClient(args.admin, timeout=timeout or args.timeout or DEFAULT_TIMEOUT)
    except ValueError as exc:  # a malformed $WEIR_ADMIN_URL (--admin is checked by argparse)
        raise UsageError(f"{URL_ENV}: {exc}") from None


def admin_url(text: str) -> str:
    try:
        return normalize_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def emit(args: argparse.Namespace, data: Any, line: str) -> int:
    if args.json:
        json.dump(data, sys.stdout, indent=2)
        print()
    else:
        print(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    admin = client(args)
    data = admin.status()
    return emit(args, data, render_status(data, admin.url))


def cmd_set_weight(args: argparse.Namespace) -> int:
    weights: dict[str, int] = {}
    for version, weight in args.weights:
        if version in weights:
            raise UsageError(f"version {version!r} is given twice")
        weights[version] = weight
    data = client(args).set_weights(args.service, weights)
    return emit(args, data, f"{data.get('service', args.service)}: weights "
                            f"{format_weights(data.get('weights', weights))}")


def cmd_switch(args: argparse.Namespace) -> int:
    data = client(args).switch(args.service, args.version)
    return emit(args, data, f"{data.get('service', args.service)}: switched to {args.version} "
                            f"(weights {format_weights(data.get('weights', {}))})")


def cmd_reload(args: argparse.Namespace) -> int:
    data = client(args).reload()
    line = (f"config reloaded: generation {data.get('generation', '?')}"
            if data.get("outcome", "success") == "success"
            else f"config reload: {data.get('outcome')}")
    pending = data.get("restart_required") or []
    if pending:  # a changed listen address and the like: applied only by a restart
        line += "\nrestart required to apply: " + "; ".join(pending)
    return emit(args, data, line)


DRAIN_POLL_SECONDS = 0.2


def wait_duration(text: str) -> float:
    """'30s', '1m', '500ms' or plain seconds, for --timeout of drain --wait."""
    from ..config.model import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _versions(used_by: Any) -> str:
    return ", ".join(used_by) if isinstance(used_by, list) and used_by else "no service"


def _requests(count: Any) -> str:
    return f"{count} request{'' if count == 1 else 's'}"


def cmd_drain(args: argparse.Namespace) -> int:
    admin = client(args)
    data = admin.drain(args.address, force=args.force)
    state = "drained" if data.get("changed", True) else "already drained"
    emit(args, data, f"{args.address} {state}: no new requests in "
                     f"{_versions(data.get('used_by'))}; {_requests(data.get('inflight', 0))} "
                     f"in flight")
    sys.stdout.flush()  # seen before the wait below begins
    say = sys.stderr if args.json else sys.stdout  # with --json, stdout is the JSON alone
    for version in data.get("without_upstream") or []:
        print(f"weir: warning: {version} has weight and no upstream left in rotation: its "
              f"requests are answered 503 until one is undrained or its weight moves",
              file=sys.stderr)
    if not args.wait:
        return 0
    return wait_drained(admin, args.address, args.timeout, say)


def wait_drained(admin: AdminClient, address: str, timeout: float, say: Any) -> int:
    """Poll /api/status until nothing is in flight to ``address`` (0), or time out (1)."""
    start = time.monotonic()
    deadline = start + timeout
    shown: tuple[Any, ...] | None = None
    while True:
        admin.timeout = max(0.5, min(DEFAULT_TIMEOUT, deadline - time.monotonic()))
        status = admin.status()
        entry = next((e for e in status.get("drained") or []
                      if isinstance(e, dict) and e.get("upstream") == address), None)
        if entry is None:
            raise AdminError(f"{address} is not drained any more (undrained meanwhile?)")
        inflight = entry.get("inflight", 0)
        confirmed = entry.get("confirmed", True) is not False
        where = _versions(entry.get("used_by"))
        if inflight == 0 and confirmed:
            print(f"{address}: nothing in flight after {time.monotonic() - start:.1f}s; "
                  f"safe to stop", file=say, flush=True)
            return 0
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"weir: {address}: still {_requests(inflight)} in flight on {where} after "
                  f"{timeout:g}s" + ("" if confirmed else " (not every worker has reported "
                                                           "since the drain)"),
                  file=sys.stderr, flush=True)
            return 1
        if shown != (inflight, confirmed):
            shown = (inflight, confirmed)
            print(f"{address}: {_requests(inflight)} in flight on {where}"
                  + ("" if confirmed else ", waiting for every worker to report")
                  + f"; waiting up to {math.ceil(left)}s more", file=say, flush=True)
        time.sleep(min(DRAIN_POLL_SECONDS, left))


def cmd_undrain(args: argparse.Namespace) -> int:
    data = client(args).undrain(args.address)
    state = "undrained" if data.get("changed", True) else "was not drained"
    return emit(args, data, f"{args.address} {state}: in rotation in "
                            f"{_versions(data.get('used_by'))}")


ROLLOUT_DONE = {"start": "rollout started", "promote": "rollout promoted",
                "abort": "rollout aborted", "pause": "rollout paused",
                "resume": "rollout resumed", "retry": "rollout restarted"}


def rollout_command(action: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        if action == "status":
            data = client(args).rollout_status(args.service)
            return emit(args, data, f"{args.service}: {describe_rollout(data) or 'no rollout'}")
        if action == "start":
            return cmd_rollout_start(args)
        body = {"full": bool(args.full)} if action == "promote" else {}
        data = client(args).rollout(args.service, action, body)
        done = ROLLOUT_DONE[action] + (" fully" if action == "promote" and args.full else "")
        detail = describe_rollout(data)
        code = emit(args, data, f"{args.service}: {done}" + (f" ({detail})" if detail else ""))
        if isinstance(data, dict) and data.get("warning"):
            # In force but not saved yet (a full disk, Redis away): done, and said plainly.
            print(f"weir: warning: {data['warning']}", file=sys.stderr)
        return code

    return command


def cmd_rollout_start(args: argparse.Namespace) -> int:
    """``weir rollout start SERVICE [--revision R] [--upstreams A,B] [--wait]``."""
    admin = client(args, DEFAULT_TIMEOUT if args.wait else None)
    body: dict[str, Any] = {}
    if args.revision is not None:
        body["revision"] = args.revision
    if args.upstreams is not None:
        body["upstreams"] = args.upstreams
    data = admin.rollout(args.service, "start", body)
    detail = describe_rollout(data)
    release = data.get("release") if isinstance(data, dict) else None
    of = f" of revision {release}" if isinstance(release, str) and release else ""
    emit(args, data, f"{args.service}: rollout {data.get('number', '')}{of} started".replace(
        "  ", " ") + (f" ({detail})" if detail else ""))
    if isinstance(data, dict) and data.get("warning"):
        print(f"weir: warning: {data['warning']}", file=sys.stderr)
    if not args.wait:
        return 0
    number = data.get("number")
    target = Target(number=number if isinstance(number, int) and number > 0 else None,
                    revision=args.revision)
    return follow(admin, args, target)


def cmd_rollout_wait(args: argparse.Namespace) -> int:
    admin = client(args, DEFAULT_TIMEOUT)
    return follow(admin, args, Target(revision=args.revision))


def follow(admin: AdminClient, args: argparse.Namespace, target: Target) -> int:
    out = sys.stderr if args.json else sys.stdout  # with --json, stdout is the JSON alone
    try:
        return wait(admin, args.service, target, args.timeout, args.until, out=out)
    except AdminError as exc:
        if exc.status == 404 or exc.unreachable:  # an unknown service is a usage error
            print(f"weir: {exc.message}", file=sys.stderr)
            return USAGE
        raise


def upstream_list(text: str) -> list[str]:
    """'10.0.0.5:8080,10.0.0.6:8080' → the addresses (checked by the server)."""
    addresses = [part.strip() for part in text.split(",") if part.strip()]
    if not addresses:
        raise argparse.ArgumentTypeError(f"expected host:port[,host:port...], got {text!r}")
    return addresses


def describe_rollout(data: Any) -> str:
    """'phase paused, step 2/5, weights stable=75 canary=25', from whatever of it is there."""
    if not isinstance(data, dict):
        return ""
    rollout = data.get("rollout") if isinstance(data.get("rollout"), dict) else data
    parts = []
    for key in ("phase", "state", "status"):
        if isinstance(rollout.get(key), str):
            parts.append(f"{key} {rollout[key]}")
            break
    step = rollout.get("step")
    if isinstance(step, int) and not isinstance(step, bool):
        total = rollout.get("steps")
        total = len(total) if isinstance(total, list) else total
        parts.append(f"step {step}/{total}" if isinstance(total, int) else f"step {step}")
    weights = rollout.get("weights", data.get("weights"))
    if isinstance(weights, dict) and weights:
        parts.append(f"weights {format_weights(weights)}")
    message = rollout.get("message") or rollout.get("reason")
    if isinstance(message, str) and message:
        parts.append(message)
    return ", ".join(parts)


def indent(text: Any, width: int) -> str:
    """A multi-line error (YAML's own) lined up under its first line."""
    return str(text).rstrip().replace("\n", "\n" + " " * width)


def _when(at: Any) -> str:
    if not isinstance(at, int | float) or isinstance(at, bool):
        return ""
    return time.strftime(" at %Y-%m-%d %H:%M:%S", time.localtime(at))


# The last actions `weir status` shows per service and for the instance (/api/status has up
# to 20 of each; --json shows them all).
ACTIONS_SHOWN = 5


def render_actions(actions: Any, indent_by: str) -> list[str]:
    """The newest ``ACTIONS_SHOWN`` of an /api/status ``actions`` list, oldest first: when,
    who (the token's name), what. Nothing for a missing or malformed list (an older Weir)."""
    if not isinstance(actions, list):
        return []
    lines = []
    for action in actions[-ACTIONS_SHOWN:]:
        if not isinstance(action, dict):
            continue
        at = action.get("at")
        when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
                if isinstance(at, int | float) and not isinstance(at, bool) else "?")
        detail = f": {action['detail']}" if action.get("detail") else ""
        lines.append(f"{indent_by}{when}  {action.get('by', '?')}  "
                     f"{action.get('action', '?')}{detail}")
    return lines


def sourced(value: str, source: Any) -> str:
    """A version's value, with who set it when not the config file ("v2.4.0 (api)")."""
    return f"{value} ({source})" if isinstance(source, str) and source != "file" else value


def render_status(data: dict[str, Any], url: str) -> str:
    """/api/status for people. Tolerant of missing fields: the API grows."""
    lines = []
    ready = data.get("ready")
    state = "" if ready is None else (", ready" if ready else ", NOT READY (draining)")
    lines.append(f"Weir at {url}: config generation {data.get('generation', '?')}{state}")
    if data.get("config_file"):
        lines.append(f"  config file: {data['config_file']}")
    if data.get("state_file"):
        lines.append(f"  state file:  {data['state_file']}")
    reload = data.get("last_reload") or {}
    if reload:
        outcome = reload.get("outcome", "?")
        trigger = f" ({reload['trigger']})" if reload.get("trigger") else ""
        if outcome == "success":
            lines.append(f"  last reload: success{trigger}{_when(reload.get('at'))}, "
                         f"generation {reload.get('generation', '?')}")
        else:
            lines.append(f"  last reload: {str(outcome).upper()}{trigger}"
                         f"{_when(reload.get('at'))}; still serving generation "
                         f"{reload.get('generation', data.get('generation', '?'))}")
        lines += [f"    - {indent(error, 6)}" for error in reload.get("errors") or []]
    pending = data.get("restart_required") or []
    if pending:
        lines.append(f"  restart required to apply: {'; '.join(pending)}")
    unsaved = data.get("state_unsaved")
    if isinstance(unsaved, dict):
        lines.append(f"  runtime state NOT SAVED{_when(unsaved.get('since'))}: could not write "
                     f"{unsaved.get('store', 'the state')} ({unsaved.get('error')}); in force "
                     f"here, retrying ({unsaved.get('attempts')} attempt(s) so far)")

    for service in data.get("services") or []:
        lines.append("")
        name = service.get("name", "?")
        source = service.get("weights_source")
        extras = [f"weights from {source}"] if source else []
        if service.get("rules"):
            extras.append(f"{service['rules']} rule(s)")
        if service.get("sticky"):
            extras.append("sticky")
        match = service.get("match") or {}
        where = ",".join(match.get("hosts") or []) + (match.get("path_prefix") or "")
        if where and where != "/":
            extras.append(f"match {where}")
        lines.append(f"service {name}" + (f"  ({', '.join(extras)})" if extras else ""))
        rollout = describe_rollout(service["rollout"]) if service.get("rollout") else ""
        if rollout:
            lines.append(f"  rollout: {rollout}")
        weights = service.get("weights") or {}
        versions = service.get("versions") or {v: {"weight": w} for v, w in weights.items()}
        total = sum(w for w in weights.values() if isinstance(w, int)) or 0
        rows = [("VERSION", "WEIGHT", "SHARE", "IN-FLIGHT", "DRAINING", "REVISION",
                 "UPSTREAMS")]
        for version, info in versions.items():
            weight = weights.get(version, info.get("weight", 0))
            share = f"{100 * weight / total:.0f}%" if total and isinstance(weight, int) else "-"
            rows.append((version, str(weight), share, str(info.get("inflight", "-")),
                         str(info.get("draining", "-")),
                         sourced(str(info.get("revision") or "-"), info.get("revision_source")),
                         sourced(", ".join(info.get("upstreams") or []),
                                 info.get("upstreams_source"))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            # Names and revisions to the left, numbers to the right; the upstreams last.
            cells = [cell.ljust(width) if i in (0, 5) else cell.rjust(width)
                     for i, (cell, width) in enumerate(zip(row[:-1], widths, strict=True))]
            lines.append(("  " + "  ".join(cells) + "  " + row[-1]).rstrip())
        actions = render_actions(service.get("actions"), "    ")
        if actions:
            lines.append("  last actions:")
            lines += actions

    drained = data.get("drained") or []
    if drained:
        lines.append("")
        lines.append("drained upstreams (weir undrain ADDRESS puts one back):")
        for entry in drained:
            lines.append(f"  {entry.get('upstream', '?')} ({_versions(entry.get('used_by'))}): "
                         f"{entry.get('inflight', '?')} in flight")

    draining = data.get("draining") or []
    if draining:
        lines.append("")
        lines.append("draining upstreams:")
        for pool in draining:
            lines.append(f"  {pool.get('upstream', '?')} ({pool.get('service', '?')}/"
                         f"{pool.get('version', '?')}): {pool.get('open', '?')} open")

    actions = render_actions(data.get("actions"), "  ")
    if actions:
        lines.append("")
        lines.append("last actions on the instance (reloads, drains):")
        lines += actions
    return "\n".join(lines)


# --- the parser -------------------------------------------------------------------------------


def admin_options(request_timeout: bool = True) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("admin API")
    group.add_argument("--admin", metavar="URL", default=None, type=admin_url,
                       help=f"the admin API's base URL (default: ${URL_ENV}, else "
                            f"{DEFAULT_ADMIN_URL}); the token comes from ${TOKEN_ENV}")
    if request_timeout:  # a command with a --timeout of its own gives each call the default
        group.add_argument("--timeout", metavar="SECONDS", type=positive_float,
                           default=DEFAULT_TIMEOUT,
                           help=f"give up after this long (default: {DEFAULT_TIMEOUT:g})")
    group.add_argument("--json", action="store_true", help="print the API's JSON answer")
    return parent


def worker_count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"expected a number of workers from 1 to 256, "
                                         f"got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def speed_factor(text: str) -> float:
    from ..demo.options import MAX_SPEED

    value = positive_float(text)
    if value > MAX_SPEED:
        raise argparse.ArgumentTypeError(f"at most {MAX_SPEED:g}, got {text!r}")
    return value


def port_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {text!r}")
    return int(text)


def demo_parser(sub: Any) -> None:
    from ..demo.options import DEFAULT_ADMIN_PORT, DEFAULT_PORT, FAST_SPEED, MAX_SPEED

    demo = sub.add_parser(
        "demo", help="watch a canary rollout and a rollback, with nothing to set up",
        description="Start two versions of a demo app, a Weir proxy and admin API, and a load "
        "generator, all on 127.0.0.1 in this process; roll a healthy canary out to 100%, then "
        "dial the canary to fail and watch the analysis roll it back. Exit code: 0 when both "
        "went as scripted (or after --keep-running), 1 if not, 130 on Ctrl-C, 143 on SIGTERM.")
    speed = demo.add_mutually_exclusive_group()
    speed.add_argument("--speed", metavar="FACTOR", type=speed_factor, default=1.0,
                       help="make every pause and analysis window FACTOR times shorter "
                            "(windows no shorter than 1s; default: 1, about a minute in all; "
                            f"at most {MAX_SPEED:g})")
    speed.add_argument("--fast", dest="speed", action="store_const", const=FAST_SPEED,
                       help=f"the same as --speed {FAST_SPEED:g}")
    demo.add_argument("--port", type=port_number, default=None,
                      help=f"the proxy's port (default: {DEFAULT_PORT}, or any free port if "
                           "that is busy; 0: any free port)")
    demo.add_argument("--admin-port", type=port_number, default=None,
                      help=f"the admin API's and dashboard's port (default: "
                           f"{DEFAULT_ADMIN_PORT}, or any free port if that is busy)")
    demo.add_argument("--keep-running", action="store_true",
                      help="stay up after the script, to explore the dashboard and the API, "
                           "until Ctrl-C")
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weir", description="Traffic-splitting HTTP proxy "
                                     "for zero-downtime deployments.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", required=True, help="YAML config file")
    run.add_argument("--workers", metavar="N", type=worker_count, default=1,
                     help="serve from N processes sharing the listener, with this one as "
                          "their supervisor and control plane (default: 1, a single process)")
    run.set_defaults(func=cmd_run)
    validate = sub.add_parser("validate", help="check a config file; exit 2 if invalid")
    validate.add_argument("-c", "--config", required=True, help="YAML config file")
    validate.set_defaults(func=cmd_validate)
    schema = sub.add_parser("schema", help="print the config's JSON Schema")
    schema.set_defaults(func=cmd_schema)
    demo_parser(sub)

    admin = [admin_options()]
    status = sub.add_parser("status", parents=admin, help="show services, weights, reloads",
                            description="Show a running Weir: config generation, the last "
                            "reload and its errors, and each service's versions, weights "
                            "(and where they came from), in-flight and draining requests.")
    status.set_defaults(func=cmd_status)

    set_weight = sub.add_parser("set-weight", parents=admin, help="set a service's weights",
                                description="Set a service's weights at once; versions left "
                                "out get 0.")
    set_weight.add_argument("service", metavar="SERVICE")
    set_weight.add_argument("weights", metavar="VERSION=W", nargs="+", type=weight_assignment,
                            help="a version and its integer weight, e.g. stable=90 canary=10")
    set_weight.set_defaults(func=cmd_set_weight, parser=set_weight)

    switch = sub.add_parser("switch", parents=admin, help="send all traffic to one version",
                            description="Send all of a service's traffic to one version; "
                            "requests in flight on the others finish (drain).")
    switch.add_argument("service", metavar="SERVICE")
    switch.add_argument("version", metavar="VERSION")
    switch.set_defaults(func=cmd_switch)

    reload = sub.add_parser("reload", parents=admin, help="re-read the config file",
                            description="Re-read the config file. An invalid file changes "
                            "nothing: its errors are shown and the exit code is 1.")
    reload.set_defaults(func=cmd_reload)

    def rollout_parser(group: Any, action: str, help: str, description: str = "") -> None:
        waits = action in ("start", "wait")
        cmd = group.add_parser(action, help=help, description=description or help,
                               parents=[admin_options(request_timeout=False)] if waits
                               else admin)
        cmd.add_argument("service", metavar="SERVICE")
        if action == "promote":
            cmd.add_argument("--full", action="store_true",
                             help="skip the remaining steps and go to 100%%")
        if action == "start":
            cmd.add_argument("--revision", metavar="R", default=None,
                             help="the new version's revision (e.g. v2.4.0), set through the "
                                  "API and kept in the runtime state")
            cmd.add_argument("--upstreams", metavar="A,B", type=upstream_list, default=None,
                             help="the new version's upstreams, host:port,...")
            cmd.add_argument("--wait", action="store_true",
                             help="then wait for the outcome, as weir rollout wait does")
        if action == "wait":
            cmd.add_argument("--revision", metavar="R", default=None,
                             help="wait for the rollout of this revision: an earlier "
                                  "rollout's outcome is never reported")
        if waits:
            cmd.add_argument("--timeout", metavar="D", type=wait_duration, default=None,
                             help="give up after this long (exit 3): 30s, 5m or plain "
                                  "seconds; without --wait, how long the call may take "
                                  "(default: no limit for a wait, "
                                  f"{DEFAULT_TIMEOUT:g}s for a call)")
            cmd.add_argument("--until", choices=("promoted", "paused"), default="promoted",
                             help="paused: a pause for a person ends the wait with 0, not 4")
        cmd.set_defaults(func=cmd_rollout_wait if action == "wait"
                         else rollout_command(action), unreachable_code=2 if waits else 1)

    helps = {"promote": "advance a rollout past its pause (--full: to the end)",
             "abort": "abort a rollout: all traffic back to stable",
             "pause": "pause a rollout where it is", "resume": "resume a paused rollout"}
    for action, text in helps.items():
        rollout_parser(sub, action, text)
    rollout = sub.add_parser("rollout", help="drive a service's rollout",
                             description="Drive the rollout controller of a service.")
    verbs = rollout.add_subparsers(dest="action", required=True, metavar="ACTION")
    rollout_parser(verbs, "start", "start a rollout")
    for action, text in helps.items():
        rollout_parser(verbs, action, text)
    rollout_parser(verbs, "retry", "start an aborted rollout again")
    rollout_parser(verbs, "status", "show a rollout's phase, step and analysis")
    rollout_parser(verbs, "wait", "wait for a rollout's outcome, with an exit code",
                   "Follow a service's rollout, printing each step and analysis as it "
                   "happens, until it ends. Exit codes: 0 promoted (or the --until point "
                   "reached), 1 aborted or rolled back, 2 bad usage or the admin API "
                   "unreachable, 3 timed out, 4 paused for a person (a pause: {} step, "
                   "inconclusive analysis).")

    drain = sub.add_parser(
        "drain", parents=[admin_options(request_timeout=False)],
        help="take one app instance out of rotation everywhere",
        description="Take an upstream address out of rotation in every service and version "
        "(kept in the runtime state: restarts, workers and instances sharing the store honour "
        "it). Its requests in flight finish and its idle connections close. Refused (exit 1) "
        "if it is the last upstream of a version that has weight, unless --force. Exit codes: "
        "0 done (with --wait: nothing in flight any more), 1 refused or timed out, 2 bad usage "
        "or the admin API unreachable.")
    drain.add_argument("address", metavar="ADDRESS", help="host:port, as in the config")
    drain.add_argument("--wait", action="store_true",
                       help="then wait until no request is in flight to it")
    drain.add_argument("--timeout", metavar="D", type=wait_duration, default=60.0,
                       help="how long --wait waits: 30s, 1m or plain seconds (default: 60s)")
    drain.add_argument("--force", action="store_true",
                       help="drain it even if a version with weight is left with no upstream "
                            "(its requests are answered 503)")
    drain.set_defaults(func=cmd_drain, unreachable_code=2)
    undrain = sub.add_parser(
        "undrain", parents=admin, help="put a drained app instance back into rotation",
        description="Put a drained upstream address back into rotation everywhere. Exit "
        "codes: 0 done, 1 refused, 2 bad usage or the admin API unreachable.")
    undrain.add_argument("address", metavar="ADDRESS", help="host:port, as in the config")
    undrain.set_defaults(func=cmd_undrain, unreachable_code=2)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        getattr(args, "parser", parser).error(str(exc))  # exits 2
    except AdminError as exc:
        print(f"weir: {exc.message}", file=sys.stderr)
        errors = exc.body.get("errors")
        if isinstance(errors, list):
            for error in errors:
                print(f"  - {indent(error, 4)}", file=sys.stderr)
        return int(getattr(args, "unreachable_code", 1)) if exc.unreachable else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # weir status | head: not an error, and no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0  # not reached: parser.error exits


if __name__ == "__main__":
    sys.exit(main())
