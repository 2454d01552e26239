# What Elixir's own parser says about source files: the judge the analysis is held to.
#
# Reads file paths from stdin, one per line, and for the Nth file prints tab-separated
# records (docs hex-encoded, "b" + hex; "-" for none, "?" for a value that is not a
# literal string):
#
#   E  N  line  message                          Code.string_to_quoted/2 refuses the file
#   M  N  module  line  end_line  moduledoc      a defmodule/defprotocol/defimpl
#   F  N  module  kind  name  arity  line  doc   a def/defp/defmacro/defmacrop/defdelegate
#   T  N  module  kind  name  arity  line        a @type/@typep/@opaque/@callback/@macrocallback
#   D  N                                         the file is done
#
# Modules are found anywhere. A module's definitions are found wherever its body defines
# them when it runs: in the body and inside any expression of it (if/unless/case/for,
# describe and other macro calls with blocks, fn bodies), but not in a function's body,
# not inside quote, not inside a nested module (which has its own) and not inside other
# def* macros (defstruct, defguard, DSL macros), whose expansion is unknown here. A
# `@doc` waits for the next definition, in the order the body runs.
defmodule ElixirAst do
  @defs [:def, :defp, :defmacro, :defmacrop]
  @mods [:defmodule, :defprotocol, :defimpl]
  @types [:type, :typep, :opaque, :callback, :macrocallback]

  def main do
    :stdio
    |> IO.stream(:line)
    |> Stream.map(&String.trim_trailing(&1, "\n"))
    |> Stream.with_index()
    |> Enum.each(fn {path, idx} -> file(path, idx) end)
  end

  defp file(path, idx) do
    case Code.string_to_quoted(File.read!(path), token_metadata: true, file: path) do
      {:ok, ast} -> modules(ast, nil, idx)
      {:error, {location, message, token}} -> out(["E", idx, line(location), text(message, token)])
    end

    out(["D", idx])
  end

  defp line(location) when is_list(location), do: Keyword.get(location, :line, 0)
  defp line(location) when is_integer(location), do: location
  defp line(_), do: 0

  defp text(message, token) do
    full =
      case message do
        {prefix, suffix} -> to_string(prefix) <> to_string(token) <> to_string(suffix)
        m -> to_string(m) <> to_string(token)
      end

    String.replace(full, ["\t", "\n", "\r"], " ")
  end

  defp out(fields), do: IO.puts(Enum.join(fields, "\t"))

  # ------------------------------------------------------------------ modules

  defp modules({form, meta, [first | rest]}, parent, idx) when form in @mods do
    case mod_name(form, first, rest, parent) do
      nil ->
        modules(rest, parent, idx)

      names ->
        # `defimpl P, for: [A, B]` defines P.A and P.B, each with the whole body
        for name <- List.wrap(names) do
          st = body(kw(rest)[:do], name, idx, %{doc: nil, moduledoc: nil})
          end_line = get_in(meta, [:end, :line]) || "?"
          out(["M", idx, name, meta[:line], end_line, enc(st.moduledoc)])
        end

        modules(rest, hd(List.wrap(names)), idx)
    end
  end

  defp modules({a, _, c}, p, idx) do
    modules(a, p, idx)
    if is_list(c), do: modules(c, p, idx)
  end

  defp modules({a, b}, p, idx), do: (modules(a, p, idx); modules(b, p, idx))
  defp modules(l, p, idx) when is_list(l), do: Enum.each(l, &modules(&1, p, idx))
  defp modules(_, _, _), do: :ok

  defp kw(rest) do
    Enum.flat_map(rest, fn l -> if is_list(l) and Keyword.keyword?(l), do: l, else: [] end)
  end

  defp mod_name(:defimpl, proto, rest, parent) do
    p = alias_name(proto, parent)

    fors =
      case Keyword.fetch(kw(rest), :for) do
        {:ok, v} when is_list(v) -> Enum.map(v, &alias_name(&1, parent))
        {:ok, v} -> [alias_name(v, parent)]
        :error -> [parent]
      end

    named = for f <- fors, f != nil, do: p <> "." <> f

    cond do
      p == nil -> nil
      named == [] -> p
      true -> named
    end
  end

  defp mod_name(_, {:__aliases__, _, [h | _] = parts}, _rest, parent)
       when is_atom(h) and h != Elixir and parent != nil do
    parent <> "." <> Enum.join(parts, ".")
  end

  defp mod_name(_, a, _rest, parent), do: alias_name(a, parent)

  defp alias_name({:__aliases__, _, [{:__MODULE__, _, _} | rest]}, parent),
    do: parent && Enum.join([parent | rest], ".")

  defp alias_name({:__aliases__, _, parts} = a, _) do
    if Enum.all?(parts, &is_atom/1), do: strip(Enum.join(parts, ".")), else: Macro.to_string(a)
  end

  defp alias_name({:__MODULE__, _, c}, parent) when is_atom(c), do: parent
  defp alias_name(a, _) when is_atom(a), do: strip(Atom.to_string(a))
  defp alias_name(other, _), do: Macro.to_string(other)

  defp strip("Elixir." <> rest), do: rest
  defp strip(s), do: s

  # ------------------------------------------------------------- module bodies

  defp body({:@, _, [{name, _, [val]}]}, _mod, _idx, st) when name in [:doc, :moduledoc] do
    if is_list(val) and Keyword.keyword?(val), do: st, else: Map.put(st, name, doc_value(val))
  end

  defp body({:@, meta, [{kind, _, [spec]}]}, mod, idx, st) when kind in @types do
    case type_sig(spec) do
      {name, arity} -> out(["T", idx, mod, kind, name, arity, meta[:line]])
      nil -> :ok
    end

    st
  end

  defp body({:@, _, _}, _mod, _idx, st), do: st

  defp body({kind, meta, [head | _]}, mod, idx, st) when kind in @defs or kind == :defdelegate do
    k = if kind == :defdelegate, do: :def, else: kind

    case sig(head) do
      {name, arity} -> out(["F", idx, mod, k, name, arity, meta[:line], enc(st.doc)])
      nil -> :ok
    end

    %{st | doc: nil}
  end

  defp body({form, _, args}, _mod, _idx, st) when form in @mods and is_list(args), do: st
  defp body({:quote, _, args}, _mod, _idx, st) when is_list(args), do: st

  defp body({name, _, args}, mod, idx, st) when is_atom(name) and is_list(args) do
    if String.starts_with?(Atom.to_string(name), "def"),
      do: %{st | doc: nil},
      else: body(args, mod, idx, st)
  end

  defp body({callee, _, args}, mod, idx, st) when is_list(args) do
    st = body(callee, mod, idx, st)
    body(args, mod, idx, st)
  end

  defp body({a, b}, mod, idx, st), do: body(b, mod, idx, body(a, mod, idx, st))
  defp body(l, mod, idx, st) when is_list(l), do: Enum.reduce(l, st, &body(&1, mod, idx, &2))
  defp body(_, _mod, _idx, st), do: st

  defp doc_value(false), do: nil
  defp doc_value(b) when is_binary(b), do: b
  defp doc_value({:sigil_S, _, [{:<<>>, _, [b]}, []]}) when is_binary(b), do: b

  defp doc_value({:sigil_s, _, [{:<<>>, _, [b]}, []]}) when is_binary(b),
    do: Macro.unescape_string(b)

  defp doc_value(_), do: :unknown

  defp type_sig({:when, _, [s | _]}), do: type_sig(s)
  defp type_sig({:"::", _, [h | _]}), do: sig(h)
  defp type_sig(h), do: sig(h)

  defp sig({:when, _, [h | _]}), do: sig(h)
  defp sig({name, _, args}) when is_atom(name) and is_list(args), do: check(name, length(args))
  defp sig({name, _, ctx}) when is_atom(name) and is_atom(ctx), do: check(name, 0)
  defp sig(_), do: nil

  defp check(name, arity) do
    s = Atom.to_string(name)
    if String.starts_with?(s, "unquote"), do: nil, else: {s, arity}
  end

  defp enc(nil), do: "-"
  defp enc(:unknown), do: "?"
  defp enc(b), do: "b" <> Base.encode16(b)
end

ElixirAst.main()
