"""Direct preference optimisation. Layer: trainers/.

Each microbatch holds B preference pairs as 2B rows (chosen first, rejected second), as
for the reward model. A row's log-prob is the sum of its response tokens' log-probs
(`loss_mask`), under the policy (trained) and under the frozen reference (same layout,
run forward-only on the same microbatch, so its numbers sit on the same pipeline stage
as the loss). The objective is `algorithms.preference.dpo_loss` (+ RPO's NLL term),
summed over pairs and divided by the global number of pairs.

Implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)); `rewards/accuracies` on
held-out pairs is the fraction where r(chosen) > r(rejected).
"""

from __future__ import annotations

import torch

from megarlhf.algorithms import dpo_loss, rpo_term, sequence_logps
from megarlhf.checkpoint.dist_ckpt import load_model_weights
from megarlhf.data import PromptDataset, collate_preference
from megarlhf.engine.schedule import run_microbatches
from megarlhf.models.backbone import build_model
from megarlhf.models.logprobs import logprobs_and_entropy
from megarlhf.parallel.collect import gather_rows, is_row_owner, shard_rows
from megarlhf.rollout import GenerationEngine, SamplingParams
from megarlhf.rollout.rewards import load_reward_fn
from megarlhf.trainers.rm import RewardModelTrainer
from megarlhf.trainers.supervised import SupervisedTrainer


class DPOTrainer(SupervisedTrainer):
    # Preference pairs, read and measured as for the reward model.
    load_dataset = RewardModelTrainer.load_dataset
    sample_length = RewardModelTrainer.sample_length

    role, head, stage = "actor", "lm", "dpo"
    postfix_keys = ("loss", "rewards/accuracies")

    def __init__(self, cfg, resume=None):
        super().__init__(cfg, resume)
        self.reference = build_model(cfg.model, self.groups, "lm")
        path = cfg.ref_model_path or cfg.init_from
        if path.startswith("hf:"):  # converted once by _init_weights into run_dir/hf_init
            path = f"{cfg.train.run_dir}/hf_init"
        load_model_weights(self.reference, self.groups, path, "actor")
        self.reference.requires_grad_(False)
        self.reference.eval()
        self.win_prompts = self.reward_fn = self._reference_rule_scores = None
        if cfg.win_rate_prompts:
            self.reward_fn = load_reward_fn(cfg.reward_fn)
            self.win_prompts = PromptDataset(
                cfg.win_rate_prompts, self.tokenizer, self.template, max_length=cfg.model.max_seq_length - cfg.win_rate_response_length,
            )  # fmt: skip

    def _row_logps(self, output: torch.Tensor, mb) -> torch.Tensor:
        """[2B] summed log-probs of each row's response tokens."""
        logprobs, _ = logprobs_and_entropy(
            output[:, :-1], mb["tokens"][:, 1:], tp_group=self.groups.tp, vocab_size=self.cfg.model.vocab_size
        )
        return sequence_logps(logprobs, mb["loss_mask"][:, 1:])

    def collate(self, items, seq_length):
        mb = collate_preference(items, seq_length, self.tokenizer.pad_id)
        mb["row_weight"] = torch.ones(len(items))  # one weight per pair
        mb["attention_tokens"] = (mb["last_index"] + 1).sum().float()
        mb = {k: v.to(self.device) for k, v in mb.items()}
        # Reference log-probs of the same rows, on the same (last) pipeline stage.
        zero = torch.zeros((), device=self.device)
        out = run_microbatches(
            self.reference, self.groups, [mb], lambda o, b: (zero, {"logps": self._row_logps(o, b)}), forward_only=True
        )
        mb["ref_logps"] = out[0]["logps"].detach() if out else torch.zeros(2 * len(items), device=self.device)
        return mb

    def count(self, mb) -> torch.Tensor:
        return mb["row_weight"].sum()

    def loss(self, output, mb, n):
        cfg = self.cfg
        b = mb["row_weight"].shape[0]
        keep = mb["row_weight"].bool()  # evaluation pads its last microbatch with weight-0 pairs
        logps, ref = self._row_logps(output, mb), mb["ref_logps"]
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
        policy = self._rule_scores(self.engine.module)
        if self._reference_rule_scores is None:
            self._reference_rule_scores = self._rule_scores(self.reference)
        ref = self._reference_rule_scores
        wins = (policy > ref).double() + 0.5 * (policy == ref).double()
        return {
            "eval_win_rate": wins.mean().item(),
            "eval_rule_score": policy.mean().item(),
            "eval_reference_rule_score": ref.mean().item(),
        }

    def _rule_scores(self, model) -> torch.Tensor:
        """[n] rule scores of `model`'s sampled answers (prompt i uses seed i), each DP
        replica answering its share of the prompts."""
        cfg, tok = self.cfg, self.tokenizer
        n = len(self.win_prompts)
        items = [self.win_prompts[min(i, n - 1)] for i in range(n + (-n % self.dp))]
        rows = shard_rows(len(items), self.groups)
        engine = GenerationEngine(model, self.groups, vocab_size=tok.vocab_size, eos_id=tok.eos_id, pad_id=tok.pad_id)
        sampling = SamplingParams(max_new_tokens=cfg.win_rate_response_length, temperature=cfg.win_rate_temperature)
        model.eval()
        out = engine.generate([items[i]["prompt_ids"].tolist() for i in rows], sampling, seeds=[cfg.train.seed * 100_003 + i for i in rows])
        local = None
        if is_row_owner(self.groups):
            texts = []
            for j in range(len(rows)):
                keep = out.response_mask[j].bool()
                texts.append(tok.decode([t for t in out.tokens[j][keep].tolist() if t != tok.eos_id]))
            mine = [items[i] for i in rows]
            local = torch.tensor(self.reward_fn([it["prompt_text"] for it in mine], texts, [it["answer"] for it in mine]), dtype=torch.float64)
        scores = gather_rows(local, rows, (len(items),), owner=is_row_owner(self.groups), dtype=torch.float64, device=self.device)
        return scores[:n].cpu()
