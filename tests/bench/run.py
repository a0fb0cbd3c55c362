"""make bench: prefork and its peers side by side on the same app under wrk.

Each server gets the same worker count, the same app and the same wrk load;
each figure is the median of --runs runs. Ratios are prefork / peer (above 1:
prefork is faster). This machine is small and noisy: read medians, not runs.
Sections: servers (hello and Flask against every peer), wait (an app that waits
20 ms, as on a database), mixed (fast requests beside slow ones: the fast ones'
p99 against their p99 alone), access-log, stats, static, reload, idle, tls, flood
(a legitimate client beside hostile connection floods: each the goal of issue 23).
Usage: tests/bench/run.py [--runs 3] [--duration 5] [--sections NAME ...]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import psutil
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEERS = os.path.join(ROOT, ".bench-venv", "bin")
TLS_FLOOR = os.path.join(ROOT, "tests", "bench", "tls_floor.py")   # PORT WORKERS CERT KEY
WORKERS = 2
CONNECTIONS = 50


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefork_command(app, port, workdir, extra="", scheme=""):
    config = os.path.join(workdir, "prefork.toml")
    with open(config, "w") as fh:
        fh.write(f"""[server]
bind = ["{scheme}127.0.0.1:{port}"]
workers = {WORKERS}
app = "{app}"
pythonpath = ["{ROOT}", "{ROOT}/tests/bench"]
pidfile = "{workdir}/prefork.pid"
{extra}
""")
    return [sys.executable, os.path.join(ROOT, "bin", "prefork"), "start", "--foreground",
            "-c", config]


def log_section(workdir, access=True):
    return (f'[logging]\naccess_log = "{workdir + "/access.log" if access else ""}"\n'
            f'error_log = "{workdir}/error.log"\n')


SERVERS = {
    "prefork": lambda app, port, wd: prefork_command(app, port, wd, log_section(wd)),
    "gunicorn-sync": lambda app, port, wd: [
        f"{PEERS}/gunicorn", "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--chdir", ROOT,
        "--pythonpath", f"{ROOT}/tests/bench", "--log-level", "warning", app],
    "gunicorn-gthread": lambda app, port, wd: [
        f"{PEERS}/gunicorn", "-w", str(WORKERS), "-k", "gthread", "--threads", "8",
        "-b", f"127.0.0.1:{port}", "--chdir", ROOT, "--pythonpath", f"{ROOT}/tests/bench",
        "--log-level", "warning", app],
    "uwsgi": lambda app, port, wd: [
        f"{PEERS}/uwsgi", "--http11-socket", f"127.0.0.1:{port}", "--processes", str(WORKERS),
        "--master", "--module", app, "--chdir", ROOT, "--pythonpath", f"{ROOT}/tests/bench",
        "--disable-logging", "--die-on-term", "--lazy-apps", "--need-app"],
    "granian": lambda app, port, wd: [
        f"{PEERS}/granian", "--interface", "wsgi", "--host", "127.0.0.1", "--port", str(port),
        "--workers", str(WORKERS), "--log-level", "warning", app],
}

APPS = {
    "hello": "prefork.apps.hello:app",
    "flask": "flask_app:app",
    "wait": "wait_app:app",
    "mixed": "wait_app:mixed",
    "flood": "wait_app:flood",
}


def wait_answering(url, proc, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=1, verify=False).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def wrk_command(url, duration, connections=CONNECTIONS, extra=()):
    return ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", *extra, url]


def run_wrk(url, duration, connections=CONNECTIONS, extra=()):
    out = subprocess.run(wrk_command(url, duration, connections, extra),
                         capture_output=True, text=True, timeout=duration + 30).stdout
    return parse_wrk(out)


def parse_wrk(out):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)

    def pct(p):
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * UNITS[unit]
    return {"rps": rps, "requests": total, "p50": pct(50), "p99": pct(99),
            "errors": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def run_h2load(url, duration, connections, streams=10):
    """h2load's figures with wrk's keys; it reports no percentiles: p50 is
    its mean and p99 its maximum."""
    # -N: a connection that sees nothing for 5 s is given up (counted failed):
    # a server that leaves connections waiting for a thread would hang the run.
    try:
        out = subprocess.run(["h2load", "-D", str(duration), "-N", "5", "-c", str(connections),
                              "-m", str(streams), url],
                             capture_output=True, text=True, timeout=duration + 30).stdout
    except subprocess.TimeoutExpired:   # connections left waiting without end: none done
        out = ""
    rps = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)
    counts = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored", out)
    latency = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)"
                        r"\s+([\d.]+)(us|ms|s)", out)
    if not rps or not counts or not latency:
        return {"rps": 0.0, "requests": 0, "p50": 0.0, "p99": 0.0, "errors": 1}
    return {"rps": float(rps.group(1)), "requests": int(counts.group(1)),
            "p50": float(latency.group(5)) * UNITS[latency.group(6)],
            "p99": float(latency.group(3)) * UNITS[latency.group(4)],
            "errors": int(counts.group(2)) + int(counts.group(3))}


def worker_memory(root_pid) -> tuple:
    """Median (RSS, USS) in MiB of the server's worker processes: the children
    of the process we started (itself the master), less prefork's Manager.
    RSS counts shared library pages in every process; USS is what one worker
    alone costs."""
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return 0.0, 0.0
    rss, uss = [], []
    for child in children:
        try:
            if " ".join(child.cmdline()).strip() == "prefork: manager":
                continue
            info = child.memory_full_info()
            rss.append(info.rss / 1048576)
            uss.append(info.uss / 1048576)
        except psutil.Error:
            continue
    return (statistics.median(rss), statistics.median(uss)) if rss else (0.0, 0.0)


def server_cpu(root_pid) -> float:
    """CPU seconds (user + system) used so far by a server: the process we
    started and all its descendants (master, workers, prefork's Manager)."""
    total = 0.0
    try:
        root = psutil.Process(root_pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return total
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


def side_by_side(args, commands, path="/", prepare=None, wrk_args=(), load=None):
    """commands: name -> (argv, base url). All servers are started at once
    (an idle server costs the others nothing) and their wrk runs rotate:
    round r starts with the r-th server. Measured here, whichever server ran
    first in a sequence lost ~10% whatever it was, and the machine drifts over
    minutes, so neither position nor time may favour one server. Besides
    req/s and latency: CPU per request (the whole process tree), which
    contention for the two cores distorts far less than throughput.
    prepare, if given, is called with {name: (process, url)} once all answer;
    wrk_args go to every wrk run (a header, say). load(url, duration) runs
    another load generator instead of wrk (h2load), with wrk's result keys."""
    if load is None:
        def load(url, duration):
            return run_wrk(url, duration, extra=wrk_args)
    servers, results = {}, {}
    try:
        for name, (command, url) in commands.items():
            workdir = tempfile.mkdtemp(prefix="pfbench")
            env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT}/tests/bench")
            stderr_path = os.path.join(workdir, "stderr")
            proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, env=env,
                                    stderr=open(stderr_path, "w"), start_new_session=True)
            servers[name] = (proc, url + path, workdir)
        for name, (proc, url, workdir) in list(servers.items()):
            try:
                wait_answering(url, proc)
            except RuntimeError as exc:
                with open(os.path.join(workdir, "stderr")) as fh:
                    print(f"  ({name} failed: {exc}: {fh.read()[-600:]})")
                continue
            results[name] = {"memory": worker_memory(proc.pid), "runs": [], "cpu_us": []}
            load(url, 1)   # warm-up
        names = list(results)
        if not names:
            return {}
        # The warm-up's connections close before the runs open theirs: a worker
        # still counting its warm-up connections leaves the run's first burst
        # to its peers (seen with h2load's 8 connections: all on one worker).
        time.sleep(1)
        if prepare is not None:
            prepare({name: servers[name][:2] for name in names})
        for round_number in range(args.runs):
            for name in names[round_number % len(names):] + names[:round_number % len(names)]:
                proc, url, _ = servers[name]
                before = server_cpu(proc.pid)
                measured = load(url, args.duration)
                used = server_cpu(proc.pid) - before
                results[name]["cpu_us"].append(used / max(1, measured["requests"]) * 1e6)
                results[name]["runs"].append(measured)
    finally:
        for proc, _, workdir in servers.values():
            stop(proc)
            shutil.rmtree(workdir, ignore_errors=True)
    table = {}
    for name, r in results.items():
        runs = r["runs"]
        table[name] = {key: statistics.median(m[key] for m in runs) for key in ("rps", "p50", "p99")}
        table[name].update(errors=sum(m["errors"] for m in runs),
                           runs=[round(m["rps"]) for m in runs],
                           idle_rss=r["memory"][0], idle_uss=r["memory"][1],
                           cpu_us=statistics.median(r["cpu_us"]))
    return table


def stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def fmt_ms(seconds):
    return f"{seconds * 1000:.2f}ms"


def round_ratio(ours, theirs) -> float:
    """The median over rounds of ours / theirs (req/s): the servers of one
    round run back to back, while this machine's speed drifts by a third
    over minutes, so a ratio within a round is steadier than one of medians
    taken over all of them. Runs that cannot be paired: the medians' ratio."""
    if len(ours) != len(theirs) or not all(ours) or not all(theirs):
        return statistics.median(ours) / statistics.median(theirs)
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def print_table(title, results, reference="prefork"):
    """prefork x: prefork's req/s over the row's (round_ratio); CPU x: the
    row's CPU per request over prefork's (above 1: prefork does the work
    for less CPU)."""
    print(f"\n{title}")
    print(f"{'server':<18}{'req/s':>9}{'p50':>9}{'p99':>9}{'CPU/req':>9}{'idle RSS':>10}"
          f"{'USS':>7}{'prefork x':>11}{'CPU x':>7}  runs")
    ref = results.get(reference)
    for name, r in results.items():
        if not r["rps"]:
            print(f"{name:<18}{'none answered':>27}  {r['runs']}")
            continue
        ratio = f"{round_ratio(ref['runs'], r['runs']):.2f}x" if ref and r["rps"] else "-"
        cpu_ratio = f"{r['cpu_us'] / ref['cpu_us']:.2f}x" if ref and ref["cpu_us"] else "-"
        note = f"  ({r['errors']} non-2xx)" if r["errors"] else ""
        print(f"{name:<18}{r['rps']:>9.0f}{fmt_ms(r['p50']):>9}{fmt_ms(r['p99']):>9}"
              f"{r['cpu_us']:>7.1f}us{r['idle_rss']:>9.1f}M{r['idle_uss']:>6.1f}M{ratio:>11}"
              f"{cpu_ratio:>7}  {r['runs']}{note}")


