"""`scripts/pretrain.py` as a child process whose exit status is kept, for the tests.

Under `accelerate launch` of several processes the launcher (torchrun) reports the signal it got and
not how its processes ended. This wrapper runs the script with the same arguments, environment and
streams, writes the script's exit status to `$EXIT_STATUS_DIR/status-RANK`, and exits with it.
Usage: `accelerate launch --multi_gpu --num_processes 2 tests/exit_status.py PRETRAIN_ARGS...`.

The launcher signals each process's group, this wrapper included: it leaves the stop signals to the
script and waits for it.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

from dino_hf.data.loader import STOP_SIGNALS

if __name__ == "__main__":
    script = Path(__file__).resolve().parent.parent / "scripts" / "pretrain.py"
    child = subprocess.Popen([sys.executable, str(script), *sys.argv[1:]])
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    status = child.wait()
    folder = Path(os.environ["EXIT_STATUS_DIR"])
    (folder / f"status-{os.environ.get('RANK', '0')}").write_text(str(status))
    sys.exit(status if status >= 0 else 128 - status)
