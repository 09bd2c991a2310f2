"""t2r-hf: turn pretrained softmax-attention language models into fast recurrent models (T2R, Kasai et al. 2021).

Importing the package registers the model type `"t2r"` with `AutoConfig`, `AutoModel` and
`AutoModelForCausalLM`.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache import T2RCache, T2RSoftmaxLayer, T2RStateLayer
from .configuration_t2r import T2RConfig
from .feature_maps import EluFeatureMap, HedgehogFeatureMap, T2RFeatureMap
from .modeling_t2r import T2RForCausalLM, T2RModel, T2RPreTrainedModel
from .ops import linear_attention_chunked, linear_attention_naive, linear_attention_recurrent

__version__ = "0.1.0"

AutoConfig.register("t2r", T2RConfig, exist_ok=True)
AutoModel.register(T2RConfig, T2RModel, exist_ok=True)
AutoModelForCausalLM.register(T2RConfig, T2RForCausalLM, exist_ok=True)

__all__ = [
    "T2RCache",
    "T2RConfig",
    "T2RForCausalLM",
    "T2RModel",
    "T2RPreTrainedModel",
    "T2RSoftmaxLayer",
    "T2RStateLayer",
    "T2RFeatureMap",
    "EluFeatureMap",
    "HedgehogFeatureMap",
    "linear_attention_chunked",
    "linear_attention_naive",
    "linear_attention_recurrent",
]
