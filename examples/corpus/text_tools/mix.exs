defmodule TextTools.MixProject do
  use Mix.Project

  @version "1.2.0"

  def project do
    [
      app: :text_tools,
      version: @version,
      elixir: "~> 1.11",
      deps: [],
      description: "Slugs, word counts and line wrapping for plain text.",
      package: [
        licenses: ["MIT"],
        links: %{"Changelog" => "https://example.org/text_tools/CHANGELOG.md"}
      ],
      docs: [main: "TextTools", extras: ["README.md"]]
    ]
  end

  def application do
    []
  end
end
