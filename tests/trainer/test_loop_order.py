"""The order of updates, evaluations, checkpoints and stops in ``Trainer.run`` (a stand-in trainer
whose steps only record what ran): a checkpoint is written before any evaluation it coincides
with (the final one included), so a crash or the time limit during a long evaluation loses no
update, and a stop asked during an evaluation saves and stops right after it."""

from __future__ import annotations

import types

import pytest

from megatron_eaopd.trainer.loop import Trainer


class _Stop:
    """should_stop() answers from a list (then False); counts the calls."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), 0

    def should_stop(self):
        self.calls += 1
        return self.answers.pop(0) if self.answers else False


def _trainer(total, eval_interval, checkpoint_interval, stop=(), start=0, pending=False,
             logged=()):  # fmt: skip
    t = Trainer.__new__(Trainer)
    t.cfg = types.SimpleNamespace(
        training=types.SimpleNamespace(eval_at_start=False, eval_interval=eval_interval,
                                       checkpoint_interval=checkpoint_interval, export_hf=None,
                                       output_dir="unused"),
        logging=types.SimpleNamespace(log_interval=1),
        eval=types.SimpleNamespace(plot=False),
    )  # fmt: skip
    t.total, t.start_iteration, t.eval_pending = total, start, pending
    t.prep_stopped = None
    t.preemption = _Stop(stop)
    t.rank0 = True
    t.student = types.SimpleNamespace(skipped_updates=0)
    t.events = []
    t.metrics_logger = types.SimpleNamespace(log=lambda *a: None)
    t.train_iteration = lambda i: t.events.append(("train", i)) or {}
    t.run_eval = lambda i: t.events.append(("eval", i)) or {}
    t.save = lambda i, eval_pending=False: t.events.append(("save", i, eval_pending))
    t._requeue = lambda: t.events.append(("requeue",))
    t._evaluated = lambda i: i in logged
    t._mark_evaluated = lambda i: t.events.append(("marked", i))
    return t


def test_the_final_checkpoint_comes_before_the_final_evaluation():
    t = _trainer(total=3, eval_interval=0, checkpoint_interval=0)
    t.run()
    assert t.events == [("train", 1), ("train", 2), ("train", 3), ("save", 3, True), ("eval", 3),
                        ("marked", 3)]  # fmt: skip


def test_coinciding_evaluations_and_checkpoints_save_first():
    t = _trainer(total=4, eval_interval=2, checkpoint_interval=4)
    t.run()
    assert t.events == [("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4),
                        ("save", 4, True), ("eval", 4), ("marked", 4)]  # fmt: skip
    t = _trainer(total=4, eval_interval=0, checkpoint_interval=1)
    t.run()
    assert [e for e in t.events if e[0] == "save"] == [("save", i, i == 4) for i in range(1, 5)]


@pytest.mark.parametrize("save_every", [2, 0])
def test_a_stop_asked_during_an_evaluation_saves_and_stops_after_it(save_every):
    # polls: it 1 (before), it 2 (before the evaluation), it 2 (after it): True
    t = _trainer(total=4, eval_interval=2, checkpoint_interval=save_every,
                 stop=[False, False, True])  # fmt: skip
    out = t.run()
    assert out["stopped_early"] and out["iteration"] == 2
    assert out["eval_iteration"] == 2  # the summary says which evaluation "eval" is
    saves = [("save", 2, True)] if save_every else []  # saved before it, pending (logged after)
    after = [("marked", 2)] if save_every else [("save", 2, False), ("marked", 2)]
    assert t.events == [("train", 1), ("train", 2), *saves, ("eval", 2), *after, ("requeue",)]


def test_a_stop_before_a_due_evaluation_saves_it_as_pending():
    t = _trainer(total=4, eval_interval=2, checkpoint_interval=0, stop=[False, True])
    out = t.run()
    assert t.events == [("train", 1), ("train", 2), ("save", 2, True), ("requeue",)]
    assert out["eval_iteration"] is None  # none ran in this launch (the done line says so)


def test_a_stop_after_the_last_iteration_is_not_a_stop():
    t = _trainer(total=2, eval_interval=0, checkpoint_interval=0, stop=[True] * 5)
    t.preemption.answers = [False]  # iteration 1 goes on; the last iteration never asks
    out = t.run()
    assert not out["stopped_early"]
    assert t.events[-3:] == [("save", 2, True), ("eval", 2), ("marked", 2)]


@pytest.mark.parametrize("logged", [(), (4,)])
def test_a_resumed_pending_evaluation_runs_once(logged):
    """Resumed from the checkpoint written before the final evaluation: the evaluation runs
    (and is marked) unless the checkpoint is marked evaluated (it finished before the crash)."""
    t = _trainer(total=4, eval_interval=0, checkpoint_interval=0, start=4, pending=True,
                 logged=logged)  # fmt: skip
    t.run()
    assert t.events == ([] if logged else [("eval", 4), ("marked", 4)])


@pytest.mark.parametrize("logged", [(), (3,)])
def test_a_run_shortened_to_where_it_was_saved_evaluates_at_its_end(logged):
    """Stopped after iteration 3 (no evaluation due then), relaunched with a length of 3: the
    loop had nothing to run and the end-of-run evaluation never happened ('no evaluation in
    this launch', no eval record). It runs now, once: a finished run's final save is marked."""
    t = _trainer(total=3, eval_interval=0, checkpoint_interval=1, start=3, pending=False,
                 logged=logged)  # fmt: skip
    out = t.run()
    assert t.events == ([] if logged else [("eval", 3), ("marked", 3)])
    assert out["eval_iteration"] == (None if logged else 3)
    t = _trainer(total=5, eval_interval=0, checkpoint_interval=1, start=3)  # not at its end
    t.run()
    assert ("eval", 3) not in t.events
