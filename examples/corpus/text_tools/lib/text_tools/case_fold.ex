defmodule TextTools.CaseFold do
  @moduledoc """
  Case-insensitive comparison of words. Its helpers carry typespecs but no docs.
  """

  @spec fold(String.t()) :: String.t()
  def fold(text), do: text |> String.trim() |> String.downcase()

  @spec equal?(String.t(), String.t()) :: boolean()
  def equal?(left, right), do: fold(left) == fold(right)

  @spec starts_with?(String.t(), String.t()) :: boolean()
  def starts_with?(text, prefix) do
    String.starts_with?(fold(text), fold(prefix))
  end
end
