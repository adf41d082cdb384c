"""The multi-host data path: two processes on localhost (4 CPU devices each) run the real
training loop and must equal one process with 8 devices on the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import read_board

ARGS = ["--config.steps=2", "--config.optim.warmup_steps=1", "--config.batch_size=4", "--config.data.eval_size=6",
        "--config.sample.max_new_tokens=12", "--config.eval.max_new_tokens=8", "--config.eval.before=False",
        "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.checkpoint.every=2"]


def _port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _start(model, workdir, processes, *extra) -> list[tuple[subprocess.Popen, Path]]:
    """The run's processes, started, each with the file its output goes to (not a pipe: with
    several processes running, an unread pipe would fill and stall one of them)."""
    devices = 8 // processes
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [sys.executable, "-m", "jaxdistill", "train", "--config=experiments/self_distill/default.py",
               f"--config.model={model}", f"--config.workdir={workdir}", *ARGS, *extra]
    port = _port()
    started = []
    for i in range(processes):
        log = Path(f"{workdir}-process{i}.log")
        with log.open("w") as out:
            started.append((subprocess.Popen(command + ([f"--config.distributed.coordinator_address=localhost:{port}",
                                                         f"--config.distributed.num_processes={processes}",
                                                         f"--config.distributed.process_id={i}"]
                                                        if processes > 1 else []),
                                             env=env, stdout=out, stderr=subprocess.STDOUT), log))
    return started


def _wait(started):
    for process, log in started:
        process.wait(timeout=900)
        assert process.returncode == 0, log.read_text()[-4000:]


def _final_params(workdir):
    """The last checkpoint's parameters, restored onto this test process's first device."""
    import jax
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / "2" / "state"
    checkpointer = ocp.StandardCheckpointer()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                            checkpointer.metadata(path).item_metadata.tree)
    restored = checkpointer.restore(path, template)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(
        restored["params"])[0]}


@pytest.mark.slow
def test_two_processes_train_exactly_like_one(tiny_chat_model, tmp_path):
    """The method with cross-entropy on the references mixed in (sft_weight): each process samples
    and scores its own rows, and builds its own rows of the reference (SFT) batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    # both runs at once: each process spends most of its time importing and compiling on one core
    _wait(_start(tiny_chat_model, one, 1, "--config.sft_weight=0.5")
          + _start(tiny_chat_model, two, 2, "--config.sft_weight=0.5"))
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [r["step"] for r in rows[1]] == [1, 2]  # one metrics file, one line per step: process 0 writes
    board = read_board(two)
    assert board["files"] == 1 and board["scalars"]["loss"] == pytest.approx({1: rows[1][0]["loss"],
                                                                              2: rows[1][1]["loss"]})
    for a, b in zip(*rows, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["sft_loss"] == pytest.approx(a["sft_loss"], rel=1e-4) and a["sft_loss"] > 0
        assert b["generated_tokens"] == a["generated_tokens"]  # the same samples: each process decoded its rows
        for name in ("reward", "length", "answer_line"):
            assert b.get(name) == pytest.approx(a.get(name), nan_ok=True)
    summaries = [json.loads((d / "summary.json").read_text())["eval"]["after"] for d in (one, two)]
    assert summaries[1]["length"] == summaries[0]["length"]
    assert summaries[1]["accuracy"] == summaries[0]["accuracy"]
    assert summaries[1]["kl_teacher_student"] == pytest.approx(summaries[0]["kl_teacher_student"], rel=1e-3)
    p1, p2 = _final_params(one), _final_params(two)  # the 2-process checkpoint restores in this one process
    assert p1.keys() == p2.keys()
    for name in p1:
        np.testing.assert_allclose(p2[name], p1[name], atol=1e-6, err_msg=name)
