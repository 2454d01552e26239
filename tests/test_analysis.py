"""Tests for exforge.elixir.analysis, checked against Elixir's own parser where possible."""

from __future__ import annotations

from pathlib import Path

import pytest
from tree_sitter import Node

from exforge.elixir.analysis import FileAnalysis, analyse, normalise
from exforge.elixir.tree import Finder, argument_nodes, deeper_than, first_argument, parse, text
from schemas.records import CodeMetrics, ElixirAnalysis, FunctionInfo
from tests.support.elixir_ast import analysis_view, elixir_views

REPO = Path(__file__).resolve().parent.parent
CORPUS = sorted((REPO / "examples" / "corpus").glob("**/*.ex"))


def fn(result: FileAnalysis, name: str, arity: int, module: str | None = None) -> FunctionInfo:
    found = [
        f
        for f in result.functions
        if f.name == name and f.arity == arity and (module is None or f.module == module)
    ]
    assert len(found) == 1, (name, arity, module, result.functions)
    return found[0]


# --------------------------------------------------------------------------- fixtures

NESTED = """\
defmodule Outer do
  @moduledoc "The outer module."

  def outer_fun(a), do: a

  defmodule Inner do
    @moduledoc false

    def inner_fun, do: :inner

    defmodule Deep do
      def deep(x, y), do: {x, y}
    end
  end

  defmodule __MODULE__.Sub do
    def sub, do: :sub
  end

  def after_inner(b), do: b
end

defmodule Other.Top do
  def top, do: 1
end
"""

MULTI_CLAUSE = """\
defmodule Math do
  @doc "Factorial."
  def fact(0), do: 1

  def fact(n) when n > 0 do
    n * fact(n - 1)
  end

  def fact(n, acc), do: fact(n - 1, acc * n)

  defp helper([]), do: []
  defp helper([h | t]), do: [h | helper(t)]
end
"""

GUARDS = """\
defmodule Guards do
  def kind(x) when is_integer(x), do: :int
  def kind(x) when is_float(x) when x > 1.0, do: :float
  def kind(_), do: :other

  def positive?(x) when is_number(x) and x > 0 do
    true
  end

  defmacro is_even(value) when is_integer(value) do
    quote do: rem(unquote(value), 2) == 0
  end
end
"""

DEFAULTS = """\
defmodule Cache do
  @doc "Fetch a key."
  def get(cache, key, default \\\\ nil)

  def get(cache, key, default) when is_map(cache) do
    Map.get(cache, key, default)
  end

  def get(_cache, _key, default), do: default

  def put(cache, key, value \\\\ true, opts \\\\ []), do: {cache, key, value, opts}
end
"""

ZERO_ARITY = """\
defmodule Zero do
  def keyword_form, do: :kw

  def block_form do
    :block
  end

  def empty_parens() do
    :parens
  end

  defp private_zero, do: :p
end
"""

DOCS = """\
defmodule Documented do
  @moduledoc \"\"\"
  Module docs.

      indented example
  \"\"\"

  @doc \"\"\"
    Keeps extra indentation.
  Base line.
  \"\"\"
  def heredoc, do: 1

  @doc ~S\"\"\"
  Raw: no \\\\escapes\\n here, #{not_interpolated}.
  \"\"\"
  def sigil_doc, do: 2

  @doc "Escapes: \\"quoted\\" and a\\ttab."
  def escaped, do: 3

  @doc false
  def hidden, do: 4

  @doc "Spec in between."
  @spec with_spec(integer()) :: integer()
  @impl true
  # a comment
  @decorate cacheable()
  def with_spec(x), do: x

  @doc "Lost: another definition comes first."
  defstruct [:a]
  def after_struct, do: 5

  @doc "Only the first clause counts."
  def multi(1), do: 1
  @doc "Ignored for a later clause."
  def multi(n), do: n

  @doc since: "1.2.0"
  @doc "Metadata keeps the doc."
  def with_meta, do: 6

  @doc "Consumed by a."
  def a, do: 1
  def b, do: 2
end
"""

