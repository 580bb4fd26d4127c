"""Rollout dumps (train.dump_rollouts), reading them back, and `--replay-rollouts`'s update.
Layer: trainers/.

One Parquet file per dumped iteration, `run_dir/rollouts/iter_NNNNNNN.parquet`, one row
per sequence. Parquet (pyarrow) rather than JSONL: float32 columns round-trip bit-exact
(a replay must reproduce the update within 1e-6), files are a fraction of the size, and
pandas / DuckDB / `datasets` read them directly.

Columns:
    prompt_text, response_text, answer (JSON)     what a person reads
    prompt_ids                                    the prompt's token ids
    <batch keys>                                  every tensor of the update's batch: [N]
                                                  ones as scalars, [N, T] ones as lists of T
                                                  (tokens, mask, engine_logprobs, trainer_logprobs,
                                                  is_weights, scores, rewards, advantages,
                                                  returns, ...), dtype kept
    policy_version                                optimizer updates the sampling policy had seen
                                                  (the iteration's index - 1)
The file's metadata holds the dtype and shape of each batch column.
"""

from __future__ import annotations

import json
from typing import Any
from pathlib import Path

import torch
import torch.nn.functional as F

# What generation produced: a replay starts from these and recomputes the rest.
GENERATED = (
    "tokens", "mask", "prompt_lengths", "response_lengths", "lengths", "last_index", "finished",
    "engine_logprobs", "engine_entropy",
)  # fmt: skip


def dump_path(run_dir: str | Path, iteration: int) -> Path:
    return Path(run_dir) / "rollouts" / f"iter_{iteration:07d}.parquet"


def write_rollouts(path: Path, batch: dict[str, torch.Tensor], items: list[dict], decode, policy_version: int) -> Path:
    """Write the batch (whole, replicated: call on one rank) and its items to `path`.
    `decode(ids) -> str` renders the texts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = batch["tokens"].shape[0]
    columns: dict[str, list] = {
        "prompt_text": [it["prompt_text"] for it in items],
        "answer": [json.dumps(it.get("answer")) for it in items],
        "prompt_ids": [it["prompt_ids"].tolist() for it in items],
        "response_text": [],
        "policy_version": [policy_version] * n,
    }
    for i in range(n):
        p, r = int(batch["prompt_lengths"][i]), int(batch["response_lengths"][i])
        columns["response_text"].append(decode(batch["tokens"][i, p : p + r].tolist()))
    layout = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor) or value.shape[:1] != (n,):
            continue
        value = value.detach().cpu()
        layout[key] = {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
        columns[key] = value.tolist()
    table = pa.table(columns)
    # Keep float32 as float32 (pyarrow would infer double from Python floats).
    schema = pa.schema([
        pa.field(f.name, _arrow_type(layout[f.name]) if f.name in layout else f.type) for f in table.schema
    ])  # fmt: skip
    table = table.cast(schema).replace_schema_metadata({"megarlhf": json.dumps({"columns": layout})})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def _arrow_type(spec: dict):
    import pyarrow as pa

    scalar = {"float32": pa.float32(), "float64": pa.float64(), "int64": pa.int64(), "int32": pa.int32(), "bool": pa.bool_()}
    base = scalar[spec["dtype"]]
    for _ in spec["shape"][1:]:
        base = pa.list_(base)
    return base


def read_rollouts(path: str | Path, keys: tuple[str, ...] = GENERATED) -> tuple[dict[str, torch.Tensor], list[dict], int]:
    """A dump -> (batch with `keys`, items {prompt_ids, prompt_text, answer}, policy_version).
    Raises ValueError naming the file and what is missing."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such rollout dump (run_dir/rollouts/iter_N.parquet, written by train.dump_rollouts)")
    table = pq.read_table(path)
    meta = json.loads((table.schema.metadata or {}).get(b"megarlhf", b"{}"))
    layout = meta.get("columns", {})
    missing = [k for k in keys if k not in layout]
    if missing:
        raise ValueError(f"{path}: not a megarlhf rollout dump with columns {missing}")
    data = table.to_pydict()
    batch = {k: torch.tensor(data[k], dtype=getattr(torch, layout[k]["dtype"])) for k in keys}
    items = [
        {"prompt_ids": torch.tensor(ids, dtype=torch.long), "prompt_text": text, "answer": json.loads(answer)}
        for ids, text, answer in zip(data["prompt_ids"], data["prompt_text"], data["answer"])
    ]
    return batch, items, int(data["policy_version"][0])


def replay(trainer, path: str) -> dict[str, Any]:
    """One update on a dumped rollout batch (train.dump_rollouts), without generating: the
    way to debug a loss spike. Start from the dumping run's checkpoint of the iteration
    before (`--resume PATH`; `trainer` is this run's RolloutTrainer): the same weights,
    optimizer state and minibatch order then reproduce that iteration's losses and update.
    Logs the metrics, saves a checkpoint."""
    dumped, items, version = read_rollouts(path)
    if version != trainer.step:
        trainer.run.say(
            f"note: {path} was sampled by the policy after {version} iterations; the weights loaded have "
            f"{trainer.step}: pass --resume with that run's checkpoints/iter_{version:07d} to reproduce it"
        )
    # Re-laid out for this run's layouts (the column multiple may differ from the dumping run's).
    batch = trainer.rollout_batch(dumped["tokens"], dumped["mask"], items)
    t = batch["tokens"].shape[1]
    for key in ("engine_logprobs", "engine_entropy"):
        batch[key] = F.pad(dumped[key], (0, max(0, t - dumped[key].shape[1])))[:, :t]
    trainer.run.say(f"replaying {path}: {len(items)} sequences, no generation")
    metrics = trainer.update(batch, items)
    trainer.step += 1
    trainer.run.log_metrics(trainer.step, metrics)
    trainer.run.say(f"replayed iteration {trainer.step}: " + ", ".join(f"{k} {metrics[k]:.4g}" for k in trainer.shown_keys if k in metrics))
    trainer.save()
    summary = {"stage": trainer.stage, "replayed": str(path), "steps": trainer.step, "final": metrics}
    trainer.run.write_summary(summary)
    trainer.run.close()
    return summary
