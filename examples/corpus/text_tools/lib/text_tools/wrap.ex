defmodule TextTools.Wrap do
  @moduledoc """
  Greedy line wrapping and related layout helpers.
  """

  @type width :: pos_integer()

  @doc """
  Wraps `text` so no line exceeds `width` characters, breaking at spaces.
  Words longer than `width` are kept whole on their own line. Existing
  newlines start a new paragraph.

      iex> TextTools.Wrap.wrap("the quick brown fox jumps", 10)
      "the quick\\nbrown fox\\njumps"

      iex> TextTools.Wrap.wrap("supercalifragilistic word", 5)
      "supercalifragilistic\\nword"
  """
  @spec wrap(String.t(), width()) :: String.t()
  def wrap(text, width) when is_integer(width) and width > 0 do
    text
    |> String.split("\n")
    |> Enum.map(&wrap_paragraph(&1, width))
    |> Enum.join("\n")
  end

  @doc """
  Prefixes every non-empty line with `prefix` (or `n` spaces).

      iex> TextTools.Wrap.indent("a\\n\\nb", 2)
      "  a\\n\\n  b"

      iex> TextTools.Wrap.indent("x", "> ")
      "> x"
  """
  @spec indent(String.t(), non_neg_integer() | String.t()) :: String.t()
  def indent(text, n) when is_integer(n) and n >= 0, do: indent(text, String.duplicate(" ", n))

  def indent(text, prefix) when is_binary(prefix) do
    text
    |> String.split("\n")
    |> Enum.map_join("\n", fn
      "" -> ""
      line -> prefix <> line
    end)
  end

  @doc """
  Shortens `text` to at most `max` characters, ending in `omission`.

      iex> TextTools.Wrap.truncate("Hello, world", 8)
      "Hello..."

      iex> TextTools.Wrap.truncate("short", 10)
      "short"

      iex> TextTools.Wrap.truncate("abcdef", 4, "~")
      "abc~"
  """
  @spec truncate(String.t(), pos_integer(), String.t()) :: String.t()
  def truncate(text, max, omission \\ "...") do
    cond do
      String.length(text) <= max -> text
      String.length(omission) >= max -> String.slice(omission, 0, max)
      true -> String.slice(text, 0, max - String.length(omission)) <> omission
    end
  end

  def center(text, width, pad \\ " ") do
    total = max(width - String.length(text), 0)
    left = div(total, 2)

    text
    |> String.pad_leading(String.length(text) + left, pad)
    |> String.pad_trailing(width, pad)
  end

  defp wrap_paragraph(paragraph, width) do
    paragraph
    |> String.split(" ", trim: true)
    |> Enum.reduce([], &place_word(&1, &2, width))
    |> Enum.reverse()
    |> Enum.join("\n")
  end

  defp place_word(word, [], _width), do: [word]

  defp place_word(word, [line | rest], width) do
    if String.length(line) + 1 + String.length(word) <= width do
      [line <> " " <> word | rest]
    else
      [word, line | rest]
    end
  end
end
