"""Elixir checks the code of every candidate's `gpt` turns before it is kept.

The checks of one candidate are `Code.string_to_quoted!` (`parse`),
`ExforgeCheck.compiles` (`compile`; `CHECK_PRELUDE`) or `Code.compile_string` (`test`:
code with ExUnit tests that must pass) calls, each made by `ExforgeCheck.check`; the
code travels base64-encoded, so no quoting can break out. A `compile` check of one
module stops Elixir's compiler where it hands the module to the Erlang backend: every
error Elixir reports for code is raised by then, and the backend's code generation, most
of a small module's compile time, cannot fail on what Elixir accepted. Whether this
Elixir reports that stop as expected is probed by the first program of a process that
compiles, and remembered (`STOPS_KEY`); the front end skips Elixir's "redefining module"
check (`ignore_module_conflict`: a warning, paid for with a code path search per
module). The instruct stage runs them on the evaluator's pool of warm, sandboxed BEAM
VMs (`exforge.elixir.sandbox`), which compile `ExforgeCheck` once as their prelude, at
most `batch` candidates per program, in rounds of one program per VM, shared evenly
(`even_batches`). A batch program is one call of `ExforgeCheck.batch` with everything as
data (`external_term`): its distinct checks (units), each code held once, compressed,
however many candidates hold it, and each candidate's verdict as a term over them. It
runs each unit at most once and remembers its result, which it also reports, so that
later programs of the same process take it from `UnitResults` instead of running the
unit again; each candidate's verdict line, tagged with a per-program nonce, says whether
all of its checks passed, in order, stopping at the first that fails (so a refactor pair
whose original side does not compile is not compiled a second time). A `compile` check
`like` another (a pipes pair's rewritten side) passes without compiling when that one
passed and Elixir expands both to the same code (`ExforgeCheck.same_expansion`);
otherwise it is compiled. A parse check of code cut from a file (`Check.within`: whole
clauses or lines, maybe de-indented) passes when the whole file parses: a complete piece
of a file Elixir accepts is accepted alone (the corpus tests hold every generator to
it); the piece is parsed alone only when the file is not. The program ends with a `done`
line; a batch that did not reach it (a candidate halted or hung its VM) is run again one
candidate per program, so one bad candidate never decides another's fate; such reruns,
programs that timed out and the VMs replaced after a program count in
`exforge_check_pool_events_total`. A candidate with `test` checks runs alone: its own
tests decide whether the program `passed`.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import threading
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TypeAlias

from exforge.core.telemetry import CHECK_POOL_EVENTS
from exforge.elixir.sandbox import Outcome, SandboxPool
from exforge.elixir.sandbox import Program as PoolProgram
from streams.generators.common import Check

FAILED_CHECK = Outcome("syntax_error")
PROGRAM_CANDIDATES = 32  # candidates that share one program
MARKER_TEST = """
defmodule ExforgeChecked do
  use ExUnit.Case, async: true
  test "checked", do: :ok
