"""`prefork` (bin/prefork, python -m prefork): argv -> start | stop | reload |
restart | status | check | scale | reopen | upgrade.

Owns: argument parsing, daemonizing, the pidfile checks, and the words printed
to the operator. Exit status: 0 done, 1 failed, 2 bad configuration or usage.
The `start` flags come from the settings table (config.py).
Must not: serve requests or supervise (the master does).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
import time

import psutil

from . import __version__, config as configmod, missing_c_modules, missing_c_note
from .master import control
from .master.upgrade import REPORT_FD_ENV, UPGRADE_ENV

DEFAULT_CONFIG = "conf/prefork.toml"
CONFIG_ENV = "PREFORK_CONFIG"


class PipeReporter:
    """Tells the waiting `start` process (our grandparent) how boot went."""

    def __init__(self, fd):
        self.fd = fd

    def close_in_child(self):
        """In a forked worker: the report is the master's to send."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _send(self, text):
        if self.fd is None:
            return
        try:
            # NUL ends the report: children forked before it was sent may
            # still hold the pipe open, so EOF cannot be the terminator.
            os.write(self.fd, text.encode("utf-8", "replace") + b"\0")
            os.close(self.fd)
        except OSError:
            pass   # `start` was interrupted; nobody is waiting
        self.fd = None

    def ready(self, pid, urls, workers, serving=""):
        self._send("READY " + ready_line(pid, urls, workers, serving))

    def failed(self, message):
        self._send("FAIL " + message)


class ForegroundReporter(PipeReporter):
    """Prints how boot went; a master started by `upgrade` also reports it on
    the pipe its predecessor gave it (REPORT_FD_ENV), so a failure is known
    at once, with its reason."""

    def __init__(self):
        fd = os.environ.pop(REPORT_FD_ENV, "")
        super().__init__(int(fd) if fd.isdigit() else None)

    def ready(self, pid, urls, workers, serving=""):
        print(ready_line(pid, urls, workers, serving), flush=True)
        super().ready(pid, urls, workers, serving)

    def failed(self, message):
        print(f"prefork: start failed: {message}", file=sys.stderr, flush=True)
        super().failed(message)


