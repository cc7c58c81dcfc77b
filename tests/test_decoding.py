"""Greedy decoding with refilled slots gives model.generate's tokens, whatever the slots."""

import pytest
import torch
from helpers import VOCAB

from compressor.decoding import changes_greedy_logits, greedy_refill


def _prompts(count: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (int(length),), generator=generator).tolist()
            for length in torch.randint(1, 14, (count,), generator=generator)]


def _generate_one(model, prompt: list[int], max_new_tokens: int, stops: set[int] = frozenset()) -> list[int]:
    """model.generate alone on one prompt (no padding), cut after its first token in `stops`."""
    output = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=0)[0, len(prompt):].tolist()
    ends = [position for position, token in enumerate(output) if token in stops]
    return output[:ends[0] + 1] if ends else output


@pytest.fixture
def model(tiny_model):
    # float64: a different batch's rounding cannot flip an argmax of the random model
    tiny_model.double().generation_config.eos_token_id = 7
    return tiny_model


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_refilled_slots_give_each_prompt_its_own_greedy_continuation(model, slots):
    """Prompts of 1-13 tokens join as others stop (at a stop token or the length limit), so rows
    of every length share the padded cache; each continuation equals generate's on that prompt
    alone."""
    prompts, stops = _prompts(10), {17, 31, 50}
    got = greedy_refill(model, prompts, 16, lambda tokens: tokens[-1] in stops, slots=slots, progress=False)
    assert got == [_generate_one(model, prompt, 16, stops) for prompt in prompts]
    assert len({len(tokens) for tokens in got}) > 3  # the rows did stop at different steps


def test_the_eos_of_the_generation_config_ends_a_sequence(model):
    prompts = _prompts(6)
    free = greedy_refill(model, prompts, 12, lambda tokens: False, slots=4, progress=False)
    token = free[0][2]
    model.generation_config.eos_token_id = [token, 5]
    cut = greedy_refill(model, prompts, 12, lambda tokens: False, slots=4, progress=False)
    assert cut[0] == free[0][:free[0].index(token) + 1]
    assert cut == [_generate_one(model, prompt, 12) for prompt in prompts]


def test_generation_configs_that_change_greedy_logits_are_refused(model):
    assert changes_greedy_logits(model) == []
    model.generation_config.repetition_penalty = 1.1
    assert changes_greedy_logits(model) == ["repetition_penalty"]
    with pytest.raises(ValueError, match="repetition_penalty"):
        greedy_refill(model, _prompts(2), 4, lambda tokens: False, progress=False)
    with pytest.raises(ValueError, match="empty prompt"):
        model.generation_config.repetition_penalty = 1.0
        greedy_refill(model, [[5], []], 4, lambda tokens: False, progress=False)