MACROS = """\
defmodule Macros do
  @doc "A public macro."
  defmacro my_if(condition, do: block) do
    quote do
      if unquote(condition), do: unquote(block)
    end
  end

  defmacrop secret(x), do: x

  defp private_fun(a, b), do: a + b

  @doc "Delegated."
  defdelegate size(map), to: Kernel, as: :map_size
  defdelegate fetch(map, key, default \\\\ nil), to: Map

  def unquote(:dynamic)(x), do: x

  def left <~> right, do: {left, right}

  defmacro __using__(_opts) do
    quote do
      def injected, do: :not_a_function_of_macros
    end
  end
end
"""

UNICODE = """\
defmodule Unicode do
  @moduledoc "Ceci n'est pas une pipe — 日本語."

  @doc "Grüße, 世界! 🎉"
  def greet(name \\\\ "wörld") do
    "héllo " <> name <> " ✓"
  end

  def après(x), do: {:ok, "日本", x}
end
"""

PROTOCOLS = """\
defprotocol Size do
  @doc "Size of data."
  def size(data)
end

defimpl Size, for: BitString do
  def size(string), do: byte_size(string)
end

defmodule Shape do
  defstruct [:w, :h]

  defimpl Size do
    def size(%{w: w, h: h}), do: w * h
  end

  if Code.ensure_loaded?(Jason) do
    def to_json(shape), do: Jason.encode!(shape)
  else
    def to_json(_shape), do: nil
  end
end
"""

KEYWORD_MODULE = """\
defmodule Tiny, do: (def one, do: 1; def two(x), do: x)

defmodule TestCase do
  def test_fun do
    defmodule Local do
      def local, do: :ok
    end
  end
end
"""

ESCAPES = r'''defmodule Escapes do
  @moduledoc ~S"""
  Raw moduledoc with `\\` kept.
  """

  @doc """
  Defaults look like `def f(a \\ 1)`; not interpolated: \#{x}.
  Tab:\tend. Unicode: \u00e9 \u{1F600}.
  Continued \
  line.
  """
  def escapes(a \\ 1), do: a

  @doc "Interpolated #{1 + 1}"
  def interpolated, do: :ok

  @doc "Before a guard"
  defguard is_small(x) when x < 10
  def after_guard(x), do: x

  def multi_line_head(
        first,
        second
      )
      when is_list(first) do
    {first, second}
  end
end
'''

HARD = r'''defmodule Hard do
  @moduledoc ~S"""
  Not code: def fake(x), do: x
  defmodule Fake do end
  """

  @type t :: %{name: String.t()}
  @typep pair(a, b) :: {a, b}
  @opaque handle :: reference()
  @callback run(t) :: :ok | {:error, term()}
  @macrocallback expand(Macro.t()) :: Macro.t()
  @callback with_when(x) :: x when x: term()
  @type unquote(:computed)() :: term()

  @regex ~r/def\s+(\w+)/
  @words ~w(def defp defmodule)a
  @heredoc """
  def inside_heredoc(x), do: x
  defmodule InHeredoc do end
  """

  defdelegate first(list), to: List
  defdelegate last(list), to: List, as: :last

  for name <- [:alpha, :beta] do
    def unquote(name)(), do: unquote(name)
  end

  Enum.each([:gamma], fn name ->
    def unquote(:"#{name}_fun")(x), do: x
  end)

  def unquote(:"dyn_#{1}")(a), do: a

  defmacro defgetter(name) do
    quote do
      def unquote(name)(), do: unquote(name)
    end
  end

  def sigil_x(string, []), do: string
  def sigil_arg(~s(a) = s), do: s
  def sigil_default(opts \\ ~w(a b)), do: opts
  defp charlist, do: 'def not_a_fun'

  defmodule Inner.Deeper do
    @type id :: pos_integer()
    def id(x) when x > 0 and is_integer(x), do: x
  end
end
'''

