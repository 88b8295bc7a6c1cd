"""Structured pruning (LLM-Pruner style): remove whole attention heads / KV groups and MLP channels, so the model
gets physically smaller. importance: scores per unit (pure); plan: how many units each layer keeps (pure); run:
the wiring. What a block's coupled units are (models/geometry.py) and how a block is shrunk to the kept ones and its
shapes recorded and replayed (models/shapes.py) live with the models, which rebuild such a model on load."""

# LLM-Pruner's default unit importance is first-order Taylor (|W·∂L/∂W|, `param_first`), and DLP's E.1 follows
# LLM-Pruner; `activation` (Wanda's |W|·‖X‖, gradient-free) stays an option. Kept here, import-light, for the CLIs.
DEFAULT_IMPORTANCE = "taylor"
