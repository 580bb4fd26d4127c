"""The SLURM launch scripts on a real SLURM (Debian's slurmctld, and two slurmd "nodes" on
this host, started by tests/slurm/cluster.py): the SFT -> RM -> PPO pipeline runs in order
with 2 CPU ranks per stage (torchrun, gloo), a failing first stage cancels the rest (and a
stage that cannot be submitted, the ones already submitted), and SIGUSR1 makes a 2-node job
checkpoint, requeue itself and finish with the same parameters as the uninterrupted 1-node
run.

Skipped only when SLURM is missing and cannot be installed (not root, no apt-get); with
CI=true that is a failure instead.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.e2e.conftest import REPO
from tests.e2e.test_sft_rm import checkpoint_tensors, metrics
from tests.slurm.cluster import LocalSlurm, SlurmUnavailable

# `megarlhf launch` sizes: 2 CPU ranks on one node, or one on each of two
ONE_NODE = ["--nodes", "1", "--gpus-per-node", "2", "--cpu", "--cpus-per-node", "2"]
TWO_NODES = ["--nodes", "2", "--gpus-per-node", "1", "--cpu", "--cpus-per-node", "1"]
SFT_STEPS, RM_STEPS, PPO_STEPS = 40, 10, 10
SFT_OVERRIDES = [f"train.max_steps={SFT_STEPS}", "data.eval_file="]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    # Not under pytest's tmp: munged wants a socket directory every user can traverse.
    root = Path(tempfile.mkdtemp(prefix="megarlhf-slurm-"))
    root.chmod(0o755)
    try:
        cluster = LocalSlurm(root).start()
    except SlurmUnavailable as err:
        shutil.rmtree(root, ignore_errors=True)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI=true: the SLURM tests must run, but SLURM cannot be installed: {err}")
        pytest.skip(f"no local SLURM: {err}")
    yield cluster
    cluster.stop()
    shutil.copytree(root / "log", tmp_path_factory.mktemp("slurm_logs"), dirs_exist_ok=True)  # kept for debugging
    shutil.rmtree(root, ignore_errors=True)


def job_env(slurm) -> dict[str, str]:
    """What the submitting shell has, and therefore every job (sbatch exports it)."""
    env = slurm.env()
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # left by in-process distributed tests of the same session
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MEGARLHF=f"{sys.executable} -m megarlhf")
    return env


def data_args(task_data, train: str) -> list[str]:
    return [f"data.tokenizer={task_data['tokenizer']}", f"data.train_file={task_data[train]}"]


def ppo_overrides(task_data) -> list[str]:
    return [
        *data_args(task_data, "prompts_train"), f"train.max_steps={PPO_STEPS}", "data.eval_file=",
        "train.global_batch_size=16", "train.micro_batch_size=4", "ppo.num_ppo_epochs=1",
    ]  # fmt: skip


def run_pipeline(slurm, task_data, root: Path, sft_extra=(), ppo_extra=()) -> subprocess.CompletedProcess:
    """launch/pipeline.sh with tiny stages."""
    env = job_env(slurm)
    env["SFT_OVERRIDES"] = " ".join([*data_args(task_data, "sft"), *SFT_OVERRIDES, *sft_extra])
    env["RM_OVERRIDES"] = " ".join([*data_args(task_data, "prefs_train"), f"train.max_steps={RM_STEPS}", "data.eval_file="])
    env["PPO_OVERRIDES"] = " ".join([*ppo_overrides(task_data), *ppo_extra])
    return subprocess.run(
        ["bash", "launch/pipeline.sh", str(root), *ONE_NODE], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def pipeline(slurm, task_data, root: Path, sft_extra=()) -> dict[str, str]:
    """{stage: job id} of a submitted pipeline."""
    out = run_pipeline(slurm, task_data, root, sft_extra)
    assert out.returncode == 0, out.stderr[-3000:]
    ids = dict(item.split("=") for item in out.stdout.split())
    assert list(ids) == ["sft", "rm", "ppo"], out.stdout
    return ids


def log_of(run_dir: Path, job_id: str) -> str:
    path = run_dir / "logs" / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def when(stamp: str) -> float:
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))


@pytest.fixture(scope="module")
def tiny_pipeline(slurm, task_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    ids = pipeline(slurm, task_data, root)
    jobs = slurm.wait(ids.values(), timeout=600)
    return root, ids, {stage: jobs[job_id] for stage, job_id in ids.items()}


def test_pipeline_runs_sft_rm_ppo_in_order(tiny_pipeline):
    root, ids, jobs = tiny_pipeline
    for stage, job in jobs.items():
        assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), (stage, job, log_of(root / stage, ids[stage])[-3000:])
    # Chained: each stage started only after the one before had ended.
    assert when(jobs["sft"]["EndTime"]) <= when(jobs["rm"]["StartTime"])
    assert when(jobs["rm"]["EndTime"]) <= when(jobs["ppo"]["StartTime"])
    assert f"--dependency=afterok:{ids['sft']}" in (root / "rm" / "logs" / "rm.sbatch").read_text()
    assert f"--dependency=afterok:{ids['rm']}" in (root / "ppo" / "logs" / "ppo.sbatch").read_text()

    # Each stage's outputs, in its own run directory, with its job's log there too.
    for stage, steps in (("sft", SFT_STEPS), ("rm", RM_STEPS), ("ppo", PPO_STEPS)):
        run = root / stage
        assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{steps:07d}", stage
        assert [r["step"] for r in metrics(run)] == list(range(1, steps + 1)), stage
        assert json.loads((run / "summary.json").read_text())["steps"] == steps
        log = log_of(run, ids[stage])
        assert f"megarlhf {stage}: job {ids[stage]} (restart 0) on 1 node(s)" in log
        assert "2 rank(s) per node via torchrun" in log
    assert "tp1-pp1-dp2" in (root / "sft" / "logs" / "train.log").read_text()
    # RM started from SFT's weights, PPO from both: the reward model scored PPO's rollouts.
    assert all(r["objective/rm_score"] is not None for r in metrics(root / "ppo"))
    rm_cfg = (root / "rm" / "config.yaml").read_text()
    assert f"init_from: {root / 'sft'}" in rm_cfg


def test_failing_first_stage_cancels_the_rest(slurm, task_data, tmp_path):
    ids = pipeline(slurm, task_data, tmp_path, sft_extra=[f"data.train_file={tmp_path / 'missing.jsonl'}"])
    jobs = slurm.wait(ids.values(), timeout=300)
    sft, rm, ppo = (jobs[ids[s]] for s in ("sft", "rm", "ppo"))
    assert sft["JobState"] == "FAILED" and sft["ExitCode"] != "0:0", sft  # torchrun exits 1 for any failed rank
    assert "missing.jsonl" in log_of(tmp_path / "sft", ids["sft"])
    for job in (rm, ppo):
        assert (job["JobState"], job["Reason"]) == ("CANCELLED", "DependencyNeverSatisfied"), job
        assert job["StartTime"] == "Unknown" or job["RunTime"] == "00:00:00", job
    assert not (tmp_path / "rm" / "checkpoints").exists() and not (tmp_path / "ppo" / "checkpoints").exists()


def test_stage_that_cannot_be_submitted_cancels_the_submitted_ones(slurm, task_data, tmp_path):
    out = run_pipeline(slurm, task_data, tmp_path, ppo_extra=["ppo.cliprange=-1"])
    assert out.returncode != 0 and "ppo.cliprange and ppo.cliprange_value must be > 0" in out.stderr
    ids = re.search(r"pipeline: cancelling jobs (\d+) (\d+)", out.stderr)
    assert ids, out.stderr[-3000:]
    for job in slurm.wait(ids.groups(), timeout=120).values():
        assert job["JobState"] == "CANCELLED", job


def preempt_and_requeue(slurm, run: Path, submit: list[str], signal_opts: list[str], after_rows: int, env=None):
    """Submit (`megarlhf launch ...` or `sbatch ...`), send SIGUSR1 once `after_rows` steps
    are logged, release the requeued job early (SLURM holds a requeued job back for ~2
    minutes) and wait for it: (job id, stop step, log)."""
    out = subprocess.run(submit, cwd=REPO, env=env or job_env(slurm), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = out.stdout.strip().split(";")[0]

    deadline = time.monotonic() + 180
    while not ((run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= after_rows):
        assert time.monotonic() < deadline and slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), log_of(run, job_id)[-3000:]
        time.sleep(0.1)
    slurm.run("scancel", "--signal=USR1", *signal_opts, job_id)
    while (job := slurm.job(job_id))["JobState"] != "PENDING":
        assert job["JobState"] in ("RUNNING", "COMPLETING", "REQUEUED"), (job, log_of(run, job_id)[-3000:])
        assert time.monotonic() < deadline, log_of(run, job_id)[-3000:]
        time.sleep(0.2)
    # Not in the second of the requeue: slurmd refuses a job credential issued in the same
    # second as the one it revoked. The update makes slurmctld schedule at once.
    time.sleep(1.5)
    slurm.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    job = slurm.wait([job_id], timeout=300)[job_id]
    log = log_of(run, job_id)
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1"), (job, log[-3000:], slurm.logs())

    stopped = re.search(r"SIGUSR1: stopped after step (\d+) with a checkpoint", log)
    assert stopped, log[-3000:]
    step = int(stopped.group(1))
    assert f"requeueing job {job_id}" in log
    assert not (run / "logs" / "stopped").exists()  # the requeued run's shell cleared it
    assert f"job {job_id} (restart 1)" in log
    resumed = re.escape(f"resumed from {run / 'checkpoints' / f'iter_{step:07d}'} at ")
    assert re.search(rf"{resumed}(step|iteration) {step}\n", log), log[-3000:]
    return job_id, step, log


def assert_same_weights(reference: Path, run: Path, step: int, roles: tuple[str, ...]) -> None:
    for role in roles:
        wa = checkpoint_tensors(reference / "checkpoints" / f"iter_{step:07d}" / role)
        wb = checkpoint_tensors(run / "checkpoints" / f"iter_{step:07d}" / role)
        assert wa.keys() == wb.keys() and len(wa) > 10
        for k in wa:
            assert torch.equal(wa[k], wb[k]), (role, k)


def assert_ran_on_both_nodes(slurm, job_id: str, log: str) -> None:
    assert f"job {job_id} (restart 0) on 2 node(s) [n[1-2]]" in log
    assert "rendezvous n1 (127.0.0.1:" in log
    for node in ("n1", "n2"):  # each slurmd started a task of the job's step
        assert f"launch task StepId={job_id}.0 " in (slurm.root / "log" / f"slurmd-{node}.log").read_text(), node


def test_usr1_to_the_batch_shell_checkpoints_requeues_and_resumes_bit_exactly(slurm, task_data, tiny_pipeline, tmp_path):
    """`scancel --signal=USR1 --batch` is what `--signal=B:USR1@N` does before the time limit:
    the batch shell passes it to the ranks, every rank stops after the same step with a
    checkpoint, the job requeues itself, and the requeued run ends where the uninterrupted
    pipeline SFT did, bit for bit. Here the generic launch/sft.sbatch, sized by sbatch's
    options, on 2 nodes x 1 rank (two torchruns meeting on n1) against the pipeline's 1 node
    x 2 ranks."""
    reference, run = tiny_pipeline[0] / "sft", tmp_path / "sft"
    (run / "logs").mkdir(parents=True)
    env = dict(job_env(slurm), RANKS_PER_NODE="1", PYTHON=sys.executable, RUN_DIR=str(run))
    submit = [
        "sbatch", "--parsable", "--nodes=2", "--cpus-per-task=1", "--gpus-per-node=0", "--mem=2G",
        f"--output={run}/logs/slurm-%j.out", "launch/sft.sbatch", "--config", "examples/sft_tiny.yaml",
        *data_args(task_data, "sft"), *SFT_OVERRIDES, f"train.run_dir={run}",
    ]  # fmt: skip
    job_id, step, log = preempt_and_requeue(slurm, run, submit, ["--batch"], after_rows=3, env=env)
    assert_ran_on_both_nodes(slurm, job_id, log)
    assert 3 <= step < SFT_STEPS
    a, b = metrics(reference), metrics(run)
    assert [r["step"] for r in b] == list(range(1, SFT_STEPS + 1))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert_same_weights(reference, run, SFT_STEPS, ("actor",))


def test_usr1_to_every_process_with_one_task_per_rank(slurm, task_data, tiny_pipeline, tmp_path):
    """PPO with `--launcher srun` (one task per rank, ranks from SLURM_PROCID, no torchrun)
    on 2 nodes, and `--full` (the signal reaches the batch shell, srun and every rank at
    once): same ending as the pipeline's 1-node torchrun PPO, actor and critic bit for bit."""
    root = tiny_pipeline[0]
    reference, run = root / "ppo", tmp_path / "ppo"
    submit = [
        sys.executable, "-m", "megarlhf", "launch", "ppo", "--config", "examples/ppo_tiny.yaml", *TWO_NODES,
        "--launcher", "srun", *ppo_overrides(task_data), f"sft_model_path={root / 'sft'}",
        f"reward_model_path={root / 'rm'}", f"train.run_dir={run}",
    ]  # fmt: skip
    job_id, step, log = preempt_and_requeue(slurm, run, submit, ["--full"], after_rows=2)
    assert_ran_on_both_nodes(slurm, job_id, log)
    assert "1 rank(s) per node via srun" in log
    assert 2 <= step < PPO_STEPS
    a, b = metrics(reference), metrics(run)
    assert [r["step"] for r in b] == list(range(1, PPO_STEPS + 1))
    for key in ("objective/scores", "objective/kl", "objective/kl_coef", "val/vf_loss", "policy/clipfrac"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert_same_weights(reference, run, PPO_STEPS, ("actor", "critic"))
