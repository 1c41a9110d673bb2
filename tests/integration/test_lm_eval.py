"""lm-evaluation-harness, the real package, scores a small multiple-choice task through the OpenAI gateway
(`local-completions`: echo + logprobs, as it scores every log-likelihood task) and through its own `hf` model on
the same transformers model: the same per-choice log-likelihoods (within 1e-3), the same greedy flags and the
same accuracy (issue 30.1's must-show)."""

from __future__ import annotations

import json

import pytest
import torch

from coordinator.api.http_launch import settings_beside, start_gateway
from coordinator.config import CoordinatorConfig
from tests.clusters import registered

ITEMS = [
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten"], 1),
    ("What colour is the sky on a clear day?", ["green", "red", "blue"], 2),
    ("Which animal says moo?", ["a cow", "a cat", "a duck", "a dog"], 0),
    ("What is two plus two?", ["three", "five", "four"], 2),
    ("Which is the largest planet in our solar system?", ["Mars", "Jupiter", "Venus"], 1),
    ("What do bees make?", ["honey", "milk", "silk"], 0),
    ("Which season is the coldest?", ["summer", "spring", "winter"], 2),
]
TASK = "shardline_mc"


@pytest.fixture(scope="module")
def gateway(loop, smollm2_store, parameters):
    config = CoordinatorConfig(store=smollm2_store.root, model="smollm2", workers=2, port=0, http_port=0,
                               parameters_address=parameters.address, heartbeat_timeout_ms=3_600_000)
    with registered(loop, config, 2) as (coordinator, _):
        http = loop.run(start_gateway(settings_beside(config, coordinator.server.port)))
        yield http.url
        loop.run(http.stop())


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The task, made here (no hub): a JSON-lines file and its YAML."""
    root = tmp_path_factory.mktemp("lm_eval_task")
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in ITEMS))
    (root / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return root


def evaluate(model, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir)),
                          log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return out["results"][TASK]["acc,none"], [[tuple(r[0]) for r in s["resps"]] for s in samples]


def test_lm_eval_scores_through_the_gateway_equal_its_hf_model(gateway, task_dir, smollm2_store):
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(smollm2_store.path("smollm2"))
    served = LocalCompletionsAPI(base_url=f"{gateway}/completions", model="smollm2", tokenizer=path,
                                 tokenizer_backend="huggingface", num_concurrent=1, max_retries=1)
    acc, scores = evaluate(served, task_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # as the other tests load it
    ref = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(path), device="cpu", batch_size=1)
    ref_acc, ref_scores = evaluate(ref, task_dir)
    assert len(scores) == len(ITEMS) and [len(s) for s in scores] == [len(c) for _, c, _ in ITEMS]
    for doc, (ours, theirs) in enumerate(zip(scores, ref_scores, strict=True)):
        for (ll, greedy), (ref_ll, ref_greedy) in zip(ours, theirs, strict=True):
            assert abs(ll - ref_ll) < 1e-3, (doc, ll, ref_ll)
            assert greedy == ref_greedy, doc
    assert acc == ref_acc
    assert len({ll for s in scores for ll, _ in s}) > len(ITEMS)  # real, distinct scores
