defmodule KvCache.Application do
  @moduledoc false

  use Application

  @impl true
  def start(_type, _args) do
    children = [
      {Registry, keys: :unique, name: KvCache.Registry},
      {KvCache.NamespaceSupervisor, []}
    ]

    opts = [strategy: :one_for_one, name: KvCache.Supervisor]
    Supervisor.start_link(children, opts)
  end
end