end
"""


# `ExforgeCheck.compiles(source, file, stops)`: raises unless Elixir compiles `source`.
# Code that is one module whose body leaves nothing to run after its code is generated
# (no `use`, `@after_compile`, `@after_verify`, `@on_load`, `@compile`, `Module` calls)
# gets Elixir's front end only: ERL_COMPILER_OPTIONS, which Elixir reads for a module's
# final compile only, names `ExforgeCheck` as a parse transform, and a parse transform
# runs before anything else of the Erlang compiler, so Elixir hands it the module's
# Erlang forms and it answers with an error that names the module (`stopped`): Elixir
# raises it, which means it accepted the module. Elixir 1.14 lowers a module to Core
# Erlang itself and lints nothing in Erlang form; stopping there, not at Core Erlang,
# also skips that lowering and the Core passes (lint, folding) after it, ~10 % of a
# compile check: none of them fails on what Elixir accepted (they warn). Anything else,
# or an Elixir that does not report the stop so (`stops`: `FRONT_END_PROBE`, or its
# result once known), gets the full compile. That front end runs with
# `ignore_module_conflict`, which only skips Elixir's "redefining module" warning and
# the code path search behind it (`code:ensure_loaded` of the module, a miss for a
# module no file defines): a module never loaded by the front end is neither redefined
# nor looked up again, and any module its body uses is loaded on demand all the same. A
# module name is expanded as at the top level of a file (no module, no aliases). In that
# front end the module's body is evaluated (`erl_eval`, as `Code.eval_quoted` runs code)
# in the environment Elixir gives a module body, not compiled into a throwaway Erlang
# module that is loaded, run and purged, as Elixir 1.14 does for every module body
# whatever it holds (that was ~45 % of a compile check): a body that makes no closure,
# loop, `try` or `receive` outside its functions and registers no `@before_compile`
# (whose callback sees the environment the body ends in); any other is compiled. The
# evaluation is the sandbox server's (`Exforge.Sandbox.Bodies`, loaded in every pool VM
# before this prelude): in a plain `elixir` script every body is compiled. Elixir would
# still compile the call that evaluates a body into a throwaway module of its own (half
# of a passing check's reductions); the check pool's VMs run that call at once
# (`CHECK_PRELUDE`). The probe (`stops?`) also checks that an evaluated body sees
# Elixir's own `__ENV__`.
# `ExforgeCheck.check(level, code, file, stops)`: one check of `level` (`:parse`,
# `:compile`, `:test`), as a batch program checks its units and a single-candidate
# program its lines (`check_line`).
# A unit that must fail to compile is failed before it is compiled, when it is a module
# of plain definitions and a struct of no module or a call of no function is there where
# Elixir expands it for sure (`ExforgeCheck.certain_failure(quoted)`, the reason, or nil):
# a unit cut from a file lacks the aliases, imports and sibling modules of its file, and
# such units were half of the pool's compile time, each failing as late as a compile does
# (a miss in the code path's search, ~1 ms, is all that the struct's check costs).
# `ExforgeCheck.same_expansion(a, b)`: whether two modules are the same code once Elixir
# expands their pipes as `Kernel.|>` does (`Macro.pipe`), metadata aside; never when one
# imports (a local `|>` could replace Kernel's) or cannot be expanded.
# `ExforgeCheck.batch(data)`: a batch program's checks (`batch_program`), which it reads
# as data: compiled code per unit and verdict cost a program more than its parse checks.
# The check pool's VMs compile this module once, as their prelude (`SandboxConfig`); a
# program on another VM (or an `elixir` script) compiles it first: compiling it took a
# program ~6 ms, more than a small module's check.
CHECK_MODULE = """\
defmodule ExforgeCheck do
  @moduledoc false
  @stopped "exforge-front-end"
  @late [:after_compile, :after_verify, :on_load, :compile]
  @defs [:def, :defp, :defmacro, :defmacrop, :defguard, :defguardp]
  # what `unbound_fragment` reads a unit of (each defines as `def` does, fragments alike)
  @defined [:def, :defp, :defmacro, :defmacrop]
  @bodies Exforge.Sandbox.Bodies
  @compiled {__MODULE__, :compiled}
  # what makes a unit's own names mean more than their plain reading, or runs its code
  # as it compiles (`certain_failure`)
  @uncertain [:defmodule, :import, :require, :use, :alias] ++
               [:defguard, :defguardp, :defstruct, :defexception, :defdelegate, :defimpl] ++
               [:defprotocol, :defoverridable]
  # Kernel's macros and special forms that expand each of their arguments where they are
  # called (as code they return, unchanged); any other's arguments may never be
  @expanding [:!, :&&, :||, :.., :"..//", :<>, :and, :or, :in, :|>, :if, :unless, :is_nil] ++
               [:is_struct, :is_exception, :match?, :destructure, :get_and_update_in] ++
               [:pop_in, :put_in, :update_in, :raise, :reraise, :tap, :then, :to_string] ++
               [:to_charlist, :%, :%{}, :&, :., :<<>>, :=, :^, :__block__, :case, :cond] ++
               [:fn, :for, :receive, :try, :with, :{}]
  # (by name: a special form's arity is not its own, `quote do ... end` has one argument)
  @unexpanded (Kernel.__info__(:macros) ++ Kernel.SpecialForms.__info__(:macros))
              |> Keyword.keys()
              |> Enum.reject(&(&1 in @expanding))
              |> MapSet.new()
  @imported MapSet.new(Kernel.__info__(:functions) ++ Kernel.__info__(:macros))
  @not_called Keyword.keys(Kernel.SpecialForms.__info__(:macros)) ++
                [:when, :->, :\\\\, :<-, :|, :module_info]
  @probe "defmodule ExforgeFrontEndProbe do\\n  Process.put(:exforge_probe, __ENV__)\\n" <>
           "  def f(x), do: x\\nend"

  def compiles(source, file, stops) do
    quoted = Code.string_to_quoted!(source, file: file)

    with description when description != nil <- certain_failure(quoted),
         do: raise(CompileError, file: file, description: description)

    module = if stops, do: lone_module(quoted)

    if module == nil or front_end(quoted, module, file) != :accepted do
      Code.compile_quoted(quoted, file)
    end

    :ok
  end

  def batch(encoded) do
    {nonce, stops, texts, units, verdicts} =
      encoded |> Base.decode64!() |> :erlang.binary_to_term([:safe])

    batch = %{
      nonce: nonce,
      stops: stops,
      texts: List.to_tuple(texts),
      units: List.to_tuple(units)
    }

    verdicts
    |> Enum.with_index()
    |> Enum.each(fn {verdict, index} ->
      IO.puts("#{nonce} #{index} #{if holds(verdict, batch), do: "ok", else: "failed"}")
    end)

    IO.puts("#{nonce} done")
  end

  defp holds(known, _batch) when is_boolean(known), do: known
  defp holds({:all, terms}, batch), do: Enum.all?(terms, &holds(&1, batch))
  defp holds({:any, terms}, batch), do: Enum.any?(terms, &holds(&1, batch))
  defp holds({:same, a, b}, batch), do: same_expansion(elem(batch.texts, a), elem(batch.texts, b))
  defp holds({:unit, index}, batch), do: unit(index, batch) == :ok

  defp unit(index, batch) do
    with nil <- Process.get({:exforge_unit, index}) do
      {level, text} = elem(batch.units, index)

      stops = if level == :compile, do: batch_stops(batch)

      result =
        try do
          check(level, elem(batch.texts, text), "check-#{index}.ex", stops)
          :ok
        rescue
          _ -> :failed
        catch
          _, _ -> :failed
        end

      Process.put({:exforge_unit, index}, result)
      IO.puts("#{batch.nonce} unit #{index} #{result}")
      result
    end
  end

  def check(:parse, code, file, _stops), do: Code.string_to_quoted!(code, file: file)
  def check(:compile, code, file, stops), do: compiles(code, file, stops)
  def check(:test, code, file, _stops), do: Code.compile_string(code, file)

  defp batch_stops(%{stops: nil, nonce: nonce}) do
    with nil <- Process.get(:exforge_stops) do
      stops = stops?()
      Process.put(:exforge_stops, stops)
      IO.puts("#{nonce} stops #{stops}")
      stops
    end
  end

  defp batch_stops(%{stops: stops}), do: stops

  # Whether the front end stops where `compiles` expects, and the body it evaluates
  # runs in the environment Elixir gives a module body (`__ENV__`, but for the lexical
  # tracker, a process of each compile).
  def stops? do
    probe = Code.string_to_quoted!(@probe)
    compiled = stopped(probe, ExforgeFrontEndProbe, "probe.ex")
    compiled_env = Process.delete(:exforge_probe)

    compiled == :accepted and is_map(compiled_env) and
      (not bodies?() or evaluates_as_compiled?(probe, compiled_env))
  rescue
    _ -> false
  end

  defp evaluates_as_compiled?(probe, compiled_env) do
    evaluated = stopped(evaluating(probe), ExforgeFrontEndProbe, "probe.ex")
    evaluated_env = Process.delete(:exforge_probe)

    evaluated == :accepted and
      %{compiled_env | lexical_tracker: nil} == %{evaluated_env | lexical_tracker: nil}
  end

  # Whether module bodies can be evaluated here: `Exforge.Sandbox.Bodies`, of the
  # sandbox server every pool VM runs, is loaded (not in a plain `elixir` script).
  defp bodies?, do: :erlang.function_exported(@bodies, :evaluate, 1)

  def same_expansion(a, b) do
    expanded(a) == expanded(b)
  rescue
    _ -> false
  catch
    _, _ -> false
  end

  defp expanded(code) do
    code
    |> Code.string_to_quoted!()
    |> Macro.prewalk(fn
      {:import, _, _} -> throw(:imports)
      {:|>, _, [left, right]} -> Macro.pipe(left, right, 0)
      other -> other
    end)
    |> Macro.prewalk(fn
      {form, _meta, args} -> {form, [], args}
      other -> other
    end)
  end

  defp runs_late?(body) do
    {_, found} =
      Macro.prewalk(body, false, fn
        {:use, _, _} = node, _ -> {node, true}
        {:@, _, [{name, _, _}]} = node, acc -> {node, acc or name in @late}
        {:., _, [{:__aliases__, _, [:Module]}, _]} = node, _ -> {node, true}
        node, acc -> {node, acc}
      end)

    found
  end

  # Whether what a module's body runs outside its functions (their bodies are only
  # stored, unless `unquote` makes parts of them run with it: `unquoted`) makes no closure, loop,
  # `try` or `receive` and names no `@before_compile`: then `front_end` evaluates it.
  defp evaluates?(body) do
    {_, evaluates} =
      Macro.prewalk(body, true, fn
        _node, false ->
          {nil, false}

        {kind, meta, [head, code]}, _ when kind in @defs ->
          if :elixir_quote.has_unquotes(code),
            do: {{kind, meta, [head, unquoted(code)]}, true},
            else: {{kind, meta, [head]}, true}

        {:@, _, [{:before_compile, _, _}]} = node, _ ->
          {node, false}

        {form, _, _} = node, _ when form in [:fn, :for, :try, :receive] ->
          {node, false}

        {:&, _, [{:/, _, _}]} = node, _ ->
          {node, true}

        {:&, _, _} = node, _ ->
          {node, false}

        node, _ ->
          {node, true}
      end)

    evaluates
  end

  # What of a function's body runs with its module's body where the body `unquote`s
  # (`def` then escapes it, running its unquotes as the module body runs): the
  # arguments of the unquotes outside any `quote`, not the function's own code, nor a
  # nested `quote` (whose unquotes run when the function does: the closures in
  # nimble_parsec's compiler, say). The whole code where anything else could unquote
  # (`:elixir_quote.has_unquotes`: a remote `Kernel.unquote`, say).
  defp unquoted(code) do
    {rest, arguments} =
      Macro.prewalk(code, [], fn
        # its options, which this Elixir expands where the function runs, are kept to
        # be safe
        {:quote, _, [options, _]}, found ->
          {options, found}

        {:quote, _, _}, found ->
          {nil, found}

        {form, _, [argument]}, found when form in [:unquote, :unquote_splicing] ->
          {nil, [argument | found]}

        node, found ->
          {node, found}
      end)

    if :elixir_quote.has_unquotes(rest), do: code, else: arguments
  end

  # Why a unit's compile must fail, told before it is compiled (nil: nothing certain). A
  # unit of plain definitions (`def`, `defp`, no unquote fragment, no `@uncertain` form
  # anywhere) runs no code of its own as its body runs, and Elixir expands each
  # definition's head, guards and body as it is defined, the unit's names read as at the
  # top level of a file (no alias, import or macro of its own). Where a call or struct is
  # expanded for sure (`expanded`), a local call that no definition of the unit and no
  # import of `Kernel` matches is an undefined function, and a struct of a module that is
  # not loaded and no file on the code path holds (`Code.ensure_loaded?`, as Elixir looks
  # it up; last, as it searches the path) and that the unit cannot define (no nested
  # module, `defstruct` or `__struct__` of its own) cannot be expanded.
  def certain_failure({:defmodule, _, [{:__aliases__, _, parts}, [do: body]]}) do
    forms = List.wrap(with {:__block__, _, forms} <- body, do: forms)

    cond do
      not Enum.all?(parts, &is_atom/1) or uncertain?(body) ->
        nil

      Enum.all?(forms, &plain_definition?/1) ->
        undefined_name(forms, Module.concat(parts))

      Enum.all?(forms, &match?({kind, _, [_ | _]} when kind in @defined, &1)) ->
        unbound_fragment(forms)

      true ->
        nil
    end
  end

  def certain_failure(_), do: nil

  defp undefined_name(forms, module) do
    {calls, structs} =
      Enum.reduce(forms, {[], []}, fn
        {_, _, [{:when, _, [{_, _, args}, guards]}, code]}, acc ->
          expanded([args, guards, code], acc)

        {_, _, [{_, _, args}, code]}, acc ->
          expanded([args, code], acc)

        _bodiless, acc ->
          acc
      end)

    defined = MapSet.new(Enum.flat_map(forms, &arities/1))

    Enum.find_value(calls, fn {name, arity} = call ->
      if not MapSet.member?(defined, call) and not MapSet.member?(@imported, call),
        do: "undefined function #{name}/#{arity}"
    end) ||
      Enum.find_value(structs, fn name ->
        with struct when struct != nil <- struct_module(name, module),
             false <- Code.ensure_loaded?(struct),
             do: "#{inspect(struct)}.__struct__ is undefined, cannot expand struct",
             else: (_ -> nil)
      end)
  end

  # A unit of definitions (functions, macros) whose unquote fragments (which its body
  # runs as it defines them) are variables and literals only: none binds a variable, so
  # the first variable they name (not a call of `Kernel`'s, nor named as a macro of the
  # unit) is unbound, an error (a definition cut from the loop that bound it).
  defp unbound_fragment(forms) do
    fragments = Enum.reduce(forms, [], &fragments/2)
    macros = for {kind, _, [head | _]} <- forms, kind in [:defmacro, :defmacrop], do: name(head)

    if Enum.all?(fragments, &(Macro.quoted_literal?(&1) or variable?(&1))) do
      Enum.find_value(fragments, fn fragment ->
        with {name, _, _} <- fragment,
             true <- variable?(fragment),
             false <- String.starts_with?(Atom.to_string(name), "_"),
             false <- MapSet.member?(@imported, {name, 0}),
             false <- name in macros,
             do: "undefined variable #{name}",
             else: (_ -> nil)
      end)
    end
  catch
    :uncertain -> nil
  end

  defp name({:when, _, [head | _]}), do: name(head)
  defp name({name, _, _}), do: name
  defp name(_), do: nil

  defp variable?({name, meta, context}),
    do: is_atom(name) and is_list(meta) and is_atom(context)

  defp variable?(_), do: false

  # The arguments of a definition's unquote fragments; throws where another unquote
  # could be one (inside a `quote`, or a remote `Kernel.unquote`).
  defp fragments({form, _, [argument]}, found) when form in [:unquote, :unquote_splicing],
    do: [argument | found]

  defp fragments({:quote, _, args}, found),
    do: if(fragments(args, []) == [], do: found, else: throw(:uncertain))

  defp fragments({{:., _, [_, form]}, _, _}, _) when form in [:unquote, :unquote_splicing],
    do: throw(:uncertain)

  defp fragments({call, _, args}, found) when is_list(args), do: fragments([call | args], found)
  defp fragments({left, right}, found), do: fragments(right, fragments(left, found))
  defp fragments(list, found) when is_list(list), do: Enum.reduce(list, found, &fragments/2)
  defp fragments(_, found), do: found

  defp plain_definition?({kind, _, [head, code]}) when kind in [:def, :defp] and is_list(code) do
    plain_head?(head) and
      not (:elixir_quote.has_unquotes(head) or :elixir_quote.has_unquotes(code))
  end

  defp plain_definition?({kind, _, [head]}) when kind in [:def, :defp], do: plain_head?(head)
  defp plain_definition?(_), do: false

  defp plain_head?({:when, _, [head, _guards]}), do: plain_head?(head)

  defp plain_head?({name, _, args}),
    do: is_atom(name) and name != :__struct__ and (args == nil or is_list(args))

  defp plain_head?(_), do: false

  # The name and arities a definition defines (one more for each default argument).
  defp arities({_, _, [{:when, _, [head, _]} | _]}), do: arities({nil, nil, [head]})

  defp arities({_, _, [{name, _, args} | _]}) do
    args = List.wrap(args)
    defaults = Enum.count(args, &match?({:\\\\, _, _}, &1))
    for arity <- (length(args) - defaults)..length(args), do: {name, arity}
  end

  defp uncertain?(body) do
    {_, found} =
      Macro.prewalk(body, false, fn
        {form, _, args} = node, acc when is_list(args) -> {node, acc or form in @uncertain}
        node, acc -> {node, acc}
      end)

    found
  end

  # The local calls (`{name, arity}`) and struct names in `code` that Elixir expands
  # where it is defined: all but those under a macro or special form not known to
  # expand every argument where it is called (`@unexpanded`: `quote`, `@`, a sigil,
  # `::`, `use`, ...); any other call is a function's (the unit imports nothing and
  # defines no macro), whose arguments are expanded. The right side of `|>` is called
  # with one argument more than it is written with.
  defp expanded({:%, _, [name, fields]}, {calls, structs}),
    do: expanded(fields, {calls, [name | structs]})

  defp expanded({:|>, _, [left, {name, _, args}]}, acc) when is_atom(name) and is_list(args),
    do: expanded([left | args], called(name, length(args) + 1, acc))

  defp expanded({form, _, args}, acc) when is_atom(form) and is_list(args) do
    if MapSet.member?(@unexpanded, form),
      do: acc,
      else: expanded(args, called(form, length(args), acc))
  end

  defp expanded({call, _, args}, acc) when is_list(args), do: expanded([call | args], acc)
  defp expanded({left, right}, acc), do: expanded(right, expanded(left, acc))
  defp expanded(list, acc) when is_list(list), do: Enum.reduce(list, acc, &expanded/2)
  defp expanded(_, acc), do: acc

  # A local call, unless `name` is of a special form, or a form that is no call (a
  # guard's `when`, a clause's `->`, a default's `\\\\`, a generator's `<-`, a list's `|`),
  # or of a function every module has (`__info__`, `module_info`).
  defp called(name, arity, {calls, structs} = acc) do
    if name in @not_called or String.starts_with?(Atom.to_string(name), "__"),
      do: acc,
      else: {[{name, arity} | calls], structs}
  end

  defp struct_module({:__aliases__, _, [{:__MODULE__, _, context} | rest]}, module)
       when is_atom(context),
       do: if(Enum.all?(rest, &is_atom/1), do: Module.concat([module | rest]))

  defp struct_module({:__aliases__, _, parts}, _module),
    do: if(Enum.all?(parts, &is_atom/1), do: Module.concat(parts))

  defp struct_module({:__MODULE__, _, context}, module) when is_atom(context), do: module
  defp struct_module(_, _), do: nil

  defp lone_module({:defmodule, _, [name, [do: body]]}) do
    if runs_late?(body),
      do: nil,
      else: Macro.expand(name, %{__ENV__ | module: nil, function: nil})
  end

  defp lone_module(_), do: nil

  # The Erlang compiler's first pass, as the front end's parse transform: stop.
  def parse_transform(forms, _options) do
    module =
      Enum.find_value(forms, fn
        {:attribute, _, :module, module} -> module
        _ -> nil
      end)

    {:error, [{~c"#{@stopped}", [{:none, __MODULE__, {:stopped, module}}]}], []}
  end

  def format_error({:stopped, module}), do: ~c"stopped: #{inspect(module)}"

  # Elixir's front end for `quoted`, a lone module: its body evaluated (`evaluating`)
  # where it `evaluates?` and registers no `@before_compile` as it runs, else compiled.
  defp front_end({:defmodule, _, [_, [do: body]]} = quoted, module, file) do
    result =
      if evaluates?(body) and bodies?(),
        do: stopped(evaluating(quoted), module, file),
        else: :compile

    if result == :compile, do: stopped(quoted, module, file), else: result
  end

  # `quoted` with its body run as Elixir evaluates code (`Code.eval_quoted`), in its
  # module's environment where it starts (`Exforge.Sandbox.Bodies`), instead of compiled
  # into a throwaway module and run: Elixir 1.14 compiles, loads and purges one per
  # module body, whatever it holds, about half of what a front-end check cost. What only
  # a compiled body could tell apart (a closure's module, a stack trace) it never makes
  # (`evaluates?`), and the Erlang compiler of a throwaway module rejects nothing that
  # Elixir made. A `@before_compile` callback gets the environment the body ends in,
  # which this one's body does not: a body that registers one is compiled after all
  # (`compiled_after_all`).
  # (`apply`: no warning where the module is absent, in a plain `elixir` script)
  defp evaluating(quoted),
    do: apply(@bodies, :evaluating, [quoted, __MODULE__, &compiled_after_all/1])

  defp compiled_after_all(env) do
    if Module.get_attribute(env.module, :before_compile) != [], do: throw(@compiled)
  end

  # (the VM's own compiler options come back after: a check leaves its VM as it was)
  defp stopped(quoted, module, file) do
    options = System.get_env("ERL_COMPILER_OPTIONS")
    System.put_env("ERL_COMPILER_OPTIONS", "[{parse_transform, 'Elixir.ExforgeCheck'}]")
    conflicts = Code.get_compiler_option(:ignore_module_conflict)
    Code.put_compiler_option(:ignore_module_conflict, true)

    try do
      Code.compile_quoted(quoted, file)
      :accepted
    rescue
      error in CompileError ->
        cond do
          error.file != @stopped -> reraise error, __STACKTRACE__
          error.description == "stopped: #{inspect(module)}" -> :accepted
          true -> :elsewhere
        end
    catch
      :throw, @compiled -> :compile
    after
      if bodies?(), do: apply(@bodies, :forget, [__MODULE__])

      if options,
        do: System.put_env("ERL_COMPILER_OPTIONS", options),
        else: System.delete_env("ERL_COMPILER_OPTIONS")

      Code.put_compiler_option(:ignore_module_conflict, conflicts)
    end
  end
