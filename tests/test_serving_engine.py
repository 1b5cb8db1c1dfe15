"""The continuous-batching engine: rows join and leave a running batch and every request still gets the
tokens of a greedy loop over PEFT's forward for its adapter alone; per-row sampling, n, cancellation, the
static policy, and sliding-window families.

Nothing here depends on the machine's speed: where a test needs a request to be running when something
happens, the engine thread is held at that request's first token (``EngineEvents``) until it has happened,
and assertions are on the order of engine events and on token counts, never on time."""
import copy
import threading
import time

import pytest
import torch

pytest.importorskip("peft")

import softprompt_kernels as sk  # noqa: E402
from hf_models import tiny_model  # noqa: E402
from softprompt_kernels.serving.engine import Engine, Request, SamplingParams  # noqa: E402
from test_serving_bank import ADAPTERS, greedy_loop, make_adapter  # noqa: E402


def bank_and_models(base, capacity=4):
    models = {name: make_adapter(base, kind, k, seed) for seed, (name, (kind, k)) in enumerate(ADAPTERS.items())}
    bank = sk.PromptBank(copy.deepcopy(base), capacity=capacity)
    for name, model in models.items():
        bank.add(name, model)
    return bank, models


def expected_tokens(base, models, adapter, prompt, steps):
    model = base if adapter is None else models[adapter]
    ids = torch.tensor([prompt])
    return greedy_loop(lambda i, m: model(input_ids=i, attention_mask=m).logits, ids, torch.ones_like(ids),
                       steps)[0].tolist()


class EngineEvents:
    """Records engine events (request name, its tokens so far) in the order the engine thread reports them;
    ``report(name, hold=True)`` holds the engine thread at that request's first token until ``release()``."""

    def __init__(self):
        self.events = []
        self.held = threading.Event()
        self._released = threading.Event()

    def report(self, name, hold=False):
        def on_event(request, choice, delta):
            self.events.append((name, len(choice.tokens)))
            if hold and len(choice.tokens) == 1:
                self.held.set()
                self._released.wait(60)  # a guard: the test releases it as soon as it has acted
        return on_event

    def release(self):
        self._released.set()

    def names(self):
        return [name for name, _ in self.events]


def wait_until(condition, guard_s=30.0):
    """Polls ``condition`` (the engine updates its state right after the events a test waits for)."""
    deadline = time.monotonic() + guard_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


SPECS = [("x6", [5, 6, 7, 8], 7), ("p3", [9, 10], 5), (None, [11, 12, 13, 14, 15, 16], 9), ("x4", [17], 3),
         ("p5", [18, 19, 20], 12), ("p3", [21, 22, 23, 24, 25], 4), ("x6", [26, 27], 6), (None, [28], 8)]


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "opt"])
def test_rows_joining_and_leaving_get_each_requests_own_tokens(model_type):
    base = tiny_model(model_type, dtype=torch.float64)
    bank, models = bank_and_models(base)
    engine = Engine(bank, max_batch=4, max_prefill_tokens=8).start()  # small: rows must wait, join, leave
    try:
        requests = []
        for i, (adapter, prompt, steps) in enumerate(SPECS):
            requests.append(engine.submit(Request(adapter, prompt, SamplingParams(max_tokens=steps, temperature=0))))
            time.sleep(0.005 * (i % 3))
        for request in requests:
            assert request.done.wait(60)
    finally:
        engine.stop()
    for (adapter, prompt, steps), request in zip(SPECS, requests):
        assert request.error is None
        assert request.choices[0].tokens == expected_tokens(base, models, adapter, prompt, steps), (adapter, prompt)
        assert request.choices[0].finish_reason == "length"


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_late_request_joins_the_running_batch_only_when_continuous(batching):
    """A request submitted while another runs (the engine is held at the first one's first token): continuous
    batching prefills it at the next step and decodes both together; static batching starts it only when the
    running batch has ended. Both give each request its own tokens."""
    base = tiny_model("llama", dtype=torch.float64)
    bank, models = bank_and_models(base)
    log = EngineEvents()
    engine = Engine(bank, max_batch=8, batching=batching).start()
    try:
        first = engine.submit(Request("x6", [5, 6, 7], SamplingParams(max_tokens=30, temperature=0),
                                      on_event=log.report("first", hold=True)))
        assert log.held.wait(60)
        late = engine.submit(Request("p3", [9], SamplingParams(max_tokens=2, temperature=0),
                                     on_event=log.report("late")))
        log.release()
        assert late.done.wait(60) and first.done.wait(60)
    finally:
        engine.stop()
    if batching == "continuous":  # late prefilled at the next iteration, then one step of both ends it
        assert log.names() == ["first", "first", "late", "first", "late"] + ["first"] * 27
    else:  # late waited for the running batch to end
        assert log.names() == ["first"] * 30 + ["late"] * 2
    assert late.choices[0].tokens == expected_tokens(base, models, "p3", [9], 2)
    assert first.choices[0].tokens == expected_tokens(base, models, "x6", [5, 6, 7], 30)


