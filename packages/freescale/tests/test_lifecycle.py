"""close() / context managers of BatchBalancer and TrainPipeline, and their argument checks, in
one process (the background groups' release on 2 ranks: test_distributed.py)."""

import pytest
import torch

from freescale import BatchBalancer, BubbleMeter, KeyedJagged, ShardedEmbeddings, TrainPipeline


def _batch(*ids):
    return KeyedJagged.from_dict({"a": [torch.tensor([i]) for i in ids]}), {}


def _failing_step(features, dense, global_batch):
    raise RuntimeError("step failed")


def test_pipeline_close_reports_the_failure_of_the_batch_it_had_staged():
    """step_fn raised while batch i+1's ids were being distributed in the background; that
    distribution failed too (an id out of range) and nothing ever said so. close() waits for it
    and raises from its error; it is idempotent, and run() afterwards raises."""
    emb = ShardedEmbeddings({"a": 10}, dim=2)
    pipe = TrainPipeline(_failing_step, embeddings=emb)
    with pytest.raises(RuntimeError, match="step failed"):
        pipe.run([_batch(1, 2), _batch(11)])
    with pytest.raises(RuntimeError, match=r"TrainPipeline.close: the background work of the batch staged before "
                                           r"run\(\) stopped failed: IndexError: ids for table 'a' must be in \[0, 10\)"):
        pipe.close()
    pipe.close()
    assert pipe._pool._shutdown
    with pytest.raises(RuntimeError, match="the pipeline is closed"):
        pipe.run([_batch(1)])


def test_pipeline_context_manager_keeps_the_steps_error_and_warns_of_the_staged_one():
    emb = ShardedEmbeddings({"a": 10}, dim=2)
    with pytest.warns(UserWarning, match="IndexError: ids for table 'a'"), pytest.raises(RuntimeError, match="step failed"):
        with TrainPipeline(_failing_step, embeddings=emb) as pipe:
            pipe.run([_batch(1, 2), _batch(11)])
    assert pipe._pool._shutdown
    seen = []
    with TrainPipeline(lambda f, d, g: seen.append(g)) as pipe:  # a clean run: nothing pending, nothing raised
        pipe.run([_batch(1, 2), _batch(3)])
    assert seen == [2, 1]


def test_pipeline_run_again_after_a_failed_run_reports_the_staged_failure():
    """The batch a failed run() left staged is waited for before the next run() stages another."""
    emb = ShardedEmbeddings({"a": 10}, dim=2)
    pipe = TrainPipeline(_failing_step, embeddings=emb)
    with pytest.raises(RuntimeError, match="step failed"):
        pipe.run([_batch(1), _batch(11)])
    with pytest.raises(RuntimeError, match="staged before the previous run"):
        pipe.run([_batch(1)])
    pipe.close()


def test_balancer_close_waits_and_refuses_background_work():
    with BatchBalancer() as balancer:
        future = balancer.plan_async(KeyedJagged.from_dict({"a": [[1], [2, 3]]}))
    assert balancer._pool._shutdown and future.done() and future.result().global_batch == 2
    balancer.close()  # idempotent
    with pytest.raises(RuntimeError, match=r"BatchBalancer.plan_async: the balancer is closed"):
        balancer.plan_async(torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=r"BatchBalancer.balance_async: the balancer is closed"):
        balancer.balance_async(*_batch(1))
    features, _, plan = balancer.balance(*_batch(1, 2))  # the foreground still works
    assert plan.global_batch == 2 and features.batch_size == 2


def test_balancer_names_arguments_of_the_wrong_kind():
    """A Future from plan_async, cost lengths instead of features, or a dense tensor instead of a
    dict ended in AttributeErrors deep inside the exchange."""
    balancer = BatchBalancer(background=False)
    features, _ = _batch(1, 2)
    with pytest.raises(TypeError, match=r"plan must be a BalancePlan, got Future: plan_async\(\) returns a Future"):
        balancer.exchange(balancer.plan_async(features), features)
    with pytest.raises(TypeError, match="BatchBalancer.balance: features must be a KeyedJagged, got Tensor"):
        balancer.balance(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="BatchBalancer.exchange: dense must be a dict of tensors"):
        balancer.exchange(balancer.plan(features), features, torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"BatchBalancer.balance_async: dense must hold tensors of one row per sample, "
                                        r"got \{'y': 'list'\}"):
        balancer.balance_async(features, {"y": [1, 2]})
    two = KeyedJagged.from_dict({"a": [[1], [2]], "b": [[1], [2]]})
    three = KeyedJagged.from_dict({"a": [[1], [2]], "b": [[1], [2]], "c": [[3], [4]]})
    with pytest.raises(ValueError, match="the features have 3 keys, the plan was made from features with 2"):
        balancer.exchange(balancer.plan(two), three)  # a broadcasting RuntimeError before
    with pytest.raises(TypeError, match=r"BatchBalancer.plan: lengths_or_features must be a KeyedJagged or cost "
                                        r"lengths \(1-D integer counts, one per sample\), got str"):
        balancer.plan("12")  # torch's "new(): invalid data type 'str'" before
    plan = balancer.plan(features)
    plan.world_size = 2  # a plan of another group
    with pytest.raises(ValueError, match="the plan was made for rank 0 of 2, this balancer is rank 0 of 1"):
        balancer.exchange(plan, features)


def test_pipeline_names_arguments_of_the_wrong_kind():
    """A batch that is not a (features, dense) pair failed with 'too many values to unpack'."""
    with pytest.raises(TypeError, match=r"each batch must be a \(KeyedJagged, dict of dense tensors\) pair, got a KeyedJagged"):
        TrainPipeline(lambda f, d, g: None).run([_batch(1)[0]])
    with pytest.raises(TypeError, match=r"got a tuple of \(Tensor, dict\)"):
        TrainPipeline(lambda f, d, g: None).run([(torch.tensor([1]), {})])
    with pytest.raises(TypeError, match=r"got a tuple of \(KeyedJagged, dict with values that are not tensors "
                                        r"\{'y': 'list'\}\)"):
        TrainPipeline(lambda f, d, g: None).run([(_batch(1)[0], {"y": [1]})])  # "'list' object has no attribute 'to'" before
    # a None batch (a collate_fn's skip, say) ended the run there, silently, on that rank alone
    trained = []
    with pytest.raises(TypeError, match=r"each batch must be a \(KeyedJagged, dict of dense tensors\) pair, got a NoneType"):
        TrainPipeline(lambda f, d, g: trained.append(g)).run([_batch(1, 2), None, _batch(3)])
    assert trained == [2]
    with pytest.raises(TypeError, match="step_fn must be callable"):
        TrainPipeline(None)
    with pytest.raises(TypeError, match="balancer must be a BatchBalancer or None, got str"):
        TrainPipeline(lambda f, d, g: None, balancer="kk")
    with pytest.raises(TypeError, match="meter must be a BubbleMeter or None"):
        TrainPipeline(lambda f, d, g: None, meter=BubbleMeter)
    with pytest.raises(TypeError, match=r"embeddings must be a ShardedEmbeddings or a sequence of them"):
        TrainPipeline(lambda f, d, g: None, embeddings=[object()])
