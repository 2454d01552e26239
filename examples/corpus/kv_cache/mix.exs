defmodule KvCache.MixProject do
  use Mix.Project

  @version "0.3.1"
  @source_url "https://example.org/exforge/kv_cache"

  def project do
    [
      app: :kv_cache,
      version: @version,
      elixir: "~> 1.12",
      start_permanent: Mix.env() == :prod,
      deps: deps(),
      description: "A small GenServer-backed key/value cache with per-entry TTL and namespaces.",
      package: package(),
      docs: [main: "KvCache", source_url: @source_url, source_ref: "v#{@version}"]
    ]
  end

  def application do
    [
      extra_applications: [:logger],
      mod: {KvCache.Application, []}
    ]
  end

  defp deps do
    []
  end

  defp package do
    [
      licenses: ["MIT"],
      links: %{"Source" => @source_url},
      files: ~w(lib mix.exs README.md LICENSE)
    ]
  end
end
