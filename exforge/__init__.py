"""exforge: teach a code LLM Elixir — collect, clean, instruct, shard, train, serve, evaluate."""

__version__ = "0.1.0"
