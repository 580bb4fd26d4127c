"""Direct preference optimisation. Layer: trainers/.

Each microbatch holds B preference pairs as 2B rows (chosen first, rejected second), as
for the reward model. A row's log-prob is the sum of its response tokens' log-probs
(`loss_mask`), under the policy (trained) and under the frozen reference. The reference
runs either inside each step (same layout, forward-only on the same microbatch, so its
numbers sit on the same pipeline stage as the loss), or, under precompute_ref_log_probs,
once over every pair before training, at its own layout: the log-probs are stored in the
dataset's items (and run_dir/reference_logps.pt, reused on resume) and the reference is
freed. The objective is `algorithms.preference.dpo_loss` (+ RPO's NLL term), summed over
pairs and divided by the global number of pairs.

Implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)); `rewards/accuracies` on
held-out pairs is the fraction where r(chosen) > r(rejected).
"""

from __future__ import annotations

import os
import pickle
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from megarlhf.algorithms import dpo_loss, rpo_term, sequence_logps
from megarlhf.checkpoint.dist_ckpt import load_model_weights, resolve_checkpoint
from megarlhf.data import PromptDataset, collate_preference
from megarlhf.engine.schedule import run_microbatches
from megarlhf.models.backbone import build_model
from megarlhf.models.compile import compile_model
from megarlhf.models.logprobs import logprobs_and_entropy
from megarlhf.parallel import Layout
from megarlhf.parallel.collect import gather_rows, is_row_owner, shard_rows
from megarlhf.parallel.layout import RoleGroups
from megarlhf.rollout import GenerationEngine, SamplingParams
from megarlhf.rollout.rewards import load_reward_fn
from megarlhf.trainers.rm import RewardModelTrainer
from megarlhf.trainers.supervised import SupervisedTrainer


def _read_cache(path: Path) -> dict | None:
    """The saved reference log-probs, or None (absent, unreadable, another format)."""
    if not path.exists():
        return None
    try:
        cached = torch.load(path)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
        return None
    return cached if isinstance(cached, dict) else None


