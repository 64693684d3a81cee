import json

import pytest
import torch

from gpukernels_common.bench import (
    BenchRecord,
    read_records,
    render_markdown,
    render_results,
    run_benchmarks,
    saved_tensor_bytes,
    time_fn,
    write_records,
)


def test_saved_bytes_matches_hand_count():
    # y = (x @ w).relu(): matmul saves x (4x8 fp32) and w (8x16 fp32); relu saves its output (4x16).
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, 16, requires_grad=True)
    got = saved_tensor_bytes(lambda: (x @ w).relu())
    assert got == (4 * 8 + 8 * 16 + 4 * 16) * 4


def test_saved_bytes_counts_shared_storage_once():
    x = torch.randn(10, requires_grad=True)
    assert saved_tensor_bytes(lambda: x * x) == 10 * 4


def test_time_fn_cpu():
    out = time_fn(lambda: torch.randn(64, 64) @ torch.randn(64, 64), warmup_ms=1, rep_ms=5)
    assert out["ms"] > 0 and out["ms_p20"] <= out["ms_p80"]


def test_records_roundtrip_and_render(tmp_path):
    recs = [BenchRecord("matmul", "torch", {"n": 64}, {"ms": 0.5}), BenchRecord("matmul", "ours", {"n": 64}, {"ms": 0.25})]
    path = write_records(tmp_path / "r.jsonl", recs)
    line = json.loads(path.read_text().splitlines()[0])
    assert {"device", "torch", "commit"} <= set(line["env"])
    back = read_records(path)
    assert back[1].figures == {"ms": 0.25}
    md = render_markdown(back, "demo")
    assert "| ours | 64 | 0.25 |" in md and "Conditions:" in md
    out = render_results([path, tmp_path / "missing.jsonl"], tmp_path / "RESULTS.md", "demo")
    assert out.read_text() == md


def test_run_benchmarks_runs_each_script_with_the_flags_and_renders_what_they_wrote(tmp_path, capsys):
    """A package's benchmarks/run.py: every bench_*.py (or --only one), the flags passed on, a
    failing script reported after the others ran, RESULTS.md rendered from results/*.jsonl."""
    folder = tmp_path / "demo_pkg" / "benchmarks"
    (folder / "results").mkdir(parents=True)
    script = ("import json, sys\nfrom pathlib import Path\n"
              "name = Path(__file__).stem\n"
              "rec = {{'bench': 'b', 'provider': name, 'shape': {{}}, 'figures': {{'flags': ' '.join(sys.argv[1:]) or '-'}}, 'env': {{}}}}\n"
              "(Path(__file__).parent / 'results' / (name + '.jsonl')).write_text(json.dumps(rec) + '\\n')\n"
              "sys.exit({code})\n")
    (folder / "bench_a.py").write_text(script.format(code=0))
    (folder / "bench_b.py").write_text(script.format(code=3))
    assert run_benchmarks(folder, ["--quick"]) == 1
    out = capsys.readouterr().out
    assert "== bench_a.py --quick" in out and "failed: ['bench_b.py']" in out
    md = (folder / "RESULTS.md").read_text()
    assert md.startswith("# demo_pkg benchmark results") and md.count("| --quick |") == 2
    (folder / "results" / "bench_a.jsonl").unlink()
    assert run_benchmarks(folder, ["--only", "a"]) == 0
    assert "bench_b" not in capsys.readouterr().out and "| - |" in (folder / "RESULTS.md").read_text()


def test_run_benchmarks_refuses_an_only_that_names_no_script(tmp_path, capsys):
    """`--only` with a misspelt name ran nothing, rendered and returned 0."""
    folder = tmp_path / "demo_pkg" / "benchmarks"
    folder.mkdir(parents=True)
    (folder / "bench_a.py").write_text("raise SystemExit(0)\n")
    with pytest.raises(SystemExit) as exc:
        run_benchmarks(folder, ["--only", "b"])
    assert exc.value.code == 2 and "--only b: no bench_b.py" in capsys.readouterr().err
    assert not (folder / "RESULTS.md").exists()
    assert run_benchmarks(folder, ["--render"]) == 0  # records brought back from elsewhere: rendered, nothing run
    assert "== bench_a.py" not in capsys.readouterr().out and (folder / "RESULTS.md").exists()


def test_bench_args():
    from gpukernels_common.bench import bench_args

    args = bench_args(["--quick"])
    assert args.quick and not args.gpu
    assert bench_args([]).quick is False


