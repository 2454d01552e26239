defmodule TextTools.WordCount do
  @moduledoc """
  Counting words in text.

  A word is a run of letters, digits, apostrophes or hyphens; counting is
  case-insensitive.
  """

  @type frequencies :: %{optional(String.t()) => pos_integer()}

  @words_per_minute 220

  @doc """
  Splits `text` into lowercase words.

      iex> TextTools.WordCount.words("It's a well-known fact. A FACT!")
      ["it's", "a", "well-known", "fact", "a", "fact"]
  """
  @spec words(String.t()) :: [String.t()]
  def words(text) do
    ~r/[\p{L}\p{N}][\p{L}\p{N}'-]*/u
    |> Regex.scan(String.downcase(text))
    |> List.flatten()
  end

  @doc """
  Number of words in `text`.

      iex> TextTools.WordCount.count("one  two\\nthree")
      3

      iex> TextTools.WordCount.count("")
      0
  """
  @spec count(String.t()) :: non_neg_integer()
  def count(text), do: text |> words() |> length()

  @doc """
  Map from word to number of occurrences.

      iex> TextTools.WordCount.frequencies("the cat and the hat")
      %{"and" => 1, "cat" => 1, "hat" => 1, "the" => 2}
  """
  @spec frequencies(String.t()) :: frequencies()
  def frequencies(text), do: text |> words() |> Enum.frequencies()

  @doc """
  The `n` most frequent words, ties broken alphabetically. Words listed in
  `:ignore` are skipped.

      iex> TextTools.WordCount.top("b a b c a b", 2)
      [{"b", 3}, {"a", 2}]

      iex> TextTools.WordCount.top("the cat and the hat", 1, ignore: ["the"])
      [{"and", 1}]
  """
  @spec top(String.t(), pos_integer(), keyword()) :: [{String.t(), pos_integer()}]
  def top(text, n, opts \\ []) when is_integer(n) and n > 0 do
    ignore = opts |> Keyword.get(:ignore, []) |> MapSet.new()

    text
    |> frequencies()
    |> Enum.reject(fn {word, _} -> MapSet.member?(ignore, word) end)
    |> Enum.sort_by(fn {word, count} -> {-count, word} end)
    |> Enum.take(n)
  end

  @doc """
  Estimated reading time in whole minutes, at least 1 for non-empty text.

      iex> TextTools.WordCount.reading_time(String.duplicate("word ", 500))
      3

      iex> TextTools.WordCount.reading_time("")
      0
  """
  @spec reading_time(String.t(), pos_integer()) :: non_neg_integer()
  def reading_time(text, wpm \\ @words_per_minute) do
    case count(text) do
      0 -> 0
      n -> max(1, ceil_div(n, wpm))
    end
  end

  def unique_count(text), do: text |> frequencies() |> map_size()

  defp ceil_div(a, b), do: div(a + b - 1, b)
end
