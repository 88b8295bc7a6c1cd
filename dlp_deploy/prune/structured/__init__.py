"""Structured pruning (LLM-Pruner style): remove whole attention heads / KV groups and MLP channels, so the model
gets physically smaller. geometry: what a block's coupled units are; importance: scores per unit (pure);
plan: how many units each layer keeps (pure); apply: shrink the modules and record the shapes; run: the wiring."""