def test_spawn_jobs_runs_every_rank_of_every_job_on_its_own_port():
    from gpukernels_common.bench import spawn_jobs
    from gpukernels_common.testing import report_rank

    results = spawn_jobs(report_rank, 2, ("x", 3), jobs=2, timeout=120)
    assert sorted((job, rank, world, args) for job, rank, world, _, args in results) == [
        (j, r, 2, ("x", 3)) for j in range(2) for r in range(2)]
    ports = {job: {port for j, _, _, port, _ in results if j == job} for job in range(2)}
    assert all(len(p) == 1 for p in ports.values()) and ports[0] != ports[1]


def test_git_commit_names_the_checkout_or_the_override(monkeypatch, tmp_path):
    from gpukernels_common.bench import environment, git_commit

    monkeypatch.delenv("GKC_COMMIT", raising=False)
    assert git_commit(cwd=tmp_path) == "unknown"  # no git history there
    monkeypatch.setenv("GKC_COMMIT", "0123abcd4567")  # a tree sent without its history names its commit
    assert git_commit(cwd=tmp_path) == "0123abcd4567" and environment("cpu")["commit"] == "0123abcd4567"


def test_git_commit_is_dirty_for_code_changes_not_for_benchmark_outputs(monkeypatch, tmp_path):
    """A benchmark writing its records as it goes must not mark its own later records -dirty."""
    import subprocess

    from gpukernels_common.bench import git_commit

    monkeypatch.delenv("GKC_COMMIT", raising=False)
    results = tmp_path / "pkg" / "benchmarks" / "results"
    results.mkdir(parents=True)
    files = {results / "x.jsonl": "{}\n", tmp_path / "pkg" / "benchmarks" / "RESULTS.md": "# r\n", tmp_path / "pkg" / "code.py": "a = 1\n"}
    for path, text in files.items():
        path.write_text(text)

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "init")
    clean = git_commit(cwd=tmp_path)
    assert len(clean) == 12 and not clean.endswith("-dirty")
    for path in list(files)[:2]:
        path.write_text("changed\n")
    assert git_commit(cwd=results) == clean  # from any directory of the checkout
    (tmp_path / "pkg" / "code.py").write_text("a = 2\n")
    assert git_commit(cwd=tmp_path) == clean + "-dirty"


def test_time_fn_quantiles_stay_inside_the_samples(monkeypatch):
    # few slow samples: the default ("exclusive") quantiles extrapolated past the measured range
    import gpukernels_common.bench as bench

    # the warm-up's deadline and its check, one warm call sizing the samples, then three timed calls
    samples = iter([0.0, 0.0, 0.0, 0.001, 0.0, 0.024, 0.0, 0.064, 0.0, 0.0701])
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(samples))
    out = time_fn(lambda: None, warmup_ms=0, rep_ms=0)
    assert 24.0 - 1e-6 <= out["ms_p20"] <= out["ms"] <= out["ms_p80"] <= 70.1 + 1e-6


def test_time_fn_sizes_its_samples_by_the_warm_calls(monkeypatch):
    """A cold first call (a JIT compile) sized the measurement: 3 samples where rep_ms asks for
    51. On a fake clock: the first call takes 500 ms, every later one 2**-10 s."""
    import gpukernels_common.bench as bench

    clock, calls = [0.0], [0]

    def fn():
        calls[0] += 1
        clock[0] += 0.5 if calls[0] == 1 else 2.0**-10

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    out = time_fn(fn, warmup_ms=10 * 2.0**-10 * 1e3, rep_ms=50)
    assert calls[0] == 1 + 10 + 51  # first, warm-up, int(50 ms / 0.977 ms)
    assert out["ms"] == pytest.approx(2.0**-10 * 1e3)


def test_time_fn_without_a_warm_up_sizes_its_samples_by_a_warm_call(monkeypatch):
    """warmup_ms=0 left no warm call to size by, so the cold first call did: 3 samples where
    rep_ms asks for 51."""
    import gpukernels_common.bench as bench

    clock, calls = [0.0], [0]

    def fn():
        calls[0] += 1
        clock[0] += 0.5 if calls[0] == 1 else 2.0**-10

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    out = time_fn(fn, warmup_ms=0, rep_ms=50)
    assert calls[0] == 1 + 1 + 51  # cold, the sizing call, int(50 ms / 0.977 ms)
    assert out["ms"] == pytest.approx(2.0**-10 * 1e3)