def server_dir(parent, name) -> str:
    path = os.path.join(parent, name)
    os.makedirs(os.path.join(path, "tmp"), exist_ok=True)
    return path


def compare_wait(args):
    """The app that waits 20 ms per request: what app threads are for."""
    parent = tempfile.mkdtemp(prefix="pfcfg")
    app = APPS["wait"]
    try:
        commands = {}
        for name, extra in (("prefork", ""), ("prefork-threads8", "[workers]\nthreads = 8\n")):
            port = free_port()
            workdir = server_dir(parent, name)
            commands[name] = (prefork_command(app, port, workdir, log_section(workdir) + extra),
                              f"http://127.0.0.1:{port}")
        for server in ("gunicorn-gthread", "gunicorn-sync", "granian"):
            if not os.path.exists(SERVERS[server]("", 0, "")[0]):
                print(f"  (skipping {server}: not installed; run tests/bench/setup.sh)")
                continue
            port = free_port()
            commands[server] = (SERVERS[server](app, port, server_dir(parent, server)),
                                f"http://127.0.0.1:{port}")
        results = side_by_side(args, commands)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    print_table(f"app: wait (sleeps 20 ms per request; {WORKERS} workers, wrk -t1 "
                f"-c{CONNECTIONS} -d{args.duration}s, median of {args.runs}, runs rotated; "
                f"gunicorn-gthread: 8 threads; prefork: its defaults, then threads = 8)", results)
    for ours, peer in (("prefork", "granian"), ("prefork-threads8", "gunicorn-gthread")):
        if ours in results and peer in results:
            print(f"  {ours} / {peer}: {results[ours]['rps'] / results[peer]['rps']:.2f}x")


def probe_beside(url, load_url, duration, load_connections):
    """p99 of fast requests (a wrk of 5 connections on url) while another wrk
    of load_connections loads load_url."""
    load = subprocess.Popen(wrk_command(load_url, duration + 2, load_connections),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(1)   # the load is under way
        probe = run_wrk(url, duration, connections=5)
    finally:
        load.communicate(timeout=duration + 30)
    return probe


def compare_mixed(args):
    """Fast requests beside slow ones (wait_app.mixed: 1 in 10 waits 200 ms):
    the fast requests' p99, probed on /?fast, against the same probe while
    the load is fast requests only. Runs alternated."""
    parent = tempfile.mkdtemp(prefix="pfcfg")
    port = free_port()
    workdir = server_dir(parent, "prefork")
    command = prefork_command(APPS["mixed"], port, workdir, log_section(workdir))
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT}/tests/bench")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, env=env,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    probes = {"alone": [], "mixed": []}
    try:
        wait_answering(url + "/?fast", proc)
        for _ in range(args.runs):
            for name, load in (("alone", "/?fast"), ("mixed", "/")):
                probes[name].append(probe_beside(url + "/?fast", url + load, args.duration,
                                                 CONNECTIONS - 5))
    finally:
        stop(proc)
        shutil.rmtree(parent, ignore_errors=True)
    print(f"\nmixed: 5 connections of fast requests beside {CONNECTIONS - 5} of load "
          f"(fast only, or 1 in 10 waiting 200 ms); prefork defaults, {WORKERS} workers")
    print(f"{'load':<8}{'fast req/s':>11}{'fast p50':>10}{'fast p99':>10}  runs (p99)")
    p99 = {}
    for name, runs in probes.items():
        p99[name] = statistics.median(r["p99"] for r in runs)
        print(f"{name:<8}{statistics.median(r['rps'] for r in runs):>11.0f}"
              f"{fmt_ms(statistics.median(r['p50'] for r in runs)):>10}{fmt_ms(p99[name]):>10}  "
              f"{[fmt_ms(r['p99']) for r in runs]}")
    print(f"  fast p99 beside slow requests / alone: {p99['mixed'] / p99['alone']:.2f}x "
          f"(goal: at most 2x)")


def instruction_count(app_name, *options):
    """User-space instructions per request on prefork's hot path, counted by
    callgrind (tests/bench/instructions.sh): the same on every run, so it is
    the figure to compare across commits and machines; req/s is not."""
    if not shutil.which("valgrind"):
        return "valgrind not installed (tests/bench/setup.sh installs it)"
    out = subprocess.run(["sh", "tests/bench/instructions.sh", app_name, *options], cwd=ROOT,
                         capture_output=True, text=True, timeout=900).stdout
    found = re.search(r"(\d+) instructions per request", out)
    return f"{int(found.group(1)):,}" if found else f"not counted ({out.strip()[-200:]})"


