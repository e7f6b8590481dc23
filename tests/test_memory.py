"""The run's peak memory counts the processes it starts (Ray's workers, shard actors) at once."""

import subprocess
import sys
import time

import numpy as np
import pytest

from fl_sim.memory import PeakMemory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_sums_this_process_and_a_child_holding_memory_at_the_same_time():
    child = "import numpy as np, time; a = np.ones(300 * 2**20 // 8); print('ready', flush=True); time.sleep(3)"
    mine = np.ones(200 * 2**20 // 8)  # 200 MB written here while the child holds 300 MB
    with PeakMemory(every_s=0.1) as memory:
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        proc.wait()
    assert mine.sum() == len(mine)
    # Neither process's own peak reaches 500 MB: only samples of both at once do.
    assert memory.result_mb() >= 500
