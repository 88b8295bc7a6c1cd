"""Structured pruning (LLM-Pruner style): remove whole attention heads / KV groups and MLP channels, so the model
gets physically smaller. geometry: what a block's coupled units are; importance: scores per unit (pure);
plan: how many units each layer keeps (pure); apply: shrink the modules and record the shapes; run: the wiring."""

# LLM-Pruner's default unit importance is first-order Taylor (|W·∂L/∂W|, `param_first`), and DLP's E.1 follows
# LLM-Pruner; `activation` (Wanda's |W|·‖X‖, gradient-free) stays an option. Kept here, import-light, for the CLIs.
DEFAULT_IMPORTANCE = "taylor"
