defmodule PipeRouter.PlugsTest do
  use ExUnit.Case, async: true

  import ExUnit.CaptureIO
  alias PipeRouter.{Plugs, Request}

  test "parse_query decodes pairs" do
    req = Request.new("GET", "/search?q=hello+world&tag=a%2Fb&flag") |> Plugs.parse_query()
    assert req.query == %{"q" => "hello world", "tag" => "a/b", "flag" => ""}
  end

  test "halted requests are left alone" do
    req = Request.new("GET", "/x?a=1") |> Plugs.halt() |> Plugs.parse_query()
    assert req.query == %{}
  end

  test "assign accumulates" do
    req =
      Request.new("GET", "/")
      |> Plugs.assign(:a, 1)
      |> Plugs.assign(:b, 2)

    assert req.assigns == %{a: 1, b: 2}
  end

  test "log_request writes method and path" do
    output = capture_io(fn -> Request.new("DELETE", "/users/3") |> Plugs.log_request() end)
    assert output == "DELETE /users/3\n"
  end

  test "unknown methods are rejected" do
    assert_raise ArgumentError, fn -> Request.new("BREW", "/pot") end
  end
end
