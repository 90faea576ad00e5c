import os
import subprocess
import sys

import pytest
from conftest import ROOT

# a training step's pattern: several blocks of 16 MB allocated, then all freed; how many pages the third round
# faults in again (zero-filled by the kernel)
THIRD_ROUND_FAULTS = '''
import resource
import numpy as np
from cifar_fa.system import keep_freed_memory
print(keep_freed_memory())
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [np.ones(4_000_000, np.float32) for _ in range(6)]
    del blocks
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="glibc's mallopt")
@pytest.mark.parametrize('env,applied', [('1', True), ('0', False)])
def test_freed_memory_is_reused_not_faulted_in_again(env, applied):
    r = subprocess.run([sys.executable, '-c', THIRD_ROUND_FAULTS], capture_output=True, text=True, check=True,
                       env={**os.environ, 'PYTHONPATH': str(ROOT), 'CIFAR_FA_KEEP_FREED': env})
    said, faults = r.stdout.split()
    assert said == str(applied)
    # 96 MB: 23,000 faults of 4 kB pages, or 48 of huge pages where the kernel gives them
    assert int(faults) < 20 if applied else int(faults) > 40
