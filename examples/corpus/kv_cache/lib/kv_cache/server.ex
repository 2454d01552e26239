defmodule KvCache.Server do
  @moduledoc """
  A `GenServer` that holds cache entries for one namespace.

  Reads check the expiry of the entry they touch; a periodic `:sweep`
  message removes every expired entry so memory does not grow without
  bound when keys are never read again.
  """

  use GenServer
  require Logger

  alias KvCache.Entry

  @default_ttl 300_000
  @default_sweep 5_000

  @type server :: GenServer.server()
  @type key :: term()

  ## Client API

  @doc """
  Starts a cache server.

  Options:

    * `:name` - registered name or `{:via, ...}` tuple
    * `:default_ttl` - TTL in milliseconds for `put/4` without `:ttl`
    * `:sweep_interval` - how often expired entries are purged
  """
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    {gen_opts, init_opts} = Keyword.split(opts, [:name])
    GenServer.start_link(__MODULE__, init_opts, gen_opts)
  end

  @doc """
  Stores `value` under `key`. Pass `ttl: ms` or `ttl: :infinity` to override
  the server's default TTL.
  """
  @spec put(server(), key(), term(), keyword()) :: :ok
  def put(server, key, value, opts \\ []) do
    GenServer.cast(server, {:put, key, value, Keyword.get(opts, :ttl)})
  end

  @doc """
  Fetches the value for `key`, or `:error` when it is missing or expired.
  """
  @spec get(server(), key()) :: {:ok, term()} | :error
  def get(server, key), do: GenServer.call(server, {:get, key})

  @doc """
  Returns the cached value or computes it with `fun`, caching the result.
  """
  @spec fetch(server(), key(), (-> term()), keyword()) :: term()
  def fetch(server, key, fun, opts \\ []) when is_function(fun, 0) do
    case get(server, key) do
      {:ok, value} ->
        value

      :error ->
        value = fun.()
        :ok = put(server, key, value, opts)
        value
    end
  end

  @doc """
  Removes `key` from the cache. Removing a missing key is not an error.
  """
  @spec delete(server(), key()) :: :ok
  def delete(server, key), do: GenServer.cast(server, {:delete, key})

  @doc """
  Returns `%{size: n, hits: h, misses: m}` for the server.
  """
  @spec stats(server()) :: %{size: non_neg_integer(), hits: non_neg_integer(), misses: non_neg_integer()}
  def stats(server), do: GenServer.call(server, :stats)

  def clear(server), do: GenServer.call(server, :clear)

  ## Server callbacks

  @impl true
  def init(opts) do
    state = %{
      entries: %{},
      hits: 0,
      misses: 0,
      default_ttl: Keyword.get(opts, :default_ttl, config(:default_ttl, @default_ttl)),
      sweep_interval: Keyword.get(opts, :sweep_interval, config(:sweep_interval, @default_sweep))
    }

    schedule_sweep(state.sweep_interval)
    {:ok, state}
  end

  @impl true
  def handle_call({:get, key}, _from, state) do
    case Map.fetch(state.entries, key) do
      {:ok, entry} ->
        if Entry.expired?(entry) do
          state = %{state | entries: Map.delete(state.entries, key), misses: state.misses + 1}
          {:reply, :error, state}
        else
          entries = Map.put(state.entries, key, Entry.touch(entry))
          {:reply, {:ok, entry.value}, %{state | entries: entries, hits: state.hits + 1}}
        end

      :error ->
        {:reply, :error, %{state | misses: state.misses + 1}}
    end
  end

  def handle_call(:stats, _from, state) do
    reply = %{size: map_size(state.entries), hits: state.hits, misses: state.misses}
    {:reply, reply, state}
  end

  def handle_call(:clear, _from, state) do
    {:reply, :ok, %{state | entries: %{}}}
  end

  @impl true
  def handle_cast({:put, key, value, ttl}, state) do
    entry = Entry.new(value, ttl || state.default_ttl)
    {:noreply, %{state | entries: Map.put(state.entries, key, entry)}}
  end

  def handle_cast({:delete, key}, state) do
    {:noreply, %{state | entries: Map.delete(state.entries, key)}}
  end

  @impl true
  def handle_info(:sweep, state) do
    {expired, live} = split_expired(state.entries, Entry.now())

    if expired > 0 do
      Logger.debug("kv_cache swept #{expired} expired entries")
    end

    schedule_sweep(state.sweep_interval)
    {:noreply, %{state | entries: live}}
  end

  def handle_info(msg, state) do
    Logger.warning("kv_cache received unexpected message: #{inspect(msg)}")
    {:noreply, state}
  end

  ## Helpers

  defp split_expired(entries, now) do
    live = for {key, entry} <- entries, not Entry.expired?(entry, now), into: %{}, do: {key, entry}
    {map_size(entries) - map_size(live), live}
  end

  defp schedule_sweep(:infinity), do: :ok
  defp schedule_sweep(interval), do: Process.send_after(self(), :sweep, interval)

  defp config(key, default), do: Application.get_env(:kv_cache, key, default)
end
