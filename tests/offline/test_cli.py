"""``python -m offline``: enumerated options accept only their choices, and an error is said once.

Two tests run the real command in a subprocess (what a user sees on stderr, loguru included);
the rest call ``main`` in-process.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
from loguru import logger

from offline.__main__ import build_parser, main
from offline.config import ConfigError
from offline.pipeline import IndexConfig
from offline.ranker import RankerConfig
from offline.train_recall import RecallConfig

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m offline ARGS`` from the repository root, as the README runs it."""
    return subprocess.run([sys.executable, "-m", "offline", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_unknown_recall_loss_exits_2_with_argparses_message_naming_the_choices():
    done = run_cli("train", "--recall-loss", "nope")
    assert done.returncode == 2
    assert "argument --recall-loss: invalid choice: 'nope' (choose from 'softmax', 'bpr')" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_data_error_is_printed_exactly_once_on_stderr(tmp_path):
    bad = tmp_path / "interactions.csv"
    bad.write_text("user_id,item_id,rating\nu1,i1,5\n")
    done = run_cli("train", "--interactions", str(bad), "--skip-baselines")
    message = "interactions.csv line 1: header lacks required column(s): timestamp"
    assert done.returncode == 2
    assert done.stderr.count(message) == 1, done.stderr
    assert done.stderr.strip().endswith(f"python -m offline train: error: {message}")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (["--recall-device", "gpu"], "argument --recall-device: invalid choice: 'gpu' (choose from 'auto', 'cpu', 'cuda')"),
    (["--ranker-default", "lightgbm"], "argument --ranker-default: invalid choice: 'lightgbm' (choose from 'auto', "
                                       "'lambdarank', 'ranknet', 'hinge', 'bpr', 'lambdamart')"),
    (["--ranker-losses", "lambdarank,listnet"], "argument --ranker-losses: invalid choice: 'listnet' (choose from "
                                                "'lambdarank', 'ranknet', 'hinge', 'bpr')"),
    (["--ranker-losses", " , "], "argument --ranker-losses: no name given"),
    (["--valid-frac", "0"], "argument --valid-frac: '0' is not a share between 0 and 1"),
    (["--test-frac", "1.5"], "argument --test-frac: '1.5' is not a share between 0 and 1"),
])
def test_enumerated_options_reject_anything_but_their_choices(args, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", *args])
    assert exit_.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--index-m", "--index-ef-construction", "--index-insert-ef-construction", "--index-ef"])
def test_hnsw_options_are_whole_numbers_of_at_least_one(flag, capsys):
    """Refused by the parser, not by hnswlib after the training (or, for the insertion beam, at a replica's first
    catalogue change)."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", flag, "0"])
    assert exit_.value.code == 2
    assert f"argument {flag}: '0' is not a whole number >= 1" in capsys.readouterr().err
    assert getattr(build_parser().parse_args(["train", flag, "7"]), flag[2:].replace("-", "_")) == 7


def test_every_enumerated_config_field_is_an_argparse_choice_list():
    """The choices live in the dataclass; the parser must carry exactly those (not a copy that drifts)."""
    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    actions = {a.dest: a for a in train._actions}
    enumerated = 0
    for cls, prefix in ((RecallConfig, "recall_"), (IndexConfig, "index_"), (RankerConfig, "ranker_")):
        for f in fields(cls):
            if f.metadata.get("choices") and not f.metadata["many"]:
                assert tuple(actions[prefix + f.name].choices) == f.metadata["choices"]
                enumerated += 1
    assert enumerated == 3  # recall loss, recall device, ranker default


def test_configs_built_in_code_get_the_same_check():
    with pytest.raises(ConfigError, match=r"argument --recall-loss: invalid choice: 'nope' \(choose from 'softmax', 'bpr'\)"):
        RecallConfig(loss="nope")
    with pytest.raises(ConfigError, match="argument --ranker-losses: invalid choice: 'listnet'"):
        RankerConfig(losses="listnet")


def test_an_inconsistent_option_is_one_line_and_exit_2_before_any_data_loads(capsys):
    code = main(["train", "--ranker-losses", "lambdarank", "--ranker-default", "ranknet", "--interactions", "/no/such.csv"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == ("python -m offline train: error: argument --ranker-default: 'ranknet' is not among the rankers this "
                   "run trains (lambdarank, lambdamart): see --ranker-losses and --ranker-lambdamart\n")


@pytest.mark.parametrize("extra, epochs, losses", [([], 3, "lambdarank"), (["--recall-epochs", "2", "--ranker-losses", "bpr,hinge"], 2, "bpr")])
def test_quick_profile_trains_less_and_says_how_to_train_the_full_model(extra, epochs, losses):
    from offline.__main__ import apply_quick_profile, stage_configs

    args = build_parser().parse_args(["train", "--quick", *extra])
    said: list[str] = []
    sink = logger.add(lambda m: said.append(str(m)), level="INFO", format="{message}")
    try:
        apply_quick_profile(args)
    finally:
        logger.remove(sink)
    assert any(line.startswith("quick profile:") and "`make train`" in line for line in said)
    recall, _, ranker = stage_configs(args)
    assert (recall.epochs, ranker.losses, ranker.lambdamart) == (epochs, losses, False)
    assert args.skip_baselines and not args.refit
    full = build_parser().parse_args(["train"])  # without --quick: the full model
    assert full.refit and not full.skip_baselines and full.recall_epochs == 40 and full.ranker_lambdamart


def test_windows_that_leave_nothing_to_train_on_are_refused_before_any_work(capsys):
    assert main(["train", "--synthetic", "50x40", "--valid-frac", "0.5", "--test-frac", "0.5"]) == 2
    assert "leave nothing to train on (their sum must be below 1)" in capsys.readouterr().err


def test_a_ranker_trained_on_shorter_lists_than_it_serves_is_refused_before_any_work(capsys):
    assert main(["train", "--synthetic", "50x40", "--index-candidates", "300"]) == 2
    assert "argument --ranker-max-list-len: 200 is below --index-candidates 300" in capsys.readouterr().err
