"""Every EOS id of generation_config.json stops generation (Llama-3 lists two)."""

from __future__ import annotations

from megarlhf.config import ModelConfig
from megarlhf.data import load_tokenizer
from megarlhf.data.template import JinjaChatTemplate
from megarlhf.models.backbone import build_model
from megarlhf.rollout.engine import GenerationEngine
from megarlhf.rollout.sampling import SamplingParams
from tests.hf_fixtures import hf_tokenizer, write_generation_eos

NEW = 10


def _stop_points(rows: list[list[int]], never: set[int]):
    """(i, j): a = rows[0][i] and b = rows[1][j] such that row 0 first meets a stop at i and
    row 1 at j when both a and b stop (and `never`, the other EOS ids, did not come first)."""
    r0, r1 = rows
    for i in range(1, NEW - 1):
        for j in range(1, NEW - 1):
            a, b = r0[i], r1[j]
            stops = {a, b}
            if a != b and not stops & set(r0[:i]) and not stops & set(r1[:j]) and not never & set(r0[: i + 1] + r1[: j + 1]):
                return i, j
    return None


def test_generation_stops_on_every_eos_id_of_generation_config(single_rank, tmp_path):
    folder = hf_tokenizer(tmp_path / "tok", "llama3")
    tok = load_tokenizer(folder)
    template = JinjaChatTemplate(tok.chat_template, tok.template_origin)
    prompts = [template.render_prompt(tok, "What is two plus two?"), template.render_prompt(tok, "Tell me a joke.")]
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, max_seq_length=128), single_rank, "lm").eval()
    params = SamplingParams(max_new_tokens=NEW, temperature=1.0)

    def generate(eos_ids):
        engine = GenerationEngine(model, single_rank, vocab_size=tok.vocab_size, eos_id=eos_ids, pad_id=tok.pad_id)
        out = engine.generate(prompts, params, seeds=[1, 2])
        return [out.response_ids(k) for k in range(2)], out.finish_reasons

    free, _ = generate([-1])  # no id stops: the samples each seed draws
    found = _stop_points(free, never={tok.eos_id})
    assert found is not None, free
    i, j = found
    a, b = free[0][i], free[1][j]
    write_generation_eos(folder, [tok.eos_id, a, b])
    tok = load_tokenizer(folder)
    assert tok.eos_ids == (tok.eos_id, a, b)

    rows, reasons = generate(tok.eos_ids)
    assert rows == [free[0][: i + 1], free[1][: j + 1]] and reasons == ["stop", "stop"]
    rows, _ = generate((tok.eos_id, a))  # without b, row 1 runs past it
    assert rows[0] == free[0][: i + 1] and len(rows[1]) > j + 1


def test_rollout_batch_counts_a_row_ending_in_any_eos_id_as_finished():
    import torch

    from megarlhf.trainers.ppo_batches import rollout_batch

    tokens = torch.tensor([[5, 6, 7, 0], [5, 6, 8, 0], [5, 6, 9, 0]])  # prompt [5], responses [6, x]
    mask = torch.tensor([[0, 1, 1, 0]] * 3, dtype=torch.float)
    batch = rollout_batch(tokens, mask, torch.tensor([1, 1, 1]), eos_id=(7, 8), pad_id=0, multiple=1, max_seq_length=8)
    assert batch["finished"].tolist() == [True, True, False]
    assert rollout_batch(tokens, mask, torch.tensor([1, 1, 1]), eos_id=7, pad_id=0, multiple=1,
                         max_seq_length=8)["finished"].tolist() == [True, False, False]  # fmt: skip
