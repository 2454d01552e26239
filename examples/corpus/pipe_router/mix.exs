defmodule PipeRouter.MixProject do
  use Mix.Project

  def project do
    [
      app: :pipe_router,
      version: "0.1.4",
      elixir: "~> 1.13",
      start_permanent: Mix.env() == :prod,
      deps: [],
      description: "A tiny request router built from pipes and pattern matching.",
      package: [
        licenses: ["Apache-2.0"],
        maintainers: ["PipeRouter contributors"],
        links: %{}
      ]
    ]
  end

  def application do
    [extra_applications: [:logger]]
  end
end
