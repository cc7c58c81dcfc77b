"""basis-compressor: post-training SVD-basis compression of LLaMA-family models.

Importing the package registers the compressed model type (`basis_llama`) with transformers'
Auto classes, so `AutoModelForCausalLM.from_pretrained(exported_dir)` loads compressed exports,
and offers the commands as functions (compressor/api.py): compress_model, train_adapter_for,
evaluate_model (not `evaluate`: that name is the compressor.evaluate module).
"""

from transformers import AutoConfig, AutoModelForCausalLM

from compressor.api import compress_model, evaluate_model, train_adapter_for
from compressor.modeling_basis_llama import BasisLlamaConfig, BasisLlamaForCausalLM, LowRankLinear

AutoConfig.register(BasisLlamaConfig.model_type, BasisLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(BasisLlamaConfig, BasisLlamaForCausalLM, exist_ok=True)

__all__ = ["BasisLlamaConfig", "BasisLlamaForCausalLM", "LowRankLinear", "compress_model", "evaluate_model",
           "train_adapter_for"]
__version__ = "0.1.0"