def compare_servers(args):
    for app_name in args.apps:
        # Counted first, alone: valgrind must not share the cores with wrk.
        instructions = (f"{instruction_count(app_name, '--set', 'workers.threads=1')} with threads "
                        f"= 1, {instruction_count(app_name)} with the default threads; through "
                        f"the worker loop with 25 connections ready per round: "
                        f"{instruction_count(app_name, '--loop', '25')}")
        commands = {}
        parent = tempfile.mkdtemp(prefix="pfcfg")
        try:
            for server in args.servers:
                if server != "prefork" and not os.path.exists(SERVERS[server]("", 0, "")[0]):
                    print(f"  (skipping {server}: not installed; run tests/bench/setup.sh)")
                    continue
                port = free_port()
                commands[server] = (SERVERS[server](APPS[app_name], port,
                                                    server_dir(parent, server)),
                                    f"http://127.0.0.1:{port}")
            results = side_by_side(args, commands)
        finally:
            shutil.rmtree(parent, ignore_errors=True)
        print_table(f"app: {app_name}  ({WORKERS} workers, wrk -t1 -c{CONNECTIONS} "
                    f"-d{args.duration}s, median of {args.runs}, runs rotated)", results)
        print(f"  prefork instructions per request (callgrind, deterministic): {instructions}")


def compare_prefork_variants(args, title, variants):
    """Same app, prefork only, one setting changed (name -> extra config)."""
    parent = tempfile.mkdtemp(prefix="pfcfg")
    try:
        commands = {}
        for name, extra in variants.items():
            port = free_port()
            workdir = server_dir(parent, name)
            commands[name] = (prefork_command(APPS["hello"], port, workdir, extra(workdir)),
                              f"http://127.0.0.1:{port}")
        results = side_by_side(args, commands)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
    names = list(results)
    print_table(title, results, reference=names[0])
    first, second = results[names[0]], results[names[1]]
    print(f"  {names[0]} / {names[1]} throughput: {first['rps'] / second['rps'] * 100:.1f}%")
    print(f"  CPU per request: {names[0]} {first['cpu_us']:.1f} us, {names[1]} "
          f"{second['cpu_us']:.1f} us; as throughput at equal CPU: "
          f"{second['cpu_us'] / first['cpu_us'] * 100:.1f}%")


# nginx for the peers' side: the frame both configs share, then each one's part.
NGINX_FRAME = """worker_processes {{workers}};
daemon off;
user root;
pid {{wd}}/nginx.pid;
error_log {{wd}}/nginx-error.log;
events {{{{ worker_connections 4096; }}}}
http {{{{
  client_body_temp_path {{wd}}/tmp; proxy_temp_path {{wd}}/tmp; fastcgi_temp_path {{wd}}/tmp;
  uwsgi_temp_path {{wd}}/tmp; scgi_temp_path {{wd}}/tmp;
{http}}}}}
"""
NGINX_CONF = NGINX_FRAME.format(http="""  access_log {wd}/nginx-access.log;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    location /static/ {{ alias {files}/; }}
  }}
""")


def compare_static(args):
    """The same files from prefork's static handler and from nginx."""
    files = tempfile.mkdtemp(prefix="pffiles")
    for name, size in (("1k.bin", 1024), ("1m.bin", 1024 * 1024)):
        with open(os.path.join(files, name), "wb") as fh:
            fh.write(os.urandom(size))
    parent = tempfile.mkdtemp(prefix="pfcfg")
    try:
        port = free_port()
        workdir = server_dir(parent, "prefork")
        extra = log_section(workdir) + f'[static]\nroot = "{files}"\n'
        commands = {"prefork": (prefork_command(APPS["hello"], port, workdir, extra),
                                f"http://127.0.0.1:{port}")}
        port = free_port()
        workdir = server_dir(parent, "nginx")
        conf = os.path.join(workdir, "nginx.conf")
        with open(conf, "w") as fh:
            fh.write(NGINX_CONF.format(workers=WORKERS, wd=workdir, port=port, files=files))
        commands["nginx"] = (["nginx", "-c", conf, "-p", workdir], f"http://127.0.0.1:{port}")
        for name in ("1k.bin", "1m.bin"):
            print_table(f"static file {name} ({WORKERS} workers, sendfile, access log on)",
                        side_by_side(args, commands, path=f"/static/{name}"))
    finally:
        shutil.rmtree(files, ignore_errors=True)
        shutil.rmtree(parent, ignore_errors=True)


