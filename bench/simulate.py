"""Closed-loop experiment simulator: simulated users with planted tastes click on what the running service
shows them, and the service's own experiment reports are read as an analyst would read them.

The data is the synthetic generator's (``offline.synthetic``): the bundle is trained here on
``generate(n_users, n_items, seed=--data-seed)`` (or taken from ``--bundle``, trained the same way), and the
users' true preferences are the factors the generator planted (``offline.synthetic.planted``, same arguments):
the true relevance of item i for user u is ``user_end[u] . item_f[i]`` (the current taste, in [-1, 1]). The
truth is used only to simulate clicks and to score the served lists; the service never sees it.

Click model (position-based): the user examines position p with probability ``(1/p)^eta`` and, having
examined it, clicks with probability ``sigmoid((rel - c) / temp)``. Clicks go through ``POST /events`` (type
click, the answer's request_id, the 1-based position). Defaults eta=1, c=0.75, temp=0.1: a few percent of
shown items are clicked.

Three studies, against one service (``uvicorn service.app:app``, file state in a temporary directory, stopped by
its pid at the end), each experiment deleted before the next study:

a. A/A false alarms: 100 A/A splits at once (aa-000..aa-099, variants a/b at 0.5; assignment hashes the
   experiment name, so they are 100 independent A/A tests on one stream of traffic). Each report is read at
   ``--looks`` evenly spaced looks; an experiment "alarms" if ``vs_control.significant`` is ever true. The
   false-alarm rate gets a Wilson 95% interval, against the test's alpha (0.05). Sample-ratio mismatches
   (the service's chi-square flag, p < 0.001) are counted too.
b. A/B power: control (full pipeline) vs ``ranker: false`` (recall order) vs ``popularity: true`` (the most
   popular items), thirds of users; the report is read every ``--every`` impressions until both degraded
   variants are significant (or ``--max-impressions``); repeated under new names (new assignments). The true
   quality of what each variant served (NDCG@10 and expected clicks per impression, from the planted
   relevance) is reported beside it.
c. Interleaving: ranked (A) vs recall (B, ``ranker: false``) in ``mode: interleave``, read the same way until
   ``preference_b`` is significant.

The service caches a report for 5 s, so consecutive reads of one experiment are spaced by at least
``REPORT_TTL_S`` (traffic pauses if needed). Writes the "simulate" section of docs/experiments.md.

    python -m bench.simulate                 # default: trains a 2000x500 bundle, ~10 minutes on 2 cores
    python -m bench.simulate --impressions 20000   # the A/A study of docs/experiments.md (~20 minutes)
    python -m bench.simulate --tiny --docs /tmp/x   # smoke size
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.report import add_docs_option, machine, update_section
from bench.serving import free_port, server
from offline.synthetic import planted
from recsys.experiments.stats import wilson
from service.client import ExperimentReport, RecsysClient, Variant

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = "experiments.md"
HEADER = ("# Online experiments\n\nNumbers written by `bench/simulate.py`: simulated users with planted tastes click "
          "on what the service shows; the service's own experiment reports are read. Each section names its machine.\n")
TOKEN = "simulate-admin-token"
REPORT_TTL_S = 5.2  # the service caches a report 5 s (recsys/experiments/registry.py report_ttl_s)
ALPHA = 0.05
K = 10
TRAINING = {False: "two-tower 3 epochs, lambdarank MLP ranker at most 5 epochs, no refit",
            True: "two-tower 1 epoch, lambdarank MLP ranker at most 2 epochs, no refit"}


# ----------------------------------------------------------------------------- the simulated users
class Users:
    """The planted truth and the click model; ids ``u{row}``/``i{row}`` as ``generate`` names them."""

    def __init__(self, n_users: int, n_items: int, data_seed: int, eta: float, c: float, temp: float):
        truth = planted(n_users=n_users, n_items=n_items, seed=data_seed)
        self.rel = truth.relevance()  # [users, items]
        self.n_users, self.eta, self.c, self.temp = n_users, eta, c, temp
        self.exam = (1.0 / np.arange(1, K + 1)) ** eta
        disc = 1 / np.log2(np.arange(2, K + 2))
        self.disc = disc
        ideal = np.sort(self.rel, axis=1)[:, ::-1][:, :K]
        self.idcg = (np.maximum(ideal, 0) * disc).sum(1)

    def attract(self, rel: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(rel - self.c) / self.temp))

    def score(self, user: int, items: list[int]) -> tuple[float, float]:
        """(true NDCG@10 with gain max(rel, 0) and the whole catalogue as the ideal, expected clicks per impression)."""
        rel = self.rel[user, items][:K]
        ndcg = float((np.maximum(rel, 0) * self.disc[:len(rel)]).sum() / self.idcg[user])
        return ndcg, float((self.attract(rel) * self.exam[:len(rel)]).sum())

    def clicks(self, user: int, items: list[int], rng: np.random.Generator) -> list[int]:
        """0-based positions clicked."""
        rel = self.rel[user, items][:K]
        p = self.exam[:len(rel)] * self.attract(rel)
        return [int(i) for i in np.flatnonzero(rng.random(len(rel)) < p)]


class Traffic:
    """Impressions driven through the HTTP API by a few threads; per-impression randomness is seeded by
    (seed, study, index), so a run does not depend on thread scheduling (the service's state still does)."""

    def __init__(self, url: str, users: Users, seed: int, threads: int):
        self.url, self.users, self.seed, self.threads = url, users, seed, threads
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(threads)
        self.lock = threading.Lock()
        self.quality: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)  # (exp, arm) -> scores
        self.counts = defaultdict(int)

    def client(self) -> RecsysClient:
        c = getattr(self.local, "client", None)
        if c is None:
            c = self.local.client = RecsysClient(self.url, read_timeout=60)
        return c

    def one(self, study: int, index: int, watch: tuple[str, ...]) -> None:
        rng = np.random.default_rng([self.seed, study, index])
        user = int(rng.integers(self.users.n_users))
        c = self.client()
        answer = c.recommend(f"u{user}", k=K)
        items = [int(item_id[1:]) for item_id in answer.item_ids]
        clicked = self.users.clicks(user, items, rng)
        joined = 0
        for pos in clicked:
            event = c.record_event(f"u{user}", f"i{items[pos]}", type="click", request_id=answer.request_id, position=pos + 1)
            joined += bool(event.joined)
        score = self.users.score(user, items) if items else (0.0, 0.0)
        with self.lock:
            self.counts["impressions"] += 1
            self.counts["clicks"] += len(clicked)
            self.counts["joined"] += joined
            self.counts["short_lists"] += len(items) < K
            for exp in watch:
                arm = answer.assignments.get(exp)
                if arm is not None:
                    self.quality[(exp, arm)].append(score)

    def drive(self, study: int, start: int, n: int, watch: tuple[str, ...] = ()) -> None:
        """Impressions ``start .. start+n-1`` of ``study``; returns when all are answered and clicked."""
        for f in [self.pool.submit(self.one, study, i, watch) for i in range(start, start + n)]:
            f.result()

    def close(self) -> None:
        self.pool.shutdown()


