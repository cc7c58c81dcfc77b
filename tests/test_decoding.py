"""Greedy decoding with refilled slots gives model.generate's tokens, whatever the slots."""

import pytest
import torch
from helpers import VOCAB, tiny_llama_config
from transformers import LlamaForCausalLM

from compressor.decoding import generation_config, greedy_refill, plain_greedy


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
def model():
    # Weights 15x the usual init, so that a wrong position or mask moves an argmax (at 0.02 the
    # logits hardly depend on position); float64, so that a different batch's rounding cannot.
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(initializer_range=0.3)).eval().double()
    model.generation_config.eos_token_id = 7
    return model


@pytest.fixture
def checked(model):
    """The model, its forward checking at every call with a mask what refilled slots must keep
    true: the cache as long as the mask, padding only on the left, no column of padding alone,
    positions counted from each row's first token."""
    forward = model.forward

    def checking_forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, **kwargs):
        if attention_mask is None:  # generate on one prompt, the reference
            return forward(input_ids=input_ids, position_ids=position_ids, past_key_values=past_key_values, **kwargs)
        before = past_key_values.get_seq_length()
        assert attention_mask.shape[1] == before + input_ids.shape[1]
        assert bool(attention_mask[:, 0].any())  # no column that no row uses
        assert torch.equal(attention_mask, attention_mask.cummax(1).values)  # padding, then tokens
        expected = (attention_mask.cumsum(1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        assert torch.equal(position_ids, expected)
        return forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       past_key_values=past_key_values, **kwargs)

    model.forward = checking_forward
    return model


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_refilled_slots_give_each_prompt_its_own_greedy_continuation(checked, slots):
    """Prompts of 1-13 tokens join as others stop (at a stop token or the length limit), so rows
    of every length share the padded cache; each continuation equals generate's on that prompt
    alone."""
    prompts, stops = _prompts(10), {17, 31, 50}
    got = greedy_refill(checked, prompts, 16, lambda tokens: tokens[-1] in stops, slots=slots, progress=False)
    assert got == [_generate_one(checked, prompt, 16, stops) for prompt in prompts]
    assert len({len(tokens) for tokens in got}) > 3  # the rows did stop at different steps


def test_the_eos_of_the_generation_config_ends_a_sequence(model):
    prompts = _prompts(6)
    free = greedy_refill(model, prompts, 12, lambda tokens: False, slots=4, progress=False)
    token = free[0][2]
    model.generation_config.eos_token_id = [token, 5]
    cut = greedy_refill(model, prompts, 12, lambda tokens: False, slots=4, progress=False)
    assert cut[0] == free[0][:free[0].index(token) + 1]
    assert cut == [_generate_one(model, prompt, 12) for prompt in prompts]
    assert greedy_refill(model, prompts, 1, lambda tokens: False, slots=2, progress=False) == [t[:1] for t in cut]


def test_only_plain_greedy_is_decoded_here(model):
    assert plain_greedy(generation_config(model)) == []
    assert plain_greedy(generation_config(model, num_beams=2)) == ["beam_search"]
    assert plain_greedy(generation_config(model, do_sample=True)) == ["sample"]
    model.generation_config.repetition_penalty = 1.1
    assert plain_greedy(generation_config(model)) == ["repetition_penalty=1.1"]
    with pytest.raises(ValueError, match="repetition_penalty"):
        greedy_refill(model, _prompts(2), 4, lambda tokens: False, progress=False)
    model.generation_config.repetition_penalty = 1.0
    with pytest.raises(ValueError, match="empty prompt"):
        greedy_refill(model, [[5], []], 4, lambda tokens: False, progress=False)
    with pytest.raises(ValueError, match="at least 1"):
        greedy_refill(model, [[5]], 0, lambda tokens: False, progress=False)
