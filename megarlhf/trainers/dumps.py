"""Rollout dumps (train.dump_rollouts) and reading them back for `--replay-rollouts`.
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
from pathlib import Path

import torch

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
