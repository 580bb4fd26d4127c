"""SFT and reward-model training end to end on the synthetic sorting task: learning
happens, resume is exact, bad inputs fail cleanly with the documented exit codes."""

from __future__ import annotations

import json

import pytest
import torch

from tests.e2e.conftest import data_overrides, megarlhf, resume_after_crash

SFT = "examples/sft_tiny.yaml"
RM = "examples/rm_tiny.yaml"


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_tensors(ckpt_dir) -> dict[str, torch.Tensor]:
    """Read a dist_checkpointing (torch_dist) checkpoint with PyTorch's own DCP reader."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt_dir.parent / (ckpt_dir.name + ".pt")
    dcp_to_torch_save(str(ckpt_dir), str(out))
    state = torch.load(out, weights_only=False)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def sft_run(task_data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    out = megarlhf(
        "sft", "--config", SFT, *data_overrides(task_data, "sft", "sft_test"),
        f"train.run_dir={run_dir}", "train.max_steps=150", "train.eval_steps=150",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    return run_dir


def test_sft_loss_falls_and_run_dir_is_complete(sft_run):
    rows = metrics(sft_run)
    assert [r["step"] for r in rows] == list(range(1, 151))
    first, final = rows[0]["loss"], rows[-1]["eval_loss"]
    # Untrained: ~log(vocab) per token. Trained: the sorted answer is nearly certain.
    assert first > 2.5
    assert final < 0.25 * first, (first, final)
    assert (sft_run / "config.yaml").is_file() and (sft_run / "summary.json").is_file()
    assert (sft_run / "checkpoints" / "latest").read_text().strip() == "iter_0000150"


def test_reward_model_from_sft_reaches_90_percent(task_data, sft_run, tmp_path):
    run_dir = tmp_path / "rm"
    out = megarlhf(
        "rm", "--config", RM, *data_overrides(task_data, "prefs_train", "prefs_test"),
        f"train.run_dir={run_dir}", f"init_from={sft_run}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    final = metrics(run_dir)[-1]
    assert final["eval_accuracy"] >= 0.90, final
    assert final["eval_rewards_chosen"] > final["eval_rewards_rejected"]


def test_resume_is_bit_exact(task_data, tmp_path):
    """20 steps straight == crash after the step-10 checkpoint + `--resume auto`."""
    common = [
        "--config", SFT, *data_overrides(task_data, "sft"), "train.max_steps=20",
        "train.save_steps=10", "train.save_total_limit=3", "optim.warmup_steps=5", "data.eval_file=",
    ]  # fmt: skip
    straight = tmp_path / "straight"
    out = megarlhf("sft", *common, f"train.run_dir={straight}")
    assert out.returncode == 0, out.stderr[-4000:]

    # A crash right after the step-10 checkpoint: the step-20 one never happened.
    crashed = tmp_path / "crashed"
    resume_after_crash("sft", straight, crashed, 10, 20, common)

    a, b = metrics(straight), metrics(crashed)
    assert [r["step"] for r in b] == list(range(1, 21))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    wa = checkpoint_tensors(straight / "checkpoints" / "iter_0000020" / "actor")
    wb = checkpoint_tensors(crashed / "checkpoints" / "iter_0000020" / "actor")
    assert wa.keys() == wb.keys() and len(wa) > 10
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k

    # `--resume auto` on the finished run (as the SLURM scripts always pass it): nothing to
    # do, and the run's summary stays what the training wrote.
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["final"]["loss"] == a[-1]["loss"]
    out = megarlhf("sft", *common, f"train.run_dir={straight}", "--resume", "auto")
    assert out.returncode == 0 and "already finished" in out.stdout + out.stderr, out.stderr[-4000:]
    assert json.loads((straight / "summary.json").read_text()) == summary
    assert len(metrics(straight)) == 20


def test_sft_at_tp2_then_rm_at_tp1_loads_the_resharded_policy(task_data, tmp_path):
    sft_dir, rm_dir = tmp_path / "sft_tp2", tmp_path / "rm_tp1"
    out = megarlhf(
        "sft", "--config", SFT, *data_overrides(task_data, "sft"), "layout.tp=2", "data.eval_file=",
        f"train.run_dir={sft_dir}", "train.max_steps=3", nproc=2,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    out = megarlhf(
        "rm", "--config", RM, *data_overrides(task_data, "prefs_train"), "data.eval_file=",
        f"train.run_dir={rm_dir}", f"init_from={sft_dir}", "train.max_steps=2",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]


def test_bad_data_line_exits_2_naming_file_and_line(task_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = task_data["sft"].read_text().splitlines()[:40]
    lines[6] = '{"prompt": "sort: 1 2", "response": 7}'
    bad.write_text("\n".join(lines) + "\n")
    out = megarlhf("sft", "--config", SFT, f"data.tokenizer={task_data['tokenizer']}", f"data.train_file={bad}")
    assert out.returncode == 2
    assert f"{bad}:7:" in out.stderr and "response" in out.stderr


def test_bad_config_and_bad_checkpoint_exit_codes(task_data, tmp_path):
    out = megarlhf("sft", "--config", SFT, *data_overrides(task_data, "sft"), "optim.learning_rat=1")
    assert out.returncode == 2 and "did you mean optim.learning_rate" in out.stderr
    out = megarlhf("rm", "--config", RM, *data_overrides(task_data, "prefs_train"), "data.eval_file=", f"init_from={tmp_path}")
    assert out.returncode == 3 and "no checkpoint at" in out.stderr