def reload_under_load(name, command, url, args, reloads=3, spacing=4.0):
    """p99 at rest, then p99 and failures while the server reloads `reloads` times."""
    workdir = tempfile.mkdtemp(prefix="pfbench")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT}/tests/bench")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, env=env,
                            stderr=open(os.path.join(workdir, "stderr"), "w"),
                            start_new_session=True)
    try:
        wait_answering(url + "/", proc)
        run_wrk(url + "/", 2, connections=20)   # warm-up
        rest = run_wrk(url + "/", 10, connections=20)
        duration = int(reloads * spacing + 4)
        wrk = subprocess.Popen(["wrk", "-t1", "-c20", f"-d{duration}s", "--latency", url + "/"],
                               stdout=subprocess.PIPE, text=True)
        for _ in range(reloads):
            time.sleep(spacing)
            os.kill(proc.pid, signal.SIGHUP)
        out = wrk.communicate(timeout=duration + 30)[0]
        during = parse_wrk(out)
        return {"rest_p99": rest["p99"], "reload_p99": during["p99"], "rps": during["rps"],
                "failed": during["errors"] + sum(int(n) for n in re.findall(r"\d+", during["socket_errors"]))}
    finally:
        stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def compare_reload(args):
    app = "tests.apps.slow_boot:app"
    results = {}
    for name in ("prefork", "gunicorn-sync"):
        port = free_port()
        workdir = tempfile.mkdtemp(prefix="pfcfg")
        try:
            command = SERVERS[name](app, port, workdir)
            results[name] = reload_under_load(name, command, f"http://127.0.0.1:{port}", args)
        except RuntimeError as exc:
            print(f"  ({name} failed: {exc})")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\nreload under load: import takes 1.5 s, requests 20 ms, 2 workers, wrk -c20, 3 HUPs")
    print(f"{'server':<22}{'p99 rest':>10}{'p99 reload':>12}{'ratio':>8}{'failed':>8}{'req/s':>8}")
    for name, r in results.items():
        print(f"{name:<22}{fmt_ms(r['rest_p99']):>10}{fmt_ms(r['reload_p99']):>12}"
              f"{r['reload_p99'] / r['rest_p99']:>7.1f}x{r['failed']:>8}{r['rps']:>8.0f}")


def total_worker_rss(root_pid) -> float:
    """Sum of the workers' RSS (MiB), the Manager left out."""
    total = 0.0
    for child in psutil.Process(root_pid).children():
        if " ".join(child.cmdline()).strip().startswith("prefork: worker"):
            total += child.memory_info().rss / 1048576
    return total


