defmodule KvCache do
  @moduledoc """
  Public entry point for namespaced caches.

  Each namespace is served by its own `KvCache.Server`, started lazily under
  `KvCache.NamespaceSupervisor` the first time it is written to.
  """

  alias KvCache.{NamespaceSupervisor, Server}

  @typedoc "Any term that names a cache, usually an atom."
  @type namespace :: term()

  @doc """
  Stores `value` under `key` in `namespace`. See `KvCache.Server.put/4`.
  """
  @spec put(namespace(), term(), term(), keyword()) :: :ok
  def put(namespace, key, value, opts \\ []) do
    {:ok, pid} = NamespaceSupervisor.ensure_started(namespace)
    Server.put(pid, key, value, opts)
  end

  @doc """
  Reads `key` from `namespace`. A namespace that was never written to
  behaves like an empty cache.
  """
  @spec get(namespace(), term()) :: {:ok, term()} | :error
  def get(namespace, key) do
    case NamespaceSupervisor.lookup(namespace) do
      {:ok, pid} -> Server.get(pid, key)
      :error -> :error
    end
  end

  @doc """
  Like `get/2` but returns `default` instead of `:error`.
  """
  @spec get(namespace(), term(), term()) :: term()
  def get(namespace, key, default) do
    case get(namespace, key) do
      {:ok, value} -> value
      :error -> default
    end
  end

  @doc """
  Deletes `key` from `namespace`.
  """
  @spec delete(namespace(), term()) :: :ok
  def delete(namespace, key) do
    case NamespaceSupervisor.lookup(namespace) do
      {:ok, pid} -> Server.delete(pid, key)
      :error -> :ok
    end
  end

  @doc """
  Drops a whole namespace and stops its server.
  """
  @spec drop(namespace()) :: :ok
  def drop(namespace) do
    case NamespaceSupervisor.stop(namespace) do
      :ok -> :ok
      {:error, :not_found} -> :ok
    end
  end

  def namespaces, do: NamespaceSupervisor.namespaces()
end
