defmodule PipeRouter.Json do
  @moduledoc """
  A minimal JSON encoder, enough for the router's responses.

  Map keys are emitted in sorted order so output is deterministic.
  """

  @doc """
  Encodes maps, lists, strings, numbers, booleans, `nil` and atoms.
  """
  @spec encode(term()) :: String.t()
  def encode(value), do: value |> do_encode() |> IO.iodata_to_binary()

  defp do_encode(nil), do: "null"
  defp do_encode(true), do: "true"
  defp do_encode(false), do: "false"
  defp do_encode(value) when is_atom(value), do: value |> Atom.to_string() |> do_encode()
  defp do_encode(value) when is_integer(value), do: Integer.to_string(value)
  defp do_encode(value) when is_float(value), do: Float.to_string(value)
  defp do_encode(value) when is_binary(value), do: [?", escape(value), ?"]

  defp do_encode(list) when is_list(list) do
    [?[, list |> Enum.map(&do_encode/1) |> Enum.intersperse(?,), ?]]
  end

  defp do_encode(map) when is_map(map) do
    pairs =
      map
      |> Enum.map(fn {k, v} -> {to_string(k), v} end)
      |> Enum.sort()
      |> Enum.map(fn {k, v} -> [do_encode(k), ?:, do_encode(v)] end)
      |> Enum.intersperse(?,)

    [?{, pairs, ?}]
  end

  @doc false
  def escape(string) do
    for <<char <- string>>, into: "", do: escape_char(char)
  end

  defp escape_char(?"), do: "\\\""
  defp escape_char(?\\), do: "\\\\"
  defp escape_char(?\n), do: "\\n"
  defp escape_char(?\t), do: "\\t"
  defp escape_char(char) when char < 0x20, do: "\\u" <> String.pad_leading(Integer.to_string(char, 16), 4, "0")
  defp escape_char(char), do: <<char>>
end
