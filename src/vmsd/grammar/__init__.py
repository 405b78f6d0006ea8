"""The .vmsd language: grammar, parser, AST and semantic checks."""
