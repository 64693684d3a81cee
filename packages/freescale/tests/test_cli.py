"""The `freescale` command line and the one-process training script."""

import json

import pytest
import torch

from freescale import cli
from freescale import train as train_module


@pytest.fixture
def one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)  # no torchrun: train in this process


def test_train_subcommand_forwards_its_options(tmp_path, one_process):
    log = tmp_path / "log.json"
    assert cli.main(["train", "--steps", "1", "--batch-size", "4", "--loss-log", str(log)]) == 0
    assert len(json.loads(log.read_text())["losses"]) == 1


def test_checkpoint_records_the_steps_taken(tmp_path, one_process):
    ckpt, log = tmp_path / "c.pt", tmp_path / "log.json"
    common = ["--batch-size", "4", "--checkpoint", str(ckpt), "--loss-log", str(log)]
    train_module.main(["--steps", "2", *common])
    train_module.main(["--steps", "1", "--resume", *common])  # already past step 1: trains nothing
    assert json.loads(log.read_text())["losses"] == []
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 2 and int(state["optimizer"]["state"][0]["step"]) == 2


@pytest.mark.parametrize("option", ["--world", "--per-rank", "--steps"])
def test_simulate_counts_must_be_positive(option, capsys):
    with pytest.raises(SystemExit):
        cli.main(["simulate", option, "0"])
    assert f"argument {option}: expected an integer >= 1, got 0" in capsys.readouterr().err


def test_train_refuses_bad_arguments(tmp_path, one_process, capsys):
    """A missing --resume file trained from step 0, an unknown --method ran in one process and a
    batch size of 0 failed deep inside; all are argument errors now, before any training."""
    cases = [(["--checkpoint", str(tmp_path / "missing.pt"), "--resume"], "no checkpoint at"),
             (["--resume"], "--resume needs --checkpoint"),
             (["--method", "no_such_method"], "argument --method: invalid choice"),
             (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
             (["--method", "contiguous", "--long-sequences", "cap"], "needs the balancer")]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            train_module.main(["--steps", "1", *argv])
        assert message in capsys.readouterr().err, argv
    # --steps below 1 trained nothing and exited 0; the usage names the command it came from
    with pytest.raises(SystemExit):
        cli.main(["train", "--steps", "-3"])
    err = capsys.readouterr().err
    assert "usage: freescale train" in err and "argument --steps: expected an integer >= 1, got -3" in err, err


def test_contiguous_method_means_no_balancer():
    """--method contiguous is documented to disable balancing: no BatchBalancer (it ran one)."""
    assert train_module.make_balancer("contiguous", "report", distributed=True) is None
    assert train_module.make_balancer("kk_equal", "report", distributed=False) is None
    assert train_module.make_balancer("kk_equal", "cap", distributed=True).method == "kk_equal"
