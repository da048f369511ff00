"""scripts/pretrain.py end to end, as subprocesses: `accelerate launch` with 1 and 2 CPU processes,
a Hub push to a local fake Hub, SIGKILL and SIGTERM followed by a resume, also with SIGTERM and
SIGINT sent to the whole job (loader workers included), as schedulers and terminals send them.

Every run trains a tiny DinoModel (32 px, hidden 32, 2 layers) on 24 generated images: batches of
4, 16 samples per epoch, 2 epochs = 8 steps, a checkpoint every 2 steps.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hub_server import FakeHub
from processes import accelerate_launch
from runs import pretrain_arguments
from safetensors.torch import load_file

from dino_hf import DinoModel
from dino_hf.run_files.checkpoints import check_checkpoint, list_checkpoints

pytestmark = pytest.mark.slow

SCRIPT = str(Path(__file__).resolve().parent.parent / "scripts" / "pretrain.py")
FSDP_ON_CPU = str(Path(__file__).resolve().parent / "fsdp_on_cpu.py")
TOKEN = "hf_pretrainTESTtoken0123456789"
# One thread per process: the same float results whatever the machine's core count, and two
# processes do not fight over two cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def arguments(data: Path, output_dir: Path, *extra: str) -> list[str]:
    """`pretrain_arguments` of a TINY run that logs its sample ids beside `output_dir`."""
    sample_ids = str(output_dir.parent / f"{output_dir.name}.jsonl")
    return pretrain_arguments(data, output_dir, "--log_sample_ids", sample_ids, *extra)


def python(*args: str, env: dict = ENV, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, SCRIPT, *args], env=env, capture_output=True, text=True, timeout=300, **kwargs
    )


def read_ids(path: Path) -> dict:
    """step -> ids that step trained on (the last reading, for steps that a killed run also did)."""
    return {row["step"]: row["ids"] for row in map(json.loads, path.read_text().splitlines())}


def teacher(output_dir: Path, step: int = 8) -> dict:
    return load_file(output_dir / "checkpoints" / f"checkpoint-{step}" / "teacher.safetensors")


def assert_same_teacher(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name  # deterministic CPU run: bit for bit


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run, through `accelerate launch` with one CPU process, pushing to a fake Hub."""
    root = tmp_path_factory.mktemp("reference")
    with FakeHub(root / "hub") as hub:
        command = [
            *accelerate_launch(1),
            SCRIPT,
            *arguments(data, root / "out", "--push_to_hub", "--hub_model_id", "org/dino-tiny", "--hub_token", TOKEN),
        ]
        completed = subprocess.run(
            command, env={**ENV, "HF_ENDPOINT": hub.url}, capture_output=True, text=True, timeout=300
        )
        requests = list(hub.requests)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return root, completed, requests


def test_one_process_writes_checkpoints_export_and_card(data, reference):
    root, completed, requests = reference
    out = root / "out"
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["checkpoint-4", "checkpoint-6", "checkpoint-8"]
    for folder in list_checkpoints(out / "checkpoints"):
        check_checkpoint(folder)
        assert {p.name for p in folder.iterdir()} == {
            "student.safetensors",
            "teacher.safetensors",
            "dino_loss.safetensors",
            "optimizer.pt",
            "rng_state_0.pt",
            "data_state_0.pt",
            "trainer_state.json",
            "training_args.json",
            "teacher_backbone",
            "manifest.json",
        }
    last = out / "checkpoints" / "checkpoint-8"
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 8
    saved_args = json.loads((last / "training_args.json").read_text())
    assert (saved_args["out_dim"], saved_args["hub_model_id"], saved_args["train_dir"]) == (
        64,
        "org/dino-tiny",
        str(data / "images"),
    )
    assert "hub_token" not in saved_args

    from transformers import AutoModel

    import dino_hf  # noqa: F401  (registers DinoModel with AutoModel)

    model = AutoModel.from_pretrained(out / "teacher_backbone")
    assert type(model).__name__ == "DinoModel"
    teacher_state = teacher(out)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, teacher_state[f"backbone.model.{name}"]), name  # the export is the teacher
    card = (out / "teacher_backbone" / "README.md").read_text()
    assert "AutoModel" in card and "org/dino-tiny" in card
    assert f'AutoModel.from_pretrained("{out / "teacher_backbone"}")' in completed.stdout

    uploaded = root / "hub" / "org" / "dino-tiny"
    assert (uploaded / "model.safetensors").read_bytes() == (
        out / "teacher_backbone" / "model.safetensors"
    ).read_bytes()
    assert any(auth == f"Bearer {TOKEN}" for _, _, auth in requests)  # the token was used ...