class DPOTrainer(SupervisedTrainer):
    # Preference pairs, read and measured as for the reward model.
    load_dataset = RewardModelTrainer.load_dataset
    sample_length = RewardModelTrainer.sample_length

    role, head, stage = "actor", "lm", "dpo"
    postfix_keys = ("loss", "rewards/accuracies")

    def __init__(self, cfg, resume=None):
        super().__init__(cfg, resume)
        self.ref_groups = self.ctx["reference"]
        self.reference = self.reference_forward = None  # the frozen model; compiled under train.compile
        self.win_prompts = self.reward_fn = self._reference_rule_scores = None
        if cfg.win_rate_prompts:
            self.reward_fn = load_reward_fn(cfg.reward_fn)
            self.win_prompts = PromptDataset(
                cfg.win_rate_prompts, self.tokenizer, self.template, max_length=cfg.model.max_seq_length - cfg.win_rate_response_length,
                on_error=cfg.data.on_error, columns=cfg.data.columns(),
            )  # fmt: skip
        if cfg.precompute_ref_log_probs:
            self._precompute_reference()
        else:
            self._load_reference()

    def layouts(self) -> dict[str, Layout]:
        return {**super().layouts(), "reference": Layout(*self.cfg.reference_layout.resolve(self.cfg.layout))}

    def _load_reference(self) -> None:
        """self.reference (and its compiled forward under train.compile)."""
        reference = build_model(self.cfg.model, self.ref_groups, "lm")
        load_model_weights(reference, self.ref_groups, self._reference_path(), "actor")
        reference.requires_grad_(False)
        self.reference = reference.eval()
        if self.cfg.train.compile:
            self.reference_forward = compile_model(reference, self.ref_groups, "the reference model")

    def compiled_roles(self) -> list[str]:
        return super().compiled_roles() + (["reference"] if self.reference_forward is not None else [])

    def _reference_path(self) -> str:
        path = self.cfg.ref_model_path or self.cfg.init_from
        if path.startswith("hf:"):  # converted once by _init_weights into run_dir/hf_init
            path = f"{self.cfg.train.run_dir}/hf_init"
        return path

    def _row_logps(self, output: torch.Tensor, mb, groups: RoleGroups) -> torch.Tensor:
        """[2B] summed log-probs of each row's response tokens."""
        logprobs, _ = logprobs_and_entropy(
            output[:, :-1], mb["tokens"][:, 1:], tp_group=groups.tp, vocab_size=self.cfg.model.vocab_size
        )
        return sequence_logps(logprobs, mb["loss_mask"][:, 1:])

    def collate(self, items, seq_length):
        mb = collate_preference(items, seq_length, self.tokenizer.pad_id)
        mb["row_weight"] = torch.ones(len(items))  # one weight per pair
        mb["attention_tokens"] = (mb["last_index"] + 1).sum().float()
        if "ref_logps" in items[0]:  # precomputed: [chosen, rejected] per item
            pairs = torch.stack([it["ref_logps"] for it in items])
            mb["ref_logps"] = torch.cat([pairs[:, 0], pairs[:, 1]])
        mb = {k: v.to(self.device) for k, v in mb.items()}
        if "ref_logps" not in mb:  # the reference scores the same rows, on the same (last) stage
            mb["ref_logps"] = self._reference_forward([mb], self.groups)[0]
        return mb

    def _reference_forward(self, mbs: list[dict], groups: RoleGroups) -> list[torch.Tensor]:
        """Each microbatch's [2B] row log-probs under the reference (zeros on stages other
        than the last, which do not need them)."""
        zero = torch.zeros((), device=self.device)
        outs = run_microbatches(
            self.reference, groups, mbs, lambda o, b: (zero, {"logps": self._row_logps(o, b, groups)}), forward_only=True,
            forward=self.reference_forward,
        )  # fmt: skip
        if not outs:
            return [torch.zeros(mb["tokens"].shape[0], device=self.device) for mb in mbs]
        return [out["logps"].detach() for out in outs]

    # --- precomputed reference log-probs -------------------------------------------------------
    def _precompute_reference(self) -> None:
        """Every train/eval pair's reference log-probs, once (or read back from the run
        directory), stored in the dataset items; then the reference is freed."""
        datasets = {"train": self.train_data, "eval": self.eval_data}
        datasets = {k: v for k, v in datasets.items() if v is not None}
        path = Path(self.cfg.train.run_dir) / "reference_logps.pt"
        key = self._reference_key(datasets)
        cached = _read_cache(path)
        usable = torch.tensor([cached is not None and cached.get("key") == key], dtype=torch.float32, device=self.device)
        dist.all_reduce(usable, op=dist.ReduceOp.MIN)  # every rank decides alike (a pass is collective)
        if usable.item():
            tables = cached["logps"]
            self.run.say(f"reference log-probs: read back from {path}")
        else:
            t0 = time.perf_counter()
            self._load_reference()
            tables = {name: self._reference_logps(data, name) for name, data in datasets.items()}
            pairs = sum(len(d) for d in datasets.values())
            self.run.say(
                f"reference log-probs of {pairs} pairs at layout {self.ref_groups.layout}: "
                f"{time.perf_counter() - t0:.1f} s; kept in {path}"
            )
            if self.ctx.is_main:
                tmp = path.with_suffix(".tmp")
                torch.save({"key": key, "logps": tables}, tmp)
                os.replace(tmp, path)
        for name, data in datasets.items():
            data.attach("ref_logps", tables[name])
        if self.win_prompts is not None:  # the reference's answers are scored once, now
            if self.reference is None:
                self._load_reference()
            self._reference_rule_scores = self._rule_scores(self.reference, self.ref_groups)
        self.reference = self.reference_forward = None  # training needs the policy only
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _reference_key(self, datasets) -> dict:
        """What the cached log-probs depend on: reference checkpoint, data, lengths, model."""
        files = {}
        for name, data in datasets.items():
            st = os.stat(data.source)
            files[name] = (data.source, st.st_size, st.st_mtime_ns, len(data))
        return {
            "reference": str(resolve_checkpoint(self._reference_path())),
            "data": files,
            "max_length": self.cfg.data.max_length,
            "tokenizer": self.cfg.data.tokenizer,
            "model": asdict(self.cfg.model),
        }

    @torch.no_grad()
    def _reference_logps(self, data, name: str) -> torch.Tensor:
        """[N, 2] (chosen, rejected) log-probs of every pair under the reference at its own
        layout: each DP replica scores its share, longest pairs first, and the owners'
        rows are gathered on every rank."""
        g, n = self.ref_groups, len(data)
        rows = shard_rows(n + (-n % g.layout.dp), g)
        mbs = self.cfg.train.forward_micro_batch(len(rows), pipelined=g.layout.pp > 1)
        order = sorted(rows, key=lambda i: self.sample_length(data[min(i, n - 1)]), reverse=True)
        chunks = [order[k : k + mbs] for k in range(0, len(order), mbs)]
        per_call = 2 * g.layout.pp  # microbatches per pipeline schedule (keeps every stage busy)
        local = torch.zeros(len(rows), 2, dtype=torch.float64)
        bar = self.run.progress(len(chunks), 0, desc=f"reference log-probs ({name})")
        for c in range(0, len(chunks), per_call):
            calls = chunks[c : c + per_call]
            items = [[data[min(i, n - 1)] for i in chunk] for chunk in calls]
            lengths = [self.step_length(chunk, g) for chunk in items]
            if g.layout.pp > 1:  # stages exchange one activation shape per schedule
                lengths = [max(lengths)] * len(lengths)
            batches = [
                {k: v.to(self.device) for k, v in collate_preference(chunk, length, self.tokenizer.pad_id).items()}
                for chunk, length in zip(items, lengths)
            ]
            for chunk, logps in zip(calls, self._reference_forward(batches, g)):
                b = len(chunk)
                slots = torch.tensor([i - rows.start for i in chunk])
                local[slots] = torch.stack([logps[:b], logps[b:]], dim=1).double().cpu()
            if bar is not None:
                bar.update(len(calls))
        if bar is not None:
            bar.close()
        owner = is_row_owner(g)
        table = gather_rows(local if owner else None, rows, (len(rows) * g.layout.dp, 2), owner=owner, dtype=torch.float64, device=self.device)
        return table[:n].float().cpu()

    def count(self, mb) -> torch.Tensor:
        return mb["row_weight"].sum()

    def loss(self, output, mb, n):
        cfg = self.cfg
        b = mb["row_weight"].shape[0]
        keep = mb["row_weight"].bool()  # evaluation pads its last microbatch with weight-0 pairs
        logps, ref = self._row_logps(output, mb, self.groups), mb["ref_logps"]
        chosen, rejected = logps[:b][keep], logps[b:][keep]
        loss, stats = dpo_loss(
            chosen, rejected, ref[:b][keep], ref[b:][keep], cfg.beta, n,
            loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
        )  # fmt: skip
        if cfg.rpo_alpha:
            lengths = mb["loss_mask"][:b, 1:].sum(-1)[keep]
            nll, nll_stats = rpo_term(chosen, lengths, cfg.rpo_alpha, n)
            loss = loss + nll
            stats.update(nll_stats)
        stats["loss"] = loss.detach()
        # Stats as plain sums over pairs (x n undoes dpo_loss's / n), divided in metrics():
        # evaluation adds up chunks that each have their own n.
        sums = {k: v * n for k, v in stats.items()}
        sums["pairs"] = keep.sum().float()
        return loss, sums

    def metrics(self, sums, prefix=""):
        pairs = max(sums.get("pairs", 0.0), 1.0)
        skip = ("pairs", "grad_norm", "learning_rate", "update_applied")
        return {f"{prefix}{k}": v / pairs for k, v in sums.items() if k not in skip}

    # --- win rate under the task's rule ------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        out = super().evaluate()
        if self.win_prompts is not None:
            out.update(self.win_rate())
        return out

    @torch.no_grad()
    def win_rate(self) -> dict[str, float]:
        """The policy's answers vs the reference's on win_rate_prompts, scored by reward_fn.
        The reference's scores are computed once (it never changes)."""
        policy = self._rule_scores(self.engine.module, self.groups)
        if self._reference_rule_scores is None:
            self._reference_rule_scores = self._rule_scores(self.reference, self.ref_groups)
        ref = self._reference_rule_scores
        wins = (policy > ref).double() + 0.5 * (policy == ref).double()
        return {
            "eval_win_rate": wins.mean().item(),
            "eval_rule_score": policy.mean().item(),
            "eval_reference_rule_score": ref.mean().item(),
        }

    def _rule_scores(self, model, groups: RoleGroups) -> torch.Tensor:
        """[n] rule scores of `model`'s sampled answers (prompt i uses seed i), each DP
        replica answering its share of the prompts."""
        cfg, tok = self.cfg, self.tokenizer
        n = len(self.win_prompts)
        items = [self.win_prompts[min(i, n - 1)] for i in range(n + (-n % groups.layout.dp))]
        rows = shard_rows(len(items), groups)
        engine = GenerationEngine(model, groups, vocab_size=tok.vocab_size, eos_id=tok.eos_ids, pad_id=tok.pad_id)
        sampling = SamplingParams(max_new_tokens=cfg.win_rate_response_length, temperature=cfg.win_rate_temperature)
        model.eval()
        out = engine.generate([items[i]["prompt_ids"].tolist() for i in rows], sampling, seeds=[cfg.train.seed * 100_003 + i for i in rows])
        local = None
        if is_row_owner(groups):
            texts = []
            for j in range(len(rows)):
                keep = out.response_mask[j].bool()
                texts.append(tok.decode([t for t in out.tokens[j][keep].tolist() if t not in tok.eos_ids]))
            mine = [items[i] for i in rows]
            local = torch.tensor(self.reward_fn([it["prompt_text"] for it in mine], texts, [it["answer"] for it in mine]), dtype=torch.float64)
        scores = gather_rows(local, rows, (len(items),), owner=is_row_owner(groups), dtype=torch.float64, device=self.device)
        return scores[:n].cpu()
