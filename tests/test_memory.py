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


_HEAP_AFTER_FREE = """
import sys
import numpy as np
from fl_sim.memory import steady_heap
def heap_mb():  # the heap can be listed as several adjacent mappings
    total = 0
    for line in open('/proc/self/maps'):
        if line.rstrip().endswith('[heap]'):
            lo, hi = (int(x, 16) for x in line.split()[0].split('-'))
            total += hi - lo
    return total / 2**20
if sys.argv[1] == 'set':
    assert steady_heap()
a = np.ones(20 * 2**20 // 8)  # a 20 MB block, the size of a scoring pass's attention mask
del a
print(heap_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_steady_heap_keeps_a_pass_sized_block_in_the_heap_after_it_is_freed():
    def heap_after(mode):
        out = subprocess.run([sys.executable, "-c", _HEAP_AFTER_FREE, mode],
                             capture_output=True, text=True, check=True)
        return float(out.stdout)
    # glibc's default: the block is a fresh mmap, returned on free, so the heap never holds it
    assert heap_after("default") < 20
    # steady: taken from the heap and kept there for the next pass
    assert heap_after("set") >= 20
