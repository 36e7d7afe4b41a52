"""Async scheduling: the forward and sampling of a step run on a device thread while the engine
thread applies the previous step's tokens and schedules the next one.

A step is launched as `prepare` (inputs copied out of the sequences, on the engine thread) then
`execute` + sample (on the device thread, or inline when async scheduling is off). While step N
runs, `Scheduler.schedule_ahead` may choose step N+1 before N's tokens are known; N+1 is
launched right away and finds those tokens in N's result on the device thread, which runs
steps in order. Outputs are the synchronous ones: draws are keyed by (seed, position), a step is
only scheduled ahead when nothing in it depends on the tokens still in flight, and a token
computed for a sequence that has meanwhile finished is dropped.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from zayaserve.replicas.engine.runner import ModelRunner, PreparedStep
from zayaserve.replicas.engine.scheduler import SampledStep, Scheduler, SchedulerOutput
from zayaserve.replicas.engine.step_sampling import (
    LogitsPlan,
    PreparedSampling,
    StepSampler,
    decode_plan,
)


@dataclass(slots=True)
class InFlight:
    """A launched step: what was scheduled, and its sampled tokens to come."""

    sched: SchedulerOutput
    result: Future[SampledStep]

    @property
    def request_ids(self) -> set[str]:
        return {c.seq.request.request_id for c in self.sched.chunks}


class StepPipeline:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner, sampler: StepSampler,
                 async_scheduling: bool) -> None:
        self.scheduler, self.runner, self.sampler = scheduler, runner, sampler
        self._device = ThreadPoolExecutor(1, "zayaserve-device") if async_scheduling else None
        self.ahead: InFlight | None = None  # a step launched before its predecessor ended
        self.steps_ahead = 0  # how many steps were scheduled ahead (stats, tests)

    def launch(self, sched: SchedulerOutput, plan: LogitsPlan,
               prev: InFlight | None = None) -> InFlight:
        step = self.runner.prepare(sched)
        sampling = self.sampler.prepare(plan)
        if self._device is None:
            done: Future[SampledStep] = Future()
            try:
                done.set_result(self._execute(step, sampling, None))
            except BaseException as err:
                done.set_exception(err)
            return InFlight(sched, done)
        return InFlight(sched, self._device.submit(
            self._execute, step, sampling, prev.result if prev is not None else None))

    def launch_ahead(self, current: InFlight) -> None:
        """Schedules and launches the step after `current` when it can go before its tokens."""
        if self._device is None or self.ahead is not None:
            return
        sched = self.scheduler.schedule_ahead(current.sched)
        if sched is not None:
            self.ahead = self.launch(sched, decode_plan(sched), current)
            self.steps_ahead += 1

    def take_ahead(self) -> InFlight | None:
        ahead, self.ahead = self.ahead, None
        return ahead

    def drain(self) -> None:
        """Waits out a step launched ahead (after a failure), ignoring its result."""
        ahead = self.take_ahead()
        if ahead is not None:
            with contextlib.suppress(BaseException):  # the failure raised is its predecessor's
                ahead.result.result()

    def _execute(self, step: PreparedStep, sampling: PreparedSampling,
                 prev: Future[SampledStep] | None) -> SampledStep:
        fill = None
        if prev is not None:  # done: the device thread runs steps in order
            fill = {seq.seq_id: tok.token_id for seq, child, _, tok in prev.result().tokens
                    if child < 0}
        logits = self.runner.execute(step, sampling.plan.rows, fill)
        return self.sampler.run(sampling, logits)
