defmodule PipeRouter.Plugs do
  @moduledoc """
  Small request transformations meant to be chained with `|>`.

  Every function takes a `PipeRouter.Request` first and returns one, and
  does nothing once the request has been halted.
  """

  alias PipeRouter.Request

  @doc """
  Decodes `query_string` into the `query` map. Repeated keys keep the last
  value; keys without `=` map to `""`.
  """
  @spec parse_query(Request.t()) :: Request.t()
  def parse_query(%Request{halted: true} = req), do: req
  def parse_query(%Request{query_string: ""} = req), do: req

  def parse_query(%Request{query_string: qs} = req) do
    query =
      qs
      |> String.split("&", trim: true)
      |> Enum.map(&split_pair/1)
      |> Map.new()

    %{req | query: query}
  end

  @doc """
  Stores `value` under `key` in the request's assigns.
  """
  @spec assign(Request.t(), atom(), term()) :: Request.t()
  def assign(%Request{assigns: assigns} = req, key, value) when is_atom(key) do
    %{req | assigns: Map.put(assigns, key, value)}
  end

  @doc """
  Marks the request as finished; later plugs and the router skip it.
  """
  @spec halt(Request.t()) :: Request.t()
  def halt(%Request{} = req), do: %{req | halted: true}

  @doc """
  Halts with `401` unless an `authorization: Bearer <token>` header is
  present, and assigns `:token` when it is.
  """
  @spec require_token(Request.t()) :: Request.t()
  def require_token(%Request{halted: true} = req), do: req

  def require_token(req) do
    with "Bearer " <> token <- Request.get_header(req, "authorization"),
         true <- byte_size(token) > 0 do
      assign(req, :token, token)
    else
      _ ->
        req
        |> Request.put_resp_header("www-authenticate", "Bearer")
        |> Request.send_resp(401, "unauthorized")
        |> halt()
    end
  end

  @doc """
  Drops a trailing slash so `/users/` and `/users` route the same way.
  """
  @spec strip_trailing_slash(Request.t()) :: Request.t()
  def strip_trailing_slash(%Request{path: "/"} = req), do: req

  def strip_trailing_slash(%Request{path: path} = req) do
    %{req | path: String.trim_trailing(path, "/")}
  end

  def put_content_type(%Request{halted: true} = req, _type), do: req

  def put_content_type(req, type) do
    Request.put_resp_header(req, "content-type", type)
  end

  @doc false
  def log_request(%Request{method: method, path: path} = req, io \\ :stdio) do
    IO.puts(io, "#{method} #{path}")
    req
  end

  defp split_pair(pair) do
    case String.split(pair, "=", parts: 2) do
      [key, value] -> {decode(key), decode(value)}
      [key] -> {decode(key), ""}
    end
  end

  defp decode(part), do: part |> String.replace("+", " ") |> URI.decode()
end
