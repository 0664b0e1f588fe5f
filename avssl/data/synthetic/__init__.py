"""The built-in synthetic talking-face corpus."""
