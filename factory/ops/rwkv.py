"""Placeholder: this family is not implemented yet."""
