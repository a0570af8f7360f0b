"""`corral train` that SIGKILLs itself at a chosen moment, for tests/test_crash.py.

    python tests/kill_child.py POINT STEP train key=value ...

POINT: `tokenise` (after the train split is written to the dataset cache's temporary folder,
before its stats), `save` (after checkpoint-STEP's model and optimizer are written, before its
trainer state), `step` (inside step STEP: after its forward pass, before the optimizer step),
`final` (after training, as the final outputs are written), `plot` (as the loss plot is drawn,
after the model and state are saved), or `none` (run to the end). SIGKILL, as a scheduler or
the OOM killer sends it: no handler, no cleanup, no flushing runs.
"""

from __future__ import annotations

import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_at(point: str, step: int) -> None:
    if point == "tokenise":
        import datasets

        save = datasets.Dataset.save_to_disk

        def save_then_die(self, path, *args, **kwargs):
            save(self, path, *args, **kwargs)
            _die()

        datasets.Dataset.save_to_disk = save_then_die
    elif point == "save":
        from transformers import Trainer

        save = Trainer._save_optimizer_and_scheduler

        def save_then_die(self, output_dir):
            save(self, output_dir)
            if self.state.global_step == step:
                _die()

        Trainer._save_optimizer_and_scheduler = save_then_die
    elif point == "step":
        from corral.train.trainer import CorralTrainer

        compute = CorralTrainer.compute_loss

        def compute_then_die(self, *args, **kwargs):
            loss = compute(self, *args, **kwargs)
            if self.model.training and self.state.global_step + 1 == step:
                _die()
            return loss

        CorralTrainer.compute_loss = compute_then_die
    elif point == "final":
        import corral.train.workflow as workflow

        def die_instead(*args, **kwargs):
            _die()

        workflow.save_final = die_instead
    elif point == "plot":
        import corral.train.workflow as workflow

        def die_plotting(*args, **kwargs):
            _die()

        workflow.plot_loss = die_plotting
    elif point != "none":
        raise SystemExit(f"unknown kill point {point}")


if __name__ == "__main__":
    _kill_at(sys.argv[1], int(sys.argv[2]))
    from corral.cli import main

    raise SystemExit(main(sys.argv[3:]))
