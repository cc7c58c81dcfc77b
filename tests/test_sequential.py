"""--sequential: each layer decomposed on the inputs its compressed predecessors give it."""

import copy

import pytest
import torch

from calibration.capture import iterate_layers
from compressor.allocate import Shape, uniform_ranks
from compressor.arch import get_spec, linear_modules
from compressor.config import CompressConfig, ConfigError, config_from_dict
from compressor.layers import sequential_cut
from compressor.modeling_basis_llama import LowRankLinear
from compressor.pipeline import compress
from compressor.stages import language_model_loss


def test_sequential_statistics_are_those_of_a_plain_forward_through_the_compressed_model(tiny_model, blocks):
    spec = get_spec("llama")
    shapes = {name: Shape(*module.weight.shape) for name, module in linear_modules(tiny_model, spec).items()}
    ranks = uniform_ranks(shapes, 0.3, align=4, tolerance=0.05)
    config = CompressConfig(method="whiten")
    _, seen = sequential_cut(tiny_model, spec, blocks, ranks, config, progress=False, keep_stats=True)
    assert any(isinstance(module, LowRankLinear) for module in tiny_model.modules())
    # A layer's input (what q, k, v and the rest of it read) comes only from the layers before it.
    for index, stats, _ in iterate_layers(tiny_model, spec, blocks, config.calibration.batch_size, progress=False):
        plain, sequential = stats["self_attn.q_proj"].mean_gram(), seen[index]["self_attn.q_proj"].mean_gram()
        assert torch.allclose(plain, sequential, rtol=1e-5, atol=1e-6), index
    first_layer = seen[0]["self_attn.q_proj"].mean_gram()
    assert not torch.allclose(seen[1]["self_attn.q_proj"].mean_gram(), first_layer)


def test_sequential_compression_meets_the_budget_and_differs_from_the_plain_one(tiny_model, blocks):
    settings = {"method": "whiten", "allocation": "global", "ratio": 0.3, "tolerance": 0.02,
                "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4, "sensitivity_samples": 2}}
    plain_model, sequential_model = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    plain = compress(plain_model, get_spec("llama"), blocks, config_from_dict(settings), progress=False)
    sequential = compress(sequential_model, get_spec("llama"), blocks,
                          config_from_dict({**settings, "sequential": True}), progress=False)
    assert sequential.ranks == plain.ranks  # the same allocation, other bases
    assert language_model_loss(plain_model, blocks, 4) != language_model_loss(sequential_model, blocks, 4)
    with pytest.raises(ConfigError, match="--sequential"):
        config_from_dict({**settings, "sequential": True, "score": "taylor"})
