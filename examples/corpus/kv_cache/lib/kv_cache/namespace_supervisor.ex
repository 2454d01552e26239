defmodule KvCache.NamespaceSupervisor do
  @moduledoc """
  Starts one `KvCache.Server` per namespace on demand.

  Servers are registered in `KvCache.Registry` under their namespace, so a
  lookup never needs to go through this supervisor.
  """

  use DynamicSupervisor

  alias KvCache.Server

  @doc false
  def start_link(init_arg) do
    DynamicSupervisor.start_link(__MODULE__, init_arg, name: __MODULE__)
  end

  @impl true
  def init(_init_arg) do
    DynamicSupervisor.init(strategy: :one_for_one, max_restarts: 10, max_seconds: 5)
  end

  @doc """
  Returns the pid of the cache for `namespace`, starting it if needed.
  """
  @spec ensure_started(term(), keyword()) :: {:ok, pid()} | {:error, term()}
  def ensure_started(namespace, opts \\ []) do
    case lookup(namespace) do
      {:ok, pid} ->
        {:ok, pid}

      :error ->
        spec = {Server, Keyword.put(opts, :name, via(namespace))}

        case DynamicSupervisor.start_child(__MODULE__, spec) do
          {:ok, pid} -> {:ok, pid}
          {:error, {:already_started, pid}} -> {:ok, pid}
          {:error, _reason} = error -> error
        end
    end
  end

  @doc """
  Finds the running cache for `namespace` without starting one.
  """
  @spec lookup(term()) :: {:ok, pid()} | :error
  def lookup(namespace) do
    case Registry.lookup(KvCache.Registry, namespace) do
      [{pid, _value}] -> {:ok, pid}
      [] -> :error
    end
  end

  @doc """
  Stops the cache for `namespace`, discarding its contents.
  """
  @spec stop(term()) :: :ok | {:error, :not_found}
  def stop(namespace) do
    with {:ok, pid} <- lookup(namespace) do
      DynamicSupervisor.terminate_child(__MODULE__, pid)
    else
      :error -> {:error, :not_found}
    end
  end

  def namespaces do
    Registry.select(KvCache.Registry, [{{:"$1", :_, :_}, [], [:"$1"]}])
  end

  defp via(namespace), do: {:via, Registry, {KvCache.Registry, namespace}}
end
