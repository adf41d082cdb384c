"""Work directories: what every command writes, in one place.

- `open_workdir(path)`: the absolute work directory (local, or `gs://...`), created and
  checked writable before any model is loaded.
- `WorkdirLock`: refuses a second run on the same work directory and names the holder
  (pid, host); a lock whose process is gone is taken over.
- `MetricsLog`: `metrics.jsonl`, one JSON line per step. On resume, lines past the restored
  step are dropped first, so a run killed between a metrics line and its checkpoint does
  not repeat steps.
- `Checkpoints`: orbax checkpoints that finish saving even when the run dies right after
  a save, and a damaged latest checkpoint that names itself and the intact one to resume from.

- `Board`: the same metrics as TensorBoard event files (workdir/tensorboard/), with the
  summary as text and the plots as images; and a Weights & Biases run with `log.wandb`.

Only process 0 writes metrics, summaries, boards and the lock; orbax coordinates the
checkpoint writes of all processes itself.
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import json
import os
import re
import socket
import time
import uuid

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxdistill.errors import RunError


def is_remote(path) -> bool:
    return "://" in str(path)


def is_writer() -> bool:
    """Whether this process writes the run's files (metrics, summaries): process 0 only."""
    return jax.process_index() == 0


def open_workdir(path) -> epath.Path:
    """The work directory as an absolute path, created and proven writable (so a typo or a
    read-only mount fails now, not after an hour of training)."""
    text = os.path.expanduser(str(path))
    directory = epath.Path(text if is_remote(text) else os.path.abspath(text))  # orbax needs absolute paths
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{uuid.uuid4().hex}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunError(f"the work directory {directory} is not writable ({e}); pick another with "
                       "--config.workdir=...") from None
    return directory


