"""Following a job (training or bulk embedding) in the terminal: an overall bar and one bar per
stage, fed by the job's events; Ctrl-C asks whether to cancel the job or leave it running."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.prompt import Confirm
from rich.text import Text

from tailor_client.errors import ConflictError
from tailor_client.resources import Runs
from tailor_client.types import JobEvent

DONE_WORDS = ("finished", "skipped")


class StageBars:
    """Bars for the whole job and for each stage as it starts (stages are learnt from the
    events, so a server with another pipeline needs no change here)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.overall = progress.add_task("job", total=1.0, message="")
        self.stages: dict[str, TaskID] = {}

    def _stage(self, stage: str) -> TaskID:
        if stage not in self.stages:
            self.stages[stage] = self.progress.add_task(f"  {stage}", total=1.0, message="")
        return self.stages[stage]

    def job(self, job: Any) -> None:
        self.progress.update(self.overall, completed=job["progress"], message=job["status"])

    def event(self, event: JobEvent) -> None:
        stage, kind, message = event.get("stage"), event["kind"], event["message"]
        if kind == "warning":
            self.progress.console.print(f"[yellow]warning[/]: {message}")
        if not stage:
            return
        task = self._stage(stage)
        if kind == "progress":
            fraction = (event.get("data") or {}).get("stage_fraction")
            self.progress.update(task, completed=fraction, message=message)
        elif kind == "stage" and message.startswith(f"{stage} started"):
            self.progress.update(task, message="started")
        elif kind == "stage" and any(w in message for w in DONE_WORDS):
            seconds = (event.get("data") or {}).get("seconds")
            note = f"done in {seconds:.1f} s" if isinstance(seconds, int | float) else "done"
            self.progress.update(task, completed=1.0, message=note)
        elif kind == "status" and (event.get("data") or {}).get("status") in ("failed",
                                                                                 "cancelled"):
            self.progress.update(task, message=f"[red]{message}[/]")
        elif kind == "status" and (event.get("data") or {}).get("status") == "succeeded":
            # A job with one stage (bulk embedding) ends that stage with its status event.
            seconds = (event.get("data") or {}).get("seconds")
            note = f"done in {seconds:.1f} s" if isinstance(seconds, int | float) else "done"
            self.progress.update(task, completed=1.0, message=note)


class RunningTime(TimeElapsedColumn):
    """Time since a bar started, while it runs; a finished stage says how long it took in its
    message instead (a stage that finished before we started following has no start here)."""

    def render(self, task: Task) -> Text:
        return Text("") if task.finished else super().render(task)


def new_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        TaskProgressColumn(),
        RunningTime(),
        TextColumn("{task.fields[message]}", markup=True),
        console=console,
        # Without a terminal (CI logs, pipes) rich prints the final bars once.
        transient=False,
    )


def follow(runs: Runs[Any], job_id: str, console: Console,
           poll_interval: float = 1.0) -> Any:
    """Show the job's progress until it finishes; returns the finished job."""
    with new_progress(console) as progress:
        bars = StageBars(progress)
        job: Any = None
        for job, events in runs.watch(job_id, poll_interval=poll_interval):
            bars.job(job)
            for event in events:
                bars.event(event)
    assert job is not None
    return job


def follow_or_cancel(runs: Runs[Any], job_id: str, console: Console,
                     poll_interval: float = 1.0, noun: str = "job") -> Any | None:
    """`follow`, where Ctrl-C asks whether to cancel the job: yes cancels it and follows it
    to the end, no leaves it running and returns None."""
    try:
        return follow(runs, job_id, console, poll_interval)
    except KeyboardInterrupt:
        pass
    console.print()
    try:
        cancel = Confirm.ask(f"Cancel {noun} {job_id}?", default=False, console=console)
    except (EOFError, KeyboardInterrupt):
        cancel = False
    if not cancel:
        group = runs.path.rsplit("/", 1)[-1]  # "jobs", "embedding-jobs": the command's group
        console.print(f"{noun} {job_id} keeps running; follow it again with "
                      f"`tailor-client {group} wait {job_id}`")
        return None
    try:
        runs.cancel(job_id)
        console.print(f"cancelling {noun} {job_id} ...")
    except ConflictError as exc:  # it finished meanwhile: show how
        console.print(f"not cancelled: {exc.detail}")
    return follow(runs, job_id, console, poll_interval)
