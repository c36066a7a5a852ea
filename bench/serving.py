"""Serving throughput side by side, with C load generators (wrk, hey) so the client is not the limit.

In one run, on one bundle, against three servers started here one after the other:

- ``bare``: FastAPI + uvicorn with one sync endpoint doing one hnswlib ``knn_query`` (k=10) and
  orjson: the ceiling for a Python service on these cores (bench/bare_app.py);
- ``service, 1 process, file state``: ``python -m service`` as ``make serve`` runs it;
- ``service, 2 workers, Redis``: ``python -m service --workers 2`` over a local redis-server
  (AOF, appendfsync always), as each compose replica runs.

For each: saturation (``wrk -c16``, requests/s, median of ``--runs``) over ``GET /recommend`` for users
rotating through the bundle's users, latency at 200 requests/s for one known user (p50 / p99, median of the
runs) with three arrival patterns (hey's bursts of 4, hey one at a time, Poisson arrivals from wrk), the Poisson
arrivals again with each request for one of the bundle's users at random (closer to real traffic than one user,
whose history, vector and candidates stay in every cache), and
durable ``POST /events`` per second (``hey -c 16``) for the two service configurations. Writes the "serving"
section of docs/benchmarks.md.

    python -m bench.serving --bundle artifacts --runs 3

With ``--against CHECKOUT`` each service configuration is also served from another checkout (the code
before a change, say) right after this one's, on the same bundle and load: a before/after comparison in
one run (written with ``--no-write`` or ``--docs`` elsewhere, so the serving section keeps the plain table).
"""
from __future__ import annotations

import argparse
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import numpy as np

from bench.report import BENCHMARKS, add_docs_option, latency_machine, update_section
from recsys.bundle import read_bundle

ROOT = Path(__file__).resolve().parents[1]
MAX_USERS = 10_000  # the users of the many-users latency runs (the bundle's first ones: all of MovieLens')
WRK_USERS = """
local users = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("GET", "/recommend?user_id=" .. users[(n %% #users) + 1] .. "&k=10")
end
"""


def free_port() -> int:
    """A loopback port free now, drawn below the kernel's ephemeral range. A port ``bind(0)`` hands out comes from
    that range, where the next outgoing connection (a client's, another process's) may take it before the
    server binds it: seen in CI, a Redis Cluster node's bus port taken between the pick and redis-server's bind."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free now, drawn as ``free_port`` draws one. Each is held while the next are
    drawn, so that a caller starting several servers at once (a cluster's nodes and their bus ports) never gets
    the same port twice."""
    low = _ephemeral_low()
    with ExitStack() as held:
        ports: list[int] = []
        for _ in range(200 * n if low > 2048 else 0):
            if len(ports) == n:
                break
            s = held.enter_context(socket.socket())
            try:
                s.bind(("127.0.0.1", _PICK.randrange(max(1024, low - 12_000), low)))
            except OSError:
                continue
            ports.append(s.getsockname()[1])
        while len(ports) < n:  # (nothing free down there: the kernel's pick)
            s = held.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


_PICK = random.SystemRandom()  # not the seeded ``random``: two test workers must not draw the same ports


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


@contextmanager
def server(cmd: list[str], env: dict, url: str, log: Path, root: Path = ROOT):
    """``cmd`` run in the checkout ``root`` (``python -m service`` there serves that checkout's code)."""
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=root)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd} exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(url)
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def wrk(url: str, script: Path, seconds: int, connections: int = 16) -> float:
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