def compare_idle(args, idle=10000):
    """Hello-world throughput on 50 active connections beside `idle` idle
    keep-alive connections, against the same server without them (runs
    rotated, as everywhere); and what an idle connection costs in RSS."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parent = tempfile.mkdtemp(prefix="pfcfg")
    held, rss = [], []
    loaded, alone = f"beside-{idle}-idle", "alone"

    def hold_idle_connections(servers):
        proc, url = servers[loaded]
        port = int(url.split(":")[2].split("/")[0])
        rss.append(total_worker_rss(proc.pid))
        request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
        for _ in range(idle):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(request)
            sock.recv(4096)   # answered: now an idle keep-alive connection
            held.append(sock)
        time.sleep(1.5)       # let the workers' RSS settle and the stats ship
        rss.append(total_worker_rss(proc.pid))

    try:
        commands = {}
        for name in (loaded, alone):
            port = free_port()
            workdir = server_dir(parent, name)
            extra = (log_section(workdir) + "[http]\nkeepalive_timeout = 600\n"
                     "[workers]\nmax_connections = 10000\n")
            commands[name] = (prefork_command(APPS["hello"], port, workdir, extra),
                              f"http://127.0.0.1:{port}")
        results = side_by_side(args, commands, prepare=hold_idle_connections)
    finally:
        for sock in held:
            sock.close()
        shutil.rmtree(parent, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print_table(f"{idle} idle keep-alive connections held by {WORKERS} workers "
                f"(hello, wrk -c{CONNECTIONS})", results, reference=loaded)
    print(f"  throughput beside them: {results[loaded]['rps'] / results[alone]['rps'] * 100:.1f}%"
          f" of normal")
    if len(rss) == 2:
        print(f"  worker RSS {rss[0]:.1f} -> {rss[1]:.1f} MiB: "
              f"{(rss[1] - rss[0]) * 1048576 / idle / 1024:.1f} KiB per idle connection")


class Flood:
    """Keeps `count` hostile connections open to port, each doing `kind`:
    "trickle" (a POST head, then one body byte every 5 s), "expect" (a head with
    Expect: 100-continue, then nothing), "idle" (nothing at all), "slow-reader"
    (GET /big, then one byte read a second through a 4 KiB window). A closed
    one is opened again, as an attacker would."""

    def __init__(self, port, kind, count):
        import threading
        self.port, self.kind, self.count = port, kind, count
        self.socks, self.reopened = [], 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def open_one(self):
        sock = socket.socket()
        if self.kind == "slow-reader":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(1)
        try:
            sock.connect(("127.0.0.1", self.port))
            if self.kind == "trickle":
                sock.sendall(b"POST / HTTP/1.1\r\nHost: f\r\nContent-Length: 100000\r\n\r\n")
            elif self.kind == "expect":
                sock.sendall(b"POST / HTTP/1.1\r\nHost: f\r\nContent-Length: 10\r\n"
                             b"Expect: 100-continue\r\n\r\n")
            elif self.kind == "slow-reader":
                sock.sendall(b"GET /big HTTP/1.1\r\nHost: f\r\n\r\n")
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        return sock

    def run(self):
        while len(self.socks) < self.count and not self.done.is_set():
            sock = self.open_one()
            if sock is not None:
                self.socks.append(sock)
        while not self.done.wait(1.0):
            for i, sock in enumerate(self.socks):
                try:
                    if self.kind == "trickle" and time.monotonic() % 5 < 1:
                        sock.send(b"x")
                    elif self.kind == "slow-reader":
                        if sock.recv(1) == b"":
                            raise ConnectionResetError
                    elif self.kind != "trickle" and sock.recv(65536) == b"":
                        raise ConnectionResetError
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    sock.close()
                    self.reopened += 1
                    self.socks[i] = self.open_one() or sock

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while len(self.socks) < self.count and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)   # the workers have taken them
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join(10)
        for sock in self.socks:
            sock.close()


def legitimate_client(url, duration, limit=2.0):
    """One request at a time on a new connection for `duration` seconds:
    -> (requests, answered within `limit`, p99 seconds)."""
    times = []
    end = time.monotonic() + duration
    while time.monotonic() < end:
        began = time.monotonic()
        try:
            requests.get(url, timeout=limit + 8).raise_for_status()
            times.append(time.monotonic() - began)
        except requests.RequestException:
            times.append(float("inf"))
        time.sleep(0.05)
    quick = sum(1 for t in times if t <= limit)
    return len(times), quick, sorted(times)[int(len(times) * 0.99) - 1 if len(times) > 1 else 0]


def compare_flood(args):
    """Issue 23's floods against prefork on its defaults (2 workers), each
    beside a legitimate client; the idle flood runs under a 256-descriptor limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    floods = (("trickle", 2000, None), ("expect", 2000, None), ("idle", 600, 256),
              ("slow-reader", 40, None), ("slow-reader", 200, None))
    print(f"floods (prefork defaults, {WORKERS} workers; a legitimate client asks one request "
          f"at a time for {args.duration * 3}s; goal: >= 95% answered within 2 s)")
    print(f"  {'flood':<22} {'answered <= 2s':>15} {'p99':>9} {'evicted':>8} "
          f"{'error log':>10} {'same workers':>13}")
    try:
        for kind, count, limit in floods:
            parent = tempfile.mkdtemp(prefix="pfcfg")
            workdir = server_dir(parent, kind)
            port = free_port()

            def limited(limit=limit):
                if limit:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            proc = subprocess.Popen(
                prefork_command(APPS["flood"], port, workdir,
                                log_section(workdir) + "[status]\nenabled = true\n"),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=limited,
                start_new_session=True)
            url = f"http://127.0.0.1:{port}"
            try:
                wait_answering(url + "/", proc)
                pids = {c.pid for c in psutil.Process(proc.pid).children()}
                with Flood(port, kind, count):
                    total, quick, p99 = legitimate_client(url + "/", args.duration * 3)
                time.sleep(1.5)   # the last interval's counts shipped
                status = requests.get(url + "/_status?format=json", timeout=10).json()
                same = pids == {c.pid for c in psutil.Process(proc.pid).children()}
                log_size = os.path.getsize(os.path.join(workdir, "error.log"))
                print(f"  {f'{kind} x{count}' + (f' (ulimit -n {limit})' if limit else ''):<22} "
                      f"{quick:>6}/{total:<4} {quick / total:>4.0%} {fmt_ms(p99):>9} "
                      f"{status['totals'].get('evicted', 0):>8} {log_size / 1024:>8.1f}K "
                      f"{'yes' if same else 'NO':>13}")
            finally:
                stop(proc)
                shutil.rmtree(parent, ignore_errors=True)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


NGINX_TLS_CONF = NGINX_FRAME.format(http="""  access_log off;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.3;
    location / {{ return 200 "Hello, World!"; }}
  }}
""")


