"""Checked-in output of `vmsd compile` for the specs shipped in specs/ (regenerate, never edit)."""