FEATURES = r'''defmodule Shop.Application do
  use Application

  @impl true
  def start(_type, _args) do
    children = [
      Shop.Repo,
      {Registry, keys: :unique, name: Shop.Registry},
      {DynamicSupervisor, name: Shop.CartSupervisor, strategy: :one_for_one},
      Supervisor.child_spec({Task, fn -> :ok end}, id: :warmup),
      %{id: Shop.Cache, start: {Shop.Cache, :start_link, [[]]}}
    ]

    Supervisor.start_link(children, strategy: :rest_for_one, name: Shop.Supervisor)
  end
end

defmodule Shop.Cart do
  @moduledoc """
  A cart process.

      iex> {:ok, pid} = Shop.Cart.start_link([])
      iex> Shop.Cart.add(pid, :apple)
      :ok

      iex> Shop.Cart.total([1, 2,
      ...>   3])
      6
  """
  use GenServer
  @behaviour Shop.Pricing

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  @impl GenServer
  def init(items), do: {:ok, items}

  @impl true
  def handle_call(:items, _from, items), do: {:reply, items, items}

  @impl true
  def handle_cast({:add, item}, items), do: {:noreply, [item | items]}

  @impl Shop.Pricing
  def price(item), do: item

  @doc "Sums."
  def total(list) when is_list(list) and list != [] do
    # keep integers only
    list |> Enum.map(& &1) |> Enum.filter(&is_integer/1) |> Enum.sum()
  end

  def total(_), do: 0

  def add(pid, item), do: GenServer.cast(pid, {:add, item})

  def classify(x) do
    case x do
      {:ok, %{id: id} = m} -> {id, m}
      [h | _] -> h
      _ -> nil
    end
  end

  def checked(opts) do
    with {:ok, a} <- Keyword.fetch(opts, :a),
         {:ok, b} <- Keyword.fetch(opts, :b) do
      a + b
    end
  end

  def ping do
    pid = spawn(fn -> receive do {:ping, from} -> send(from, :pong) end end)
    send(pid, {:ping, self()})

    receive do
      :pong -> :ok
    after
      100 -> :timeout
    end
  end

  defmacro twice(expr) do
    quote do
      unquote(expr)
      unquote(expr)
    end
  end
end

defmodule Shop.CartTest do
  use ExUnit.Case, async: true
  doctest Shop.Cart

  describe "total/1" do
    test "sums" do
      assert Shop.Cart.total([1, 2]) == 3
    end

    test "empty" do
      assert Shop.Cart.total([]) == 0
    end
  end
end
'''

BROKEN = """\
defmodule Broken do
  def ok(x), do: x

  def broken(x do
    x +
  end
"""

# Where Elixir defines functions beyond the plain module body, and where it does not.
WHERE_DEFINED = """\
defmodule Where.Test do
  use ExUnit.Case
  @moduledoc "Where definitions hide."

  describe "parsing" do
    @doc "A helper inside describe."
    def helper(x), do: x

    test "works" do
      defmodule Inside do
        def inner, do: :ok
      end

      assert helper(1) == 1
    end

    defp private_helper(a, b), do: {a, b}
  end

  for {name, value} <- [one: 1, two: 2] do
    def unquote(name)(), do: unquote(value)
    @doc "Looks a name up."
    def lookup(unquote(name)), do: unquote(value)
  end

  if Code.ensure_loaded?(Jason) do
    def encode(term), do: Jason.encode!(term)
  else
    def encode(term, _opts), do: inspect(term)
  end

  case System.get_env("MODE") do
    "fast" -> defp mode, do: :fast
    _ -> defmacrop mode(x), do: x
  end

  Enum.each([:a], fn k -> def each_defined(unquote(k)), do: true end)

  defmacro __using__(_opts) do
    quote do
      def injected, do: :quoted
    end
  end

  quote do
    def never, do: nil
  end

  defstruct [:a]

  defimpl String.Chars, for: [Where.A, Where.B] do
    @moduledoc false
    def to_string(_), do: "where"
  end
end
"""
# Binary syntax that a text search takes for IPv6 addresses, and docs that say "generated".
BINARY_AND_GENERATED_DOCS = """\
defmodule Bits do
  @moduledoc "The id is autogenerated; this file was generated by hand."

  @doc "Returns the autogenerated value."
  def parse(<<a1::4, b2::4, rest::binary>>), do: {a1, b2, rest}
  def three, do: <<2::3>>
  def wide(<<ab::16, cd::16, 0::8>>), do: {ab, cd}
  def schema, do: [autogenerate: true]
end
"""