def tls_files(directory):
    """A throwaway CA's certificate and key for 127.0.0.1 (trustme, a test
    dependency: no key is kept anywhere) -> (cert path, key path)."""
    import trustme
    cert = trustme.CA().issue_cert("127.0.0.1")
    paths = (os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem"))
    cert.cert_chain_pems[0].write_to_path(paths[0])
    cert.private_key_pem.write_to_path(paths[1])
    return paths


def compare_tls(args, stalled=2000):
    """Hello world over TLS against granian (keep-alive) and nginx (a new
    connection per request: the handshake's cost), then a client's latency
    beside `stalled` TLS connections that never finish their handshake."""
    import resource
    import urllib3
    urllib3.disable_warnings()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parent = tempfile.mkdtemp(prefix="pfcfg")
    cert, key = tls_files(parent)
    try:
        commands = {}
        port = free_port()
        workdir = server_dir(parent, "prefork")
        commands["prefork"] = (prefork_command(
            APPS["hello"], port, workdir,
            log_section(workdir) + f'[tls]\ncertfile = "{cert}"\nkeyfile = "{key}"\n',
            scheme="https://"), f"https://127.0.0.1:{port}")
        if os.path.exists(SERVERS["granian"]("", 0, "")[0]):
            port = free_port()
            commands["granian"] = (SERVERS["granian"](APPS["hello"], port, "") + [
                "--ssl-certificate", cert, "--ssl-keyfile", key], f"https://127.0.0.1:{port}")
        port = free_port()   # the least Python on the ssl module does (a yardstick)
        commands["tls_floor.py"] = ([sys.executable, TLS_FLOOR, str(port), str(WORKERS), cert,
                                     key], f"https://127.0.0.1:{port}")
        print_table(f"hello over TLS, keep-alive ({WORKERS} workers, wrk -t1 -c{CONNECTIONS}, "
                    f"TLS 1.3)", side_by_side(args, commands))
        port = free_port()
        workdir = server_dir(parent, "nginx")
        os.makedirs(os.path.join(workdir, "tmp"), exist_ok=True)
        conf = os.path.join(workdir, "nginx.conf")
        with open(conf, "w") as fh:
            fh.write(NGINX_TLS_CONF.format(workers=WORKERS, wd=workdir, port=port, cert=cert,
                                           key=key))
        commands["nginx"] = (["nginx", "-c", conf, "-p", workdir], f"https://127.0.0.1:{port}")
        print_table("hello over TLS, a new connection per request (wrk -H 'Connection: close', "
                    "TLS 1.3; nginx answers a fixed string)",
                    side_by_side(args, commands, wrk_args=("-H", "Connection: close")),
                    reference="prefork")
        beside_stalled_handshakes(parent, cert, key, stalled)
    finally:
        shutil.rmtree(parent, ignore_errors=True)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def merged_runs(tables):
    """Tables of one run each (side_by_side), as one: the medians of the runs."""
    merged = {}
    for name in dict.fromkeys(name for table in tables for name in table):
        rows = [table[name] for table in tables if name in table]
        merged[name] = {key: statistics.median(row[key] for row in rows)
                        for key in ("rps", "p50", "p99", "cpu_us", "idle_rss", "idle_uss")}
        merged[name].update(errors=sum(row["errors"] for row in rows),
                            runs=[run for row in rows for run in row["runs"]])
    return merged


def compare_h2(args):
    """Hello world over HTTP/2 (h2load -m10: ten streams at once per
    connection), over TLS (ALPN) and in cleartext (prior knowledge), with 8
    and 50 connections, against gunicorn's gthread worker (8 threads, its
    HTTP/2 is h2 too) and granian."""
    if not shutil.which("h2load"):
        print("\nHTTP/2: skipped (h2load, Debian's nghttp2-client, is not installed)")
        return
    import urllib3
    urllib3.disable_warnings()
    parent = tempfile.mkdtemp(prefix="pfcfg")
    cert, key = tls_files(parent)
    try:
        for tls in (True, False):
            commands = {}
            port = free_port()
            workdir = server_dir(parent, f"prefork-{tls}")
            scheme = "https" if tls else "http"
            extra = (f'[tls]\ncertfile = "{cert}"\nkeyfile = "{key}"\n' if tls else
                     '[http2]\ncleartext = true\n[proxy]\ntrusted = ["127.0.0.1/32"]\n')
            commands["prefork"] = (prefork_command(APPS["hello"], port, workdir,
                                                   log_section(workdir) + extra,
                                                   scheme="https://" if tls else ""),
                                   f"{scheme}://127.0.0.1:{port}")
            port = free_port()
            commands["gunicorn-gthread"] = (SERVERS["gunicorn-gthread"](APPS["hello"], port, "") + (
                ["--http-protocols", "h2,h1", "--certfile", cert, "--keyfile", key] if tls else
                ["--http-protocols", "h2,h1", "--http2-cleartext", "both"]),   # (HTTP/1.1 too)
                f"{scheme}://127.0.0.1:{port}")
            port = free_port()
            commands["granian"] = (SERVERS["granian"](APPS["hello"], port, "") + ["--http", "auto"] + (
                ["--ssl-certificate", cert, "--ssl-keyfile", key] if tls else []),
                f"{scheme}://127.0.0.1:{port}")
            for connections in (8, 50):
                # Each run on a server started afresh, and alone (the order
                # rotates from run to run): gunicorn's workers were seen spinning
                # a core after an h2load run with 50 connections, which would
                # tax whoever ran beside or after it.
                names = list(commands)
                runs = [side_by_side(argparse.Namespace(runs=1, duration=args.duration),
                                     {name: commands[name]},
                                     load=lambda url, duration, c=connections:
                                     run_h2load(url, duration, c))
                        for r in range(args.runs) for name in names[r % 3:] + names[:r % 3]]
                print_table(f"hello over HTTP/2, {'TLS' if tls else 'cleartext'} ({WORKERS} workers, "
                            f"h2load -c{connections} -m10; p50 is h2load's mean, p99 its maximum)",
                            merged_runs(runs))
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def compare_page(args, files=50, rounds=20):
    """What a browser does with a page of 50 small files (4 KiB each) over
    TLS: one HTTP/2 connection with every request at once, against six
    HTTP/1.1 connections with one request each at a time (h2load --h1).
    The time to fetch the whole page, median of `rounds` fetches, alternated."""
    if not shutil.which("h2load"):
        return
    parent = tempfile.mkdtemp(prefix="pfcfg")
    cert, key = tls_files(parent)
    root = os.path.join(parent, "files")
    os.makedirs(root)
    urls = os.path.join(parent, "urls.txt")
    port = free_port()
    with open(urls, "w") as fh:
        for i in range(files):
            with open(os.path.join(root, f"f{i}.css"), "wb") as out:
                out.write(os.urandom(4096))
            fh.write(f"https://127.0.0.1:{port}/static/f{i}.css\n")
    workdir = server_dir(parent, "prefork")
    proc = subprocess.Popen(prefork_command(
        APPS["hello"], port, workdir, log_section(workdir) + f'[static]\nroot = "{root}"\n'
        f'[tls]\ncertfile = "{cert}"\nkeyfile = "{key}"\n', scheme="https://"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ways = {"HTTP/2, 1 connection": ["-c", "1", "-m", str(files)],
            "HTTP/1.1, 6 connections": ["--h1", "-c", "6", "-m", "1"]}
    times: dict = {name: [] for name in ways}
    try:
        wait_answering(f"https://127.0.0.1:{port}/", proc)
        for round_number in range(rounds + 1):
            order = list(ways) if round_number % 2 else list(reversed(ways))
            for name in order:
                out = subprocess.run(["h2load", "-n", str(files), *ways[name], "-i", urls],
                                     capture_output=True, text=True, timeout=60).stdout
                took = re.search(r"finished in ([\d.]+)(ms|s)", out)
                assert f"{files} succeeded" in out, out
                if round_number:   # the first round warms up
                    times[name].append(float(took.group(1)) * UNITS[took.group(2)])
    finally:
        stop(proc)
        shutil.rmtree(parent, ignore_errors=True)
    print(f"\na page of {files} files of 4 KiB over TLS, fetched whole (h2load -i, median of "
          f"{rounds}, a new connection each time, handshake included)")
    for name, samples in times.items():
        print(f"  {name:<26}{fmt_ms(statistics.median(samples)):>10}")


def beside_stalled_handshakes(parent, cert, key, stalled):
    port = free_port()
    workdir = server_dir(parent, "prefork-stalled")
    proc = subprocess.Popen(prefork_command(
        APPS["hello"], port, workdir,
        log_section(workdir) + f'[tls]\ncertfile = "{cert}"\nkeyfile = "{key}"\n',
        scheme="https://"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = f"https://127.0.0.1:{port}/"
    held = []
    try:
        wait_answering(url, proc)
        alone = tls_client_latencies(url)
        hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"   # half a ClientHello
        for i in range(stalled):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            if i % 2:
                sock.sendall(hello)
            held.append(sock)
        time.sleep(1)
        beside = tls_client_latencies(url)
        print(f"  a client's new TLS connections (200, one request each): p99 "
              f"{fmt_ms(alone[int(len(alone) * 0.99) - 1])} alone, "
              f"{fmt_ms(beside[int(len(beside) * 0.99) - 1])} beside {stalled} stalled "
              f"handshakes (half silent, half after half a ClientHello); "
              f"{sum(1 for t in beside if t == float('inf'))} failed")
    finally:
        for sock in held:
            sock.close()
        stop(proc)


def tls_client_latencies(url, count=200):
    """Seconds for each of `count` requests, each on a new TLS connection made
    with one client context (requests would build a context per call, which
    costs the client more than the server's whole answer)."""
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    port = int(url.rsplit(":", 1)[1].strip("/"))
    times = []
    for _ in range(count):
        began = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with ctx.wrap_socket(raw) as tls:
                    tls.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                    reply = b""
                    while chunk := tls.recv(65536):
                        reply += chunk
            times.append(time.monotonic() - began if reply.startswith(b"HTTP/1.1 200")
                         else float("inf"))
        except OSError:
            times.append(float("inf"))
    return sorted(times)


def main():
    sys.stdout.reconfigure(line_buffering=True)   # progress shows when piped
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--servers", nargs="*", default=list(SERVERS))
    parser.add_argument("--apps", nargs="*", default=["hello", "flask"])
    parser.add_argument("--sections", nargs="*",
                        default=["servers", "wait", "mixed", "access-log", "stats", "static",
                                 "reload", "idle", "flood", "tls", "h2"])
    args = parser.parse_args()
    print(f"prefork bench: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    if "servers" in args.sections:
        compare_servers(args)
    if "wait" in args.sections:
        compare_wait(args)
    if "mixed" in args.sections:
        compare_mixed(args)
    if "access-log" in args.sections:
        compare_prefork_variants(args, "access log on vs off (prefork, hello)", {
            "access-log-on": lambda wd: log_section(wd, access=True),
            "access-log-off": lambda wd: log_section(wd, access=False),
        })
    if "static" in args.sections:
        compare_static(args)
    if "reload" in args.sections:
        compare_reload(args)
    if "idle" in args.sections:
        compare_idle(args)
    if "tls" in args.sections:
        compare_tls(args)
    if "flood" in args.sections:
        compare_flood(args)
    if "h2" in args.sections:
        compare_h2(args)
        compare_page(args)
    if "stats" in args.sections:
        compare_prefork_variants(args, "statistics on vs off (prefork, hello)", {
            "stats-on": lambda wd: log_section(wd) + "[status]\nstatistics = true\n",
            "stats-off": lambda wd: log_section(wd) + "[status]\nstatistics = false\n",
        })


if __name__ == "__main__":
    main()
