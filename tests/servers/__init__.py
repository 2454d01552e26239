"""Local HTTP servers that speak the source registries' formats, for the tests."""