def test_definitions_wherever_the_module_body_makes_them() -> None:
    result = analyse(WHERE_DEFINED)
    assert [m.name for m in result.modules] == [
        "Where.Test",
        "Where.Test.Inside",
        "String.Chars.Where.A",
        "String.Chars.Where.B",
    ]
    found = {(f.module, f.kind, f.name, f.arity) for f in result.functions}
    assert found == {
        ("Where.Test", "def", "helper", 1),
        ("Where.Test", "defp", "private_helper", 2),
        ("Where.Test", "def", "lookup", 1),
        ("Where.Test", "def", "encode", 1),
        ("Where.Test", "def", "encode", 2),
        ("Where.Test", "defp", "mode", 0),
        ("Where.Test", "defmacrop", "mode", 1),
        ("Where.Test", "def", "each_defined", 1),
        ("Where.Test", "defmacro", "__using__", 1),
        ("Where.Test.Inside", "def", "inner", 0),
        ("String.Chars.Where.A", "def", "to_string", 1),
        ("String.Chars.Where.B", "def", "to_string", 1),
    }
    assert fn(result, "helper", 1).doc == "A helper inside describe."
    assert fn(result, "lookup", 1).doc == "Looks a name up."


FIXTURES: dict[str, str] = {
    "nested": NESTED,
    "multi_clause": MULTI_CLAUSE,
    "guards": GUARDS,
    "defaults": DEFAULTS,
    "zero_arity": ZERO_ARITY,
    "docs": DOCS,
    "macros": MACROS,
    "unicode": UNICODE,
    "protocols": PROTOCOLS,
    "keyword_module": KEYWORD_MODULE,
    "escapes": ESCAPES,
    "docs_crlf": DOCS.replace("\n", "\r\n"),
    "hard": HARD,
    "features": FEATURES,
    "where_defined": WHERE_DEFINED,
    "binary_and_generated_docs": BINARY_AND_GENERATED_DOCS,
}


# ------------------------------------------------------------------------------ tests


def test_nested_modules() -> None:
    result = analyse(NESTED)
    assert [(m.name, m.start_line, m.end_line) for m in result.modules] == [
        ("Outer", 1, 21),
        ("Outer.Inner", 6, 14),
        ("Outer.Inner.Deep", 11, 13),
        ("Outer.Sub", 16, 18),
        ("Other.Top", 23, 25),
    ]
    docs = {m.name: m.moduledoc for m in result.modules}
    assert docs["Outer"] == "The outer module."
    assert docs["Outer.Inner"] is None
    owners = {(f.name, f.arity): f.module for f in result.functions}
    assert owners == {
        ("outer_fun", 1): "Outer",
        ("inner_fun", 0): "Outer.Inner",
        ("deep", 2): "Outer.Inner.Deep",
        ("sub", 0): "Outer.Sub",
        ("after_inner", 1): "Outer",
        ("top", 0): "Other.Top",
    }
    assert not result.has_errors
    assert result.lines == 25


def test_multi_clause_grouping() -> None:
    result = analyse(MULTI_CLAUSE)
    fact = fn(result, "fact", 1)
    assert fact.kind == "def"
    assert fact.doc == "Factorial."
    assert fact.head == "def fact(0)"
    assert (fact.start_line, fact.end_line) == (3, 7)
    assert fact.source == (
        "def fact(0), do: 1\n\ndef fact(n) when n > 0 do\n  n * fact(n - 1)\nend"
    )
    fact2 = fn(result, "fact", 2)
    assert fact2.doc is None
    assert (fact2.start_line, fact2.end_line) == (9, 9)
    helper = fn(result, "helper", 1)
    assert helper.kind == "defp"
    assert not helper.public
    assert helper.source.count("defp helper") == 2
    assert (helper.start_line, helper.end_line) == (11, 12)
    assert [(f.name, f.arity) for f in result.functions] == [
        ("fact", 1),
        ("fact", 2),
        ("helper", 1),
    ]


