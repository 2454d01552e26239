defmodule PipeRouter.Request do
  @moduledoc """
  The request/response value that flows through the pipeline.
  """

  @methods ~w(GET POST PUT PATCH DELETE HEAD OPTIONS)

  @enforce_keys [:method, :path]
  defstruct method: nil,
            path: nil,
            segments: [],
            query_string: "",
            query: %{},
            headers: %{},
            body: nil,
            assigns: %{},
            status: nil,
            resp_headers: %{},
            resp_body: nil,
            halted: false

  @type method :: String.t()
  @type t :: %__MODULE__{
          method: method(),
          path: String.t(),
          segments: [String.t()],
          query_string: String.t(),
          query: %{optional(String.t()) => String.t()},
          headers: %{optional(String.t()) => String.t()},
          body: binary() | nil,
          assigns: map(),
          status: pos_integer() | nil,
          resp_headers: %{optional(String.t()) => String.t()},
          resp_body: iodata() | nil,
          halted: boolean()
        }

  @doc """
  Builds a request from a method and a target such as `"/users/1?x=2"`.

  The method is upcased; the path is split into segments and the query string
  is kept raw until `PipeRouter.Plugs.parse_query/1` runs.
  """
  @spec new(String.t() | atom(), String.t(), keyword()) :: t()
  def new(method, target, opts \\ [])

  def new(method, target, opts) when is_atom(method) do
    method |> Atom.to_string() |> new(target, opts)
  end

  def new(method, target, opts) when is_binary(method) and is_binary(target) do
    method = String.upcase(method)

    unless method in @methods do
      raise ArgumentError, "unsupported HTTP method: #{inspect(method)}"
    end

    {path, query_string} = split_target(target)

    %__MODULE__{
      method: method,
      path: path,
      segments: split_path(path),
      query_string: query_string,
      headers: opts |> Keyword.get(:headers, %{}) |> downcase_keys(),
      body: Keyword.get(opts, :body)
    }
  end

  @doc """
  Returns the value of a request header, matching the name case-insensitively.
  """
  @spec get_header(t(), String.t()) :: String.t() | nil
  def get_header(%__MODULE__{headers: headers}, name) do
    Map.get(headers, String.downcase(name))
  end

  @doc """
  Sets the response status and body.
  """
  @spec send_resp(t(), pos_integer(), iodata()) :: t()
  def send_resp(%__MODULE__{} = req, status, body) when status in 100..599 do
    %{req | status: status, resp_body: body}
  end

  def put_resp_header(%__MODULE__{resp_headers: headers} = req, name, value) do
    %{req | resp_headers: Map.put(headers, String.downcase(name), value)}
  end

  @doc false
  def methods, do: @methods

  defp split_target(target) do
    case String.split(target, "?", parts: 2) do
      [path, query] -> {normalize_path(path), query}
      [path] -> {normalize_path(path), ""}
    end
  end

  defp normalize_path(""), do: "/"
  defp normalize_path("/" <> _ = path), do: path
  defp normalize_path(path), do: "/" <> path

  defp split_path(path), do: String.split(path, "/", trim: true)

  defp downcase_keys(headers) do
    Map.new(headers, fn {k, v} -> {String.downcase(to_string(k)), v} end)
  end
end
