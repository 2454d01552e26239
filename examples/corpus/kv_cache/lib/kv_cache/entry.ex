defmodule KvCache.Entry do
  @moduledoc """
  A single cached value together with the monotonic time at which it expires.

  Times are in milliseconds from `System.monotonic_time/1`, so they are only
  meaningful inside the running VM.
  """

  @enforce_keys [:value, :expires_at]
  defstruct [:value, :expires_at, hits: 0]

  @type t :: %__MODULE__{
          value: term(),
          expires_at: integer() | :infinity,
          hits: non_neg_integer()
        }

  @doc """
  Builds an entry that lives for `ttl` milliseconds, or forever when `ttl`
  is `:infinity`.
  """
  @spec new(term(), pos_integer() | :infinity, integer()) :: t()
  def new(value, ttl, now \\ now())

  def new(value, :infinity, _now), do: %__MODULE__{value: value, expires_at: :infinity}

  def new(value, ttl, now) when is_integer(ttl) and ttl > 0 do
    %__MODULE__{value: value, expires_at: now + ttl}
  end

  @doc """
  Returns `true` when the entry is past its expiry time.
  """
  @spec expired?(t(), integer()) :: boolean()
  def expired?(entry, now \\ now())
  def expired?(%__MODULE__{expires_at: :infinity}, _now), do: false
  def expired?(%__MODULE__{expires_at: at}, now), do: now >= at

  @doc """
  Milliseconds left before the entry expires (never negative).
  """
  @spec remaining(t(), integer()) :: non_neg_integer() | :infinity
  def remaining(entry, now \\ now())
  def remaining(%__MODULE__{expires_at: :infinity}, _now), do: :infinity
  def remaining(%__MODULE__{expires_at: at}, now), do: max(at - now, 0)

  def touch(%__MODULE__{hits: hits} = entry), do: %{entry | hits: hits + 1}

  @doc false
  def now, do: System.monotonic_time(:millisecond)
end