def test_guards() -> None:
    result = analyse(GUARDS)
    kind = fn(result, "kind", 1)
    assert kind.head == "def kind(x) when is_integer(x)"
    assert kind.source.count("def kind(") == 3
    positive = fn(result, "positive?", 1)
    assert positive.head == "def positive?(x) when is_number(x) and x > 0"
    assert (positive.start_line, positive.end_line) == (6, 8)
    even = fn(result, "is_even", 1)
    assert even.kind == "defmacro"
    assert even.public


def test_default_args() -> None:
    result = analyse(DEFAULTS)
    get = fn(result, "get", 3)
    assert get.head == "def get(cache, key, default \\\\ nil)"
    assert get.doc == "Fetch a key."
    assert (get.start_line, get.end_line) == (3, 9)
    assert get.source.startswith("def get(cache, key, default \\\\ nil)\n\ndef get(cache, key")
    put = fn(result, "put", 4)
    assert put.head == "def put(cache, key, value \\\\ true, opts \\\\ [])"
    assert len(result.functions) == 2


def test_zero_arity_forms() -> None:
    result = analyse(ZERO_ARITY)
    keyword = fn(result, "keyword_form", 0)
    assert keyword.head == "def keyword_form"
    assert keyword.source == "def keyword_form, do: :kw"
    block = fn(result, "block_form", 0)
    assert block.head == "def block_form"
    assert block.source == "def block_form do\n  :block\nend"
    assert (block.start_line, block.end_line) == (4, 6)
    assert fn(result, "empty_parens", 0).head == "def empty_parens()"
    assert fn(result, "private_zero", 0).kind == "defp"


def test_docs() -> None:
    result = analyse(DOCS)
    assert result.modules[0].moduledoc == "Module docs.\n\n    indented example\n"
    assert fn(result, "heredoc", 0).doc == "  Keeps extra indentation.\nBase line.\n"
    assert fn(result, "sigil_doc", 0).doc == ("Raw: no \\\\escapes\\n here, #{not_interpolated}.\n")
    assert fn(result, "escaped", 0).doc == 'Escapes: "quoted" and a\ttab.'
    assert fn(result, "hidden", 0).doc is None
    assert fn(result, "with_spec", 1).doc == "Spec in between."
    assert fn(result, "after_struct", 0).doc is None
    assert fn(result, "multi", 1).doc == "Only the first clause counts."
    assert fn(result, "with_meta", 0).doc == "Metadata keeps the doc."
    assert fn(result, "a", 0).doc == "Consumed by a."
    assert fn(result, "b", 0).doc is None


def test_macros_private_and_delegates() -> None:
    result = analyse(MACROS)
    my_if = fn(result, "my_if", 2)
    assert my_if.kind == "defmacro"
    assert my_if.doc == "A public macro."
    assert my_if.head == "defmacro my_if(condition, do: block)"
    assert fn(result, "secret", 1).kind == "defmacrop"
    assert fn(result, "private_fun", 2).kind == "defp"
    size = fn(result, "size", 1)
    assert size.kind == "def"
    assert size.public
    assert size.doc == "Delegated."
    assert size.head == "defdelegate size(map)"
    assert size.source == "defdelegate size(map), to: Kernel, as: :map_size"
    assert fn(result, "fetch", 3).kind == "def"
    assert fn(result, "<~>", 2).head == "def left <~> right"
    names = {f.name for f in result.functions}
    assert "injected" not in names  # inside a quote in a macro body
    assert not any(n.startswith("unquote") for n in names)
    assert fn(result, "__using__", 1).kind == "defmacro"


def test_non_ascii() -> None:
    result = analyse(UNICODE)
    assert result.modules[0].name == "Unicode"
    assert result.modules[0].moduledoc == "Ceci n'est pas une pipe — 日本語."
    greet = fn(result, "greet", 1)
    assert greet.doc == "Grüße, 世界! 🎉"
    assert greet.head == 'def greet(name \\\\ "wörld")'
    assert greet.source == 'def greet(name \\\\ "wörld") do\n  "héllo " <> name <> " ✓"\nend'
    assert (greet.start_line, greet.end_line) == (5, 7)
    apres = fn(result, "après", 1)
    assert apres.source == 'def après(x), do: {:ok, "日本", x}'
    assert apres.start_line == 9