WRK_POISSON = """
local mean_ms, paths, bodies = %(mean_ms)f, {%(paths)s}, {%(bodies)s}
math.randomseed(%(seed)d)
request = function()
  local path = paths[math.random(#paths)]
  if #bodies == 0 then return wrk.format("GET", path) end
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, bodies[math.random(#bodies)])
end
delay = function() return math.min(-mean_ms * math.log(1 - math.random()), 5 * mean_ms) end
"""
UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def poisson(url: str, path: str | list[str], seconds: int, rate: int, tmp: Path, body: str | list[str] | None = None,
            seed: int = 0) -> dict[str, float]:
    """p50 / p99 with requests arriving as independent users send them: ``rate`` connections, each waiting an
    exponentially distributed time (mean 1 s) before each request, so that arrivals are close to a Poisson stream of
    ``rate`` per second (the response time, a few ms against a mean wait of a second, hardly delays the next
    request; a wait is cut at 5 s, one in 150, since the service answers 408 to a connection whose first request
    head has not come 10 s after it opened). hey's ``-q`` fires its connections on one tick instead: bursts no
    independent users make. wrk times each request from its send, as hey does; one slower than 10 s counts as an
    error. ``path``: one, or a list of them (each request one drawn at random: many users by GET). ``body``: a POST
    body, or a list of them (drawn the same way); None: GET."""
    script = tmp / f"poisson-{seed}.lua"
    bodies = [] if body is None else [body] if isinstance(body, str) else body
    paths = [path] if isinstance(path, str) else path
    script.write_text(WRK_POISSON % {"mean_ms": 1000.0, "seed": seed, "paths": ", ".join(f'"{p}"' for p in paths),
                                     "bodies": ", ".join("[==[" + b + "]==]" for b in bodies)})
    out = subprocess.run(["wrk", "-t1", f"-c{rate}", f"-d{seconds}s", "--timeout", "10s", "--latency", "-s", str(script),
                          url], capture_output=True, text=True, check=True).stdout
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    if errors:
        raise RuntimeError(f"{url}{paths[0]}: {errors.group(0)}\n{out}")
    pct = {int(p): float(v) * UNITS_MS[unit] for p, v, unit in re.findall(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)}
    if 99 not in pct:
        raise RuntimeError(f"{url}{paths[0]}: no latency distribution in wrk's output:\n{out}")
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": pct[50], "p99": pct[99]}


def hey(url: str, seconds: int, rate_per_worker: int | None, workers: int, body: str | None = None) -> dict[str, float]:
    cmd = ["hey", "-z", f"{seconds}s", "-c", str(workers)]
    if rate_per_worker:
        cmd += ["-q", str(rate_per_worker)]
    if body:
        cmd += ["-m", "POST", "-T", "application/json", "-d", body]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    pct = {int(p): float(v) * 1000 for p, v in re.findall(r"(\d+)%% in ([\d.]+) secs".replace("%%", "%"), out)}
    if 99 not in pct:  # hey prints a percentile only when enough answers came back to place it
        raise RuntimeError(f"{url}: too few answers for a 99th percentile ({seconds} s, {workers} x {rate_per_worker}/s):\n{out}")
    codes = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    bad = {c: n for c, n in codes.items() if c != "200"}
    if bad:
        raise RuntimeError(f"{url}: non-200 answers {bad}")
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": pct[50], "p99": pct[99]}


