"""Models: where they come from (fetch), how they load (load), how their decoder blocks are found (layers,
geometry) and how a model whose blocks differ from its config is rebuilt (shapes). The public names are
re-exported here, so `from dlp_deploy import models; models.load(...)` reads as before."""
from .fetch import (ALIASES, GGUF_SOURCE_FILE, GGUFAlias, PackagedFile, assemble, cache_dir, dequantize_gguf,
                    fetch_gguf, gguf_model_name, models_dir)
from .layers import (check_prunable, decoder_layers, linear_modules, model_sparsity, prunable_modules,
                     unprunable_weights)
from .load import load, load_config, load_streamlined, load_structured, resolve
from .shapes import STREAMLINE_FILE, STRUCTURE_FILE

__all__ = ["ALIASES", "GGUF_SOURCE_FILE", "GGUFAlias", "PackagedFile", "STREAMLINE_FILE", "STRUCTURE_FILE", "assemble",
           "cache_dir", "check_prunable", "decoder_layers", "dequantize_gguf", "fetch_gguf", "gguf_model_name",
           "linear_modules", "load", "load_config", "load_streamlined", "load_structured", "model_sparsity",
           "models_dir", "prunable_modules", "resolve", "unprunable_weights"]
