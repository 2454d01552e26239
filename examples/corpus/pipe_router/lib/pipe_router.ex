defmodule PipeRouter do
  @moduledoc """
  Runs a request through the default pipeline and the router.
  """

  alias PipeRouter.{Plugs, Request, Router}

  @doc """
  The full pipeline: normalise, parse the query, authenticate writes, route.
  """
  @spec call(Request.t()) :: Request.t()
  def call(%Request{} = req) do
    req
    |> Plugs.strip_trailing_slash()
    |> Plugs.parse_query()
    |> maybe_authenticate()
    |> Router.route()
  end

  @doc """
  Convenience wrapper: builds a request and runs `call/1`.
  """
  @spec request(String.t() | atom(), String.t(), keyword()) :: Request.t()
  def request(method, target, opts \\ []) do
    method
    |> Request.new(target, opts)
    |> call()
  end

  def write?(%Request{method: method}), do: method in ["POST", "PUT", "PATCH", "DELETE"]

  defp maybe_authenticate(req) do
    if write?(req), do: Plugs.require_token(req), else: req
  end
end