def test_sampling_is_per_row_and_reproducible_and_n_gives_independent_choices():
    base = tiny_model("llama")
    bank, _ = bank_and_models(base)
    engine = Engine(bank, max_batch=8).start()
    try:
        params = SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=3)
        a = engine.submit(Request("p5", [5, 6], params, n=3))
        greedy = engine.submit(Request("p5", [5, 6], SamplingParams(max_tokens=8, temperature=0)))
        assert a.done.wait(60) and greedy.done.wait(60)
        b = engine.submit(Request("p5", [5, 6], params, n=3))
        assert b.done.wait(60)
    finally:
        engine.stop()
    assert [c.tokens for c in a.choices] == [c.tokens for c in b.choices]
    assert len({tuple(c.tokens) for c in a.choices}) > 1
    assert greedy.choices[0].tokens == bank.generate(torch.tensor([[5, 6]]), adapters=["p5"], max_new_tokens=8)[0]


def test_a_cancelled_request_stops_and_leaves_the_batch():
    base = tiny_model("llama")
    bank, _ = bank_and_models(base)
    log = EngineEvents()
    engine = Engine(bank, max_batch=8).start()
    try:
        long = engine.submit(Request("x4", [5], SamplingParams(max_tokens=240, temperature=0),
                                     on_event=log.report("long", hold=True)))
        other = engine.submit(Request("p3", [6], SamplingParams(max_tokens=20, temperature=0)))
        assert log.held.wait(60)  # long has its first token and the engine waits
        long.cancel()
        log.release()
        assert long.done.wait(60) and other.done.wait(60)
        wait_until(lambda: engine.running_rows == 0)
        assert log.names() == ["long"] and engine.running_rows == 0  # it left at the next step
        assert other.choices[0].tokens == bank.generate(torch.tensor([[6]]), adapters=["p3"], max_new_tokens=20)[0]
    finally:
        engine.stop()


def test_more_adapters_than_capacity_wait_instead_of_failing():
    base = tiny_model("llama", dtype=torch.float64)
    bank, models = bank_and_models(base, capacity=2)
    engine = Engine(bank, max_batch=8).start()
    try:
        requests = [engine.submit(Request(a, p, SamplingParams(max_tokens=s, temperature=0))) for a, p, s in SPECS]
        for request in requests:
            assert request.done.wait(60)
    finally:
        engine.stop()
    for (adapter, prompt, steps), request in zip(SPECS, requests):
        assert request.error is None and request.choices[0].tokens == expected_tokens(base, models, adapter, prompt,
                                                                                       steps)


def test_sliding_window_families_are_batched_statically_and_say_so(caplog):
    from hf_families import tiny_causal_lm

    base = tiny_causal_lm("gemma3_text").double()
    bank, models = bank_and_models(base)
    with caplog.at_level("WARNING", logger="softprompt_kernels.serving"):
        engine = Engine(bank, max_batch=8)
    assert engine.batching == "static" and "sliding-window layers" in caplog.text
    engine.start()
    try:
        requests = [engine.submit(Request(a, p, SamplingParams(max_tokens=s, temperature=0))) for a, p, s in SPECS[:4]]
        for request in requests:
            assert request.done.wait(60)
    finally:
        engine.stop()
    for (adapter, prompt, steps), request in zip(SPECS, requests):
        assert request.choices[0].tokens == expected_tokens(base, models, adapter, prompt, steps)


def test_engine_arguments_are_checked():
    bank, _ = bank_and_models(tiny_model("llama"))
    with pytest.raises(ValueError, match="batching must be"):
        Engine(bank, batching="dynamic")
    with pytest.raises(ValueError, match="max_queue"):
        Engine(bank, max_queue=0)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_a_step_failing_halfway_fails_only_its_row(model_type, monkeypatch):
    """A decode step that raises in its second layer (after the first has appended to the cache), whenever
    the batch holds the victim's second token: the victim fails, the others get their own tokens (the cache
    is restored to before the step; continuous and static batching alike)."""
    from hf_families import tiny_causal_lm

    base = (tiny_model(model_type) if model_type == "llama" else tiny_causal_lm(model_type)).double()
    bank, models = bank_and_models(base)
    victim = ("p5", [30, 31, 32], 8)
    poison = expected_tokens(base, models, *victim)[1]
    others = [s for s in SPECS[:5] if poison not in expected_tokens(base, models, *s) + s[1]]
    model = bank.model
    poisoned = {"now": False}
    original = model.forward

    def forward(*args, **kwargs):
        ids = kwargs.get("input_ids")
        poisoned["now"] = ids is not None and ids.shape[1] == 1 and bool((ids == poison).any())
        return original(*args, **kwargs)

    def second_layer(module, inputs):
        if poisoned["now"]:
            raise RuntimeError("injected fault in layer 1")

    monkeypatch.setattr(model, "forward", forward)
    model.model.layers[1].register_forward_pre_hook(second_layer)
    engine = Engine(bank, max_batch=8).start()
    try:
        requests = [engine.submit(Request(a, p, SamplingParams(max_tokens=s, temperature=0)))
                    for a, p, s in [victim, *others]]
        for request in requests:
            assert request.done.wait(60)
    finally:
        engine.stop()
    assert "injected fault in layer 1" in requests[0].error
    for (adapter, prompt, steps), request in zip(others, requests[1:]):
        assert request.error is None
        assert request.choices[0].tokens == expected_tokens(base, models, adapter, prompt, steps)
