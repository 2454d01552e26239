defmodule TextTools.Slug do
  @moduledoc """
  Turns titles into URL-safe slugs.

  Accented Latin letters are reduced to their base letter, everything that is
  not an ASCII letter or digit becomes a separator, and runs of separators
  collapse into one.
  """

  @typedoc "Options accepted by `slugify/2`."
  @type option :: {:separator, String.t()} | {:max_length, pos_integer()} | {:lowercase, boolean()}

  @doc """
  Builds a slug from `text`.

  ## Options

    * `:separator` - defaults to `"-"`
    * `:max_length` - cut at a separator so the slug fits
    * `:lowercase` - defaults to `true`

  ## Examples

      iex> TextTools.Slug.slugify("Hello, World!")
      "hello-world"

      iex> TextTools.Slug.slugify("Crème brûlée à la carte")
      "creme-brulee-a-la-carte"

      iex> TextTools.Slug.slugify("Elixir & Erlang", separator: "_")
      "elixir_erlang"

      iex> TextTools.Slug.slugify("a very long title indeed", max_length: 12)
      "a-very-long"
  """
  @spec slugify(String.t(), [option()]) :: String.t()
  def slugify(text, opts \\ []) when is_binary(text) do
    separator = Keyword.get(opts, :separator, "-")

    text
    |> transliterate()
    |> maybe_downcase(Keyword.get(opts, :lowercase, true))
    |> String.split(~r/[^A-Za-z0-9]+/, trim: true)
    |> Enum.join(separator)
    |> truncate(Keyword.get(opts, :max_length), separator)
  end

  @doc """
  Returns `true` when `text` is already a valid lowercase slug.

      iex> TextTools.Slug.valid?("hello-world-2")
      true

      iex> TextTools.Slug.valid?("Hello World")
      false

      iex> TextTools.Slug.valid?("trailing-")
      false
  """
  @spec valid?(String.t()) :: boolean()
  def valid?(text) when is_binary(text) do
    Regex.match?(~r/\A[a-z0-9]+(?:-[a-z0-9]+)*\z/, text)
  end

  @doc """
  Appends `-2`, `-3`, ... until the slug is not in `taken`.

      iex> TextTools.Slug.unique("post", ["post", "post-2"])
      "post-3"

      iex> TextTools.Slug.unique("fresh", ["post"])
      "fresh"
  """
  @spec unique(String.t(), Enumerable.t()) :: String.t()
  def unique(slug, taken) do
    taken = MapSet.new(taken)

    if MapSet.member?(taken, slug) do
      Stream.iterate(2, &(&1 + 1))
      |> Stream.map(&"#{slug}-#{&1}")
      |> Enum.find(&(not MapSet.member?(taken, &1)))
    else
      slug
    end
  end

  @doc false
  def transliterate(text) do
    text
    |> String.normalize(:nfd)
    |> String.replace(~r/\p{Mn}/u, "")
  end

  defp maybe_downcase(text, true), do: String.downcase(text)
  defp maybe_downcase(text, false), do: text

  defp truncate(slug, nil, _sep), do: slug
  defp truncate(slug, max, _sep) when byte_size(slug) <= max, do: slug

  defp truncate(slug, max, sep) do
    slug
    |> binary_part(0, max)
    |> String.split(sep)
    |> Enum.drop(-1)
    |> case do
      [] -> binary_part(slug, 0, max)
      parts -> Enum.join(parts, sep)
    end
  end
end
