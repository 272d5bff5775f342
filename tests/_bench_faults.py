"""scripts/bench_uci.py with one fault injected by monkeypatching (for tests only).

``python tests/_bench_faults.py FAULT [bench_uci options]`` runs bench_uci's batch with its child
runs started through this file too, so that the fault happens where a real one did:

* ``die-after-epoch-1``: the run's process is killed once its first epoch is checkpointed (as a
  session's end kills it);
* ``crash-in-predict``: the child segfaults after training and the common evaluator, in the
  method's own prediction (GPyTorch's KeOps/LOVE prediction on kin40k);
* ``kill-all-in-predict``: the batch and its child are killed together at that point.
"""

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import _benchutil as bu  # noqa: E402
import bench_uci  # noqa: E402
import gpytorch_baseline  # noqa: E402

from gpadjoint import cli  # noqa: E402

FAULTS = ("die-after-epoch-1", "crash-in-predict", "kill-all-in-predict")


def inject(fault: str) -> None:
    """Monkeypatch bench_uci's pieces so that ``fault`` happens in each child run."""
    if fault == "die-after-epoch-1":
        fit = cli.main

        def one_epoch_then_die(argv):
            if "--resume" in argv:
                return fit(argv)
            i = argv.index("--epochs")
            fit(argv[: i + 1] + ["1"] + argv[i + 2:])
            os.kill(os.getpid(), signal.SIGKILL)

        cli.main = one_epoch_then_die
        epoch, calls = gpytorch_baseline.gpytorch_epoch, []

        def die_at_second_epoch(*args):
            calls.append(1)  # a fresh run: epoch 1 is checkpointed before the second call
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return epoch(*args)

        gpytorch_baseline.gpytorch_epoch = die_at_second_epoch
        return
    save = bu.save_progress

    def save_then_fail(spec, res):
        save(spec, res)
        if res.get("stage") == "predict":
            if fault == "kill-all-in-predict":
                os.kill(os.getppid(), signal.SIGKILL)
                os.kill(os.getpid(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGSEGV)

    bu.save_progress = save_then_fail


if __name__ == "__main__":
    if "--child" in sys.argv:  # a child run: the fault is in its spec
        import json

        spec = json.loads(sys.argv[sys.argv.index("--child") + 1])
        inject(spec.pop("fault"))
        sys.argv[sys.argv.index("--child") + 1] = json.dumps(spec)
        sys.exit(bench_uci.main(sys.argv[1:]))
    fault = sys.argv[1]
    assert fault in FAULTS, fault
    bench_uci.CHILD_SCRIPT = Path(__file__)
    run_child = bu.run_child
    bu.run_child = lambda script, spec, timeout, env=None: run_child(
        script, spec | {"fault": fault}, timeout, env)
    sys.exit(bench_uci.main(sys.argv[2:]))