def test_protocols_impls_and_conditionals() -> None:
    result = analyse(PROTOCOLS)
    assert [m.name for m in result.modules] == ["Size", "Size.BitString", "Shape", "Size.Shape"]
    assert fn(result, "size", 1, "Size").doc == "Size of data."
    assert fn(result, "size", 1, "Size").source == "def size(data)"
    assert fn(result, "size", 1, "Size.BitString").source.startswith("def size(string)")
    assert fn(result, "size", 1, "Size.Shape").module == "Size.Shape"
    to_json = fn(result, "to_json", 1, "Shape")
    assert to_json.source.count("def to_json") == 2


def test_keyword_module_and_module_in_function() -> None:
    result = analyse(KEYWORD_MODULE)
    assert [m.name for m in result.modules] == ["Tiny", "TestCase", "TestCase.Local"]
    assert fn(result, "one", 0).module == "Tiny"
    assert fn(result, "two", 1).module == "Tiny"
    assert fn(result, "local", 0).module == "TestCase.Local"
    assert fn(result, "test_fun", 0).module == "TestCase"


def test_escapes_and_multi_line_heads() -> None:
    result = analyse(ESCAPES)
    assert result.modules[0].moduledoc == "Raw moduledoc with `\\\\` kept.\n"
    assert fn(result, "escapes", 1).doc == (
        "Defaults look like `def f(a \\ 1)`; not interpolated: #{x}.\n"
        "Tab:\tend. Unicode: \u00e9 \U0001f600.\nContinued line.\n"
    )
    assert fn(result, "interpolated", 0).doc == "Interpolated #{1 + 1}"
    assert fn(result, "after_guard", 1).doc is None
    assert "is_small" not in {f.name for f in result.functions}
    head = fn(result, "multi_line_head", 2)
    assert head.head == (
        "def multi_line_head(\n      first,\n      second\n    )\n    when is_list(first)"
    )
    assert head.source.endswith("do\n  {first, second}\nend")
    assert (head.start_line, head.end_line) == (21, 27)


def test_syntax_error() -> None:
    result = analyse(BROKEN)
    assert result.has_errors
    assert result.lines == 6
    for fixture in FIXTURES.values():
        assert not analyse(fixture).has_errors


def test_empty_and_moduleless() -> None:
    measured = ElixirAnalysis(metrics=CodeMetrics(nesting=0))
    assert analyse("") == FileAnalysis(modules=[], functions=[], lines=0, details=measured)
    result = analyse("def loose(x), do: x\nIO.puts(:hi)")
    assert result.functions == []
    assert result.lines == 2


def test_crlf_heredoc() -> None:
    source = DOCS.replace("\n", "\r\n")
    result = analyse(source)
    assert result.modules[0].moduledoc == "Module docs.\n\n    indented example\n"
    assert fn(result, "a", 0).doc == "Consumed by a."


def test_normalise() -> None:
    assert normalise("\r\n\n  \ndefmodule A do  \r\n  def f, do: 1\t\rend\n\n\n") == (
        "defmodule A do\n  def f, do: 1\nend\n"
    )
    assert normalise("x") == "x\n"
    assert normalise(" \n\t\n") == ""
    assert normalise("\ufeffa\n") == "a\n"
    assert normalise(normalise(NESTED)) == normalise(NESTED) == NESTED


def test_hard_cases() -> None:
    result = analyse(HARD)
    assert [m.name for m in result.modules] == ["Hard", "Hard.Inner.Deeper"]
    names = {(f.name, f.arity) for f in result.functions}
    assert names == {
        ("first", 1),
        ("last", 1),
        ("defgetter", 1),
        ("sigil_x", 2),
        ("sigil_arg", 1),
        ("sigil_default", 1),
        ("charlist", 0),
        ("id", 1),
    }
    types = {(t.module, t.kind, t.name, t.arity) for t in result.details.types}
    assert ("Hard", "typep", "pair", 2) in types
    assert ("Hard", "callback", "with_when", 1) in types
    assert ("Hard.Inner.Deeper", "type", "id", 0) in types
    assert not any(t[2].startswith("unquote") for t in types)


