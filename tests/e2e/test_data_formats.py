"""The CLI reads Parquet, save_to_disk folders and verl's RL Parquet schema through the
data.*_key column mapping: an SFT run trains on them, and a bad row stops DPO and GRPO
with exit 2 naming the file, row and column (before any model is built; SFT's bad rows
are the unit tests')."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from tests.e2e.conftest import megarlhf

TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128", "train.micro_batch_size=4",
        "train.global_batch_size=8", "train.logging_steps=1", "train.save_steps=0"]  # fmt: skip


def rows(path, n):
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def test_sft_trains_on_parquet_and_save_to_disk_with_renamed_columns(task_data, tmp_path):
    import datasets

    renamed = [{"question": r["prompt"], "reply": r["response"]} for r in rows(task_data["sft"], 64)]
    pq.write_table(pa.Table.from_pylist(renamed), tmp_path / "sft.parquet")
    datasets.Dataset.from_list(renamed[:16]).save_to_disk(str(tmp_path / "eval"))
    run = tmp_path / "run"
    out = megarlhf(
        "sft", "--config", "examples/sft_tiny.yaml", f"data.tokenizer={task_data['tokenizer']}",
        f"data.train_file={tmp_path / 'sft.parquet'}", f"data.eval_file={tmp_path / 'eval'}",
        "data.prompt_key=question", "data.response_key=reply", f"train.run_dir={run}", "train.max_steps=3", *TINY,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    assert "64 training samples (0 skipped), 16 eval samples (0 skipped)" in out.stdout + out.stderr
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3 and "eval_loss" in last


def test_bad_rows_stop_dpo_and_grpo_naming_file_row_and_column(task_data, tmp_path):
    tok = f"data.tokenizer={task_data['tokenizer']}"
    # DPO: a pair whose chosen equals its rejected, in row 2 (init_from is never reached)
    prefs = rows(task_data["prefs_train"], 8)
    prefs[2]["rejected"] = prefs[2]["chosen"]
    pq.write_table(pa.Table.from_pylist(prefs), tmp_path / "prefs.parquet")
    out = megarlhf("dpo", "--config", "examples/dpo_tiny.yaml", tok, f"data.train_file={tmp_path / 'prefs.parquet'}",
                   "data.eval_file=", "win_rate_prompts=", f"init_from={tmp_path}", *TINY)  # fmt: skip
    assert out.returncode == 2, out.stderr[-4000:]
    assert f"{tmp_path / 'prefs.parquet'} row 2: 'chosen' equals 'rejected'" in out.stderr

    # GRPO on verl's schema: prompt as messages, the answer nested in reward_model; row 3 lacks it
    verl = [{"data_source": "sort", "prompt": [{"content": r["prompt"], "role": "user"}], "ability": "sort",
             "reward_model": {"ground_truth": r["answer"], "style": "rule"}, "extra_info": {"index": i}}
            for i, r in enumerate(rows(task_data["prompts_train"], 8))]  # fmt: skip
    verl[3]["reward_model"]["ground_truth"] = None
    pq.write_table(pa.Table.from_pylist(verl), tmp_path / "verl.parquet")
    out = megarlhf("grpo", "--config", "examples/grpo_tiny.yaml", tok, f"data.train_file={tmp_path / 'verl.parquet'}",
                   "data.eval_file=", "data.answer_key=reward_model.ground_truth", f"sft_model_path={tmp_path}",
                   *TINY)  # fmt: skip
    assert out.returncode == 2, out.stderr[-4000:]
    assert f"{tmp_path / 'verl.parquet'} row 3: column 'reward_model.ground_truth' (data.answer_key) is null" in out.stderr
