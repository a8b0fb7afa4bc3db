"""`atelier jobs list|get|cancel|watch` and the live progress view `train` shares."""

from __future__ import annotations

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from atelier.cli.context import options
from atelier.cli.output import console, emit, handle_errors, print_json_line, to_dict
from atelier.client import JobHandle
from atelier_api.v1 import common_pb2, training_pb2

app = typer.Typer(no_args_is_help=True, help="Training jobs.")


def state_name(state: int) -> str:
    return training_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]


def method_name(kind: int) -> str:
    return common_pb2.AdapterKind.Name(kind).removeprefix("ADAPTER_KIND_")  # type: ignore[arg-type]


def job_row(job: training_pb2.TrainingJob) -> list[object]:
    output = f"{job.output.name}@{job.output.version}" if job.output.name else ""
    return [job.id, method_name(job.spec.method), state_name(job.state), f"{job.step}/{job.total_steps}",
            f"{job.loss:.4f}", output, job.error]


JOB_COLUMNS = ["id", "method", "state", "step", "loss", "adapter", "error"]


def follow(handle: JobHandle, json_mode: bool) -> training_pb2.TrainingJob:
    """Show Watch events as a progress bar (or JSON Lines, one event per line) until the job ends."""
    if json_mode:
        for event in handle.watch():
            print_json_line(to_dict(event))
        return handle.job
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
               TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"job {handle.id}", total=handle.job.total_steps or None, loss=0.0)
        for event in handle.watch():
            progress.update(task, completed=event.job.step, total=event.job.total_steps or None,
                            loss=event.loss or event.job.loss,
                            description=f"job {handle.id} {state_name(event.job.state)}")
    job = handle.job
    if job.output.name:
        console.print(f"published [bold]{job.output.name}@{job.output.version}[/bold]")
    elif job.error:
        console.print(f"[red]{state_name(job.state)}[/red]: {job.error}")
    return job


def follow_or_detach(handle: JobHandle, json_mode: bool) -> None:
    """Ctrl-C asks whether to cancel the job or only stop watching it."""
    try:
        job = follow(handle, json_mode)
    except KeyboardInterrupt:
        if typer.confirm(f"\ncancel job {handle.id}? (no = detach, the job keeps running)", default=False):
            handle.cancel()
            console.print(f"job {handle.id} cancelled")
        else:
            console.print(f"detached; follow again with: atelier jobs watch {handle.id}")
        raise typer.Exit(130) from None
    if job.state != training_pb2.JOB_STATE_SUCCEEDED:
        raise typer.Exit(1)


@app.command("list")
@handle_errors
def list_jobs(ctx: typer.Context, state: str = typer.Option("", help="QUEUED, RUNNING, SUCCEEDED, ..."),
              limit: int = typer.Option(50, help="Most jobs to show.")) -> None:
    """List jobs, newest first."""
    opts = options(ctx)
    state_value = training_pb2.JobState.Value(f"JOB_STATE_{state.upper()}") if state else 0
    with opts.client() as client:
        jobs = []
        for job in client.jobs.list(state=state_value):
            jobs.append(job)
            if len(jobs) >= limit:
                break
    emit(opts.json, jobs, "training jobs", JOB_COLUMNS, job_row)


@app.command("get")
@handle_errors
def get_job(ctx: typer.Context, job_id: str) -> None:
    """Show one job."""
    opts = options(ctx)
    with opts.client() as client:
        emit(opts.json, [client.jobs.get(job_id).job], "training job", JOB_COLUMNS, job_row)


@app.command("cancel")
@handle_errors
def cancel_job(ctx: typer.Context, job_id: str) -> None:
    """Cancel a queued or running job; a running job publishes nothing."""
    opts = options(ctx)
    with opts.client() as client:
        emit(opts.json, [client.jobs.get(job_id).cancel()], "training job", JOB_COLUMNS, job_row)


@app.command("watch")
@handle_errors
def watch_job(ctx: typer.Context, job_id: str) -> None:
    """Follow a job's progress until it ends."""
    opts = options(ctx)
    with opts.client() as client:
        follow_or_detach(client.jobs.get(job_id), opts.json)
