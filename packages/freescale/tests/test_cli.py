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


@pytest.mark.parametrize("lengths", ["zipf", "movielens"])
def test_simulate_prints_the_same_figures_each_run(lengths, capsys):
    """Both length pools are drawn with a fixed seed (the MovieLens one was not: each run differed)."""
    args = ["simulate", "--world", "4", "--per-rank", "8", "--steps", "3", "--lengths", lengths]
    outputs = []
    for _ in range(2):
        torch.manual_seed(len(outputs))  # a global generator's state must not matter
        assert cli.main(args) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert outputs[0] == outputs[1] and outputs[0]["naive"]["bubble_ratio"] > 0


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


def test_resume_refuses_other_training_options(tmp_path, one_process, capsys):
    """The checkpoint held only model/optimizer/step: another --max-len failed in load_state_dict
    with a raw size mismatch, another --seed / --batch-size / --all-positions resumed silently on
    another data stream. Now the options are recorded and a resume with others exits 2."""
    ckpt = tmp_path / "c.pt"
    common = ["--checkpoint", str(ckpt), "--max-len", "20", "--batch-size", "4", "--seed", "3"]
    train_module.main(["--steps", "1", *common])
    assert torch.load(ckpt, weights_only=True)["args"] == {"seed": 3, "batch_size": 4, "max_len": 20,
                                                            "all_positions": False, "long_sequences": "report"}
    for changed, named in ((["--max-len", "30"], "--max-len 20 (now 30)"), (["--seed", "4"], "--seed 3 (now 4)"),
                           (["--batch-size", "6"], "--batch-size 4 (now 6)"),
                           (["--all-positions"], "--all-positions False (now True)")):
        with pytest.raises(SystemExit) as exit_info:
            train_module.main(["--steps", "2", "--resume", *common, *changed])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "was written with other options" in err and named in err, (changed, err)
    # the same options (another --method would be fine too: it moves samples, not what is trained)
    train_module.main(["--steps", "2", "--resume", *common])
    assert torch.load(ckpt, weights_only=True)["step"] == 2


def test_resume_from_a_checkpoint_without_recorded_options(tmp_path, one_process, capsys):
    """A checkpoint of an older release (no "args"): resumed with a warning; one of another model
    shape is a clear CLI error, not load_state_dict's size mismatch traceback."""
    ckpt = tmp_path / "c.pt"
    common = ["--checkpoint", str(ckpt), "--max-len", "20", "--batch-size", "4"]
    train_module.main(["--steps", "1", *common])
    state = torch.load(ckpt, weights_only=True)
    del state["args"]
    torch.save(state, ckpt)
    with pytest.warns(UserWarning, match="records no training options"):
        train_module.main(["--steps", "2", "--resume", *common])
    state = torch.load(ckpt, weights_only=True)
    del state["args"]
    torch.save(state, ckpt)
    with pytest.warns(UserWarning, match="records no training options"), pytest.raises(SystemExit) as exit_info:
        train_module.main(["--steps", "3", "--resume", *common[:2], "--max-len", "30", "--batch-size", "4"])
    assert exit_info.value.code == 2 and "does not fit this model (another --max-len?)" in capsys.readouterr().err
