"""Lightning training stack: models, data, module, callbacks."""

from scrimp.training.models import LLAMA_SIZES, build_model, llama_config

__all__ = ["LLAMA_SIZES", "build_model", "llama_config"]
