"""The background batch drawer: same batches as a plain loop, errors reach the caller."""

import pytest
import torch

from leo.meta.prefetch import Prefetcher


def test_batches_and_recorded_states_match_a_plain_loop():
    def draws(gen):
        return lambda: torch.rand(3, generator=gen)

    plain_gen = torch.Generator().manual_seed(5)
    plain = []
    for _ in range(6):
        batch = draws(plain_gen)()
        plain.append((batch, plain_gen.get_state()))
    gen = torch.Generator().manual_seed(5)
    with Prefetcher(draws(gen), (gen,), depth=2) as ahead:
        got = [next(ahead) for _ in range(6)]
    for (batch, state), drawn in zip(plain, got, strict=True):
        assert torch.equal(batch, drawn.batch)
        assert torch.equal(state, drawn.states_after[0])


def test_an_error_in_the_drawing_thread_is_raised_by_next():
    calls = []

    def draw():
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("class 'x' has 2 examples")
        return len(calls)

    with Prefetcher(draw, ()) as ahead:
        assert next(ahead).batch == 1
        assert next(ahead).batch == 2
        with pytest.raises(ValueError, match="class 'x'"):
            next(ahead)


def test_disabled_draws_in_the_callers_thread():
    gen = torch.Generator().manual_seed(1)
    with Prefetcher(lambda: torch.rand(2, generator=gen), (gen,), enabled=False) as inline:
        first = next(inline)
    # nothing was drawn ahead: the live state is the recorded one
    assert torch.equal(gen.get_state(), first.states_after[0])