# ----------------------------------------------------------------------------- the service
@contextmanager
def service(bundle: Path, tmp: Path, log: Path):
    """The service on file state in ``tmp``, with the admin token and room for the A/A study's experiments."""
    url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(bundle), "RECSYS_STATE_DIR": str(tmp / "state"),
           "RECSYS_STATE_BACKEND": "file", "RECSYS_ADMIN_TOKEN": TOKEN, "RECSYS_MAX_EXPERIMENTS": "200",
           "RECSYS_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    # keep-alive longer than the report cache's wait between reads (REPORT_TTL_S): with uvicorn's 5 s default the
    # server closes an idle pooled connection just as the client reuses it ("Server disconnected", seen in CI)
    cmd = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
           "--log-level", "warning", "--timeout-keep-alive", "75"]
    with server(cmd, env, url, log):
        yield url


class Admin:
    """The experiments, defined and deleted with the admin token, and read fresh."""

    def __init__(self, url: str):
        self.api = RecsysClient(url, admin_token=TOKEN, read_timeout=300)
        self.last_read: dict[str, float] = {}

    def put(self, name: str, variants: list[Variant], mode: str = "split") -> None:
        self.api.define_experiment(name, variants, mode=mode)

    def delete(self, name: str) -> None:
        self.api.delete_experiment(name)
        self.last_read.pop(name, None)

    def report(self, name: str) -> ExperimentReport:
        """A fresh report: waits out the service's report cache since this experiment's last read."""
        wait = self.last_read.get(name, -math.inf) + REPORT_TTL_S - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        report = self.api.experiment_report(name)
        self.last_read[name] = time.monotonic()
        return report


