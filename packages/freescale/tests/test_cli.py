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