def test_behaviours_and_supervision_trees() -> None:
    details = analyse(FEATURES).details
    assert [t.model_dump() for t in details.supervisors] == [
        {
            "module": "Shop.Application",
            "supervisor": "Supervisor",
            "strategy": "rest_for_one",
            "children": ["Shop.Repo", "Registry", "DynamicSupervisor", "Task", "Shop.Cache"],
        }
    ]
    adopted = {
        (b.module, b.behaviour): (b.via, b.otp, b.callbacks)
        for b in details.behaviours
        if b.via != "call"
    }
    assert adopted == {
        ("Shop.Application", "Application"): ("use", True, ["start/2"]),
        ("Shop.Cart", "GenServer"): ("use", True, ["handle_call/3", "handle_cast/2", "init/1"]),
        ("Shop.Cart", "Shop.Pricing"): ("behaviour", False, ["price/1"]),
        ("Shop.CartTest", "ExUnit.Case"): ("use", False, []),
    }
    called = {(b.module, b.behaviour) for b in details.behaviours if b.via == "call"}
    assert called == {
        ("Shop.Application", "Supervisor"),
        ("Shop.Application", "Registry"),
        ("Shop.Application", "DynamicSupervisor"),
        ("Shop.Application", "Task"),
    }
    dynamic = analyse(
        "defmodule D do\n  use DynamicSupervisor\n\n"
        "  def init(_), do: DynamicSupervisor.init(strategy: :one_for_one, max_children: 5)\nend\n"
    ).details
    assert [(t.supervisor, t.strategy) for t in dynamic.supervisors] == [
        ("DynamicSupervisor", "one_for_one")
    ]


def test_a_module_named_like_an_otp_module_is_not_that_module() -> None:
    # `Shop.Task` and `Shop.Supervisor` end in OTP names; their calls are local modules'.
    details = analyse(
        "defmodule Shop.Jobs do\n"
        "  def run(x), do: Shop.Task.run(x)\n"
        "  def start, do: Shop.Supervisor.start_link([Shop.Repo])\n"
        "  def later(x), do: Task.async(fn -> x end)\n"
        "end\n"
    ).details
    assert details.supervisors == []
    assert [(b.module, b.behaviour, b.via) for b in details.behaviours] == [
        ("Shop.Jobs", "Task", "call")
    ]


def test_code_features() -> None:
    details = analyse(FEATURES).details
    assert (details.pipes, details.longest_pipe) == (3, 3)
    assert details.multi_clause_functions == 1
    assert (details.case, details.with_, details.cond) == (1, 1, 0)
    assert details.destructuring == 3  # `%{id: id} = m`, two `{:ok, _} <-`
    assert (details.spawns, details.sends, details.receives) == (1, 2, 2)
    assert (details.macros, details.quotes, details.unquotes) == (1, 1, 2)
    assert details.test_modules == ["Shop.CartTest"]
    assert (details.tests, details.describes) == (2, 1)
    assert details.doctest_targets == ["Shop.Cart"]
    assert [(d.owner, d.expression, d.expected) for d in details.doctests] == [
        ("Shop.Cart", "{:ok, pid} = Shop.Cart.start_link([])", None),
        ("Shop.Cart", "Shop.Cart.add(pid, :apple)", ":ok"),
        ("Shop.Cart", "Shop.Cart.total([1, 2,\n  3])", "6"),
    ]
    assert analyse(FEATURES).details.model_dump(by_alias=True)["with"] == 1


def test_metrics() -> None:
    source = 'defmodule M do\n  # one\n\n  @doc "x"\n  def f(x), do: x # trailing\nend\n'
    metrics = analyse(source).details.metrics
    assert (metrics.lines, metrics.loc, metrics.comment_lines) == (6, 4, 1)
    assert metrics.comment_ratio == 1 / 5
    assert metrics.doc_coverage == 1.0
    assert metrics.max_line_length == len("  def f(x), do: x # trailing")
    assert metrics.mean_line_length == sum(len(line) for line in source.splitlines()) / 6
    alnum = sum(c.isalnum() for c in source)
    assert metrics.alphanumeric_fraction == alnum / len(source)
    assert metrics.complexity == 1
    # 1 + an extra clause of total/1 + two extra case clauses + the guard's `when`, `and`
    assert analyse(FEATURES).details.metrics.complexity == 1 + 1 + 2 + 2
    assert analyse("").details.metrics.lines == 0


