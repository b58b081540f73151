"""The packed layout (each prompt once in one sequence, logits at response positions only) equals
the plain padded forward (fp32, 1e-5): summed log-probs, a loss built on them, and every gradient;
GPT-2 and Llama; responses of different lengths, groups of 2 and 4, rows that share no prompt, a
single sequence, one sequence longer than all the others; and the reward model's features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from rpo_pipeline.scoring import ResponseLogps, batch_response_logps, packed_collate, target_logps

VOCAB, PAD = 50, 0


def _models():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                      n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=64))
    return {"gpt2": gpt2, "llama": llama}


def _plain(lm, sequences, starts):
    """Reference: right-padded prompt + response rows, full logits, log-softmax over all positions."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD)
    attn = torch.zeros_like(ids)
    for b, s in enumerate(sequences):
        ids[b, :len(s)] = torch.tensor(s)
        attn[b, :len(s)] = 1
    logits = lm(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                use_cache=False).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = torch.zeros_like(lp, dtype=torch.bool)
    for b, (s, st) in enumerate(zip(sequences, starts, strict=True)):
        mask[b, max(st, 1) - 1:len(s) - 1] = True
    return (lp * mask).double().sum(-1), mask.sum(-1)


def _groups(seed, n_groups, k):
    g = torch.Generator().manual_seed(seed)
    seqs, starts = [], []
    for _ in range(n_groups):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
        for _ in range(k):
            resp = torch.randint(1, VOCAB, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g)
            seqs.append(prompt.tolist() + resp.tolist())
            starts.append(len(prompt))
    return seqs, starts


def _pair_order(seqs, k):
    """DPO's row order: every group's first response, then every group's second, ..."""
    return [seqs[i * k + j] for j in range(k) for i in range(len(seqs) // k)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("k,order", [(2, "pairs"), (4, "groups")])
@pytest.mark.parametrize("share_prompt", [True, False])
def test_packed_batch_equals_padded_forward_in_value_and_every_gradient(arch, k, order, share_prompt):
    """One packed sequence (each prompt once, or one segment per row), the LM head at scored
    positions only, equals full logits over right-padded rows: DPO pairs (chosen rows first) and
    RPO groups of 2 and 4, plus a row that shares its prompt with no other."""
    lm = _models()[arch]
    seqs, starts = _groups(1, 5, k)
    if order == "pairs":
        seqs, starts = _pair_order(seqs, k), _pair_order(starts, k)
    seqs.append([7, 8, 9, 10])  # a row that shares its prompt with no other row
    starts.append(3)
    batch = packed_collate(seqs, starts, share_prompt)
    assert batch["segment_index"].shape[0] == (6 if share_prompt else len(seqs))
    prompts = [tuple(x[:max(s, 1)]) for x, s in zip(seqs, starts, strict=True)]
    responses = sum(len(x) - len(q) for x, q in zip(seqs, prompts, strict=True))
    assert batch["packed_ids"].shape[1] == responses + sum(map(len, set(prompts) if share_prompt else prompts))
    w = torch.linspace(-1, 1, len(seqs), dtype=torch.float64)

    lm.zero_grad()
    ref, ref_n = _plain(lm, seqs, starts)
    (F.logsigmoid(w * ref / 10).sum()).backward()
    ref_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}

    lm.zero_grad()
    got, got_n = ResponseLogps(lm)(batch)
    (F.logsigmoid(w * got / 10).sum()).backward()

    assert torch.equal(got_n, ref_n)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-6)
    assert ref.abs().min() > 1  # real log-probs, not zeros
    for n, p in lm.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    assert sum(g.abs().sum() for g in ref_grads.values()) > 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_single_sequence_and_one_longer_than_the_rest_together(arch):
    """A batch of one sequence; and one segment longer than all the others together (most of the
    batch's tokens, the rest padding in attention only)."""
    lm = _models()[arch]
    long = list(range(1, 40)) + list(range(1, 9))
    for seqs, starts in (([[3, 4, 5, 6, 7]], [2]), ([long, [5, 6, 7], [9, 8]], [6, 1, 1])):
        batch = packed_collate(seqs, starts)
        assert batch["packed_ids"].shape[1] == sum(len(x) for x in seqs)  # no padding token
        lm.zero_grad()
        ref, ref_n = _plain(lm, seqs, starts)
        ref.sum().backward()
        ref_grads = {n: p.grad.clone() for n, p in lm.named_parameters()}
        lm.zero_grad()
        got, got_n = ResponseLogps(lm)(batch)
        got.sum().backward()
        assert torch.equal(got_n, ref_n)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-6)
        for n, p in lm.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)


