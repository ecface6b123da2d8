"""Rewrite passes, one module per DSL keyword; each registers itself with peftc.passmanager.register."""
