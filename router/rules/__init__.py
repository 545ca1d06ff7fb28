"""The rules engine: rule files (rules/<sink>.yaml) compiled, checked, tested and reloaded."""
