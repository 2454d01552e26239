defmodule KvCache.ServerTest do
  use ExUnit.Case, async: true

  alias KvCache.Server

  setup do
    pid = start_supervised!({Server, default_ttl: 1_000, sweep_interval: 20})
    {:ok, server: pid}
  end

  test "entries expire after their ttl", %{server: server} do
    Server.put(server, :short, "x", ttl: 10)
    Server.put(server, :long, "y", ttl: :infinity)
    Process.sleep(40)

    assert Server.get(server, :short) == :error
    assert Server.get(server, :long) == {:ok, "y"}
  end

  test "sweep removes expired entries", %{server: server} do
    for i <- 1..5, do: Server.put(server, i, i, ttl: 5)
    Process.sleep(60)

    assert %{size: 0} = Server.stats(server)
  end

  test "fetch computes once and caches", %{server: server} do
    parent = self()

    compute = fn ->
      send(parent, :computed)
      42
    end

    assert Server.fetch(server, :answer, compute) == 42
    assert Server.fetch(server, :answer, compute) == 42
    assert_received :computed
    refute_received :computed
  end

  test "stats counts hits and misses", %{server: server} do
    Server.put(server, :a, 1)
    Server.get(server, :a)
    Server.get(server, :b)

    assert %{hits: 1, misses: 1, size: 1} = Server.stats(server)
  end
end
