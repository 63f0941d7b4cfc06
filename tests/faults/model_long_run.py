"""A long run of the interleaving model, outside pytest (no output capture to slow it).

    .venv/bin/python -m tests.faults.model_long_run 5000

Runs tests/faults/test_state_machine.py's model, every rule of it (resize,
drain, failover, hooks, reset_session, recovery, cancellation through scopes
and with task.cancel(), stale releases, on_before_exit), for that many
examples on the virtual clock, with the pool's logging off, and prints how many
machines ran. Each example draws its own pool configuration.
"""

from __future__ import annotations

import logging
import sys
import time

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from pool import _acquiring, _breaker, _closing, _diagnosis, _ledger, _state
from tests.faults import test_state_machine as model


def main(examples: int) -> None:
    logging.getLogger("pool").setLevel(logging.CRITICAL)  # leak reports by the thousand
    for module in (_acquiring, _breaker, _closing, _diagnosis, _state, _ledger):
        module.time = model.CLOCK  # type: ignore[attr-defined]
    machines = 0
    init = model.PoolMachine.__init__

    def counted(self: model.PoolMachine) -> None:
        nonlocal machines
        machines += 1
        init(self)

    model.PoolMachine.__init__ = counted  # type: ignore[method-assign]
    started = time.monotonic()
    run_state_machine_as_test(
        model.PoolMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=model.STEPS,
            deadline=None,
            database=None,
            report_multiple_bugs=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    print(
        f"{examples} examples ({machines} machines run, up to {model.STEPS} steps each) "
        f"in {time.monotonic() - started:.0f} s: no invariant violated"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5_000)
