defmodule PipeRouter.Router do
  @moduledoc """
  Dispatches requests by pattern matching on method and path segments.
  """

  import PipeRouter.Plugs, only: [assign: 3]
  alias PipeRouter.{Json, Request}

  @max_page_size 100

  @doc """
  Routes a request to a response. Halted requests are returned untouched;
  anything without a matching clause gets `404`.
  """
  @spec route(Request.t()) :: Request.t()
  def route(%Request{halted: true} = req), do: req

  def route(%Request{method: "GET", segments: []} = req) do
    Request.send_resp(req, 200, "ok")
  end

  def route(%Request{method: "GET", segments: ["health"]} = req) do
    json(req, 200, %{status: "up"})
  end

  def route(%Request{method: "GET", segments: ["users"], query: query} = req) do
    with {:ok, page} <- parse_positive(Map.get(query, "page", "1")),
         {:ok, size} <- parse_positive(Map.get(query, "per_page", "20")),
         :ok <- check_page_size(size) do
      users = for id <- ((page - 1) * size + 1)..(page * size), do: %{id: id}
      json(req, 200, %{page: page, users: users})
    else
      {:error, reason} -> json(req, 400, %{error: reason})
    end
  end

  def route(%Request{method: "GET", segments: ["users", id]} = req) do
    case Integer.parse(id) do
      {int, ""} when int > 0 ->
        req
        |> assign(:user_id, int)
        |> json(200, %{id: int, name: "user-#{int}"})

      _ ->
        json(req, 400, %{error: "invalid id"})
    end
  end

  def route(%Request{method: method, segments: ["users", _id]} = req)
      when method in ["PUT", "PATCH"] do
    with %{token: _} <- req.assigns,
         body when is_binary(body) and body != "" <- req.body do
      json(req, 200, %{updated: true})
    else
      %{} -> json(req, 401, %{error: "missing token"})
      _ -> json(req, 422, %{error: "empty body"})
    end
  end

  def route(%Request{method: "DELETE", segments: ["users", _id]} = req) do
    Request.send_resp(req, 204, "")
  end

  def route(%Request{method: "GET", segments: ["files" | rest]} = req) when rest != [] do
    json(req, 200, %{file: Enum.join(rest, "/")})
  end

  def route(%Request{segments: segments} = req) do
    if known_path?(segments) do
      json(req, 405, %{error: "method not allowed"})
    else
      json(req, 404, %{error: "not found"})
    end
  end

  def known_path?([]), do: true
  def known_path?(["health"]), do: true
  def known_path?(["users" | rest]) when length(rest) <= 1, do: true
  def known_path?(["files", _ | _]), do: true
  def known_path?(_), do: false

  defp json(req, status, data) do
    req
    |> Request.put_resp_header("content-type", "application/json")
    |> Request.send_resp(status, Json.encode(data))
  end

  defp parse_positive(value) do
    case Integer.parse(value) do
      {n, ""} when n > 0 -> {:ok, n}
      _ -> {:error, "expected a positive integer, got #{inspect(value)}"}
    end
  end

  defp check_page_size(size) when size <= @max_page_size, do: :ok
  defp check_page_size(_size), do: {:error, "per_page must be at most #{@max_page_size}"}
end
