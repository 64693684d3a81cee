"""The composed demo (tools/demo/stack.py --smoke) end to end: 2 gloo ranks under torchrun train
the HSTU + MoE + MultiBalance model with freescale balancing, silvertorch publishes and serves it,
and the answers obey their filters. Catches any package change that breaks the composition."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "demo"))

from movielens import load  # noqa: E402
from stack import FILTERS  # noqa: E402


def test_smoke_run_trains_publishes_serves_and_reports(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # CPU users get the PyTorch paths
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "demo" / "stack.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())

    training = report["training"]
    assert training["world_size"] == 2 and training["steps"] == 6
    assert set(training["loss"]) == {"next", "watch", "like"}
    for log in ("train_balanced", "train_unbalanced"):
        steps = json.loads((tmp_path / f"{log}.json").read_text())["steps"]
        assert all(0 <= s["bubble_ratio"] < 1 for s in steps)
        assert all(set(s["scales"]) == {"next", "watch", "like"} for s in steps)

    # the index approximations only: every filtered list close to the exact pipeline's
    for label, fig in report["recall"].items():
        assert fig["results_breaking_the_filter"] == 0, label
        assert fig["recall@10"] >= 0.8, (label, fig)

    ml = load()
    answers = report["serving"]["answers"]
    assert len(answers) == 3
    for answer in answers:
        pred = FILTERS[answer["filter"]][1]
        assert len(answer["results"]) == 5, answer
        for row in answer["results"]:
            assert row["title"] == ml.titles[row["id"]]
            assert pred(ml.genres[row["id"]], ml.years[row["id"]]), (answer["filter"], row)
    assert report["serving"]["malformed_filter"]["status"] == 400
    assert report["serving"]["load"]["ok"] == report["serving"]["load"]["requests"]

    text = (tmp_path / "report.md").read_text()
    for png in ("training_curves.png", "bubbles.png", "retrieval.png"):
        assert (tmp_path / png).stat().st_size > 10_000
        assert f"]({png})" in text
    assert "Comedy after 1990" in proc.stdout
