"""Backbone builder, LM and value heads, log-probs/entropy under TP, compiled forwards. Layer: models/."""
