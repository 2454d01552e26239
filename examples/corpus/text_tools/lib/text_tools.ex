defmodule TextTools do
  @moduledoc """
  Helpers for plain text: see `TextTools.Slug`, `TextTools.WordCount` and
  `TextTools.Wrap`. This module only re-exports the most common calls.
  """

  @doc """
  Shortcut for `TextTools.Slug.slugify/2`.

      iex> TextTools.slug("Release notes: v1.2")
      "release-notes-v1-2"
  """
  @spec slug(String.t(), keyword()) :: String.t()
  defdelegate slug(text, opts \\ []), to: TextTools.Slug, as: :slugify

  @doc """
  Shortcut for `TextTools.Wrap.wrap/2`.

      iex> TextTools.wrap("one two three", 7)
      "one two\\nthree"
  """
  @spec wrap(String.t(), pos_integer()) :: String.t()
  defdelegate wrap(text, width), to: TextTools.Wrap

  @doc false
  def version, do: "1.2.0"
end
