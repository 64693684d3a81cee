"""CommScheduler in one process, without a process group (a world of one)."""

import pytest
import torch

from freescale import CommScheduler


def test_world_of_one_without_a_process_group_is_a_local_no_op():
    sched = CommScheduler(chunk_bytes=64)
    grads = torch.arange(100, dtype=torch.float32)
    rows = torch.arange(40, dtype=torch.float32).view(8, 5)
    out = torch.empty(8, 5)
    f_reduce = sched.all_reduce(grads)
    f_rows = sched.all_to_all(out, rows, [8], [8])
    f_none = sched.all_to_all(torch.empty(4, 0), torch.ones(4, 0))  # no columns
    sched.flush()
    assert f_reduce.result(timeout=10) is grads and torch.equal(grads, torch.arange(100, dtype=torch.float32))
    assert f_rows.result(timeout=10) is out and torch.equal(out, rows)
    assert f_none.result(timeout=10).shape == (4, 0)
    bad = sched.all_to_all(torch.empty(3, 5), rows)
    sched.flush()
    with pytest.raises(ValueError, match="output must have input's shape"):
        bad.result(timeout=10)
    sched.close()


@pytest.mark.parametrize("cols, chunks", [(10, 3), (8, 2), (16, 4), (5, 2), (3, 1)])
def test_all_to_all_chunks_hold_at_most_chunk_bytes(cols, chunks):
    """An all-to-all larger than chunk_bytes is cut into column blocks of at most chunk_bytes
    each (ceil(bytes / chunk_bytes) of them); 4 float32 rows: 16 bytes a column."""
    sched = CommScheduler(chunk_bytes=64)
    try:
        x = torch.ones(4, cols)
        n = sched._local_chunks(x, x)
        blocks = sched._column_blocks(x, x, n)
        assert n == chunks and len(blocks) == chunks
        if n > 1:  # one op as a whole is the block None
            assert [lo for lo, _ in blocks] == [0] + [hi for _, hi in blocks[:-1]] and blocks[-1][1] == cols
            assert all(4 * (hi - lo) * x.element_size() <= 64 for lo, hi in blocks)
    finally:
        sched.close()


def test_ops_after_close_raise_and_unflushed_ops_fail():
    sched = CommScheduler()
    unflushed = sched.all_reduce(torch.ones(3), name="late")
    sched.close()
    with pytest.raises(RuntimeError, match="closed before this op was flushed"):
        unflushed.result(timeout=10)
    with pytest.raises(RuntimeError, match="scheduler is closed"):
        sched.all_reduce(torch.ones(3))
    with pytest.raises(RuntimeError, match="scheduler is closed"):
        sched.all_to_all(torch.empty(2, 2), torch.ones(2, 2))
    with pytest.raises(RuntimeError, match="scheduler is closed"):
        sched.flush()


def test_collective_device_follows_the_group_backend(monkeypatch):
    """Counts and flags made on the host for a collective go where the group takes them: the host
    where it has a CPU backend (gloo), the current GPU under NCCL alone (which refuses CPU tensors)."""
    from freescale.comm import collective_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for backend, device in (("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("nccl", "cuda:1"), ("mpi", "cpu")):
        monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None, backend=backend: backend)
        assert collective_device(object()) == torch.device(device), backend


def test_ops_after_the_round_agreement_failed_raise_instead_of_never_resolving():
    """The communication thread stops when the ranks' round agreement fails (a rank died): it
    failed the ops it held, but ops queued or flushed afterwards were accepted and their futures
    never resolved (result() without a timeout hung)."""
    import threading

    sched = CommScheduler(preempt=True)
    release = threading.Event()

    def failed_agreement(flushed):
        release.wait(10)
        raise RuntimeError("the agreement's all-reduce failed")

    sched._agreed_round = failed_agreement
    first = sched.all_reduce(torch.ones(2), name="first")
    sched.flush()
    late = sched.all_reduce(torch.ones(2), name="late")  # queued while the thread is still alive
    release.set()
    with pytest.raises(RuntimeError, match="agreement's all-reduce failed"):
        first.result(timeout=10)
    sched._thread.join(timeout=10)
    with pytest.raises(RuntimeError, match="communication thread stopped"):
        sched.flush()
    with pytest.raises(RuntimeError, match="communication thread stopped"):
        late.result(timeout=10)
    with pytest.raises(RuntimeError, match="communication thread stopped"):
        sched.all_to_all(torch.empty(2, 2), torch.ones(2, 2))
    sched.close()


@pytest.mark.parametrize("chunk_bytes", [0, -4, 1e6, "1MB", True])
def test_chunk_bytes_must_be_a_positive_integer(chunk_bytes):
    """Refused when constructed, naming chunk_bytes: with a process group a 0 failed in the first
    all-to-all with a ZeroDivisionError, 1e6 in the first all-reduce with range()'s TypeError,
    and -4 cut every all-reduce into one-element chunks."""
    with pytest.raises(ValueError, match="chunk_bytes must be an integer >= 1"):
        CommScheduler(chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("priority", [None, "high", float("nan"), True])
def test_a_priority_that_is_not_a_number_is_refused_naming_it(priority):
    """Refused when queued: the communication thread compared it with the others' when picking a
    chunk, and the TypeError there (None, a string) stopped the thread and failed every op queued
    beside it; a NaN compared as neither more nor less urgent."""
    sched = CommScheduler()
    fine = sched.all_reduce(torch.ones(2), priority=0, name="fine")
    with pytest.raises(ValueError, match="'bad': priority must be a number"):
        sched.all_reduce(torch.ones(2), priority=priority, name="bad")
    with pytest.raises(ValueError, match="'bad': priority must be a number"):
        sched.all_to_all(torch.empty(2, 2), torch.ones(2, 2), priority=priority, name="bad")
    late = sched.all_reduce(torch.ones(2), priority=2.5, name="late")  # floats (e.g. need times) are numbers
    sched.flush()
    assert fine.result(timeout=10) is not None and late.result(timeout=10) is not None
    sched.close()