def ready_line(pid, urls, workers, serving=""):
    return (f"prefork: ready: master pid {pid}, {workers} workers, "
            f"{serving + ', ' if serving else ''}listening on {' '.join(urls)}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="prefork", description="A preforking WSGI server.")
    parser.add_argument("--version", action="version", version=f"prefork {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("-c", "--config", default=None,
                       help=f"config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG} "
                            "when it exists)")
        return p

    for name, text in (("start", "start the server"), ("restart", "stop, then start")):
        p = command(name, text)
        p.add_argument("--foreground", action="store_true", help="stay attached to the terminal")
        p.add_argument("--print-config", action="store_true",
                       help="print the effective settings and where each came from, then exit")
        for flag in configmod.start_flags():
            if flag.kind == "strlist":
                p.add_argument(flag.flag, dest=flag.key, action="append",
                               help=flag.help + " (repeatable)")
            elif flag.kind == "bool":
                p.add_argument(flag.flag, dest=flag.key, action="store_const", const=True,
                               help=flag.help)
            else:
                p.add_argument(flag.flag, dest=flag.key, help=flag.help)
    def control_command(name, help_text):
        """A command for a running master: found by its config, or --pidfile."""
        p = command(name, help_text)
        p.add_argument("--pidfile", help="the pidfile `start --pidfile` was given")
        return p

    p = control_command("stop", "stop the server (graceful)")
    p.add_argument("--fast", action="store_true", help="do not wait for in-flight requests")
    control_command("reload", "reload config and app with no downtime")
    p = control_command("status", "what the server and each worker is doing")
    p.add_argument("--json", action="store_true")
    command("check", "validate the config and import the app")
    p = control_command("scale", "set the number of workers")
    p.add_argument("workers", type=int)
    control_command("reopen", "reopen log files (after logrotate)")
    control_command("upgrade", "re-exec the master on the same sockets (zero downtime)")
    return parser.parse_args(argv)


def overrides_from(args) -> dict:
    """The settings given as `start` flags, as config overrides (checked by
    config.load like the file's, and blamed on the flag)."""
    overrides = {}
    for flag in configmod.start_flags():
        value = getattr(args, flag.key, None)
        if value is None:
            continue
        if flag.kind == "workers" and value != "auto":
            try:
                value = int(value)
            except ValueError:
                pass   # left as text: the check names the flag
        if flag.key == "bind":
            value = [b if not b.startswith("unix:") else "unix:" + os.path.abspath(b[5:])
                     for b in value]
        elif flag.path and value not in ("", "-"):
            value = os.path.abspath(value)   # a path on the command line is the shell's
        overrides.setdefault(flag.section, {})[flag.key] = value
    return overrides


CONTROL_COMMANDS = ("stop", "reload", "status", "scale", "reopen", "upgrade")


def load_config(args):
    """-c wins, then $PREFORK_CONFIG, then conf/prefork.toml if it exists."""
    path = args.config or os.environ.get(CONFIG_ENV) or None
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    loader = configmod.load_for_control if args.command in CONTROL_COMMANDS else configmod.load
    return loader(path, overrides_from(args))


def live_master_pid(config) -> int | None:
    """The live master's pid from the pidfile. A pidfile naming no live
    prefork master is stale: it is removed, and None returned."""
    path = config.server.pidfile
    try:
        with open(path) as fh:
            pid = int(fh.read().strip())
    except (OSError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() != psutil.STATUS_ZOMBIE and "prefork" in " ".join(proc.cmdline()):
            return pid
    except psutil.Error:
        pass
    try:
        os.unlink(path)
    except OSError:
        pass
    return None


def wait_gone(pid, timeout) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def cmd_start(args, config, overrides=None) -> int:
    """overrides: the flags as config overrides (restart passes the running
    master's, under its own)."""
    if args.print_config:
        print(configmod.describe(config, config.source or None, overrides_from(args)))
        return 0
    pid = live_master_pid(config)
    if pid is not None and str(pid) != os.environ.get(UPGRADE_ENV):
        print(f"prefork: already running (master pid {pid}, pidfile {config.server.pidfile})",
              file=sys.stderr)
        return 1
    os.chdir(config.server.base)
    overrides = overrides_from(args) if overrides is None else overrides
    if args.foreground:
        # Imported here: the master's and the workers' code costs a control
        # command (status, stop, reload...) 60% of its start-up otherwise.
        from .master.loop import Master
        return run_master(Master(config, overrides, ForegroundReporter(), foreground=True))
    return daemonize(config, overrides)


def run_master(master) -> int:
    try:
        return master.run()
    except Exception as exc:  # a bug of ours: say so in one place, then exit
        logging.getLogger("prefork.master").exception("master crashed")
        master.reporter.failed(f"master crashed: {exc!r}")
        return 1


def daemonize(config, overrides) -> int:
    from .master.loop import Master   # (before the fork: a failure shows)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        os.setsid()
        if os.fork() > 0:
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os._exit(run_master(Master(config, overrides, PipeReporter(write_fd))))
    os.close(write_fd)
    os.waitpid(pid, 0)
    report = read_report(read_fd, config.workers.boot_timeout + 15)
    if report.startswith("READY "):
        print(report[6:])
        return 0
    if report.startswith("FAIL "):
        print(f"prefork: start failed: {report[5:]}", file=sys.stderr)
    else:
        print(f"prefork: the master exited without reporting; see {config.logging.error_log}",
              file=sys.stderr)
    return 1


def read_report(fd, timeout) -> str:
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            chunks.append("FAIL no report from the master within %.0fs" % timeout)
            break
        data = os.read(fd, 65536)
        chunks.append(data.decode("utf-8", "replace"))
        if not data or b"\0" in data:
            break
    os.close(fd)
    return "".join(chunks).split("\0")[0]


def not_running(config) -> int:
    """No master where this config points: say where we looked and name the
    prefork masters that do run here, with what reaches each. -> 1, as
    `nginx -s stop` exits when it finds no master."""
    print(f"prefork: not running: no live master in {config.server.pidfile} "
          f"(config: {config.source or 'built-in defaults'})", file=sys.stderr)
    for pid, pidfile, source in other_masters():
        reach = f"-c {source}" if source else f"--pidfile {pidfile}"
        print(f"prefork: a prefork master runs as pid {pid} (pidfile {pidfile}): "
              f"add {reach}", file=sys.stderr)
    return 1


def other_masters():
    """(pid, pidfile, config) of each prefork master on this host that we may
    look at, found by its process title and its control socket (beside the
    pidfile); its config as it answers status (None when it does not)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if not " ".join(proc.info["cmdline"] or ()).startswith("prefork: master"):
                continue
            listing = getattr(proc, "net_connections", None) or proc.connections   # psutil < 6
            sockets = [c.laddr for c in listing(kind="unix")
                       if isinstance(c.laddr, str) and c.laddr.endswith(".sock")
                       and os.path.exists(c.laddr[:-5] + ".pid")]
        except psutil.Error:
            continue
        for path in sockets[:1]:
            try:
                answer = control.request(path, {"cmd": "status"}, 1.0)
                source = answer["status"]["server"]["config"] or None
            except (control.ControlError, KeyError, TypeError):
                source = None
            found.append((proc.pid, path[:-5] + ".pid", source))
    return found


def cmd_stop(args, config) -> int:
    pid = live_master_pid(config)
    if pid is None:
        return not_running(config)
    os.kill(pid, signal.SIGQUIT if args.fast else signal.SIGTERM)
    timeout = (0 if args.fast else config.workers.graceful_timeout) + 10
    if wait_gone(pid, timeout):
        print(f"prefork: stopped (master pid {pid})")
        return 0
    print(f"prefork: master pid {pid} still running after {timeout:g}s", file=sys.stderr)
    return 1


def cmd_restart(args, config) -> int:
    """stop, then start with the flags the running master was started with
    (as reload keeps them), under this command's own; start alone when
    nothing runs, as systemctl restart does."""
    args.fast = False
    if live_master_pid(config) is None:
        return cmd_start(args, config)
    kept = overrides_from(args)
    answer = ask_master(config, {"cmd": "overrides"})
    if answer is not None and answer.get("ok"):
        kept = answer["overrides"]
        for section, values in overrides_from(args).items():
            kept.setdefault(section, {}).update(values)
        config = configmod.load(config.source or None, kept)
    code = cmd_stop(args, config)
    return code if code else cmd_start(args, config, kept)


def ask_master(config, command, timeout=5.0):
    if live_master_pid(config) is None and not os.path.exists(config.control_socket):
        not_running(config)
        return None
    try:
        return control.request(config.control_socket, command, timeout)
    except control.ControlError as exc:
        print(f"prefork: {exc}", file=sys.stderr)
        return None


def ask_for(config, command, refusal, timeout=5.0):
    """The master's answer when it did what was asked; else None, with the
    reason printed after `refusal` (formatted with the answer's fields)."""
    answer = ask_master(config, command, timeout)
    if answer is not None and not answer.get("ok"):
        print(f"prefork: {refusal.format(**answer)}: {answer.get('error')}", file=sys.stderr)
        return None
    return answer


def cmd_reload(args, config) -> int:
    answer = ask_master(config, {"cmd": "reload"},
                        config.workers.boot_timeout + config.workers.graceful_timeout + 10)
    if answer is None:
        return 1
    if not answer.get("ok"):
        print(f"prefork: reload failed (generation {answer.get('generation')} keeps serving): "
              f"{shortened(answer.get('error', ''), config.logging.error_log)}", file=sys.stderr)
        return 1
    print(f"prefork: reloaded: generation {answer['generation']} serving on "
          f"{' '.join(answer['urls'])}")
    return 0


def shortened(error: str, error_log: str, keep=6) -> str:
    """A reason with a traceback: its first line and the traceback's last
    `keep` lines (where it was raised, and what), then where the rest is."""
    lines = error.rstrip().splitlines()
    if len(lines) <= keep + 2:
        return error.rstrip()
    return "\n".join([lines[0], "  ...", *lines[-keep:],
                      f"(the whole traceback is in {error_log or 'the error log'})"])


def cmd_status(args, config) -> int:
    answer = ask_master(config, {"cmd": "status"})
    if answer is None:
        return 1
    status = answer["status"]
    print(json.dumps(status, indent=2) if args.json else render_status(status))
    return 0


def _ms(seconds):
    return f"{seconds * 1000:.1f}ms"


def render_status(s) -> str:
    server, pool, totals = s["server"], s["pool"], s["totals"]
    classes = ", ".join(f"{k} {v}" for k, v in totals["responses"].items() if v)
    lines = [
        f"prefork {server['version']}  master {server['pid']}  up {server['uptime']:.0f}s  "
        f"generation {server['generation']}  {server['state']}",
        f"pool: {pool['alive']}/{pool['target']} alive, {pool['busy']} busy, {pool['idle']} idle; "
        f"requests {totals.get('requests_live', totals['requests'])} ({classes or 'none'}); "
        f"{s['rates']['10s']:.1f} req/s (10s)",
        f"latency p50 {_ms(s['latency']['p50'])} p90 {_ms(s['latency']['p90'])} "
        f"p99 {_ms(s['latency']['p99'])}; listen queue {s['listen_queue']['depth']} "
        f"(max {s['listen_queue']['max']})",
    ]
    if pool["boot_failures"]:
        lines.append(f"DEGRADED: {pool['boot_failures']} boot failure(s) in a row; last error: "
                     f"{pool['last_boot_error'].splitlines()[-1] if pool['last_boot_error'] else '?'}")
    tls = totals.get("tls")
    if tls and (tls["handshakes"] or tls["failures"]):
        failed = ", ".join(f"{k} {v}" for k, v in sorted(tls["failures"].items())) or "none"
        lines.append(f"tls: {tls['handshakes']} handshakes, {tls['open']} open; failed: {failed}")
    http2 = totals.get("http2")
    if http2 and http2["connections"]:
        goaways = ", ".join(f"{k} {v}" for k, v in sorted(http2["goaways"].items())) or "none"
        lines.append(f"http2: {http2['connections']} connections, {http2['open']} open, "
                     f"{http2['streams']} streams, {http2['resets']} reset by clients; "
                     f"goaway: {goaways}")
    for kind, state in s.get("logs", {}).items():
        if state["error"]:
            lines.append(f"log problem ({kind}): {state['error']}; "
                         f"{state['lost_lines']} line(s) lost so far")
    lines.append(f"  {'slot':>4} {'pid':>7} {'gen':>3} {'state':<8} {'reqs':>8} {'rss':>8} "
                 f"{'cpu%':>5} {'threads':>9}  running")
    for w in s["workers"]:
        running = ([w["current"]] if w["current"] else []) + w.get("running", [])
        shown = [f"{r['method']} {r['path']} ({r['elapsed']:.1f}s)" for r in running] or ["-"]
        threads = w.get("threads")
        busy = f"{threads['busy']}/{threads['alive']}" if threads else "-"
        lines.append(f"  {w['slot']:>4} {w['pid']:>7} {w['generation']:>3} {w['state']:<8} "
                     f"{w['requests']:>8} {w['rss'] / 1048576:>7.1f}M {w['cpu']:>5.1f} "
                     f"{busy:>9}  {shown[0]}")
        lines.extend(f"{'':>60}{more}" for more in shown[1:])
        if threads and threads["waiting"]:
            lines.append(f"{'':>60}({threads['waiting']} waiting for a thread)")
    return "\n".join(lines)


def cmd_check(args, config) -> int:
    from .worker.dispatch import load_app
    try:
        load_app(config.server.app, config.server.pythonpath + (config.server.base,))
    except Exception as exc:
        print(f"prefork: check failed: cannot load app {config.server.app}: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"prefork: config {config.source or '(built-in defaults)'} is valid; "
          f"app {config.server.app} loads")
    missing = missing_c_modules()
    if missing:
        print(f"prefork: note: {missing_c_note(missing)}")
    return 0


def cmd_scale(args, config) -> int:
    answer = ask_for(config, {"cmd": "scale", "workers": args.workers}, "scale refused")
    if answer is None:
        return 1
    print(f"prefork: pool size set to {answer['workers']}")
    return 0


def cmd_upgrade(args, config) -> int:
    old = live_master_pid(config)
    if old is None:
        return not_running(config)
    answer = ask_for(config, {"cmd": "upgrade"}, f"upgrade failed (master pid {old} keeps serving)",
                     config.workers.boot_timeout + 15)
    if answer is None:
        return 1
    timeout = config.workers.graceful_timeout + config.workers.kill_grace + 10
    if wait_gone(old, timeout):
        print(f"prefork: upgraded: master pid {answer['pid']} replaced {old}")
        return 0
    print(f"prefork: the new master pid {answer['pid']} serves, but the old one ({old}) is "
          f"still there after {timeout:g}s; see {config.logging.error_log}", file=sys.stderr)
    return 1


def cmd_reopen(args, config) -> int:
    answer = ask_for(config, {"cmd": "reopen"}, "reopen failed")
    if answer is None:
        return 1
    print("prefork: log files reopened")
    return 0


COMMANDS = {
    "start": cmd_start, "stop": cmd_stop, "restart": cmd_restart, "reload": cmd_reload,
    "status": cmd_status, "check": cmd_check, "scale": cmd_scale, "reopen": cmd_reopen,
    "upgrade": cmd_upgrade,
}


def main(argv=None) -> int:
    try:
        return run(argv)
    except BrokenPipeError:
        # `prefork status | head`: the reader left; nothing more to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def run(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args)
    except configmod.ConfigError as exc:
        if args.command == "start" and args.foreground and REPORT_FD_ENV in os.environ:
            PipeReporter(int(os.environ[REPORT_FD_ENV])).failed(f"config error: {exc}")
        print(f"prefork: config error: {exc}", file=sys.stderr)
        return 2
    return COMMANDS[args.command](args, config)