def settle() -> None:
    """Impressions are written by the service's writer thread: give it a moment before a look."""
    time.sleep(0.5)


# ----------------------------------------------------------------------------- the studies
def study_aa(admin: Admin, traffic: Traffic, n_exp: int, impressions: int, looks: int) -> dict:
    names = [f"aa-{i:03d}" for i in range(n_exp)]
    for name in names:
        admin.put(name, [Variant("a", share=0.5), Variant("b", share=0.5)])
    ever = {n: False for n in names}
    srm_ever = {n: False for n in names}
    per_look, done, t0 = [], 0, time.monotonic()
    bounds = [round(impressions * (j + 1) / looks) for j in range(looks)]
    reps: dict[str, dict] = {}
    for bound in bounds:
        traffic.drive(0, done, bound - done)
        done = bound
        settle()
        sig = srm = 0
        for name in names:
            rep = reps[name] = admin.report(name)
            b = rep.variant("b")
            s = bool(b["vs_control"]["significant"])
            ever[name] |= s
            sig += s
            m = bool(rep.sample_ratio["mismatch"])
            srm_ever[name] |= m
            srm += m
        per_look.append({"impressions": done, "significant": sig, "ever": sum(ever.values()), "srm": srm})
        print(f"  A/A look at {done} impressions: {sig} significant now, {sum(ever.values())} ever; {srm} SRM "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
    final = [reps[n] for n in names]
    served = [sum(v["impressions"] for v in r.variants) for r in final]
    clicks = [sum(v["clicks"] for v in r.variants) for r in final]
    p_values = [r.variant("b")["vs_control"]["p_value"] for r in final]
    srm_p = [r.sample_ratio["p_value"] for r in final]
    for name in names:
        admin.delete(name)
    alarms = sum(ever.values())
    return {"experiments": n_exp, "impressions": impressions, "looks": looks, "per_look": per_look, "alarms": alarms,
            "wilson": wilson(alarms, n_exp, ALPHA), "srm_ever": sum(srm_ever.values()),
            "srm_final": sum(r.sample_ratio["mismatch"] for r in final),
            "report_impressions": (min(served), max(served)), "report_clicks": float(np.mean(clicks)),
            "final_p_below_05": sum(p <= ALPHA for p in p_values), "srm_p_below_05": sum(p <= 0.05 for p in srm_p),
            "users_per_exp": float(np.mean([sum(v["users"] for v in r.variants) for r in final]))}


def study_ab(admin: Admin, traffic: Traffic, name: str, study: int, every: int, max_impressions: int) -> dict:
    arms = ["control", "no-ranker", "popular"]
    admin.put(name, [Variant("control", share=1 / 3), Variant("no-ranker", share=1 / 3, ranker=False),
                     Variant("popular", share=1 - 2 / 3, popularity=True)])
    first: dict[str, int | None] = {a: None for a in arms[1:]}
    wrong_way: dict[str, int] = {a: 0 for a in arms[1:]}
    done, rep = 0, None
    while done < max_impressions and any(v is None for v in first.values()):
        n = min(every, max_impressions - done)
        traffic.drive(study, done, n, watch=(name,))
        done += n
        settle()
        rep = admin.report(name)
        for v in rep.variants:
            if v["name"] in first and v["vs_control"]["significant"]:
                if v["vs_control"]["difference"] > 0:
                    wrong_way[v["name"]] += 1
                if first[v["name"]] is None:
                    first[v["name"]] = done
    out = {"name": name, "impressions": done, "first": first, "wrong_way": wrong_way, "variants": {}}
    for v in rep.variants:
        q = np.array(traffic.quality.get((name, v["name"]), [(np.nan, np.nan)]))
        out["variants"][v["name"]] = {
            "users": v["users"], "impressions": v["impressions"], "clicks": v["clicks"], "ctr": v["ctr"],
            "vs_control": v.get("vs_control"), "true_ndcg": _mean_ci(q[:, 0]), "true_ctr": _mean_ci(q[:, 1])}
    out["sample_ratio"] = rep.sample_ratio
    admin.delete(name)
    print(f"  A/B {name}: first significant at {first} impressions (read every {every}); read {done}", flush=True)
    return out


def study_il(admin: Admin, traffic: Traffic, name: str, study: int, every: int, max_impressions: int) -> dict:
    admin.put(name, [Variant("ranked"), Variant("recall", ranker=False)], mode="interleave")
    first, done, rep, wrong_way = None, 0, None, 0
    while done < max_impressions and first is None:
        n = min(every, max_impressions - done)
        traffic.drive(study, done, n)
        done += n
        settle()
        rep = admin.report(name)
        pref = rep.interleave["preference_b"]
        if pref["significant"]:
            first = done
            wrong_way += pref["difference"] > 0
    il = rep.interleave
    admin.delete(name)
    print(f"  interleave {name}: first significant at {first} impressions; wins A {il['wins_a']} B {il['wins_b']} "
          f"ties {il['ties']}", flush=True)
    return {"name": name, "impressions": done, "first": first, "wrong_way": wrong_way, "interleave": il}


def _mean_ci(x: np.ndarray) -> tuple[float, float, float]:
    """Mean over impressions and its 95% normal interval."""
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan, math.nan, math.nan)
    half = 1.96 * x.std(ddof=1) / math.sqrt(len(x))
    return float(x.mean()), float(x.mean() - half), float(x.mean() + half)


