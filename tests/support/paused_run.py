"""Run an `exforge` command whose training run stops, blocked, right after one step.

    python tests/support/paused_run.py STEP exforge-arguments...

Each progress event prints `{"step": …, "loss": …}` on stdout; after step STEP's, the
process prints `paused` and blocks on stdin, so the test can SIGKILL it exactly there:
whatever the run would have done after that step (flushes, checkpoints, registration)
never happens. The recipe itself knows nothing of this: the sink is added from outside.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from schemas.records import TrainingEvent
from workers.trainer import recipe


class PauseAfter:
    def __init__(self, step: int) -> None:
        self.step = step

    def emit(self, event: TrainingEvent) -> None:
        if event.event != "progress":
            return
        print(json.dumps({"step": event.step, "loss": event.metrics["loss"]}), flush=True)
        if event.step == self.step:
            print("paused", flush=True)
            sys.stdin.read()  # until the test kills this process

    def flush(self) -> None:
        return None


def main() -> None:
    step, arguments = int(sys.argv[1]), sys.argv[2:]
    setup = recipe.Recipe.__init__

    def with_pause(self: recipe.Recipe, *args: Any, **kwargs: Any) -> None:
        setup(self, *args, **kwargs)
        self.sinks.append(PauseAfter(step))

    recipe.Recipe.__init__ = with_pause  # type: ignore[method-assign]
    from exforge.cli import main as cli

    sys.argv = ["exforge", *arguments]
    cli()


if __name__ == "__main__":
    main()