def measure(url: str, script: Path, runs: int, seconds: int, user: str, users: list[str], event_item: str | None) -> dict[str, float]:
    """Median over runs of saturation, fixed-rate latency for one known ``user`` and with Poisson arrivals also for
    ``users`` at random (each request one of them, warm from the saturation runs) and, unless ``event_item`` is
    None (the bare app has no /events), the ingestion of events on that item."""
    for _ in range(2):  # warm the user-vector cache and the connection paths
        wrk(url, script, min(3, seconds))
    sat = [wrk(url, script, seconds) for _ in range(runs)]
    lat = [hey(f"{url}/recommend?user_id={user}&k=10", seconds, 50, 4) for _ in range(runs)]
    smooth = [hey(f"{url}/recommend?user_id={user}&k=10", seconds, 200, 1) for _ in range(runs)]
    arrivals = [poisson(url, f"/recommend?user_id={user}&k=10", seconds, 200, script.parent, seed=run) for run in range(runs)]
    everyone = [f"/recommend?user_id={u}&k=10" for u in users]
    many = [poisson(url, everyone, seconds, 200, script.parent, seed=runs + run) for run in range(runs)]
    out = {"saturation": float(np.median(sat))}
    for key, results in (("", lat), ("_1", smooth), ("_poisson", arrivals), ("_users", many)):
        out |= {f"p50{key}": float(np.median([r["p50"] for r in results])), f"p99{key}": float(np.median([r["p99"] for r in results]))}
    if event_item is not None:
        body = '{"user_id": "bench-events", "item_id": "%s"}'
        ev = [hey(f"{url}/events", seconds, None, 16, body % event_item)["rps"] for _ in range(runs)]
        out["events"] = float(np.median(ev))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--user", default="196", help="the known user of the fixed-rate runs (default: a MovieLens user)")
    p.add_argument("--item", default="1", help="the item of the POST /events runs (default: a MovieLens item)")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--against", type=Path, metavar="CHECKOUT", help="also serve another checkout of this project (e.g. "
                   "`git worktree add ../before main`) with the same harness, bundle and load, each service configuration "
                   "measured for it right after this checkout: before and after a change, in one run")
    add_docs_option(p)
    args = p.parse_args()
    bundle = read_bundle(args.bundle)
    users = bundle.catalog["user_ids"]
    if args.user not in users or args.item not in bundle.catalog["item_ids"]:
        raise SystemExit(f"--user {args.user} / --item {args.item}: not in {args.bundle} (its first user and item: "
                         f"{users[0]}, {bundle.catalog['item_ids'][0]})")
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        tmp = Path(tmp)
        script = tmp / "users.lua"
        script.write_text(WRK_USERS % ", ".join(f'"{u}"' for u in users))
        base = {**os.environ, "RECSYS_BUNDLE_DIR": str(args.bundle.resolve()), "RECSYS_LOG_LEVEL": "WARNING"}
        base.pop("RECSYS_ADMIN_TOKEN", None)
        rows = {}
        port = free_port()
        load = (args.runs, args.seconds, args.user, users[:MAX_USERS])
        url = f"http://127.0.0.1:{port}"
        bare = [sys.executable, "-m", "uvicorn", "bench.bare_app:app", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning", "--timeout-keep-alive", "75"]  # (the service's: idle users keep their connections)
        with server(bare, base, url, tmp / "bare.log"):
            rows["bare FastAPI + hnswlib knn_query"] = measure(url, script, *load, event_item=None)
        service = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
        trees = {"": ROOT} if args.against is None else {" (this checkout)": ROOT, f" ({args.against})": args.against.resolve()}
        for suffix, root in trees.items():
            env = {**base, "RECSYS_STATE_BACKEND": "file", "RECSYS_STATE_DIR": str(tmp / f"state{len(rows)}")}
            with server(service, env, url, tmp / "file.log", root):
                rows[f"service, 1 process, file state{suffix}"] = measure(url, script, *load, event_item=args.item)
        redis_port = free_port()
        redis_cmd = ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
                     "--appendonly", "yes", "--appendfsync", "always"]
        stack.enter_context(_redis(redis_cmd, tmp / "redis.log"))
        for n, (suffix, root) in enumerate(trees.items()):
            env = {**base, "RECSYS_STATE_BACKEND": "redis", "RECSYS_REDIS_URL": f"redis://127.0.0.1:{redis_port}/{n}"}
            with server([*service, "--workers", "2"], env, url, tmp / "redis-workers.log", root):
                rows[f"service, 2 workers, Redis state{suffix}"] = measure(url, script, *load, event_item=args.item)
    write(rows, args)


@contextmanager
def _redis(cmd: list[str], log: Path):
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    time.sleep(0.5)
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def write(rows: dict[str, dict[str, float]], args) -> None:
    bare = rows["bare FastAPI + hnswlib knn_query"]["saturation"]
    lines = [f"Machine: {latency_machine()}; load generators on the same 2 cores (wrk 1 thread, hey). Bundle `{args.bundle}`. "
             f"Median of {args.runs} runs of {args.seconds} s each.", "",
             "| server | saturation, wrk -c16 (req/s) | vs bare | p50 / p99 at 200 req/s, hey -c4 -q50 (ms) "
             "| p50 / p99 at 200 req/s, hey -c1 -q200 (ms) | p50 / p99 at 200 req/s, Poisson arrivals (ms) "
             "| p50 / p99, Poisson, users at random (ms) | durable events/s (hey -c16) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        events = f"{r['events']:,.0f}" if "events" in r else "-"
        lines.append(f"| {name} | {r['saturation']:,.0f} | {r['saturation'] / bare:.0%} | {r['p50']:.2f} / {r['p99']:.2f} "
                     f"| {r['p50_1']:.2f} / {r['p99_1']:.2f} | {r['p50_poisson']:.2f} / {r['p99_poisson']:.2f} "
                     f"| {r['p50_users']:.2f} / {r['p99_users']:.2f} | {events} |")
    lines += ["", "hey -c4 -q50 starts its 4 workers on the same tick, so requests arrive in bursts of 4 every 20 ms and "
              "the 4th of a burst waits for the 3 before it; hey -c1 -q200 offers the same rate one request at a time. "
              "Poisson arrivals: wrk with 200 connections, each waiting an exponentially distributed time (mean 1 s) "
              "before each request, as independent users arrive (`poisson` in bench/serving.py); the first three "
              f"columns for one user ({args.user}), the fourth for one of the bundle's first {MAX_USERS:,} users at random "
              "per request, every one of them warm from the saturation runs (the bare endpoint reads a vector per user "
              "id and nothing else)."]
    body = "## Serving: bare endpoint vs the service (file state, one process) vs Redis state with 2 workers\n\n" + "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("serving", body, args.docs / BENCHMARKS.name)


if __name__ == "__main__":
    main()