# ----------------------------------------------------------------------------- bundle
def train(out: Path, n_users: int, n_items: int, seed: int, tiny: bool) -> None:
    epochs = ["--recall-epochs", "1", "--ranker-epochs", "2"] if tiny else ["--recall-epochs", "3", "--ranker-epochs", "5"]
    cmd = [sys.executable, "-m", "offline", "train", "--synthetic", f"{n_users}x{n_items}", "--seed", str(seed),
           "--out", str(out), "--skip-baselines", "--no-refit", "--ranker-losses", "lambdarank", "--no-ranker-lambdamart",
           *epochs]
    print("training:", " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    print(f"trained in {time.monotonic() - t0:.0f} s", flush=True)


def check_bundle(bundle: Path, n_users: int, n_items: int) -> None:
    from recsys.bundle import read_bundle

    catalog = read_bundle(bundle).catalog
    users, items = catalog["user_ids"], catalog["item_ids"]
    bad = [u for u in users if not (u[:1] == "u" and u[1:].isdigit() and int(u[1:]) < n_users)]
    bad += [i for i in items if not (i[:1] == "i" and i[1:].isdigit() and int(i[1:]) < n_items)]
    if bad:
        raise SystemExit(f"{bundle} was not trained on --synthetic {n_users}x{n_items} (ids like {bad[:3]})")


# ----------------------------------------------------------------------------- main
def add_click_model_options(p: argparse.ArgumentParser, c: float = 0.75) -> None:
    """The simulated users' options: client threads and the click model's parameters (``Users``)."""
    p.add_argument("--threads", type=int, default=4, help="client threads")
    p.add_argument("--eta", type=float, default=1.0, help="examination (1/p)^eta")
    p.add_argument("--c", type=float, default=c, help="attractiveness sigmoid((rel - c) / temp)")
    p.add_argument("--temp", type=float, default=0.1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="a bundle trained on --synthetic USERSxITEMS --seed DATA_SEED (default: train one)")
    p.add_argument("--synthetic", default=None, help="USERSxITEMS of the synthetic data (default 2000x500; tiny 300x120)")
    p.add_argument("--data-seed", type=int, default=0, help="the generator's (and training's) seed")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated traffic and clicks")
    p.add_argument("--aa-experiments", type=int, default=100)
    p.add_argument("--impressions", type=int, default=None, help="A/A study impressions (default 10000; tiny 600)")
    p.add_argument("--looks", type=int, default=10, help="A/A looks, evenly spaced")
    p.add_argument("--every", type=int, default=None, help="A/B and interleaving: impressions between looks (default 250)")
    p.add_argument("--max-impressions", type=int, default=None, help="A/B and interleaving: cap per run (default 8000)")
    p.add_argument("--repeats", type=int, default=None, help="A/B and interleaving runs, new names each (default 3)")
    add_click_model_options(p)
    p.add_argument("--quick", action="store_true", help="a shorter run: 5000 A/A impressions, 2 repeats")
    p.add_argument("--tiny", action="store_true", help="smoke size: tiny bundle, 10 A/A experiments, a few hundred impressions")
    p.add_argument("--no-write", action="store_true", help="print only")
    add_docs_option(p)
    args = p.parse_args(argv)
    tiny, quick = args.tiny, args.quick
    size = args.synthetic or ("300x120" if tiny else "2000x500")
    n_users, n_items = (int(x) for x in size.lower().split("x"))
    impressions = args.impressions or (600 if tiny else 5000 if quick else 10_000)
    every = args.every or (100 if tiny else 250)
    max_imp = args.max_impressions or (300 if tiny else 8000)
    repeats = args.repeats or (1 if tiny else 2 if quick else 3)
    n_aa = 10 if tiny and args.aa_experiments == 100 else args.aa_experiments
    looks = 3 if tiny and args.looks == 10 else args.looks

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="simulate-") as tmp_s:
        tmp = Path(tmp_s)
        bundle = args.bundle
        if bundle is None:
            bundle = tmp / "bundle"
            train(bundle, n_users, n_items, args.data_seed, tiny)
        check_bundle(bundle, n_users, n_items)
        users = Users(n_users, n_items, args.data_seed, args.eta, args.c, args.temp)
        with service(bundle, tmp, tmp / "service.log") as url:
            traffic = Traffic(url, users, args.seed, args.threads)
            admin = Admin(url)
            try:
                print(f"A/A: {n_aa} experiments, {impressions} impressions, {looks} looks", flush=True)
                t0 = time.monotonic()
                aa = study_aa(admin, traffic, n_aa, impressions, looks)
                aa["seconds"] = time.monotonic() - t0
                aa["ctr"] = traffic.counts["clicks"] / max(traffic.counts["impressions"], 1)
                print("A/B:", flush=True)
                ab = [study_ab(admin, traffic, f"ab-{args.seed}-{r}", 10 + r, every, max_imp) for r in range(repeats)]
                print("interleaving:", flush=True)
                il = [study_il(admin, traffic, f"il-{args.seed}-{r}", 100 + r, every, max_imp) for r in range(repeats)]
            finally:
                traffic.close()
            counts = dict(traffic.counts)
    body = write(args, size, aa, ab, il, counts, time.monotonic() - t_start, every, max_imp)
    print(body)
    if not args.no_write:
        path = args.docs / EXPERIMENTS
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(HEADER)
        update_section("simulate", body, path)
        print(f"wrote the simulate section of {path}")


