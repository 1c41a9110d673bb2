"""The last stage's log probabilities, logit biases and penalties equal transformers' on the same model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from shardline.v1 import worker_pb2
from tests.helpers import Chain, error_of, load, seq

SPLITS = [(0, 3), (3, 6)]


@pytest.fixture(scope="module")
def chain(store, parameters, pool):
    servers = pool(len(SPLITS))
    for server, (a, b) in zip(servers, SPLITS, strict=True):
        load(server.address, "tiny-llama", a, b, parameters.address, prefill_chunk_tokens=8)
    return Chain([s.address for s in servers])


@pytest.fixture(scope="module")
def model(store):
    return AutoModelForCausalLM.from_pretrained(store.path("tiny-llama"), dtype=torch.float32).eval()


def sliced(session: str, start: int, ids: list[int], **sampling) -> worker_pb2.SequenceSlice:
    piece = seq(session, start, len(ids), **sampling)
    piece.token_ids.extend(ids)
    return piece


def run(chain: Chain, session: str, prompt: list[int], steps: int, chunk: int = 8, **sampling):
    """Feed the prompt in chunks, then `steps` sampled ids; every response's token and log probabilities."""
    out, scored = [], []
    sampling.setdefault("prompt_tokens", len(prompt))
    pos, pending = 0, list(prompt)
    while len(out) < steps:
        ids = pending[:chunk]
        response = chain.step([sliced(session, pos, ids, **sampling)], ids)
        assert not response.HasField("error") and not response.sequence_errors, error_of(response).message
        scored.append(response.logprobs[0] if response.logprobs else None)
        pos += len(ids)
        del pending[:len(ids)]
        if not pending:
            out.append(response.token_ids[0])
            pending = [out[-1]]
    return out, scored


def test_log_probabilities_of_prompt_and_samples_equal_transformers_log_softmax(chain, model):
    prompt = [5, 17, 3, 99, 42, 7, 1, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # 3 chunks of 8
    out, scored = run(chain, "lp", prompt, 4, logprobs=3, prompt_logprobs=2)
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt + out])).logits[0].float(), dim=-1)
    prompt_scores = [t for s in scored if s is not None for t in s.prompt]
    assert [t.position for t in prompt_scores] == list(range(1, len(prompt)))  # from position 1, none twice
    for t in prompt_scores:
        assert t.token_id == prompt[t.position]
        assert abs(t.logprob - ref[t.position - 1, t.token_id]) < 1e-4
        best = torch.topk(ref[t.position - 1], 2)
        assert list(t.top_ids) == best.indices.tolist()
        assert max(abs(a - b) for a, b in zip(t.top_logprobs, best.values.tolist(), strict=True)) < 1e-4
    sampled = [s.sampled for s in scored if s is not None and s.HasField("sampled")]
    sampled = sampled[-len(out):]  # mid-prefill chunks' samples are not tokens
    for i, (t, token) in enumerate(zip(sampled, out, strict=True)):
        row = ref[len(prompt) - 1 + i]
        assert (t.position, t.token_id) == (len(prompt) + i, token)
        assert abs(t.logprob - row[token]) < 1e-4
        assert list(t.top_ids) == torch.topk(row, 3).indices.tolist()


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties, over the generated ids only (the reference)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float) -> None:
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        for row, ids in zip(scores, input_ids, strict=True):
            out = ids[self.prompt_len:]
            if len(out):
                tokens, counts = torch.unique(out, return_counts=True)
                row[tokens] -= self.frequency * counts.float() + self.presence
        return scores


PROMPTS = [[5, 17, 3, 99, 42], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [100, 7], [64, 64, 64, 64], [9, 8, 7, 6, 5, 4, 3]]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_penalties_and_biases_greedy_equal_transformers_processors(chain, model, prompt):
    bias = {7: 2.5, 42: -100.0, 99: 1.25}
    out, _ = run(chain, f"pen-{prompt[0]}-{len(prompt)}", prompt, 64, repetition_penalty=1.3,
                 frequency_penalty=0.4, presence_penalty=0.6, logit_bias=bias)
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                             repetition_penalty=1.3, sequence_bias={(k,): v for k, v in bias.items()},
                             logits_processor=LogitsProcessorList([OpenAIPenalties(len(prompt), 0.4, 0.6)]))
    assert out == ref[0, len(prompt):].tolist()
    assert 42 not in out


def test_min_p_of_one_keeps_only_the_best_id(chain, model):
    prompt = [5, 17, 3, 99]
    sampled, _ = run(chain, "minp", prompt, 12, temperature=1.5, seed=7, min_p=1.0)
    greedy, _ = run(chain, "minp-greedy", prompt, 12)
    assert sampled == greedy
    loose, _ = run(chain, "minp-off", prompt, 12, temperature=1.5, seed=7)
    assert loose != greedy  # without min_p, this temperature strays (so the assertion above can fail)


def test_penalties_without_the_slices_ids_are_refused_naming_them(chain):
    response = chain.step([seq("no-ids", 0, 3, repetition_penalty=1.2)], [1, 2, 3])
    assert "token_ids" in error_of(response).message
    response = chain.step([sliced("bad-bias", 0, [1, 2], logit_bias={10**9: 1.0})], [1, 2])
    assert "logit_bias" in error_of(response).message


def test_a_fork_copies_its_parents_prompt_and_samples_as_a_whole_prefill_would(chain):
    prompt = [5, 17, 3, 99, 42, 7, 1, 8, 9, 10, 11]
    sampled = dict(temperature=1.3, seed=21)
    whole, _ = run(chain, "fork-whole", prompt, 6, **sampled)
    run(chain, "fork-parent", prompt, 1, seed=20, temperature=1.3)
    piece = seq("fork-child", len(prompt) - 1, 1, **sampled)
    piece.fork_from = "fork-parent"
    response = chain.step([piece], prompt[-1:])
    assert not response.sequence_errors, error_of(response).message
    out = [response.token_ids[0]]
    while len(out) < 6:
        response = chain.step([seq("fork-child", len(prompt) + len(out) - 1, 1, **sampled)], out[-1:])
        out.append(response.token_ids[0])
    assert out == whole  # the copied prompt is the computed one (test_choices counts the prefill saved)
    gone = seq("fork-orphan", len(prompt) - 1, 1)
    gone.fork_from = "no-such-session"
    assert "fork_from" in error_of(chain.step([gone], prompt[-1:])).message