def test_packed_layout_positions_and_masks():
    """Each response's positions continue from its prompt; a response sees its prompt and its own
    earlier tokens, never another response or segment."""
    b = packed_collate([[5, 6, 7], [5, 6, 8, 9], [4, 6, 7]], [2, 2, 2])
    assert b["packed_ids"].tolist() == [[5, 6, 7, 8, 9, 4, 6, 7]]
    assert b["packed_positions"].tolist() == [[0, 1, 2, 2, 3, 0, 1, 2]]
    assert b["segment_index"].tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 8]]  # 8: padding
    mask = b["segment_mask"][0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    assert b["segment_mask"][1, 0, 3:, 3:].int().tolist() == [[1, 0], [0, 1]]  # padding sees itself
    # token 7 of row 0 is predicted from position 1 (the prompt's last), 8 from 1, 9 from 3
    assert b["score_from"].tolist() == [1, 1, 3, 6]
    assert b["score_target"].tolist() == [7, 8, 9, 7] and b["score_row"].tolist() == [0, 1, 1, 2]
    assert b["last_at"].tolist() == [2, 4, 7]
    lm = _models()["gpt2"]
    logp, n = batch_response_logps(lm, packed_collate([[1, 2], [1, 2, 3]], [2, 2]))
    assert n.tolist() == [0, 1] and logp[0] == 0 and logp[1] < 0  # no response token: 0


def test_packed_attention_leaves_other_calls_to_sdpa():
    """A model switched to the packed attention generates as before (no segment arguments)."""
    lm = _models()["gpt2"].eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        before = lm(input_ids=ids).logits
        ResponseLogps(lm)(packed_collate([[3, 4, 5, 6]], [2]))
        assert lm.config._attn_implementation == "rpo_packed"
        torch.testing.assert_close(lm(input_ids=ids).logits, before)


def test_chunked_target_logps_equal_unchunked_with_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 30, bias=False)
    h = torch.randn(23, 8, requires_grad=True)
    y = torch.randint(0, 30, (23,))
    full = target_logps(head, h, y)
    g_full = torch.autograd.grad(full.sum(), [h, head.weight])
    chunked = target_logps(head, h, y, chunk_elements=30 * 5)  # 5 rows per chunk
    g_chunk = torch.autograd.grad(chunked.sum(), [h, head.weight])
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(full, torch.log_softmax(head(h), -1).gather(-1, y[:, None])[:, 0])
    for a, b in zip(g_full, g_chunk, strict=True):
        torch.testing.assert_close(a, b)


def test_logit_softcapping_models_are_refused():
    lm = _models()["gpt2"]
    lm.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        batch_response_logps(lm, packed_collate([[1, 2, 3]], [1]))


@pytest.mark.parametrize("head_input", ["hidden", "logits"])
@pytest.mark.parametrize("starts", ["prompt", "whole"])
def test_reward_model_packed_batches_equal_one_forward_per_sequence(tmp_path, head_input, starts):
    """Rewards (and gradients) of packed pairs (the prompt once; ``whole``: responses from token 0,
    so only the first token is shared) equal the last-token reward of one plain forward per
    sequence (full-precision backbone, so exact to float rounding)."""
    from rpo_pipeline.reward_model import RewardModel, RewardModelConfig, RewardPair, pair_collate

    _models()["gpt2"].save_pretrained(tmp_path / "lm")
    rm = RewardModel.for_training(RewardModelConfig(backbone_path=str(tmp_path / "lm"),
                                                    load_in_4bit=False, head_input=head_input,
                                                    lora_r=4, lora_alpha=8), seed=0)
    seqs, st = _groups(3, 4, 2)
    if starts == "whole":
        st = [0] * len(st)
    items = [RewardPair(seqs[2 * i], seqs[2 * i + 1], 0.0, st[2 * i], st[2 * i + 1]) for i in range(4)]
    items.append(RewardPair([3, 4, 5], [3, 4, 5, 6]))

    def plain(x):
        out = rm.backbone(input_ids=torch.tensor([x]), output_hidden_states=True, use_cache=False)
        feats = out.hidden_states[-1][:, -1] if head_input == "hidden" else out.logits[:, -1]
        return rm.head(feats.float()).squeeze(-1)

    rm.zero_grad()
    ref = torch.cat([plain(i.chosen_input_ids) for i in items] + [plain(i.rejected_input_ids) for i in items])
    ref.square().sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}
    rm.zero_grad()
    got = rm(pair_collate()(items))
    got.square().sum().backward()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert len(ref_grads) > 4  # LoRA and head
    for n, g in ref_grads.items():
        torch.testing.assert_close(dict(rm.named_parameters())[n].grad, g, atol=1e-5, rtol=1e-4, msg=n)
