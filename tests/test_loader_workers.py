"""DataLoader workers die with the process that started them: a run killed by SIGKILL (an
out-of-memory kill) leaves no orphaned workers, even workers busy inside a slow item."""
import os
import signal
import subprocess
import sys

from _tiny_runs import ROOT, alive, env, wait_until

# Two workers each return their pid for one item and then hang inside the next item, where
# torch's own watchdog (which checks the parent between items) never looks.
PARENT = """
import os, sys, time
from torch.utils.data import Dataset
from unidd_fast.pipeline.datasets import data_loader

class Hanging(Dataset):
    def __len__(self):
        return 100

    def __getitem__(self, i):
        if i < 2:
            return os.getpid()
        time.sleep(3600)

batches = iter(data_loader(Hanging(), 2, batch_size=1))
print(int(next(batches)), int(next(batches)), flush=True)
sys.stdin.read()
"""


def test_sigkill_of_the_parent_kills_its_busy_loader_workers():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=env(), cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    workers = []
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]  # waits for both workers' items
        assert len(workers) == 2 and parent.pid not in workers and all(alive(pid) for pid in workers)
        parent.kill()
        parent.wait()
        wait_until(lambda: not any(alive(pid) for pid in workers), "the killed parent's workers to die", 60)
    finally:
        parent.kill()
        parent.wait()
        for pid in filter(alive, workers):  # orphans of a failed run: do not leave them hanging
            os.kill(pid, signal.SIGKILL)