def test_token_appears_in_no_file_or_log(reference):
    root, completed, _ = reference
    assert TOKEN not in completed.stdout and TOKEN not in completed.stderr  # ... and written nowhere
    scanned = 0
    for path in root.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
            scanned += 1
    assert scanned > 30  # checkpoints, exports, cards, the uploaded copy, the sample log


def launch_two_processes(
    data: Path, output_dir: Path, *extra: str, machines: int = 1, script: str = SCRIPT
) -> list[subprocess.CompletedProcess]:
    """Two CPU processes (gloo): on one machine, or one on each of two machines (two launches on
    127.0.0.1 that meet at the main process's port, as two nodes do)."""
    common = accelerate_launch(2, machines=machines)
    if machines == 1:
        commands = [[*common, script, *arguments(data, output_dir, *extra)]]
    else:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        commands = [
            [
                *common,
                "--machine_rank",
                str(rank),
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                str(port),
                SCRIPT,
                *arguments(data, output_dir),
            ]
            for rank in range(machines)
        ]
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    processes = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    completed = []
    for process, command in zip(processes, commands):
        stdout, stderr = process.communicate(timeout=300)
        completed.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    for result in completed:
        assert result.returncode == 0, result.stderr[-3000:]
    return completed


@pytest.fixture(scope="module")
def two_processes(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_processes")
    (completed,) = launch_two_processes(data, root / "out")
    return root, completed


def test_two_processes_see_disjoint_samples(data, two_processes):
    tmp_path, completed = two_processes
    assert completed.stdout.count("The trained teacher backbone is in") == 1  # printed by the main process only

    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    # a total batch of 8 (4 per process), 16 samples per epoch: 2 steps per epoch, 4 steps
    assert sorted((row["step"], row["process"]) for row in rows) == [(s, p) for s in range(4) for p in (0, 1)]
    by_process = {p: [i for row in rows if row["process"] == p for i in row["ids"]] for p in (0, 1)}
    # One pass over the data is 12 images per process (the 24 files are dealt into shards, split
    # between the processes once: split_dataset_by_node, no second split by Accelerate), so the
    # first 3 steps of each process are one pass: 12 different images, none shared, all 24 seen.
    first_pass = [set(by_process[p][:12]) for p in (0, 1)]
    assert [len(ids) for ids in first_pass] == [12, 12]
    assert not first_pass[0] & first_pass[1]
    assert len(first_pass[0] | first_pass[1]) == 24
    for step in range(4):  # in the next pass too, the two processes' batches never share an image
        ids = [set(row["ids"]) for row in rows if row["step"] == step]
        assert not ids[0] & ids[1], step

    last = tmp_path / "out" / "checkpoints" / "checkpoint-4"
    check_checkpoint(last)
    assert json.loads((last / "trainer_state.json").read_text())["num_processes"] == 2
    assert {"rng_state_0.pt", "rng_state_1.pt", "data_state_0.pt", "data_state_1.pt"} <= {
        p.name for p in last.iterdir()
    }
    DinoModel.from_pretrained(tmp_path / "out" / "teacher_backbone")


def test_two_machines_train_as_two_processes_on_one(data, two_processes, tmp_path):
    """Multi-node: one process on each of two "machines" (ranks from --machine_rank, the rendezvous
    at --main_process_ip) trains as the two processes of one machine: same samples, same teacher."""
    single_machine, _ = two_processes
    machine0, machine1 = launch_two_processes(data, tmp_path / "out", machines=2)
    assert (machine0.stdout + machine1.stdout).count("The trained teacher backbone is in") == 1
    assert sorted((tmp_path / "out.jsonl").read_text().splitlines()) == sorted(
        (single_machine / "out.jsonl").read_text().splitlines()
    )
    assert_same_teacher(teacher(tmp_path / "out", 4), teacher(single_machine / "out", 4))


def test_fsdp_trains_as_ddp_and_resumes_sharded(data, two_processes, tmp_path):
    """The trainer under Accelerate's FSDP2 (2 CPU processes, see tests/fsdp_on_cpu.py): the student
    sharded by Accelerate and the teacher sharded like it end where the DDP run ends (float rounding:
    reduce-scatter and all-reduce sum in different orders), the export is whole, and a sharded run
    resumed from its checkpoint ends where the uninterrupted one does."""
    ddp, _ = two_processes
    (completed,) = launch_two_processes(data, tmp_path / "fsdp", script=FSDP_ON_CPU)
    assert completed.stdout.count("The trained teacher backbone is in") == 1
    sharded = teacher(tmp_path / "fsdp", 4)
    for name, tensor in teacher(ddp / "out", 4).items():
        torch.testing.assert_close(sharded[name], tensor, rtol=0, atol=1e-6, msg=name)
    export = DinoModel.from_pretrained(tmp_path / "fsdp" / "teacher_backbone").state_dict()
    for name, tensor in export.items():
        assert torch.equal(tensor, sharded[f"backbone.model.{name}"]), name

    launch_two_processes(data, tmp_path / "resumed", "--max_train_steps", "2", script=FSDP_ON_CPU)
    (resumed,) = launch_two_processes(
        data, tmp_path / "resumed", "--resume_from_checkpoint", "latest", script=FSDP_ON_CPU
    )
    assert "at step 2" in resumed.stdout
    assert_same_teacher(teacher(tmp_path / "resumed", 4), sharded)


def start(data: Path, output_dir: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, SCRIPT, *arguments(data, output_dir, *extra)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def test_sigkill_then_resume_ends_with_the_same_teacher(data, reference, tmp_path):
    out = tmp_path / "out"
    process = start(data, out)
    staging = out / "checkpoints" / ".checkpoint-4.tmp"
    wait_for(staging, process)
    process.send_signal(signal.SIGKILL)  # while checkpoint 4 is being written (or just after)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "checkpoints" / "checkpoint-8").exists()
    complete = list_checkpoints(out / "checkpoints")
    for folder in complete:
        check_checkpoint(folder)  # never a partial folder under a checkpoint's name
    interrupted_write = staging.exists()
    expected_start = 2 if interrupted_write else int(complete[-1].name.split("-")[1])

    resumed = python(*arguments(data, out, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"resumed from {out / 'checkpoints' / f'checkpoint-{expected_start}'} at step {expected_start}"
        in resumed.stdout
    )
    assert not list((out / "checkpoints").glob(".checkpoint-*"))  # the partial write was cleaned up
    assert_same_teacher(teacher(out), teacher(reference[0] / "out"))
    assert read_ids(tmp_path / "out.jsonl") == read_ids(reference[0] / "out.jsonl")  # the same batches


def test_sigterm_checkpoints_exits_cleanly_and_resumes(data, reference, tmp_path):
    out = tmp_path / "out"
    process = start(data, out)
    wait_for(out / "checkpoints" / "checkpoint-2", process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    line = next(line for line in stdout.splitlines() if line.startswith("Stopped by SIGTERM after step "))
    step = int(line.split("after step ")[1].split(";")[0])
    assert 2 <= step < 8
    assert f"checkpoint-{step}" in line
    check_checkpoint(out / "checkpoints" / f"checkpoint-{step}")
    assert max(int(p.name.split("-")[1]) for p in list_checkpoints(out / "checkpoints")) == step
    assert not (out / "teacher_backbone").exists()  # stopped early: no final export

    resumed = python(*arguments(data, out, "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{step}'} at step {step}" in resumed.stdout
    assert_same_teacher(teacher(out), teacher(reference[0] / "out"))


def test_sigterm_to_a_two_process_launch_checkpoints_once_and_resumes(data, tmp_path):
    """The launcher forwards SIGTERM to both processes; they agree on the step to stop at, write one
    checkpoint with both processes' states, and a launch with --resume_from_checkpoint goes on."""
    out = tmp_path / "out"
    command = [
        *accelerate_launch(2),
        SCRIPT,
    ]
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    long_run = arguments(data, out, "--num_train_epochs", "8")  # 16 steps: the signal comes well before the end
    process = subprocess.Popen(
        [*command, *long_run], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(out / "checkpoints" / "checkpoint-2", process)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=240)
    # The launcher itself (torchrun) reports the signal it got; its workers stopped cleanly.
    stops = [line for line in stdout.splitlines() if line.startswith("Stopped by SIGTERM after step ")]
    assert len(stops) == 1, stdout[-3000:] + stderr[-3000:]
    step = int(stops[0].split("after step ")[1].split(";")[0])
    assert 2 <= step < 16
    last = out / "checkpoints" / f"checkpoint-{step}"
    check_checkpoint(last)
    assert {"rng_state_0.pt", "rng_state_1.pt", "data_state_0.pt", "data_state_1.pt"} <= {
        p.name for p in last.iterdir()
    }

    resumed = subprocess.run(
        [*command, *long_run, "--resume_from_checkpoint", "latest", "--max_train_steps", str(step + 1)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {last} at step {step}" in resumed.stdout
    check_checkpoint(out / "checkpoints" / f"checkpoint-{step + 1}")


def processes_under(pid: int) -> set[int]:
    """`pid` and the processes it started, directly or not (read from /proc)."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent_of[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # the process has ended
            continue
    tree = {pid}
    while grown := {child for child, parent in parent_of.items() if parent in tree} - tree:
        tree |= grown
    return tree


def assert_processes(process: subprocess.Popen, count: int, timeout: float = 30) -> None:
    """At least `count` processes in the tree of `process`, seen together once within `timeout` seconds (a
    loader worker is restarted at each epoch's start: a single count could fall on that moment)."""
    deadline, seen = time.monotonic() + timeout, 0
    while seen < count and time.monotonic() < deadline:
        seen = len(processes_under(process.pid))
        time.sleep(0.05)
    assert seen >= count, f"{seen} processes under {process.pid}, expected {count}"


def stopped_at(stdout: str, signal_name: str) -> int:
    """The step of the "Stopped by ..." line (there must be exactly one)."""
    stops = [line for line in stdout.splitlines() if line.startswith(f"Stopped by {signal_name} after step ")]
    assert len(stops) == 1, stdout[-3000:]
    return int(stops[0].split("after step ")[1].split(";")[0])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=lambda signum: signum.name)
def test_a_signal_to_the_whole_job_checkpoints_exits_cleanly_and_resumes(data, reference, tmp_path, signum):
    """SLURM, `timeout` (SIGTERM) and Ctrl-C in a terminal (SIGINT) signal every process of the job,
    the loader's worker included: the worker lives on, the trainer checkpoints the current step and
    exits with status 0, and the resumed run ends with the teacher of the uninterrupted one."""
    out = tmp_path / "out"
    process = start(data, out, "--dataloader_num_workers", "1", start_new_session=True)
    wait_for(out / "checkpoints" / "checkpoint-2", process)
    assert_processes(process, 2)  # the trainer and its loader worker, one process group
    os.killpg(process.pid, signum)
    stdout, stderr = process.communicate(timeout=240)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr
    step = stopped_at(stdout, signum.name)
    assert 2 <= step < 8
    check_checkpoint(out / "checkpoints" / f"checkpoint-{step}")
    assert max(int(p.name.split("-")[1]) for p in list_checkpoints(out / "checkpoints")) == step

    resumed = python(*arguments(data, out, "--dataloader_num_workers", "1", "--resume_from_checkpoint", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'checkpoint-{step}'} at step {step}" in resumed.stdout
    assert_same_teacher(teacher(out), teacher(reference[0] / "out"))


@pytest.mark.slow
def test_sigterm_to_the_whole_job_of_a_two_process_launch_checkpoints_and_resumes(data, tmp_path):
    """SIGTERM to the process group of `accelerate launch` (2 processes, a loader worker each): the
    launcher (torchrun) gets it and sends it on to the process group of each process, worker
    included; both processes stop at the same step and write one checkpoint, and the resumed launch
    ends with the teacher of an uninterrupted one."""
    extra = ("--dataloader_num_workers", "1", "--num_train_epochs", "8", "--max_train_steps", "8")
    launch_two_processes(data, tmp_path / "uninterrupted", *extra)
    out = tmp_path / "out"
    command = [
        *accelerate_launch(2),
        SCRIPT,
        *arguments(data, out, *extra),
    ]
    process = subprocess.Popen(
        command,
        env={**ENV, "ACCELERATE_USE_CPU": "true"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for(out / "checkpoints" / "checkpoint-2", process)
    assert_processes(process, 5)  # the launcher, 2 processes and their loader workers
    os.killpg(process.pid, signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=240)
    # The launcher itself (torchrun) reports the signal it got; its processes stopped cleanly.
    assert "is killed by signal" not in stderr and "training stopped" not in stderr, stderr[-3000:]
    step = stopped_at(stdout, "SIGTERM")
    assert 2 <= step < 8
    last = out / "checkpoints" / f"checkpoint-{step}"
    check_checkpoint(last)
    per_process = {"rng_state_0.pt", "rng_state_1.pt", "data_state_0.pt", "data_state_1.pt"}
    assert per_process <= {p.name for p in last.iterdir()}

    (resumed,) = launch_two_processes(data, out, *extra, "--resume_from_checkpoint", "latest")
    assert f"resumed from {last} at step {step}" in resumed.stdout
    assert_same_teacher(teacher(out), teacher(tmp_path / "uninterrupted"))


def test_wrong_setting_exits_with_status_2_before_any_work(data, tmp_path):
    completed = python(*arguments(data, tmp_path / "out", "--local_crops_size", "12"))
    assert completed.returncode == 2
    assert "--local_crops_size=12 is not valid: a multiple of the backbone's patch size 8" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_hub_answering_errors_does_not_stop_training_and_the_final_state_arrives(data, tmp_path):
    """The Hub answers the first pushes with 503 and 429: training goes on, the uploads are retried in
    the background, and the teacher of the last step reaches the Hub."""
    out = tmp_path / "out"
    with FakeHub(tmp_path / "hub") as hub:
        hub.fail_next(6, 503)
        hub.fail_next(2, 429)
        completed = python(
            *arguments(data, out, "--push_to_hub", "--hub_model_id", "org/dino-flaky", "--hub_token", TOKEN),
            env={**ENV, "HF_ENDPOINT": hub.url},
        )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (out / "checkpoints" / "checkpoint-8").is_dir()  # training was not held up by the Hub
    uploaded = tmp_path / "hub" / "org" / "dino-flaky"
    assert (uploaded / "model.safetensors").read_bytes() == (
        out / "teacher_backbone" / "model.safetensors"
    ).read_bytes()
    assert "final state on the Hub" in completed.stdout
    assert TOKEN not in completed.stdout + completed.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: Accelerate enables FSDP on accelerators only")
def test_fsdp_run_matches_an_unsharded_run_and_resumes_without_fsdp(data, tmp_path):
    """`accelerate launch --use_fsdp --fsdp_version 2` on one GPU: the student is sharded by Accelerate,
    the teacher by dino_hf; the checkpoints hold whole weights, so the run ends where an unsharded one
    ends and its checkpoint resumes without FSDP."""
    common = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    fsdp = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
    runs = {"fsdp": [*fsdp, *common], "plain": common}
    for name, options in runs.items():
        completed = subprocess.run(
            ["accelerate", "launch", *options, SCRIPT, *arguments(data, tmp_path / name)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
    sharded, plain = teacher(tmp_path / "fsdp"), teacher(tmp_path / "plain")
    assert sharded.keys() == plain.keys()
    for name, tensor in plain.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=0, atol=1e-4, msg=name)
    DinoModel.from_pretrained(tmp_path / "fsdp" / "teacher_backbone")

    resumed = subprocess.run(
        [
            "accelerate",
            "launch",
            *common,
            SCRIPT,
            *arguments(data, tmp_path / "fsdp", "--num_train_epochs", "3", "--resume_from_checkpoint", "latest"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and (tmp_path / "fsdp" / "checkpoints" / "checkpoint-12").is_dir()
