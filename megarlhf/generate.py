"""`megarlhf generate`: batch generation from any checkpoint, optionally scored. Layer: cli
entry (beside quickstart.py; uses checkpoint/, data/, models/, parallel/, rollout/).

    prompts file -> chat template -> rollout engine (TP x DP) -> score (rule and/or reward
    model) -> best-of-n -> output JSONL (+ summary with a confidence interval)

The model is the trainers' (`build_model` + `load_model_weights`, or `load_hf_weights` for a
Hugging Face folder), the engine is the trainers' rollout engine (`GenerationEngine`), the
prompts go through the trainers' `PromptDataset` and chat template: what `generate` prints
for a checkpoint is what that checkpoint's evaluation sees. Sample j of prompt i draws from
seed (seed, i, j), so results do not depend on TP, DP or batch size.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megarlhf.algorithms.intervals import summarize_scores
from megarlhf.checkpoint.dist_ckpt import checkpoint_model_config, load_model_weights, resolve_checkpoint
from megarlhf.config import ConfigError, GenerateConfig, ModelConfig
from megarlhf.checkpoint.source import model_source
from megarlhf.config.train import DataConfig
from megarlhf.data import PromptDataset, tokenizer_and_template
from megarlhf.engine.schedule import run_microbatches
from megarlhf.models.backbone import build_model
from megarlhf.parallel import Layout, RoleGroups, build_parallel_context, init_distributed, seed_all
from megarlhf.parallel.collect import is_row_owner
from megarlhf.rollout import GenerationEngine, SamplingParams
from megarlhf.rollout.rewards import load_reward_fn
from megarlhf.trainers.rm import sequence_scores


def is_hf_folder(path: str | Path) -> bool:
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


def load_model(path: str, role: str, groups: RoleGroups, head: str = "lm") -> torch.nn.Module:
    """A frozen model from a megarlhf checkpoint (any saved TP/PP) or a Hugging Face folder."""
    if is_hf_folder(path):
        from megarlhf.checkpoint.hf import load_hf_weights, model_config_from_hf, read_hf_config

        cfg = model_config_from_hf(read_hf_config(path)).config
        model = build_model(cfg, groups, head)
        load_hf_weights(model, groups, path, strict=True)
    else:
        cfg = checkpoint_model_config(path)
        model = build_model(cfg, groups, head)
        load_model_weights(model, groups, path, role)
    model.requires_grad_(False)
    return model.eval()


def data_config(cfg: GenerateConfig) -> DataConfig:
    """cfg.data, its empty tokenizer fields filled from the checkpoint: an HF folder's files, a
    converted model's hf/ folder, or the tokenizer, template and special tokens its training
    run used (what `init_from` brings to a trainer: checkpoint.source.model_source)."""
    if cfg.data.tokenizer:
        return cfg.data
    found = model_source(str(resolve_checkpoint(cfg.model_path).parent.parent)) if not is_hf_folder(cfg.model_path) \
        else model_source(f"hf:{cfg.model_path}")
    brought = found[2] if found else {}
    if not brought.get("tokenizer"):
        raise ConfigError(
            f"no tokenizer found for {cfg.model_path} (no hf/ folder, no data.tokenizer in its run's config.yaml): "
            "set data.tokenizer"
        )
    return replace(cfg.data, **{k: v for k, v in brought.items() if not getattr(cfg.data, k)})


def mark_best(samples: list[dict[str, Any]]) -> None:
    """Best-of-n: `best` = True on the highest-scoring of one prompt's samples (the first
    one on ties), False on the others."""
    best = max(range(len(samples)), key=lambda k: (samples[k]["score"], -k))
    for k, r in enumerate(samples):
        r["best"] = k == best


def _model_config(model: torch.nn.Module) -> ModelConfig:
    return model.megarlhf_config


class Generator:
    """One `megarlhf generate` run: set-up in __init__, everything else in `run()`."""

    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg
        init_distributed()
        layouts = {"actor": Layout(cfg.layout.tp, 1)}
        if cfg.reward_model_path:
            layouts["reward"] = Layout(cfg.layout.tp, 1)
        self.ctx = build_parallel_context(layouts)
        self.groups = self.ctx["actor"]
        seed_all(cfg.seed, self.groups)
        self.tokenizer, self.template = tokenizer_and_template(data_config(cfg))
        self.prompts = PromptDataset(
            cfg.prompts, self.tokenizer, self.template, max_length=cfg.data.max_length,
            truncation=cfg.data.truncation, on_error=cfg.data.on_error, progress=False,
        )  # fmt: skip
        self.model = load_model(cfg.model_path, cfg.role, self.groups)
        model_cfg = _model_config(self.model)
        if self.tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens, the model's vocabulary {model_cfg.vocab_size}: "
                "wrong data.tokenizer for this checkpoint?"
            )
        longest = max(len(it["prompt_ids"]) for it in self.prompts) + cfg.max_new_tokens
        if longest > model_cfg.max_seq_length:
            raise ConfigError(
                f"longest prompt + max_new_tokens = {longest} tokens exceeds the model's max_seq_length "
                f"{model_cfg.max_seq_length}: lower max_new_tokens or data.max_length"
            )
        self.engine = GenerationEngine(
            self.model, self.groups, vocab_size=self.tokenizer.vocab_size,
            eos_id=self.tokenizer.eos_ids, pad_id=self.tokenizer.pad_id,
        )  # fmt: skip
        self.reward_fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
        self.reward = load_model(cfg.reward_model_path, "reward", self.ctx["reward"], "value") if cfg.reward_model_path else None
        self.is_main = self.ctx.is_main

    # --- the run ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        rows = [(i, j) for i in range(len(self.prompts)) for j in range(cfg.n)]
        mine = rows[self.groups.dp_rank :: self.groups.layout.dp]  # this DP replica's samples
        results = []
        bar = self._progress(len(rows))
        for start in range(0, max(len(mine), 1), cfg.batch_size):
            # A replica's TP ranks hold the same rows, so they call the engine together;
            # replicas need not make the same number of calls (only gather() is world-wide).
            batch = mine[start : start + cfg.batch_size]
            if batch:
                results += self.generate(batch)
            if bar is not None:
                bar.update(min(cfg.batch_size * self.groups.layout.dp, len(rows) - bar.n))
        if self.reward is not None:
            self.score_with_reward_model(results)
        results = self.gather(results)
        if bar is not None:
            bar.close()
        summary = None
        if self.is_main:
            results.sort(key=lambda r: (r["index"], r["sample"]))
            summary = self.finish(results, time.perf_counter() - t0)
        return summary or {}

    def _progress(self, total: int):
        if not self.is_main:
            return None
        from tqdm import tqdm

        return tqdm(total=total, desc="generate", unit="sample", dynamic_ncols=True)

    def generate(self, batch: list[tuple[int, int]]) -> list[dict[str, Any]]:
        """Samples (prompt i, sample j) of `batch`, decoded and rule-scored on this replica."""
        cfg, tok = self.cfg, self.tokenizer
        items = [self.prompts[i] for i, _ in batch]
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        seeds = [hash((cfg.seed, i, j)) % 2**62 for i, j in batch]
        out = self.engine.generate([it["prompt_ids"].tolist() for it in items], params, seeds)
        if not is_row_owner(self.groups):
            return []
        results = []
        for k, ((i, j), item) in enumerate(zip(batch, items)):
            ids = out.response_ids(k)
            text = tok.decode([t for t in ids if t not in tok.eos_ids])
            results.append({
                "index": i, "line": self.prompts.lines[i], "sample": j, "prompt": item["prompt_text"],
                "response": text, "finish_reason": out.finish_reasons[k],
                "prompt_tokens": len(item["prompt_ids"]), "response_tokens": len(ids),
                "response_ids": ids,
            })  # fmt: skip
        if self.reward_fn is not None:
            scores = self.reward_fn([r["prompt"] for r in results], [r["response"] for r in results],
                                    [items[k]["answer"] for k in range(len(results))])  # fmt: skip
            for r, s in zip(results, scores):
                r["rule_score"] = float(s)
        return results

    @torch.no_grad()
    def score_with_reward_model(self, results: list[dict[str, Any]]) -> None:
        """Reward-model scores (last token of prompt + response) of this replica's samples.
        Collective within the replica: its TP ranks run the forward together, so the rows
        (known only on the row owner) are broadcast over TP first."""
        groups = self.ctx["reward"]
        payload = [[(self.prompts[r["index"]]["prompt_ids"].tolist(), r["response_ids"]) for r in results]]
        if groups.layout.tp > 1:
            dist.broadcast_object_list(payload, src=dist.get_global_rank(groups.tp, 0), group=groups.tp)
        seqs = [p + r for p, r in payload[0]]
        device = next(self.reward.parameters()).device
        scores: list[float] = []
        for start in range(0, len(seqs), self.cfg.batch_size):
            chunk = seqs[start : start + self.cfg.batch_size]
            t = max(len(s) for s in chunk)
            tokens = torch.full((len(chunk), t), self.tokenizer.pad_id, dtype=torch.long)
            for k, s in enumerate(chunk):
                tokens[k, : len(s)] = torch.tensor(s)
            mb = {"tokens": tokens.to(device), "position_ids": torch.arange(t, device=device).expand(len(chunk), t),
                  "last_index": torch.tensor([len(s) - 1 for s in chunk], device=device)}  # fmt: skip
            zero = torch.zeros((), device=device)
            out = run_microbatches(
                self.reward, groups, [mb], lambda o, b: (zero, {"s": sequence_scores(o[..., 0].float(), b["last_index"])}),
                forward_only=True,
            )  # fmt: skip
            scores += out[0]["s"].tolist()
        for r, s in zip(results, scores):
            r["rm_score"] = float(s)

    def gather(self, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every replica's samples on rank 0 (collective over the world)."""
        if dist.get_world_size() == 1:
            return results
        everyone = [None] * dist.get_world_size() if self.is_main else None
        dist.gather_object(results, everyone, dst=0)
        return [r for part in everyone for r in part] if self.is_main else []

    # --- rank 0: scores, best-of-n, output -------------------------------------------------------
    def finish(self, results: list[dict[str, Any]], seconds: float) -> dict[str, Any] | None:
        cfg = self.cfg
        scored = self.reward_fn is not None or self.reward is not None
        for r in results:
            if scored:
                r["score"] = r.get("rule_score", 0.0) + r.get("rm_score", 0.0)
        per_prompt: dict[int, list[dict[str, Any]]] = {}
        for r in results:
            per_prompt.setdefault(r["index"], []).append(r)
        if scored and cfg.n > 1:
            for samples in per_prompt.values():
                mark_best(samples)
        kept = [r for r in results if r.get("best", True)] if cfg.best_of_n else results
        out_path = Path(cfg.output_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "w") as f:
            for r in kept:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        tokens = sum(r["response_tokens"] for r in results)
        print(f"megarlhf generate: {len(results)} samples of {len(per_prompt)} prompts, {tokens} tokens "
              f"in {seconds:.1f} s ({tokens / seconds:.1f} tokens/s); wrote {out_path}")  # fmt: skip
        if not scored:
            return None
        scores = [[r["score"] for r in samples] for samples in per_prompt.values()]
        summary: dict[str, Any] = {"samples": summarize_scores(scores, cfg.confidence)}
        if cfg.n > 1:
            summary["best_of_n"] = summarize_scores([[max(s)] for s in scores], cfg.confidence)
        summary.update({"model_path": cfg.model_path, "prompts": cfg.prompts, "n": cfg.n, "temperature": cfg.temperature,
                        "max_new_tokens": cfg.max_new_tokens, "reward_fn": cfg.reward_fn,
                        "reward_model_path": cfg.reward_model_path, "seconds": seconds})  # fmt: skip
        for name in ("samples", "best_of_n") if cfg.n > 1 else ("samples",):
            s = summary[name]
            what = "accuracy" if "accuracy" in s else "mean score"
            print(f"{name}: {what} {s['mean']:.4f}, {s['confidence']:.0%} CI [{s['ci_low']:.4f}, {s['ci_high']:.4f}] "
                  f"({s['ci_method']}; {s['prompts']} prompts, {s['samples']} samples)")  # fmt: skip
        Path(f"{out_path}.summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


def run_generate(cfg: GenerateConfig) -> dict[str, Any]:
    return Generator(cfg).run()
