"""`megarlhf launch`: the rendered sbatch scripts (multi-node header, rendezvous, signals),
the generic scripts in launch/, and inputs refused with exit code 2 before anything is
submitted. Running the scripts on a real SLURM: tests/e2e/test_slurm.py."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from megarlhf.cli import main
from megarlhf.launch import GENERIC_STAGES, SlurmJob, render, time_limit_seconds

REPO = Path(__file__).resolve().parents[2]
PPO_70B = [
    "ppo", "--config", "examples/ppo_70b.yaml", "--nodes", "16", "--gpus-per-node", "8",
    "--partition", "batch", "--account", "llm", "--time", "04:00:00", "--container-image",
    "nvcr.io#nvidia/pytorch:25.01-py3", "--container-mounts", "/lustre:/lustre",
]  # fmt: skip


def launch(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["launch", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def sbatch_options(script: str) -> dict[str, str]:
    return dict(
        (m.group(1), m.group(2) or "")
        for m in re.finditer(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", script, flags=re.M)
    )


def test_70b_ppo_on_16_nodes_of_8_gpus(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, script, err = launch(capsys, *PPO_70B, "--dry-run", "--env", "NCCL_IB_HCA=mlx5", "train.max_steps=10")
    assert code == 0 and err == ""
    opts = sbatch_options(script)
    assert opts == {
        "job-name": "megarlhf-ppo", "nodes": "16", "ntasks-per-node": "1", "gpus-per-node": "8",
        "exclusive": "", "mem": "0", "partition": "batch", "account": "llm", "time": "04:00:00",
        "signal": "B:USR1@600", "requeue": "", "open-mode": "append",
        "output": "/lustre/runs/llama3-70b-ppo/logs/slurm-%j.out", "chdir": str(REPO),
    }  # fmt: skip
    assert "layouts: actor tp8-pp4-dp4, critic tp8-pp4-dp4, reference tp8-pp2-dp8, reward tp8-pp1-dp16, rollout tp8-pp1-dp16" in script
    assert "16 node(s) x 8 GPUs = 128 ranks" in script
    # What the job runs: one torchrun per node, 8 workers each, meeting on the first node.
    assert f"ARGS=(--config {REPO}/examples/ppo_70b.yaml train.max_steps=10)" in script
    assert "RANKS_PER_NODE=8\nLAUNCHER=torchrun\nPYTHON=python\n" in script
    assert "CONTAINER_IMAGE='nvcr.io#nvidia/pytorch:25.01-py3'\nCONTAINER_MOUNTS=/lustre:/lustre\n" in script
    assert '--nnodes="$NODES" --nproc-per-node="$RANKS_PER_NODE"' in script
    assert '--rdzv-backend=c10d --rdzv-endpoint="$HEAD_ADDR:$PORT" --rdzv-id="$SLURM_JOB_ID"' in script
    assert 'HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in script
    assert '-m megarlhf "$STAGE" --resume auto "${ARGS[@]}"' in script
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in script and "export NCCL_IB_HCA=mlx5" in script
    assert 'scontrol requeue "$SLURM_JOB_ID"' in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_one_task_per_rank_and_cpu_ranks(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, script, _ = launch(
        capsys, "sft", "--config", "examples/sft_tiny.yaml", "--nodes", "4", "--gpus-per-node", "2", "--cpu",
        "--cpus-per-node", "8", "--launcher", "srun", "--dependency", "afterok:17", "--dry-run", "train.micro_batch_size=4",
    )  # fmt: skip
    assert code == 0
    opts = sbatch_options(script)
    assert (opts["nodes"], opts["ntasks-per-node"], opts["cpus-per-task"]) == ("4", "2", "4")
    assert "gpus-per-node" not in opts and "exclusive" not in opts
    assert (opts["dependency"], opts["kill-on-invalid-dep"]) == ("afterok:17", "yes")
    assert "export MASTER_ADDR=$HEAD_ADDR MASTER_PORT=$PORT" in script
    assert "layouts: actor tp1-pp1-dp8" in script


def test_launch_scripts_are_the_generic_renderings():
    for stage in GENERIC_STAGES:
        path = REPO / "launch" / f"{stage}.sbatch"
        assert path.read_text() == render(SlurmJob(stage=stage)), f"regenerate: python -m megarlhf.launch launch/ ({path})"
        assert path.stat().st_mode & 0o111
        subprocess.run(["bash", "-n", str(path)], check=True)
        assert 'ARGS=("$@")' in path.read_text()
    subprocess.run(["bash", "-n", str(REPO / "launch" / "pipeline.sh")], check=True)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--nodes", "12", "--gpus-per-node", "4"], "actor layout: tp*pp = 8*4 = 32 does not divide the world size 48"),
        (["--nodes", "1"], "actor layout: tp*pp = 8*4 = 32 does not divide the world size 8"),
        (["--gpus-per-node", "8", "layout.tp=16"], "model.num_query_groups = 8 is not divisible by tp = 16"),
        (["reward_layout.pp=3"], "reward layout: tp*pp = 8*3 = 24 does not divide the world size 128"),
        (["--time", "00:05:00"], "--signal-seconds 600 is not shorter than --time 00:05:00"),
        (["--env", "1BAD=x"], "--env '1BAD=x': expected KEY=VALUE"),
        (["--nodez", "3"], "unrecognized arguments: --nodez 3"),
        (["optim.learning_rat=1"], "did you mean optim.learning_rate"),
        (["--container-image", "", "--container-mounts", "/a:/a"], "--container-mounts needs --container-image"),
    ],
)
def test_bad_inputs_exit_2_before_submitting(capsys, monkeypatch, args, message):
    monkeypatch.chdir(REPO)
    code, out, err = launch(capsys, *PPO_70B, "--dry-run", *args)
    assert code == 2 and out == ""
    assert message in err


def test_missing_config_and_unknown_stage(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    code, _, err = launch(capsys, "sft", "--config", str(tmp_path / "nope.yaml"), "--dry-run")
    assert code == 2 and "nope.yaml does not exist" in err
    with pytest.raises(SystemExit) as exit_:
        main(["launch", "sfx", "--config", "examples/sft_tiny.yaml"])
    assert exit_.value.code == 2 and "invalid choice: 'sfx'" in capsys.readouterr().err


def test_tensor_parallel_across_nodes_warns(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, script, err = launch(
        capsys, "sft", "--config", "examples/sft_tiny.yaml", "--nodes", "2", "--gpus-per-node", "2",
        "layout.tp=4", "model.num_query_groups=4", "--dry-run",
    )  # fmt: skip
    assert code == 0 and script
    assert "actor tp=4 does not fit in one node of 2" in err


def test_supervised_batch_must_split_over_data_parallel_ranks(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    code, _, err = launch(capsys, "sft", "--config", "examples/sft_tiny.yaml", "--nodes", "3", "--gpus-per-node", "1", "--dry-run")
    assert code == 2 and "micro_batch_size * dp = 16 * 3" in err


@pytest.mark.parametrize(
    "stage,args,message",
    [
        # minibatches of 32 of the 64 prompts, micro-batch 16: 3 DP ranks cannot share them
        ("ppo", ["--nodes", "3"], "the minibatch = 32 sequences does not split over the actor's 3"),
        # the frozen reward model at dp 3 (tp 1 of 3 ranks) vs an actor at tp 3, dp 1
        ("ppo", ["--nodes", "3", "layout.tp=3", "reward_layout.tp=1", "model.num_attention_heads=3",
                 "model.num_query_groups=3", "model.hidden_size=96", "model.ffn_hidden_size=192",
                 "model.make_vocab_size_divisible_by=96"],
         "the rollout batch = 64 sequences does not split over the reward's 3"),
        # 4 minibatches of 32 responses each, micro-batch 16: DP 4 needs 64 per minibatch
        ("grpo", ["--nodes", "4"], "the minibatch = 32 sequences does not split over the actor's 4"),
    ],
)
def test_rollout_batches_must_split_over_every_role(capsys, monkeypatch, stage, args, message):
    monkeypatch.chdir(REPO)
    code, out, err = launch(capsys, stage, "--config", f"examples/{stage}_tiny.yaml", "--gpus-per-node", "1", *args, "--dry-run")
    assert code == 2 and out == "" and message in err, err
    code, script, _ = launch(capsys, stage, "--config", f"examples/{stage}_tiny.yaml", "--nodes", "2", "--gpus-per-node", "1", "--dry-run")
    assert code == 0 and script


@pytest.mark.parametrize(
    "value,seconds",
    [("30", 1800), ("10:30", 630), ("04:00:00", 14400), ("2-00", 172800), ("1-02:03", 93780), ("1-00:00:05", 86405)],
)
def test_time_limit_seconds(value, seconds):
    assert time_limit_seconds(value) == seconds


def test_docs_show_the_current_70b_dry_run(capsys, monkeypatch):
    """docs/slurm.md's example was rendered from /home/me/megarlhf; it must match today's renderer."""
    monkeypatch.chdir(REPO)
    code, script, _ = launch(capsys, *PPO_70B, "--account", "my-account", "--dry-run")
    assert code == 0
    readme = (REPO / "docs" / "slurm.md").read_text()
    start = readme.index("```bash\n#!/bin/bash\n# megarlhf ppo on 16 node(s)") + len("```bash\n")
    shown = readme[start : readme.index("```\n", start)]
    assert shown == script.replace(str(REPO), "/home/me/megarlhf"), "rerun the dry-run command of docs/slurm.md"
