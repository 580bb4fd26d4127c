"""Shared e2e fixtures: the synthetic task's data and tokenizer, built once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> dict[str, Path]:
    from megarlhf.data import train_sentencepiece, write_synthetic

    out = tmp_path_factory.mktemp("sort_task")
    paths = write_synthetic(out, seed=0)
    paths["tokenizer"] = Path(train_sentencepiece([str(paths["tokenizer_corpus"])], str(out / "sp"), 64))
    return paths


def megarlhf(*args, nproc: int = 1, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (torchrun for more than one rank)."""
    env = dict(os.environ, OMP_NUM_THREADS="1" if nproc > 1 else "2", PYTHONPATH=str(REPO))
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "megarlhf", *args]
    else:
        cmd = [sys.executable, "-m", "megarlhf", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def data_overrides(task_data, train: str, eval_: str | None = None) -> list[str]:
    out = [f"data.tokenizer={task_data['tokenizer']}", f"data.train_file={task_data[train]}"]
    if eval_:
        out.append(f"data.eval_file={task_data[eval_]}")
    return out


@pytest.fixture(scope="session")
def weak_sft(task_data, tmp_path_factory) -> Path:
    """A 40-step SFT policy: it answers in the right format but often sorts wrongly, which
    leaves PPO and DPO something to improve."""
    run_dir = tmp_path_factory.mktemp("sft40") / "run"
    out = megarlhf(
        "sft", "--config", "examples/sft_tiny.yaml", *data_overrides(task_data, "sft"), "data.eval_file=",
        f"train.run_dir={run_dir}", "train.max_steps=40", "train.seed=0",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    return run_dir


def resume_after_crash(stage: str, straight: Path, crashed: Path, kept: int, lost: int, args: list[str]):
    """Copy the finished run `straight` to `crashed` as if it had crashed right after the
    iteration-`kept` checkpoint (the iteration-`lost` one never written), then continue it
    with `--resume auto`; asserts that it ran and said it resumed."""
    import shutil

    shutil.copytree(straight, crashed)
    shutil.rmtree(crashed / "checkpoints" / f"iter_{lost:07d}")
    (crashed / "checkpoints" / "latest").write_text(f"iter_{kept:07d}\n")
    out = megarlhf(stage, *args, f"train.run_dir={crashed}", "--resume", "auto")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "resumed from" in out.stdout + out.stderr


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    """One JSON object per line (the data writers are a parameter of the HF-model tests:
    other formats add a writer with this signature)."""
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """One Parquet file; a column of one form is null in the other form's rows (from_pylist
    alone would take the columns of the first row only)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    keys = list(dict.fromkeys(k for r in rows for k in r))
    pq.write_table(pa.Table.from_pydict({k: [r.get(k) for r in rows] for k in keys}), path)
    return path


def write_save_to_disk(path: Path, rows: list[dict]) -> Path:
    """A `datasets.Dataset.save_to_disk` folder."""
    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


DATA_WRITERS = {"jsonl": (".jsonl", write_jsonl), "parquet": (".parquet", write_parquet),
                "save_to_disk": ("", write_save_to_disk)}  # fmt: skip
"""Format name -> (file suffix, writer(path, rows) -> the path to pass as data.*_file)."""


@pytest.fixture(scope="session")
def converted_llama(tmp_path_factory) -> Path:
    """A tiny random HF Llama with a ChatML tokenizer (tests/hf_fixtures.py), converted by
    tools/convert_hf_to_megatron.py: the directory a user passes as init_from."""
    from tests.hf_fixtures import tiny_llama

    root = tmp_path_factory.mktemp("hf_llama")
    src = tiny_llama(root / "hf_model", "chatml")
    out = root / "converted"
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "tools/convert_hf_to_megatron.py", str(src), str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return out
