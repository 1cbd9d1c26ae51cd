"""wuneng.runtime.tune_cpu_allocator: freed memory stays in the process (glibc), measured in page faults.

Run in a child process: the setting is process-wide and the measurement needs a fresh allocator.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from wuneng.runtime import _glibc

CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from wuneng import runtime

    def step():
        # a training step in miniature: activations pile up (40 x 6 MiB, the size of one [8, 512, 384]
        # float32 tensor), then all are freed after the backward
        held = [torch.empty(3 << 19).fill_(1.0) for _ in range(40)]
        del held

    def faults_per_round(rounds=3, warmup=3):
        for _ in range(warmup):
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(rounds):
            step()
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds

    default = faults_per_round()
    applied = runtime.tune_cpu_allocator()
    again = runtime.tune_cpu_allocator()
    tuned = faults_per_round()
    print(json.dumps(dict(default=default, applied=applied, again=again, tuned=tuned,
                          reported=runtime.cpu_allocator_tuned())))
    """
)


@pytest.mark.skipif(_glibc() is None, reason="tune_cpu_allocator acts on glibc only")
def test_tuned_allocator_stops_refaulting_freed_memory():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=120)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["applied"] and res["again"] and res["reported"]
    # glibc's default may trim the top of the freed heap, so that part of it is faulted in again every
    # round (0 or 512 pages per round on the development machine, by the heap's layout at start-up);
    # kept, no page is faulted in again
    assert res["tuned"] == 0, res


def test_train_config_has_the_switch():
    from wuneng.train.config import TrainConfig, config_from_dict

    assert TrainConfig().tune_cpu_allocator is True
    assert config_from_dict({"tune_cpu_allocator": False}).tune_cpu_allocator is False