def atomic_write_text(path: epath.Path, text: str) -> None:
    """Write a whole file so that readers see the old one or the new one, never half of it."""
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def source_commit() -> str:
    """The git commit this code runs at ("-dirty" when it has uncommitted changes; "unknown" outside
    a checkout): every summary carries it, so a recorded number names the code that made it."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def json_once(path: epath.Path, compute):
    """`compute()`'s result saved as JSON at `path` the first time, read back every time after: a
    resumed run redoes none of the work (and needs none of its models) that it finished before."""
    if not path.exists():
        atomic_write_text(path, json.dumps(compute()))
    return json.loads(path.read_text())


class WorkdirLock:
    """`with WorkdirLock(workdir):` one run per work directory.

    The lock file holds the holder's pid and host. A lock left by a process that no longer
    runs on this host is stale and taken over; one held from another host is respected (its
    liveness cannot be checked from here), and the message says how to clear it. Work
    directories on object stores (gs://) cannot be locked this way and are not.
    """

    STALE_UNREADABLE_SECONDS = 60.0  # a lock file nobody finished writing, this old, is stale

    def __init__(self, workdir: epath.Path):
        self.path = workdir / ".lock"
        self.held = False

    def __enter__(self) -> WorkdirLock:
        if is_remote(self.path) or not is_writer():
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._stale(holder):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)
                    continue
                who = (f"process {holder['pid']} on {holder['host']} (since {holder.get('since', '?')})"
                       if holder else "another process")
                raise RunError(
                    f"{self.path.parent} is in use by {who}. Wait for that run to finish or use another "
                    f"--config.workdir; if that run is dead, delete {self.path}.") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunError(f"could not take the lock {self.path}: other processes keep taking it.")

    def __exit__(self, *exc) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and {"pid", "host"} <= set(holder) else None
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict | None) -> bool:
        if holder is None:  # unreadable: a writer died mid-write, or is writing right now
            try:
                return time.time() - os.path.getmtime(self.path) > self.STALE_UNREADABLE_SECONDS
            except FileNotFoundError:
                return True
        if holder["host"] != socket.gethostname():
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by another user
            return False
        return False


class MetricsLog:
    """Appends one JSON line per step to `path` (process 0 only).

    `resume_step`: the step the run restarts from (0 for a fresh start). Existing lines of
    later steps are dropped first: they were written after the checkpoint the run resumes from.
    """

    def __init__(self, path: epath.Path, resume_step: int, board: Board | None = None):
        self.path, self.board = path, board
        if not is_writer():
            return
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and _step_of(line) is not None and _step_of(line) <= resume_step]
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def write(self, row: dict) -> None:
        if is_writer():
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.board is not None:
            self.board.scalars(row, step=int(row["step"]))

    def rows(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class Checkpoints:
    """Orbax checkpoints of (state, JSON metadata) under `directory`, one per saved step.

    `restore(template)` restores the latest checkpoint, or `resume_from` when given (the
    checkpoints after it are deleted, so the run continues from there). A checkpoint that
    fails to restore is named, together with the latest intact one. `close()` waits for
    the last asynchronous save: call it on every exit path (`with Checkpoints(...)`).
    """

    def __init__(self, directory: epath.Path, *, keep: int, resume_from: int = 0):
        self.directory = directory
        self.resume_from = resume_from
        self.manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True))

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.manager.wait_until_finished()  # a save in flight finishes even if the run is failing
        self.manager.close()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, template) -> tuple[int, object, dict] | None:
        """(step, state, meta) of the checkpoint to resume from, or None for a fresh start."""
        steps = self.steps()
        if self.resume_from:
            if self.resume_from not in steps:
                raise RunError(f"checkpoint.resume_from={self.resume_from}, but {self.directory} holds steps "
                               f"{steps or 'none'}.")
            for later in [s for s in steps if s > self.resume_from]:
                self.manager.delete(later)
            steps = [s for s in steps if s <= self.resume_from]
        if not steps:
            return None
        try:
            return (steps[-1], *self._restore(steps[-1], template))
        except Exception as e:  # orbax/tensorstore raise many types for damaged files
            damage = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            intact = self._latest_intact(steps[:-1], template)
            advice = (f"the previous checkpoint, step {intact}, is intact: rerun with "
                      f"--config.checkpoint.resume_from={intact} to resume from it (later checkpoints are deleted)"
                      if intact else "no earlier checkpoint is intact")
            raise RunError(f"checkpoint {self.directory / str(steps[-1])} is damaged ({type(e).__name__}: "
                           f"{damage}); {advice}, or use a fresh --config.workdir.") from None

    def restore_params(self, template):
        """The parameters of the latest checkpoint, restored into `template`'s shapes, dtypes and
        shardings (a model's parameters), without the optimizer state: how a finished run's
        model is loaded. None if there is no checkpoint."""
        steps = self.steps()
        if not steps:
            return None
        restored = self.manager.restore(steps[-1], args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": template}, restore_args={"params": ocp.checkpoint_utils.construct_restore_args(template)},
            partial_restore=True)))
        return restored.state["params"]

    def _restore(self, step: int, template) -> tuple[object, dict]:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

    def _latest_intact(self, steps: list[int], template) -> int | None:
        for step in reversed(steps):
            try:
                self._restore(step, template)
                return step
            except Exception:  # noqa: BLE001 - damaged as well; try the one before
                continue
        return None


class Board:
    """TensorBoard event files in `workdir/tensorboard/`: numeric metrics as scalars by step,
    summary.md as text, every plot (*.png) of the work directory as an image. With
    `wandb_project` the same go to a Weights & Biases run (its files under workdir/wandb/;
    WANDB_MODE=offline keeps them local). Process 0 writes; elsewhere every call does nothing.

    `resume(step)` before the first event: events of later steps from an earlier, interrupted
    run are hidden, as MetricsLog drops their lines. The writers open at the first event.
    """

    def __init__(self, workdir, *, wandb_project: str = "", config: dict | None = None):
        self.workdir, self.wandb_project, self.config = epath.Path(workdir), wandb_project, config
        self.purge_step, self._writer, self._wandb = None, None, None
        if wandb_project and is_writer() and importlib.util.find_spec("wandb") is None:
            raise RunError(f"log.wandb={wandb_project!r} needs wandb: pip install wandb (or leave log.wandb "
                           "empty; TensorBoard files are written either way).")

    def resume(self, step: int) -> None:
        self.purge_step = step + 1 if step else None

    def _writers(self) -> tuple:
        """(TensorBoard writer, W&B run or None), opened on first use; (None, None) off process 0."""
        if self._writer is None and is_writer():
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=self.purge_step)
            if self.wandb_project:
                import wandb

                run_id = uuid.uuid5(uuid.NAMESPACE_URL, str(self.workdir)).hex[:16]  # one run per work directory
                self._wandb = wandb.init(project=self.wandb_project, dir=str(self.workdir), config=self.config,
                                         name=self.workdir.name, id=run_id, resume="allow")
        return self._writer, self._wandb

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def scalars(self, row: dict, *, step: int, prefix: str = "") -> None:
        """Every finite number of `row` (a metrics line) at `step`. NaN marks a metric with no value
        at that step (no row had one): TensorBoard leaves a gap; lists and text stay in metrics.jsonl."""
        numbers = {board_tag(prefix + k): float(v) for k, v in row.items()
                   if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and k != "step"
                   and np.isfinite(v)}
        writer, wandb_run = self._writers()
        if writer is not None:
            for tag, value in numbers.items():
                writer.add_scalar(tag, value, step)
        if wandb_run is not None:
            wandb_run.log(numbers, step=step)

    def curves(self, history: dict, alphas) -> None:
        """PPO training curves, `history[name]` shaped [alphas, seeds, updates]: one scalar
        series per (name, alpha, seed), by update."""
        for name, values in history.items():
            values = np.asarray(values)
            for a, alpha in enumerate(alphas):
                for seed in range(values.shape[1]):
                    for update, value in enumerate(values[a, seed]):
                        self.scalars({f"{name}/alpha_{float(alpha):g}/seed_{seed}": value}, step=update + 1)

    def publish(self, *, step: int) -> None:
        """The finished work directory's summary.md as text and its plots as images, at `step`."""
        writer, wandb_run = self._writers()
        if writer is None:
            return
        summary = self.workdir / "summary.md"
        text = summary.read_text() if summary.exists() else ""
        plots = sorted(self.workdir.glob("*.png"))
        if text:
            writer.add_text("summary", text, step)
        for plot in plots:
            writer.add_image(plot.stem, _read_png(plot), step, dataformats="HWC")
        if wandb_run is not None:
            import wandb

            media = {plot.stem: wandb.Image(str(plot)) for plot in plots}
            if text:
                media["summary"] = wandb.Html(f"<pre>{html.escape(text)}</pre>")
            wandb_run.log(media, step=step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._writer = self._wandb = None


def board_tag(name: str) -> str:
    """A metric's name as TensorBoard stores it (it replaces what is not a letter, digit, -, _, / or .)."""
    return re.sub(r"[^-/\w.]", "_", name)


def board(config, workdir) -> Board:
    """The Board a command's config asks for (`log.wandb`, empty for TensorBoard alone)."""
    log = config.get("log") or {}
    return Board(workdir, wandb_project=log.get("wandb", ""), config=config.to_dict())


def _read_png(path) -> np.ndarray:
    import matplotlib.image

    image = matplotlib.image.imread(str(path))  # float in [0, 1], RGB or RGBA
    return (image[..., :3] * 255).round().astype(np.uint8)
