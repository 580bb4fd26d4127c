"""Backbone builder, LM and value heads, log-probs/entropy under TP. Layer: models/."""
