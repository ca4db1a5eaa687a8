"""Entry point of a spawned tensor-parallel rank: `python -m pangu_infer.parallel.worker FD`.

FD is this process's end of a socket pair with rank 0 (see launch.py).
"""

import sys
from multiprocessing.connection import Connection

from pangu_infer.parallel.launch import run_spawned_worker

if __name__ == "__main__":
    run_spawned_worker(Connection(int(sys.argv[1])))