@pytest.mark.parametrize("kw", [{"rep_ms": float("nan")}, {"warmup_ms": -1.0}, {"rep_ms": "100"}])
def test_time_fn_bad_durations(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        time_fn(lambda: None, **kw)


def test_a_benchmark_with_records_of_two_machines_renders_a_table_for_each():
    cpu = dict(device="cpu (x86_64, 2 threads)", torch="2.13", triton="3.9", python="3.11", commit="aaa", date="d1")
    gpu = dict(cpu, device="NVIDIA H200", date="d2")
    md = render_markdown([BenchRecord("overhead", "a", {"n": 1}, {"ms": 1.0}, env=cpu),
                          BenchRecord("overhead", "a", {"n": 1}, {"ms": 0.4}, env=gpu),
                          BenchRecord("overhead", "b|c", {"n": 1}, {"ms": 2.0}, env=cpu)], "demo")
    cpu_part, gpu_part = md.split("device `NVIDIA H200`")
    assert "| a | 1 | 1 |" in cpu_part and "| b\\|c | 1 | 2 |" in cpu_part and "0.4" not in cpu_part
    assert "| a | 1 | 0.4 |" in gpu_part and md.count("## overhead") == 1


def test_records_of_two_commits_on_one_machine_render_a_table_for_each():
    """A table states one commit: records measured at another commit get a table of their own."""
    env = dict(device="cpu", torch="2.13", triton="3.9", python="3.11", commit="aaa", date="d1")
    md = render_markdown([BenchRecord("overhead", "a", {"n": 1}, {"ms": 1.0}, env=env),
                          BenchRecord("overhead", "a", {"n": 1}, {"ms": 0.5}, env=dict(env, commit="bbb"))], "demo")
    old_part, new_part = md.split("commit `bbb`")
    assert "commit `aaa`" in old_part and "| a | 1 | 1 |" in old_part and "0.5" not in old_part
    assert "| a | 1 | 0.5 |" in new_part and md.count("## overhead") == 1


def test_records_describe_the_device_bench_args_chose(monkeypatch):
    from gpukernels_common import bench

    monkeypatch.setattr(bench, "_RECORD_DEVICE", [])
    monkeypatch.setattr(bench, "has_cuda", lambda: True)  # a GPU host
    monkeypatch.setattr(bench, "device_name", lambda dev: f"name of {torch.device(dev).type}")
    bench.bench_args([])  # a CPU run there
    assert BenchRecord("b", "p", {}, {}).env["device"] == "name of cpu"
    bench.bench_args(["--gpu"])
    assert BenchRecord("b", "p", {}, {}).env["device"] == "name of cuda"


def test_spawn_jobs_names_a_rank_that_died_without_waiting_out_the_timeout():
    import time

    import pytest

    from gpukernels_common.bench import spawn_jobs

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"job 0 rank \d exited with code 1"):
        spawn_jobs(divmod, 2, (), timeout=300)  # divmod(queue, job, rank, ...) raises a TypeError in each rank
    assert time.monotonic() - start < 120


def test_spawn_jobs_names_a_rank_that_exited_without_reporting_without_waiting_out_the_timeout():
    import time

    import pytest

    from gpukernels_common.bench import spawn_jobs

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"job 0 rank \d exited with code 0 without putting its result on the queue"):
        spawn_jobs("".format, 2, (), timeout=90)  # "".format(queue, job, rank, ...) returns "" and puts nothing
    assert time.monotonic() - start < 60


def test_time_fn_reports_the_median_and_the_20th_and_80th_percentiles(monkeypatch):
    """On a fake clock: a 1 ms warm call sizes rep_ms=11 to 11 samples of 1..11 ms (shuffled)."""
    import gpukernels_common.bench as bench

    clock = [0.0]
    durations = iter([1, 1, 5, 1, 9, 3, 11, 7, 2, 10, 4, 8, 6])  # cold, sizing, samples

    def fn():
        clock[0] += next(durations) / 1e3

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    out = time_fn(fn, warmup_ms=0, rep_ms=11)
    assert out == pytest.approx({"ms": 6.0, "ms_p20": 3.0, "ms_p80": 9.0})


def test_device_time_us_reads_either_name_of_a_profiler_events_device_time():
    from types import SimpleNamespace

    from gpukernels_common.bench import device_time_us

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(3).add_(1)
    assert all(device_time_us(e) == 0 for e in prof.key_averages())  # host-only events
    assert device_time_us(SimpleNamespace(self_device_time_total=7.5)) == 7.5
    assert device_time_us(SimpleNamespace(self_cuda_time_total=3.0)) == 3.0  # torch before 2.4


def test_print_profile_reports_wall_time_and_host_events(capsys):
    from gpukernels_common.bench import print_profile

    x = torch.randn(64, 64)
    got = print_profile("matmul and a read back", lambda: float((x @ x).sum()), calls=3)
    out = capsys.readouterr().out
    assert "### matmul and a read back:" in out and "ms per call" in out
    assert got["wall_ms"] > 0 and got["host_events"].get("aten::item") == 1.0
