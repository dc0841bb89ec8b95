"""Admission by device slots: a pure function of the queue, the running jobs' devices and the host's devices."""
from __future__ import annotations

from finetune.jobs.scheduler import Admission, admit

TWO_GPUS = ["0", "1"]


def test_two_one_gpu_jobs_run_side_by_side_and_a_two_gpu_job_waits():
    queue = [("a", 1), ("b", 1), ("c", 2)]
    assert admit(queue, [], TWO_GPUS) == [Admission("a", ("0",)), Admission("b", ("1",))]
    # a and b hold both GPUs: c waits, also when one of them has finished
    assert admit([("c", 2)], [("0",), ("1",)], TWO_GPUS) == []
    assert admit([("c", 2)], [("1",)], TWO_GPUS) == []
    assert admit([("c", 2)], [], TWO_GPUS) == [Admission("c", ("0", "1"))]


def test_the_free_gpu_is_the_one_given():
    assert admit([("b", 1)], [("0",)], TWO_GPUS) == [Admission("b", ("1",))]
    assert admit([("b", 1)], [("1",)], ["0", "1", "2"]) == [Admission("b", ("0",))]
    assert admit([("x", 1), ("y", 1)], [("1",)], ["0", "1", "2"]) == [Admission("x", ("0",)), Admission("y", ("2",))]


def test_submission_order_holds_so_a_large_job_is_not_starved():
    # one GPU is free; the 2-GPU job at the head waits, and the 1-GPU job behind it does not overtake it
    assert admit([("big", 2), ("small", 1)], [("0",)], TWO_GPUS) == []


def test_cpu_host_runs_one_job_at_a_time():
    assert admit([("a", 1), ("b", 0)], [], []) == [Admission("a", ())]
    assert admit([("b", 0)], [()], []) == []
    assert admit([("a", 1), ("b", 1), ("c", 1)], [()], [], cpu_slots=2) == [Admission("a", ())]


def test_cpu_only_job_on_a_gpu_host_takes_a_cpu_slot_not_a_gpu():
    assert admit([("export", 0), ("train", 1)], [], TWO_GPUS) == [Admission("export", ()), Admission("train", ("0",))]
    assert admit([("export2", 0)], [()], TWO_GPUS) == []


def test_max_jobs_caps_a_gpu_host():
    assert admit([("a", 1), ("b", 1)], [], TWO_GPUS, max_jobs=1) == [Admission("a", ("0",))]
    assert admit([("b", 1)], [("0",)], TWO_GPUS, max_jobs=1) == []


def test_a_job_needing_more_gpus_than_the_host_has_waits_at_the_head():
    assert admit([("huge", 4), ("a", 1)], [], TWO_GPUS) == []
