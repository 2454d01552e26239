# Doctests run from the individual test files via `doctest`.
ExUnit.start()