def _ci(t: tuple[float, float, float], fmt: str = ".3f") -> str:
    return f"{t[0]:{fmt}} [{t[1]:{fmt}}, {t[2]:{fmt}}]"


def _interval(x: list) -> str:
    return "[" + ", ".join("-inf/inf" if v is None else f"{v:+.4f}" for v in x) + "]"


def write(args, size: str, aa: dict, ab: list[dict], il: list[dict], counts: dict, seconds: float, every: int,
          max_imp: int) -> str:
    lo, hi = aa["wilson"]
    lines = [
        f"## Closed-loop simulation: A/A false alarms, A/B power, interleaving ({'tiny smoke run' if args.tiny else size})",
        "",
        f"Machine: {machine()}; the service (`uvicorn service.app:app`, file state, one process) and the simulated "
        f"users ({args.threads} client threads) share it. Synthetic data `--synthetic {size}` (data seed "
        f"{args.data_seed}); bundle {'`' + str(args.bundle) + '`' if args.bundle else 'trained by the script (' + TRAINING[args.tiny] + ')'}; "
        f"traffic seed {args.seed}; {seconds / 60:.1f} minutes in all.",
        "",
        f"Click model: user u is drawn uniformly; position p is examined with probability (1/p)^{args.eta:g} and an "
        f"examined item clicked with probability sigmoid((rel - {args.c:g}) / {args.temp:g}), rel = user_end[u] . item_f[i] "
        f"(the generator's planted current taste, `offline.synthetic.planted`; never sent to the service). "
        f"{counts['impressions']:,} impressions, {counts['clicks']:,} clicks posted "
        f"({counts['clicks'] / max(counts['impressions'], 1):.3f} per impression, "
        f"{counts['clicks'] / max(counts['impressions'], 1) / K:.2%} of shown items); "
        f"{counts['joined']:,} answered `joined: true`; {counts['short_lists']} answers shorter than {K}.",
        "",
        "The test is the service's: an always-valid mSPRT on per-user clicks per impression (delta method), alpha 0.05; "
        f"every report read is a fresh one (reads of one experiment at least {REPORT_TTL_S} s apart, past the 5 s cache).",
        "",
        f"### a. A/A false alarms ({aa['experiments']} A/A splits at once, {aa['impressions']:,} impressions, "
        f"{aa['looks']} looks)",
        "",
        f"Experiments ever significant at any of the {aa['looks']} looks: **{aa['alarms']} of {aa['experiments']} = "
        f"{aa['alarms'] / aa['experiments']:.1%}**, Wilson 95% interval [{lo:.1%}, {hi:.1%}], against alpha = 5% "
        f"(the mSPRT's bound on the chance of ever rejecting a true null). At the last look "
        f"{aa['final_p_below_05']} had p <= 0.05. Sample-ratio mismatch flags (chi-square on users, p < 0.001): "
        f"{aa['srm_ever']} experiments at any look, {aa['srm_final']} at the last; at the last look "
        f"{aa['srm_p_below_05']} of {aa['experiments']} had chi-square p <= 0.05 (expected about 5% under correct assignment). "
        f"Per experiment at the last look: {aa['users_per_exp']:.0f} users, "
        f"{aa['report_impressions'][0]:,}-{aa['report_impressions'][1]:,} impressions counted, "
        f"{aa['report_clicks']:.0f} clicks. Study time {aa['seconds']:.0f} s.",
        "",
        "| impressions | significant at this look | ever significant | SRM flags |",
        "|---|---|---|---|",
        *[f"| {r['impressions']:,} | {r['significant']} | {r['ever']} | {r['srm']} |" for r in aa["per_look"]],
        "",
        "### b. A/B power: control vs `ranker: false` vs `popularity: true` (thirds of users)",
        "",
        f"Report read every {every} impressions until both degraded variants are significant (cap {max_imp:,}); "
        "'first significant' is the impressions (all three variants together) at the first read with "
        "`vs_control.significant`. True quality of the lists each variant served, from the planted relevance: "
        "NDCG@10 (gain max(rel, 0), ideal = the user's best 10 of the catalogue) and expected clicks per impression "
        "under the click model, each a mean over impressions with a 95% normal interval.",
        "",
        "| run | variant | first significant at | users | impressions | CTR (clicks/impression) [95% fixed-horizon] "
        "| vs control: difference [always-valid 95%], p | true expected CTR | true NDCG@10 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in ab:
        for name, v in run["variants"].items():
            vc = v["vs_control"]
            first = "-" if name == "control" else (f"{run['first'][name]:,}" if run["first"][name] else f"not by {run['impressions']:,}")
            if name != "control" and run["wrong_way"][name]:
                first += f" (significant the wrong way at {run['wrong_way'][name]} reads)"
            test = "-" if vc is None else f"{vc['difference']:+.4f} {_interval(vc['interval'])}, p={vc['p_value']:.3g}"
            lines.append(f"| {run['name']} | {name} | {first} | {v['users']} | {v['impressions']:,} | "
                         f"{v['ctr']['value']:.4f} {_interval(v['ctr']['interval'])} | {test} | {_ci(v['true_ctr'])} | "
                         f"{_ci(v['true_ndcg'])} |")
    lines += ["", "### c. Interleaving: ranked (A) vs recall (B, `ranker: false`)", "",
              f"Report read every {every} impressions until `preference_b` is significant (cap {max_imp:,}). "
              "preference_b = (B wins - A wins) / impressions over users, always-valid 95% interval.", "",
              "| run | first significant at | impressions read | wins A / B / ties | preference_b [always-valid 95%], p |",
              "|---|---|---|---|---|"]
    for run in il:
        pb = run["interleave"]["preference_b"]
        first = f"{run['first']:,}" if run["first"] else f"not by {run['impressions']:,}"
        if run["wrong_way"]:
            first += " (the wrong way)"
        lines.append(f"| {run['name']} | {first} | {run['interleave']['impressions']:,} | {run['interleave']['wins_a']} / "
                     f"{run['interleave']['wins_b']} / {run['interleave']['ties']} | {pb['difference']:+.4f} "
                     f"{_interval(pb['interval'])}, p={pb['p_value']:.3g} |")
    split_first = [r["first"]["no-ranker"] for r in ab if r["first"]["no-ranker"]]
    il_first = [r["first"] for r in il if r["first"]]
    lines += ["", "Impressions to first significance, ranker vs no ranker: split (control vs no-ranker, thirds of users, "
              f"so about 2/3 of those impressions are in the pair) {split_first or 'never'}; interleaving "
              f"{il_first or 'never'} (resolution: one read every {every} impressions)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