# ------------------------------------------------------- comparison with Elixir itself


def test_matches_elixir_parser(tmp_path: Path) -> None:
    """Every fixture and sample-corpus file: modules (lines, ends, docs), the first line
    and doc of each distinct definition, and types, as Elixir's own parser has them."""
    paths: list[Path] = []
    for name, source in FIXTURES.items():
        path = tmp_path / f"{name}.ex"
        path.write_text(source, encoding="utf-8")
        paths.append(path)
    paths.extend(CORPUS)
    views = elixir_views(paths)
    assert [(p.name, v.error) for p, v in zip(paths, views, strict=True) if v.error] == []
    for path, expected in zip(paths, views, strict=True):
        result = analyse(path.read_bytes().decode("utf-8", errors="replace"))
        got = analysis_view(result, expected.unknown_docs)
        assert sorted((n, s, d) for n, s, _, d in got.modules) == sorted(
            (n, s, d) for n, s, _, d in expected.modules
        ), path
        known_ends = {(n, s, e) for n, s, e, _ in expected.modules if e is not None}
        got_ends = {(n, s, e) for n, s, e, _ in got.modules if (n, s, e) in known_ends}
        assert got_ends == known_ends, path
        assert got.functions == expected.functions, path
        assert got.types == expected.types, path


def test_elixir_rejects_broken_fixture(tmp_path: Path) -> None:
    path = tmp_path / "broken.ex"
    path.write_text(BROKEN, encoding="utf-8")
    (view,) = elixir_views([path])
    assert view.error


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_corpus_parses_without_crashing(path: Path) -> None:
    result = analyse(path.read_text(encoding="utf-8", errors="replace"))
    for f in result.functions:
        assert f.start_line <= f.end_line <= result.lines
        assert f.source.startswith(f.head)


def test_comments_are_never_arguments() -> None:
    source = "defmodule M do\n  def f(# the first\n a, # between\n b), do: g(# c\n a)\nend\n"
    (call,) = [n for n in parse(source.encode()).children if n.type == "call"]
    assert [text(a) for a in argument_nodes(call)] == ["M"]
    (found,) = analyse(source).functions
    assert (found.name, found.arity) == ("f", 2)
    head = parse(b"f(# note\n a, b)").children[0]
    assert text(first_argument(head)) == "a"
    assert [text(a) for a in argument_nodes(head)] == ["a", "b"]


def _depth(root: Node) -> int:
    """The tree's depth by a walk over every node."""
    below = [(child, 1) for child in root.children]
    deepest = 0
    while below:
        node, depth = below.pop()
        deepest = max(deepest, depth)
        below.extend((child, depth + 1) for child in node.children)
    return deepest


WIDE = "defmodule W do\n  # a\n  # b\n\n  # c\n  def f, do: [\n # d\n 1, # e\n 2]\n  # f\nend\n"


@pytest.mark.parametrize(
    "source", [FEATURES, NESTED, MULTI_CLAUSE, WIDE], ids=["features", "nested", "multi", "wide"]
)
def test_the_finder_answers_as_tree_sitter_from_the_root(source: str) -> None:
    data = source.encode()
    root = parse(data)
    ranges = [(start, start + size) for start in range(len(data)) for size in (1, 2, 3)]
    for order in (ranges, ranges[::-1]):  # in source order (its use) and against it
        finder = Finder(root)
        for start, end in order:
            node = finder.find(start, end)
            assert node == root.descendant_for_byte_range(start, end), (start, end)
            assert finder.parent(node) == node.parent
            named = finder.find_named(start, end)
            assert named == root.named_descendant_for_byte_range(start, end), (start, end)
            assert finder.parent(named) == named.parent


@pytest.mark.parametrize("source", [FEATURES, NESTED, "[[[[[1]]]]]", "x"], ids=repr)
def test_deeper_than_is_the_depth_of_the_tree(source: str) -> None:
    root = parse(source.encode())
    depth = _depth(root)
    assert [deeper_than(root, limit) for limit in range(depth + 2)] == [True] * depth + [False] * 2