end
"""
# The check pool's prelude: `ExforgeCheck`, then the VM's Elixir made to run each body
# `front_end` evaluates at once, not after compiling the call that evaluates it into a
# throwaway module (`Exforge.Sandbox.Bodies.call_stubs`: half of a passing compile
# check's reductions). Only here, where a VM boots, before the baseline its candidates
# are held to: a program that compiles `ExforgeCheck` itself (`LOAD_PRELUDE`) leaves
# Elixir as it found it.
CHECK_PRELUDE = (
    CHECK_MODULE
    + "if :erlang.function_exported(Exforge.Sandbox.Bodies, :call_stubs, 0),\n"
    + "  do: apply(Exforge.Sandbox.Bodies, :call_stubs, [])\n"
)


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Atom(str):
    """An Erlang atom in a term for `external_term`."""


Term: TypeAlias = Atom | str | int | bool | tuple["Term", ...] | list["Term"] | None


def _term(value: Term) -> bytes:
    """`value` in Erlang's external term format (without its version byte): true, false
    and None as the atoms `true`, `false` and `nil`, a str as a UTF-8 binary."""
    match value:
        case Atom():
            name = value.encode()
            return b"w" + len(name).to_bytes(1, "big") + name
        case bool() | None:
            return _term(Atom("nil" if value is None else str(value).lower()))
        case str():
            data = value.encode("utf-8", "surrogatepass")
            return b"m" + len(data).to_bytes(4, "big") + data
        case int() if 0 <= value < 256:
            return b"a" + value.to_bytes(1, "big")
        case int():
            return b"b" + value.to_bytes(4, "big", signed=True)
        case tuple():
            return b"h" + len(value).to_bytes(1, "big") + b"".join(map(_term, value))
        case list() if value:
            return b"l" + len(value).to_bytes(4, "big") + b"".join(map(_term, value)) + b"j"
        case list():
            return b"j"
    raise TypeError(f"no external term for {value!r}")


def external_term(value: Term) -> str:
    """Base64 of `value` as Erlang's compressed external term format, which
    `binary_to_term` inflates natively. Why a program holds its data so, not as Elixir
    literals: a program is compiled by the Erlang compiler, which handles a binary literal
    byte by byte through every pass (~16 ms of the ~24 ms a 32-candidate program took to
    compile, most of them its files' text), and every expression of the program's own
    code too; compressed, a file and the pieces cut from it take little more than the
    file. Programs hold it as a `~S` sigil, which Elixir's tokenizer reads ~3x faster
    than a string (no escapes, no interpolation: ~1.4 against ~4 ms for 20 KB)."""
    term = _term(value)
    return encoded(b"\x83P" + len(term).to_bytes(4, "big") + zlib.compress(term))


def term_literal(texts: Sequence[str]) -> str:
    """Elixir for the tuple of `texts`, from one literal (`external_term`)."""
    data = external_term(list(texts))
    return f'List.to_tuple(:erlang.binary_to_term(Base.decode64!(~S"{data}")))'


def check_line(index: int, check: Check, source: str) -> str:
    """The Elixir call that checks `check`, whose code is the expression `source`
    (`ExforgeCheck.check`, as a batch program's units are checked)."""
    return f'ExforgeCheck.check(:{check.level}, {source}, "check-{index}.ex", stops)\n'


def tested(checks: Sequence[Check]) -> bool:
    return any(c.level == "test" for c in checks)


# Whether this Elixir reports a lone module stopped by the parse transform as `compiles`
# reads it.
FRONT_END_PROBE = "ExforgeCheck.stops?()"
# `ExforgeCheck` for a VM that lacks it, in every program: without its comment lines (it
# holds no multi-line string), which would travel in each program for no VM to read.
PRELUDE_CODE = "\n".join(
    line for line in CHECK_MODULE.splitlines() if not line.lstrip().startswith("#")
)
LOAD_PRELUDE = (
    "unless :erlang.module_loaded(ExforgeCheck),\n"
    f'  do: Code.compile_string(elem({term_literal([PRELUDE_CODE])}, 0), "exforge_check.ex")\n'
)


def preamble(compiles: bool) -> str:
    """What a program's check lines need first: `ExforgeCheck`, and `stops`, its front-end
    stop, probed if they `compile`."""
    return LOAD_PRELUDE + f"stops = {FRONT_END_PROBE if compiles else 'false'}\n"


def check_lines(checks: Sequence[Check]) -> str:
    texts = f"texts = {term_literal([c.code for c in checks])}\n"
    lines = "".join(check_line(i, c, f"elem(texts, {i})") for i, c in enumerate(checks))
    return preamble(any(c.level == "compile" for c in checks)) + texts + lines


def check_program(checks: Sequence[Check]) -> str:
    """An Elixir script that exits non-zero unless every check passes (for `elixir`)."""
    return ("ExUnit.start()\n" if tested(checks) else "") + check_lines(checks)


def pool_program(checks: Sequence[Check]) -> str:
    """The same checks for the sandbox pool: `passed` when all succeed."""
    return check_lines(checks) + ("" if tested(checks) else MARKER_TEST)


def failure_reason(checks: Sequence[Check], outcome: Outcome) -> str | None:
    """Why a candidate is dropped (None: it passed): the strictest level it was held to."""
    if outcome.status == "passed":
        return None
    if outcome.status in ("timeout", "memory"):
        return f"check_{outcome.status}"
    if tested(checks) and outcome.status != "syntax_error":
        return "tests_failed"
    strict = any(c.level != "parse" for c in checks)
    return "compile_failed" if strict else "parse_failed"


class UnitResults:
    """Results of the check units programs have run in this process, by the sha256 of
    their level and code (the `size` most recently used): a unit's result depends on its
    code alone, so a later program does not run it again. Only programs that ran to
    their end contribute."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._results: OrderedDict[str, bool] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(code: str, level: str) -> str:
        return hashlib.sha256(f"{level}\0{code}".encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, key: str) -> bool | None:
        with self._lock:
            if key in self._results:
                self._results.move_to_end(key)
            return self._results.get(key)

    def put(self, key: str, passed: bool) -> None:
        with self._lock:
            self._results[key] = passed
            self._results.move_to_end(key)
            while len(self._results) > self.size:
                self._results.popitem(last=False)


# The probe's result depends on the Elixir installation alone: a batch program reports
# it (`<nonce> stops true|false`) and later programs of the process take it from
# `UnitResults`.
STOPS_KEY = UnitResults.key(FRONT_END_PROBE, "stops")


class Units:
    """The distinct checks of one program, numbered in order of first use; a check
    whose result `known` holds is not run again. The code they need is held once, in
    `texts` (numbered in order of first use)."""

    def __init__(self, known: UnitResults | None = None) -> None:
        self.index: dict[tuple[str, str], int] = {}
        self.texts: dict[str, int] = {}
        self.known = known
        # each unit's cache key, hashed once: the candidates of a file share the unit of
        # its whole text (`Check.within`), which `of` looks up for each of them
        self._keys: dict[tuple[str, str], str] = {}

    def text(self, code: str) -> int:
        return self.texts.setdefault(code, len(self.texts))

    def key(self, code: str, level: str) -> str:
        unit = (code, level)
        if unit not in self._keys:
            self._keys[unit] = UnitResults.key(code, level)
        return self._keys[unit]

    def of(self, check: Check) -> Term:
        """A term that holds when the unit of `check` passes: its known result, or the
        unit to run (`{:unit, index}`)."""
        if self.known is not None:
            passed = self.known.get(self.key(check.code, check.level))
            if passed is not None:
                return passed
        if check.level == "test":
            raise ValueError("a candidate with tests runs alone, not in a batch program")
        self.text(check.code)
        return (Atom("unit"), self.index.setdefault((check.code, check.level), len(self.index)))

    def expression(self, check: Check) -> Term:
        """A term that holds when `check` passes (`ExforgeCheck.holds`)."""
        if check.like is not None:
            like = self.of(Check(check.like, check.level))
            same = (Atom("same"), self.text(check.like), self.text(check.code))
            return (Atom("any"), [(Atom("all"), [like, same]), self.of(check)])
        if check.level != "parse" or check.within is None:
            return self.of(check)
        whole = self.of(Check(check.within))
        return whole if whole is True else (Atom("any"), [whole, self.of(check)])

    def definitions(self) -> list[Term]:
        """Each unit as `{level, text}`, by index (once every expression is made)."""
        return [(Atom(level), self.texts[code]) for (code, level) in self.index]

    def keys(self) -> list[str]:
        """The cache key of each unit, by index."""
        return [self.key(code, level) for (code, level) in self.index]


@dataclass(frozen=True)
class Program:
    """One batch program: its source, its nonce, the cache key of each of its units and
    the front-end stop it was given (None: it probes and reports it)."""

    source: str
    nonce: str
    units: list[str]
    stops: bool | None


def batch_program(
    batch: Sequence[Sequence[Check]],
    known: UnitResults | None = None,
    preluded: bool = False,
) -> Program:
    """Every candidate's verdict, `<nonce> <index> ok|failed`, each unit's result as it
    runs, `<nonce> unit <index> ok|failed`, the probed front-end stop, `<nonce> stops
    true|false`, then `<nonce> done`. The program is one call of
    `ExforgeCheck.batch` with all of it as data: compiling a program's own code (a
    closure per unit, an expression per candidate) took ~30 ms, more than its checks
    of parsing. For VMs `preluded` (`CHECK_PRELUDE`) it is that call alone, which their
    Elixir makes at once (`Exforge.Sandbox.Bodies.at_once`) instead of compiling it and
    its data into a throwaway module (~10 ms a program, a fifth of the pool's CPU on the
    corpus); else `LOAD_PRELUDE` first."""
    nonce = secrets.token_hex(8)
    units = Units(known)
    verdicts: list[Term] = [(Atom("all"), [units.expression(c) for c in cs]) for cs in batch]
    stops = known.get(STOPS_KEY) if known is not None else None
    texts = list(units.texts)
    term = (nonce, stops, texts, units.definitions(), verdicts)
    call = f'ExforgeCheck.batch(~S"{external_term(term)}")\n'
    return Program(call if preluded else LOAD_PRELUDE + call, nonce, units.keys(), stops)


def batch_verdicts(
    outcome: Outcome, program: Program, size: int, known: UnitResults | None = None
) -> list[bool] | None:
    """Per candidate: passed? None when the program did not run to its end. The results
    of the units it ran go to `known`."""
    nonce = program.nonce
    found = dict(re.findall(rf"^{nonce} (\d+) (ok|failed)$", outcome.output, re.MULTILINE))
    done = re.search(rf"^{nonce} done$", outcome.output, re.MULTILINE) is not None
    if not done or len(found) != size:
        return None
    if known is not None:
        for stops in re.findall(rf"^{nonce} stops (true|false)$", outcome.output, re.MULTILINE):
            known.put(STOPS_KEY, stops == "true")
        ran = re.findall(rf"^{nonce} unit (\d+) (ok|failed)$", outcome.output, re.MULTILINE)
        for index, result in ran:
            known.put(program.units[int(index)], result == "ok")
    return [found[str(i)] == "ok" for i in range(size)]


def even_batches(items: list[int], most: int, workers: int) -> list[list[int]]:
    """`items` in batches of at most `most`, as many as a multiple of `workers` takes and
    as even as can be, so that no VM waits on another's larger share."""
    if not items:
        return []
    count = -(-len(items) // most)
    count = -(-count // workers) * workers
    size, extra = divmod(len(items), count)
    starts = [i * size + min(i, extra) for i in range(count + 1)]
    return [items[a:b] for a, b in pairwise(starts) if a < b]


def count_events(outcome: Outcome) -> None:
    """A check program's mishaps, as `exforge_check_pool_events_total`."""
    if outcome.status == "timeout":
        CHECK_POOL_EVENTS.labels(event="timeout").inc()
    if outcome.worker_replaced:
        CHECK_POOL_EVENTS.labels(event="vm_replaced").inc()


def check_all(
    pool: SandboxPool,
    candidates: Sequence[Sequence[Check]],
    batch: int = PROGRAM_CANDIDATES,
    known: UnitResults | None = None,
) -> list[str | None]:
    """The failure reason (None: passed) of each candidate's checks, in order; units
    whose results `known` holds are not run again, and those run are added to it. A
    batch program has the pool's `timeout_s` for each of its candidates, the time each
    would have had alone (one limit for the whole batch timed out busy batches of sound
    code on a loaded machine, and each cost a VM and a rerun of its candidates one by
    one). Its programs' timeouts, the VMs they left to be replaced and the batch programs run again
    one candidate per program count in `exforge_check_pool_events_total`."""
    reasons: dict[int, str | None] = {}
    alone = [i for i, checks in enumerate(candidates) if tested(checks)]
    shared = [i for i, checks in enumerate(candidates) if not tested(checks)]
    batches = even_batches(shared, batch, pool.config.workers)
    preluded = pool.config.prelude == CHECK_PRELUDE
    programs = [batch_program([candidates[i] for i in group], known, preluded) for group in batches]
    limit = pool.config.timeout_s
    outcomes = pool.map(
        PoolProgram(p.source, timeout_s=limit * len(group))
        for p, group in zip(programs, batches, strict=True)
    )
    for group, program, outcome in zip(batches, programs, outcomes, strict=True):
        count_events(outcome)
        verdicts = batch_verdicts(outcome, program, len(group), known)
        if verdicts is None:  # run one by one: who failed, and why
            CHECK_POOL_EVENTS.labels(event="batch_rerun").inc()
            alone += group
            continue
        for index, ok in zip(group, verdicts, strict=True):
            reasons[index] = None if ok else failure_reason(candidates[index], FAILED_CHECK)
    single = pool.map([pool_program(candidates[i]) for i in alone])
    for index, outcome in zip(alone, single, strict=True):
        count_events(outcome)
        reasons[index] = failure_reason(candidates[index], outcome)
    return [reasons[i] for i in range(len(candidates))]
