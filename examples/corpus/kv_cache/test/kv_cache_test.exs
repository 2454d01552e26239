defmodule KvCacheTest do
  use ExUnit.Case

  setup do
    namespace = :"ns_#{System.unique_integer([:positive])}"
    on_exit(fn -> KvCache.drop(namespace) end)
    {:ok, ns: namespace}
  end

  test "put then get returns the value", %{ns: ns} do
    :ok = KvCache.put(ns, :a, 1)
    assert KvCache.get(ns, :a) == {:ok, 1}
  end

  test "unknown namespace reads as empty" do
    assert KvCache.get(:never_written, :a) == :error
    assert KvCache.get(:never_written, :a, :fallback) == :fallback
  end

  test "namespaces are isolated", %{ns: ns} do
    other = :"#{ns}_other"
    on_exit(fn -> KvCache.drop(other) end)

    KvCache.put(ns, :k, "one")
    KvCache.put(other, :k, "two")

    assert KvCache.get(ns, :k) == {:ok, "one"}
    assert KvCache.get(other, :k) == {:ok, "two"}
    assert ns in KvCache.namespaces()
  end

  test "drop removes the namespace", %{ns: ns} do
    KvCache.put(ns, :k, 1)
    assert :ok = KvCache.drop(ns)
    assert KvCache.get(ns, :k) == :error
  end
end
