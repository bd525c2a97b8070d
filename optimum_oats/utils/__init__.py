"""Small helpers every layer of the package shares; they import nothing from the rest of `optimum_oats`."""
