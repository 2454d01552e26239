# exforge sandbox worker: a warm BEAM that compiles and runs candidate programs with
# their ExUnit tests, one at a time, and reports each outcome. sandbox.py compiles this
# file once (`server_modules`); each VM loads the modules and runs
# Exforge.Sandbox.Server.main/1 with the arguments below.
#
# Protocol (a pipe pair passed as two file descriptors, never stdout, so that a candidate writing to the
# real stdout through `:user` cannot forge a frame): every frame is a 4-byte big-endian
# length and a payload. The worker first sends "READY". Each request is one program, as
# "CODE_BYTES\n" <> code <> tests: the candidate's code and the tests that follow it, one
# Elixir file (tests may be empty). Each reply is one header line "STATUS TESTS FAILURES WARNINGS DIRTY\n" followed by the
# candidate's (truncated) output. DIRTY=1 means the candidate changed global VM state
# that cleaning could not undo for certain; the host then discards this worker.
#
# Arguments: REQUEST_FD REPLY_FD TEST_TIMEOUT_MS MAX_OUTPUT_BYTES WORK_DIR OWN_PID_NAMESPACE
# PRELUDE (OWN_PID_NAMESPACE=1: every OS process in /proc is this VM's, so the ones a
# candidate leaves running count as changed state. PRELUDE: base64 of Elixir compiled once
# before the baseline, maybe empty.)

defmodule Exforge.Sandbox.Sink do
  @moduledoc "An IO device that keeps the first `limit` bytes written to it."

  def start(limit), do: spawn(fn -> loop(limit, []) end)

  def contents(sink) do
    ref = make_ref()
    send(sink, {:contents, self(), ref})

    receive do
      {^ref, data} -> data
    after
      1000 -> ""
    end
  end

  defp loop(room, acc) do
    receive do
      {:io_request, from, reply_as, request} ->
        {reply, room, acc} = handle(request, room, acc)
        send(from, {:io_reply, reply_as, reply})
        loop(room, acc)

      {:contents, from, ref} ->
        send(from, {ref, IO.iodata_to_binary(Enum.reverse(acc))})
        loop(room, acc)

      _other ->
        loop(room, acc)
    end
  end

  defp handle({:put_chars, _encoding, chars}, room, acc), do: keep(chars, room, acc)

  defp handle({:put_chars, _encoding, m, f, a}, room, acc),
    do: keep(apply(m, f, a), room, acc)

  defp handle({:put_chars, chars}, room, acc), do: keep(chars, room, acc)
  defp handle({:requests, requests}, room, acc), do: handle_all(requests, room, acc)
  defp handle({:get_geometry, _}, room, acc), do: {{:error, :enotsup}, room, acc}
  defp handle({:setopts, _}, room, acc), do: {:ok, room, acc}
  defp handle(:getopts, room, acc), do: {[binary: true, encoding: :unicode], room, acc}
  defp handle(_request, room, acc), do: {:eof, room, acc}

  defp handle_all([], room, acc), do: {:ok, room, acc}

  defp handle_all([request | rest], room, acc) do
    {_reply, room, acc} = handle(request, room, acc)
    handle_all(rest, room, acc)
  end

  defp keep(_chars, room, acc) when room <= 0, do: {:ok, room, acc}

  defp keep(chars, room, acc) do
    data = IO.chardata_to_string(chars)
    taken = binary_part(data, 0, min(byte_size(data), room))
    {:ok, room - byte_size(taken), [taken | acc]}
  end
end

defmodule Exforge.Sandbox.Collector do
  @moduledoc "ExUnit formatter that sends each finished test to the candidate's runner."
  use GenServer

  def init(opts), do: {:ok, Keyword.fetch!(opts, :exforge_reply_to)}

  def handle_cast({:test_finished, test}, reply_to) do
    send(reply_to, {:exforge_test, classify(test.state)})
    {:noreply, reply_to}
  end

  def handle_cast(_event, reply_to), do: {:noreply, reply_to}

  defp classify(nil), do: :passed
  defp classify({:skipped, _}), do: :skipped
  defp classify({:excluded, _}), do: :skipped
  defp classify({:invalid, _}), do: :runtime_error
  defp classify({:failed, failures}), do: failures |> Enum.map(&failure_kind/1) |> worst()

  defp failure_kind({:error, %ExUnit.AssertionError{}, _}), do: :failed
  defp failure_kind({:error, %ExUnit.TimeoutError{}, _}), do: :timeout
  defp failure_kind(_other), do: :runtime_error

  defp worst(kinds) do
    Enum.find([:timeout, :runtime_error, :failed], :failed, &(&1 in kinds))
  end
end

defmodule Exforge.Sandbox.Modules do
  @moduledoc """
  What the VM has loaded and how it is configured, as the baseline and the compiled-once
  tests and protocols see it.
  """

  # The compiler's options and the configuration of `apps` as the baseline (`before`)
  # had them: what compiles alike besides the modules loaded.
  def configured?(before, apps) do
    Code.compiler_options() == before.compiler and
      Enum.all?(apps, &(Application.get_all_env(&1) == before.env[&1]))
  end

  # :erlang.get_module_info/2 (not module_info/1, which would load a deleted module
  # again); a module with only old code left has none.
  def checksum(module) do
    :erlang.get_module_info(module, :md5)
  rescue
    ArgumentError -> :old_code_only
  end

  # Whether `module`, loaded now, is as the baseline had it (`modules`: its checksums),
  # or was loaded since from the code path; a module new otherwise is `new_ok?`'s call.
  def unchanged?(module, modules, code_path, new_ok?) do
    case modules do
      %{^module => checksum} -> checksum(module) == checksum
      _ -> autoloaded?(module, code_path) or new_ok?.(module)
    end
  end

  # Not loaded, or loaded as the baseline (`before`) had it or from the code path since.
  def as_found?(module, before, context) do
    not :erlang.module_loaded(module) or
      unchanged?(module, before.modules, context.code_path, fn _ -> false end)
  end

  # Loaded from an object file in an absolute directory of the code path (not ".").
  def autoloaded?(module, code_path) do
    case :code.is_loaded(module) do
      {:file, [_ | _] = path} ->
        directory = path |> Path.dirname() |> String.to_charlist()
        Path.type(directory) == :absolute and directory in code_path

      _ ->
        false
    end
  end
end

defmodule Exforge.Sandbox.Checker do
  @moduledoc """
  The undefined-function check (`Module.ParallelChecker.verify/1`) with what it caches
  of the modules a program calls kept from one candidate to the next. Each check starts
  with an empty cache and fills it from every called module's object file (Kernel, Enum,
  ExUnit's: read from disk and decoded for every candidate) or loaded exports. Here the
  server computes a module's entries once, in a clean VM (`learn/2`), and a check starts
  with those of every module that is still as the server found it: not loaded, or loaded
  from the code path or as the baseline had it, with the code path the baseline's. A
  module of the program's own is loaded from a string, so never one of them; the check
  caches those from the program's own modules as before.
  """

  @table :exforge_checker_cache
  # modules learnt at most (then no more: a bound on memory)
  @kept 2_000

  # A protected table the server owns (created before the baseline): {module, entries}.
  def start, do: :ets.new(@table, [:named_table, :protected, :set])

  # `Module.ParallelChecker.verify/1` but for the cache its checker starts with, and the
  # modules it cached besides sent to `server` (`learn/2` computes their entries itself).
  def verify(fun, server, before, context) do
    previous = Process.put(:elixir_checker_info, {self(), nil})

    try do
      result = fun.()

      case Process.get(:elixir_checker_info) do
        {_, nil} ->
          :ok

        {_, checker} ->
          ets = :gen_server.call(checker, :ets)
          known = prefill(ets, before, context)
          Module.ParallelChecker.verify(checker, [])
          cached = :ets.match(ets, {{:cached, :"$1"}, :"$2"})

          fresh =
            for [module, mode] <- cached,
                mode,
                module not in known,
                Exforge.Sandbox.Modules.as_found?(module, before, context),
                do: module

          send(server, {__MODULE__, fresh})
      end

      result
    after
      {_, checker} = Process.get(:elixir_checker_info)

      if previous,
        do: Process.put(:elixir_checker_info, previous),
        else: Process.delete(:elixir_checker_info)

      if checker, do: Module.ParallelChecker.stop(checker)
    end
  end

  # The kept entries of modules as the server found them put in the checker's table:
  # the modules put.
  defp prefill(ets, before, context) do
    if :code.get_path() == context.code_path and context.code_path == before.code_path do
      for {module, entries} <- :ets.tab2list(@table),
          Exforge.Sandbox.Modules.as_found?(module, before, context) do
        :ets.insert(ets, entries)
        module
      end
    else
      []
    end
  end

  # Each of `modules` (atoms a check sent, of a candidate: trusted for nothing but their
  # names) not kept yet and as found, its entries computed by a checker of its own as a
  # check would: called in a clean VM, the server's.
  def learn(modules, before) do
    context = %{code_path: :code.get_path()}

    fresh =
      if context.code_path == before.code_path do
        for module <- Enum.uniq(modules),
            is_atom(module),
            :ets.lookup(@table, module) == [],
            Exforge.Sandbox.Modules.as_found?(module, before, context),
            do: module
      else
        []
      end

    if fresh != [] and :ets.info(@table, :size) + length(fresh) <= @kept do
      {checker, ets} = Module.ParallelChecker.test_cache()

      for module <- fresh do
        Module.ParallelChecker.preload_module({checker, ets}, module)
        entries = :ets.match_object(ets, {{:export, module, :_}, :_, :_})

        case :ets.lookup(ets, {:cached, module}) do
          [{_, mode} = cached] when mode != false ->
            :ets.insert(@table, {module, [cached | entries]})

          _ ->
            :ok
        end
      end

      GenServer.stop(checker)
    end
  end
end

defmodule Exforge.Sandbox.Tracer do
  @moduledoc "Compile tracer: keeps the events of a compilation in the compiling process."

  def trace({:on_module, _binary, _}, _env), do: :ok

  def trace(event, _env) do
    case Process.get(:exforge_trace) do
      events when is_list(events) -> Process.put(:exforge_trace, [event | events])
      _ -> :ok
    end

    :ok
  end

  # `fun`'s result and the events its compilation traced
  def traced(fun) do
    previous = Code.get_compiler_option(:tracers)
    Process.put(:exforge_trace, [])
    Code.put_compiler_option(:tracers, [__MODULE__ | previous])

    try do
      result = fun.()
      {result, Enum.reverse(Process.get(:exforge_trace))}
    after
      Code.put_compiler_option(:tracers, previous)
      Process.delete(:exforge_trace)
    end
  end
end

defmodule Exforge.Sandbox.Bodies do
  @moduledoc """
  Module bodies evaluated, as `Code.eval_quoted/3` runs code, instead of compiled into a
  throwaway Erlang module that is loaded, run and purged, as Elixir 1.14 does for every
  `defmodule` whatever its body holds (~15 % of compiling a small module). Only where the
  body can run nothing but the storing of its definitions: a file of top-level
  `defmodule`s, `defprotocol`s and `defimpl`s whose bodies are all `def` and `defp` (no
  `unquote`), `@doc`, `@moduledoc`, `@impl` and `@fallback_to_any` of literal values and
  at most one `defstruct` of distinct literal fields (~35 % of compiling a small struct's
  module), so no code of the candidate runs as they compile, nothing it could set
  (compiler options, tracers) differs from a clean VM's and nothing raises or warns with
  a stacktrace, which would show where the body ran. Each `defmodule`'s body is then replaced
  by a macro call that evaluates it in the environment the body starts in, less the
  `require` of this module (`evaluating/3`); the module compiled from it is the same
  binary (`probe/0`, at boot: else bodies are compiled as before). A `defimpl` whose
  protocol is loaded and ready (`evaluating_forms/2`) is first made the `defmodule` of
  its own expansion, whose body is then evaluated alike.

  `evaluating/3` and `evaluate/1` are also the check pool's (streams/generators/check.py:
  `ExforgeCheck`, compiled as its VMs' prelude, after this script's modules), which
  evaluates the bodies its own rule picks and hands a check to run after each. Its VMs
  also have Elixir run the `evaluate` call a body is left with at once (`call_stubs/0`),
  not compile it into a throwaway module first as every other VM's Elixir still does.
  """

  @defs [:def, :defp]
  @attributes [:doc, :moduledoc, :impl, :fallback_to_any]
  @probe """
  defmodule Exforge.Sandbox.BodiesProbe do
    @moduledoc "probe"
    defstruct [:head, tail: [1], kind: :probe]
    @doc "first"
    def first(list, default \\\\ nil)
    def first([head | _], _default), do: head
    def first([], default) when is_nil(default) or is_atom(default), do: default
    def line, do: {__ENV__.line, __ENV__.function, __MODULE__, __ENV__.requires}
    defp twice(x), do: [x, x]
    def both(x), do: twice(x)
  end
  """
  @probe_impl """
  defimpl String.Chars, for: Exforge.Sandbox.BodiesProbe do
    @doc "to_string"
    def to_string(probe), do: twice(probe.head)
    defp twice(x), do: {x, x, __ENV__.line}
  end
  """

  # `forms` with each `defmodule` rewritten to evaluate its body where every form is
  # evaluable, `defimpl`s of a protocol `ready?` accepts first made the module they define
  # (`implementing/2`), else `forms` as they are.
  def evaluating_forms(forms, ready?) do
    if Enum.all?(forms, &evaluable?/1) do
      # a protocol the file defines again is not the one `ready?` saw
      defined =
        for {kind, _, [{:__aliases__, _, parts}, _]} <- forms,
            kind in [:defmodule, :defprotocol],
            do: Module.concat(parts)

      forms
      |> Enum.map(
        &implementing(&1, fn protocol -> protocol not in defined and ready?.(protocol) end)
      )
      |> Enum.with_index()
      |> Enum.map(fn
        {{:defmodule, _, _} = form, index} -> evaluating(form, index)
        {form, _index} -> form
      end)
    else
      forms
    end
  end

  # The `defmodule` form with its body put aside under `key` (a literal, distinct among
  # the modules compiled together) and replaced by one that `evaluate`s it where it
  # starts; `check`, if any, gets the environment the body started in once it ran.
  def evaluating({:defmodule, meta, [name, [do: body]]}, key, check \\ nil) do
    Process.put({__MODULE__, key}, {body, check})
    line = [line: Keyword.get(meta, :line, 0)]
    evaluate = {{:., line, [__MODULE__, :__evaluate__]}, line, [key]}
    {:defmodule, meta, [name, [do: {:__block__, [], [{:require, line, [__MODULE__]}, evaluate]}]]}
  end

  # What `evaluating` left for `key` where its module never ran its body.
  def forget(key) do
    Process.delete({__MODULE__, key})
    Process.delete({__MODULE__, :env, key})
  end

  # A `defimpl` of a protocol `ready?` accepts (loaded, not consolidated: its expansion's
  # checks, Protocol.assert_protocol!/1 and __ensure_defimpl__/3, pass and print nothing)
  # as the `defmodule` of its expansion, whose top level is those checks and the module
  # (~3x less work: no top level compiled for them, the impl's body evaluated); else the
  # form as it is.
  defp implementing(
         {:defimpl, meta, [{:__aliases__, _, parts}, [for: {:__aliases__, _, _}], [do: _]]} =
           form,
         ready?
       ) do
    protocol = Module.concat(parts)
    line = Keyword.get(meta, :line, 0)

    with true <- ready?.(protocol),
         # the expansion's shape in Elixir 1.14 (line numbers as a macro call's)
         {:__block__, _, [set_protocol, set_for, _name, _assert, _ensure, module]} <-
           :elixir_quote.linify(
             line,
             :line,
             Macro.expand_once(form, %{:elixir_env.new() | line: line})
           ),
         {:=, _, [{:protocol, _, Protocol}, _]} <- set_protocol,
         {:=, _, [{:for, _, Protocol}, for]} when is_atom(for) <- set_for,
         {:defmodule, _, [{:name, _, Protocol}, [do: body]]} <- module do
      {:defmodule, meta,
       [Module.concat(protocol, for), [do: {:__block__, [], [set_protocol, set_for, body]}]]}
    else
      _ -> form
    end
  end

  defp implementing(form, _ready?), do: form

  defp evaluable?({kind, _, [{:__aliases__, _, parts}, [do: body]]})
       when kind in [:defmodule, :defprotocol],
       do: Enum.all?(parts, &is_atom/1) and stores_only?(body)

  defp evaluable?({:defimpl, _, [{:__aliases__, _, parts}, [for: _], [do: body]]}),
    do: Enum.all?(parts, &is_atom/1) and stores_only?(body)

  defp evaluable?(_form), do: false

  defp stores_only?({:__block__, _, forms}),
    do:
      Enum.all?(forms, &stores_only?/1) and
        Enum.count(forms, &match?({:defstruct, _, _}, &1)) <= 1

  # defstruct raises or warns on other fields (a second call, a key not an atom, one
  # given twice)
  defp stores_only?({:defstruct, _, [fields]}) when is_list(fields) do
    keys =
      Enum.map(fields, fn
        {key, _value} -> key
        key -> key
      end)

    Macro.quoted_literal?(fields) and Enum.all?(keys, &is_atom/1) and Enum.uniq(keys) == keys
  end

  defp stores_only?({kind, _, [_head | _]} = form) when kind in @defs,
    do: not Exforge.Sandbox.Tests.unquotes?([form])

  defp stores_only?({:@, _, [{name, _, [value]}]}) when name in @attributes,
    do: Macro.quoted_literal?(value)

  defp stores_only?(_form), do: false

  # The module's environment where its body starts, less the `require` of this module:
  # its body evaluated there.
  defmacro __evaluate__(key) do
    env = %{__CALLER__ | requires: List.delete(__CALLER__.requires, __MODULE__)}
    Process.put({__MODULE__, :env, key}, env)
    quote do: unquote(__MODULE__).evaluate(unquote(key))
  end

  def evaluate(key) do
    {body, check} = Process.delete({__MODULE__, key})
    env = Process.delete({__MODULE__, :env, key})
    {value, _binding, _env} = :elixir.eval_forms(body, [], env)
    if check, do: check.(env)
    value
  end

  # Elixir 1.14's `:elixir_compiler.compile/3`, which runs a module's body: expanded,
  # compiled into a throwaway module, loaded, run and purged.
  @compile_as_found ~S"""
  compile(Quoted, ArgsList, E) ->
      {Expanded, SE, EE} = elixir_expand:expand(Quoted, elixir_env:env_to_ex(E), E),
      elixir_env:check_unused_vars(SE, EE),
      {Module, Fun, Purgeable} =
          elixir_erl_compiler:spawn(fun() -> spawned_compile(Expanded, E) end),
      Args = list_to_tuple(ArgsList),
      {dispatch(Module, Fun, Args, Purgeable), EE}.
  """
  # The same, but a body `evaluating` left, once expanded, calls `evaluate` at once, and
  # a file that is one call of literals makes it at once (`at_once/3`).
  @compile_calling ~S"""
  compile(Quoted, ArgsList, E) ->
      {Expanded, SE, EE} = elixir_expand:expand(Quoted, elixir_env:env_to_ex(E), E),
      elixir_env:check_unused_vars(SE, EE),
      case 'Elixir.Exforge.Sandbox.Bodies':at_once(Expanded, ArgsList, E) of
          {evaluate, Key} ->
              {'Elixir.Exforge.Sandbox.Bodies':evaluate(Key), EE};
          {call, M, F, A} ->
              {apply(M, F, A), EE};
          compile ->
              {Module, Fun, Purgeable} =
                  elixir_erl_compiler:spawn(fun() -> spawned_compile(Expanded, E) end),
              Args = list_to_tuple(ArgsList),
              {dispatch(Module, Fun, Args, Purgeable), EE}
      end.
  """

  # Has this VM's Elixir call the `evaluate` a body `evaluating` left at once instead of
  # compiling that call into a throwaway module first and loading, running and purging
  # it (the Erlang compiler's whole work on a lone module's check: half of a passing
  # check's reductions, a sixth of a failing one's): `:elixir_compiler` loaded again from
  # its own abstract code with `compile/3` as `@compile_calling`, where it is as
  # `@compile_as_found` expects; true where it is (~0.1 s, once a VM). The call runs in
  # the same process with the same argument and its value is the body's, as in the
  # throwaway module; every other body compiles as before.
  def call_stubs do
    path = :code.which(:elixir_compiler)

    with {:ok, {_, [abstract_code: {:raw_abstract_v1, forms}]}} <-
           :beam_lib.chunks(path, [:abstract_code]),
         [found] <- for({:function, _, :compile, 3, _} = form <- forms, do: form),
         true <- plain(found) == plain(erlang_form(@compile_as_found)),
         patched = Enum.map(forms, &if(&1 == found, do: erlang_form(@compile_calling), else: &1)),
         {:ok, :elixir_compiler, binary} <- :compile.forms(patched, [:binary, :return_errors]),
         {:module, :elixir_compiler} <- :code.load_binary(:elixir_compiler, path, binary) do
      true
    else
      _ -> false
    end
  end

  # What `compile/3` runs at once: {:evaluate, key} for the `evaluate` call a body
  # `evaluating` left, as `defmodule` at a file's top level expands it (its value bound,
  # Elixir's no-op call, the value), with no arguments; {:call, module, function, args}
  # for a file whose top level is one remote call of literals (the check pool's batch
  # program: its throwaway module, mostly the Erlang compiler's passes over its data,
  # ~10 ms a program, cost more than parsing the file); else :compile.
  def at_once(
        {{:., _, [module, function]}, _, args},
        [],
        %{module: nil, function: nil}
      )
      when is_atom(module) and is_atom(function) and is_list(args) do
    if Enum.all?(args, &(is_binary(&1) or is_atom(&1) or is_number(&1))),
      do: {:call, module, function, args},
      else: :compile
  end

  def at_once(
        {:__block__, _,
         [
           {:=, _,
            [value, {:__block__, _, [__MODULE__, {{:., _, [__MODULE__, :evaluate]}, _, [key]}]}]},
           {{:., _, [:elixir_utils, :noop]}, _, []},
           value
         ]},
        [],
        _env
      ),
      do: {:evaluate, key}

  def at_once(_expanded, _args, _env), do: :compile

  defp erlang_form(text) do
    {:ok, tokens, _} = text |> String.to_charlist() |> :erl_scan.string()
    {:ok, form} = :erl_parse.parse_form(tokens)
    form
  end

  defp plain(form), do: :erl_parse.map_anno(fn _ -> 0 end, form)

  # Whether the probe module, and an implementation of String.Chars, compile to the
  # same binaries with their bodies evaluated; they are unloaded either way.
  def probe do
    # a protocol of Elixir's, as loaded (compiling one would cost each VM ~0.1 s)
    Code.ensure_loaded!(String.Chars)

    Enum.all?([@probe, @probe_impl], fn probe ->
      forms = probe |> Code.string_to_quoted!() |> List.wrap()
      compiled = Code.compile_quoted({:__block__, [], forms}, "probe.ex")
      unload(compiled)
      evaluated = evaluating_forms(forms, &(&1 == String.Chars))
      evaluated = Code.compile_quoted({:__block__, [], evaluated}, "probe.ex")
      unload(evaluated)
      match?([{_, binary}] when is_binary(binary), compiled) and compiled == evaluated
    end)
  rescue
    _ -> false
  end

  defp unload(compiled) do
    for {module, _} <- compiled do
      :code.purge(module)
      :code.delete(module)
      :code.purge(module)
    end
  end
end

defmodule Exforge.Sandbox.Tests do
  @moduledoc """
  A program's tests compiled once per VM and reused after every candidate that cannot
  change how they compile, with verdicts and warnings identical to compiling the whole
  program. Only tests of MultiPL-E's shape are kept: top-level `ExUnit.start(...)` and
  modules of nothing but `use ExUnit.Case` and `test` with a literal name (no `unquote`),
  whose compilation has no effect beyond their binary and ExUnit's registration. They are
  compiled in a clean VM before the candidate, without the undefined-function check
  (whose warnings depend on the candidate: it runs again for each candidate) and their
  compiler warnings kept to be printed again.

  A candidate reuses them when the whole program parses into the candidate's top-level
  `defmodule`s, `defprotocol`s and `defimpl`s followed by exactly the tests' forms, and compiling those modules left the
  compiler options, ExUnit's and Elixir's configuration and every module the VM had
  loaded as they were, and defined no module that the tests define, that exists in the
  code path, or that exports macros (a remote call to a macro compiles differently).
  Else the tests compile after the candidate's modules in the same check, as in
  `Code.compile_string/2`.
  """

  @file_name "candidate.exs"

  def parse!(text, line) do
    text
    |> String.to_charlist()
    |> :elixir.string_to_quoted!(line, 1, @file_name, :elixir_config.get(:parser_options))
    |> top_level()
  end

  def compile(forms), do: :elixir_compiler.quoted(block(forms), @file_name, fn _, _ -> :ok end)

  # Compiled in the calling process: a map, or nil for tests of another shape or that
  # depend on the modules loaded since `before` (a candidate's, `binaries` their object
  # code) other than through remote calls and the expansion of structs whose `__struct__`
  # functions are kept (as code) to be compared with a later candidate's.
  def build(text, line, before, context, binaries \\ %{}) do
    forms = parse!(text, line)

    if Enum.all?(forms, &cacheable?/1) and not unquotes?(forms) do
      names =
        for {:defmodule, _, [{:__aliases__, _, parts}, _]} <- forms, do: Module.concat(parts)

      # the candidate's modules: what the tests could depend on besides the baseline
      candidate =
        for module <- :erlang.loaded(),
            not Map.has_key?(before.modules, module),
            not Exforge.Sandbox.Modules.autoloaded?(module, context.code_path),
            into: MapSet.new(),
            do: module

      with true <- unchanged?(%{modules: MapSet.new(names)}, before, context),
           {compiled, events} = Exforge.Sandbox.Tracer.traced(fn -> compile(forms) end),
           {:ok, structs} <- dependencies(events, candidate, binaries) do
        binaries = Map.new(compiled)
        ExUnit.Server.modules_loaded()
        async = take_async_modules([])
        steps = Enum.map(forms, &step(&1, binaries, async))
        modules = for {:module, module, _binary, _map, _async} <- steps, do: module

        %{
          forms: forms,
          steps: steps,
          modules: MapSet.new(modules),
          warnings: "",
          structs: structs
        }
      else
        _ -> nil
      end
    end
  end

  # The structs of the candidate's modules the tests expanded, each with its `__struct__`
  # definitions; :error where the tests depend on one of its modules any other way (an
  # import, a require, a macro) or on a struct whose `__struct__` could vary.
  defp dependencies(events, candidate, binaries) do
    Enum.reduce_while(events, {:ok, %{}}, fn event, {:ok, structs} ->
      case event do
        {:struct_expansion, _meta, module, _keys} ->
          if MapSet.member?(candidate, module) do
            case struct_definitions(module, binaries) do
              nil -> {:halt, :error}
              definitions -> {:cont, {:ok, Map.put(structs, module, definitions)}}
            end
          else
            {:cont, {:ok, structs}}
          end

        {kind, _meta, _module} when kind == :alias_reference ->
          {:cont, {:ok, structs}}

        {:remote_function, _meta, _module, _name, _arity} ->
          {:cont, {:ok, structs}}

        # :start, :stop
        atom when is_atom(atom) ->
          {:cont, {:ok, structs}}

        _other ->
          names = event |> Tuple.to_list() |> tl()

          if Enum.any?(names, &(is_atom(&1) and MapSet.member?(candidate, &1))),
            do: {:halt, :error},
            else: {:cont, {:ok, structs}}
      end
    end)
  end

  # `module`'s `__struct__/0` and `__struct__/1` from its object code, without metadata,
  # where each is one clause calling nothing but pure functions (as `defstruct` defines
  # them): equal definitions expand a struct alike. Else nil.
  def struct_definitions(module, binaries) do
    with binary when is_binary(binary) <- Map.get(binaries, module),
         {:ok, {_, [debug_info: {:debug_info_v1, backend, data}]}} <-
           :beam_lib.chunks(binary, [:debug_info]),
         {:ok, %{definitions: definitions}} <- backend.debug_info(:elixir_v1, module, data, []) do
      found =
        for {{:__struct__, arity}, :def, _meta, [{_, args, [], body}]} <- definitions,
            pure?(body),
            do: {arity, strip({args, body})}

      if Enum.sort(Enum.map(found, &elem(&1, 0))) == [0, 1], do: Enum.sort(found)
    else
      _ -> nil
    end
  end

  @pure_remote [
    {Enum, :reduce},
    {List, :delete},
    {:erlang, :error},
    {ArgumentError, :exception},
    {Kernel, :inspect}
  ]
  @special [:%{}, :{}, :=, :|, :fn, :->, :case, :<<>>, :__block__, :_]

  defp pure?({:"::", _, [expression, _type]}), do: pure?(expression)

  defp pure?({{:., _, [module, name]}, _, args}) when is_list(args),
    do: {module, name} in @pure_remote and pure?(args)

  defp pure?({name, _, context}) when is_atom(name) and is_atom(context), do: true
  defp pure?({name, _, args}) when is_list(args), do: name in @special and pure?(args)
  defp pure?({left, right}), do: pure?(left) and pure?(right)
  defp pure?(list) when is_list(list), do: Enum.all?(list, &pure?/1)
  defp pure?(other), do: not is_tuple(other)

  defp strip(ast) do
    Macro.prewalk(ast, fn
      {name, meta, args} when is_list(meta) -> {name, [], args}
      other -> other
    end)
  end

  # The candidate's modules before the tests: reused if `head` is the whole program but
  # for the tests' forms and compiling it changed nothing they depend on.
  # (A protocol the program begins with is loaded where it was kept.)
  def compile_program(forms, nil, before, context),
    do: compile(Exforge.Sandbox.Protocols.substitute(forms, before, context))

  def compile_program(forms, tests, before, context) do
    count = length(forms) - length(tests.forms)
    {head, rest} = Enum.split(forms, max(count, 0))

    if count >= 0 and rest == tests.forms and Enum.all?(head, &module_form?/1) do
      head = if context.bodies, do: evaluating(head, before, context), else: head
      binaries = Map.new(compile(Exforge.Sandbox.Protocols.substitute(head, before, context)))

      if unchanged?(tests, before, context) and same_structs?(tests.structs, binaries),
        do: load(tests),
        else: compile(tests.forms)
    else
      compile(Exforge.Sandbox.Protocols.substitute(forms, before, context))
    end
  end

  # `head` with its bodies evaluated (Exforge.Sandbox.Bodies) and its `defimpl`s made
  # modules where their protocol is the kept one it begins with, loaded now, or one as
  # the baseline had it or loaded from the code path since.
  defp evaluating(head, before, context) do
    {loaded, head} = Exforge.Sandbox.Protocols.loading(head, before, context)

    Exforge.Sandbox.Bodies.evaluating_forms(head, fn protocol ->
      (protocol == loaded or Exforge.Sandbox.Modules.as_found?(protocol, before, context)) and
        :erlang.module_loaded(protocol) and function_exported?(protocol, :__protocol__, 1) and
        not Protocol.consolidated?(protocol)
    end)
  end

  defp load(tests) do
    Enum.each(tests.steps, fn
      # what evaluating the form does (~1.4 ms less: no module compiled to evaluate it)
      :start_ex_unit ->
        ExUnit.start()

      {:eval, form} ->
        compile([form])

      {:module, module, binary, map, async} ->
        {:module, ^module} = :code.load_binary(module, [], binary)
        Module.ParallelChecker.spawn(Module.ParallelChecker.get(), module, map)

        if async,
          do: ExUnit.Server.add_async_module(module),
          else: ExUnit.Server.add_sync_module(module)
    end)

    IO.write(:stderr, tests.warnings)
  end

  defp same_structs?(structs, binaries) do
    Enum.all?(structs, fn {module, definitions} ->
      struct_definitions(module, binaries) == definitions
    end)
  end

  defp unchanged?(tests, before, context) do
    Exforge.Sandbox.Modules.configured?(before, [:elixir, :ex_unit]) and
      Enum.all?(:erlang.loaded(), &harmless?(&1, tests, before.modules, context))
  end

  defp harmless?(module, tests, modules, context) do
    Exforge.Sandbox.Modules.unchanged?(module, modules, context.code_path, fn new ->
      not (MapSet.member?(tests.modules, new) or MapSet.member?(context.available, new) or
             macros?(new))
    end)
  end

  defp macros?(module) do
    function_exported?(module, :__info__, 1) and module.__info__(:macros) != []
  end

  defp step({:defmodule, _, [{:__aliases__, _, parts}, _]}, binaries, async) do
    module = Module.concat(parts)
    binary = Map.fetch!(binaries, module)
    {:module, module, binary, module_map(binary, module), module in async}
  end

  defp step({{:., _, [{:__aliases__, _, [:ExUnit]}, :start]}, _, []}, _binaries, _async),
    do: :start_ex_unit

  defp step(form, _binaries, _async), do: {:eval, form}

  # what the undefined-function check reads from a module's binary
  def module_map(binary, module) do
    {:ok, {_, [debug_info: {:debug_info_v1, backend, data}]}} =
      :beam_lib.chunks(binary, [:debug_info])

    {:ok, map} = backend.debug_info(:elixir_v1, module, data, [])
    map
  end

  defp take_async_modules(acc) do
    case ExUnit.Server.take_async_modules(1_000) do
      nil -> acc
      modules -> take_async_modules(modules ++ acc)
    end
  end

  defp cacheable?({:defmodule, _, [{:__aliases__, _, parts}, [do: body]]}),
    do: Enum.all?(parts, &is_atom/1) and Enum.all?(top_level(body), &test_module_form?/1)

  defp cacheable?({{:., _, [{:__aliases__, _, [:ExUnit]}, :start]}, _, args}),
    do: Macro.quoted_literal?(args)

  defp cacheable?(_form), do: false

  defp test_module_form?({:use, _, [{:__aliases__, _, [:ExUnit, :Case]} | options]}),
    do: Macro.quoted_literal?(options)

  defp test_module_form?({:test, _, [name, [do: _]]}), do: Macro.quoted_literal?(name)
  defp test_module_form?(_form), do: false

  def unquotes?(forms) do
    forms
    |> Macro.prewalk(false, fn
      {name, _, _} = node, _found when name in [:unquote, :unquote_splicing] -> {node, true}
      node, found -> {node, found}
    end)
    |> elem(1)
  end

  # Top-level forms that define modules and leave nothing the tests could see in the file's
  # scope (defimpl's variables are hygienic, of Protocol's context).
  def module_form?({:defmodule, _, [{:__aliases__, _, _}, [do: _]]}), do: true
  def module_form?({:defprotocol, _, [{:__aliases__, _, _}, [do: _]]}), do: true
  def module_form?({:defimpl, _, [{:__aliases__, _, _}, [for: _], [do: _]]}), do: true
  def module_form?(_form), do: false

  defp top_level({:__block__, [], forms}), do: forms
  defp top_level(form), do: [form]

  defp block([form]), do: form
  defp block(forms), do: {:__block__, [], forms}
end

defmodule Exforge.Sandbox.Protocols do
  @moduledoc """
  A program's leading protocol compiled once per VM and loaded, not compiled again, by
  later candidates whose program begins with the same `defprotocol` form: the same text on
  the same lines (the Erlang compiler takes ~120 ms a protocol, most of such a candidate's
  time). Only protocols whose compilation is a function of their form are kept: `def`
  heads of plain variables and literal `@doc`, `@moduledoc`, `@typedoc` and
  `@fallback_to_any` (no code of the candidate's runs as they compile), compiled in a
  clean VM without output, into one module no object file of the code path defines.

  A candidate's first form is loaded instead of compiled where it equals a kept one and
  the VM is as the protocol was compiled in (compiler options, Elixir's configuration,
  every module it had loaded unchanged): the same binary, but for the absolute path of the
  source that the compiler records (`module_info(:compile)`), set to the candidate's
  directory, loaded in its place in the program's order, with what compiling it would do
  besides (the undefined-function check's record of the module, the binary among the
  file's modules). The protocol's implementations compile as before, against it.
  """

  @table :exforge_protocols
  @file_name ~c"candidate.exs"
  @attributes [:doc, :moduledoc, :typedoc, :fallback_to_any]

  # A protected table the server owns (created before the baseline): {{:form, form}, id}
  # and {{:id, id}, entry}.
  def start, do: :ets.new(@table, [:named_table, :protected, :set])

  def clear, do: :ets.delete_all_objects(@table)

  # The program's first form where it is a protocol of the shape kept, else nil.
  def key([{:defprotocol, _, [{:__aliases__, _, parts}, [do: body]]} = form | _]) do
    if Enum.all?(parts, &is_atom/1) and Enum.all?(top_level(body), &plain?/1) and
         not Exforge.Sandbox.Tests.unquotes?(form),
       do: form
  end

  def key(_forms), do: nil

  defp plain?({:def, _, [{name, _, args}]}) when is_atom(name) and is_list(args),
    do: Enum.all?(args, &variable?/1)

  defp plain?({:@, _, [{name, _, [value]}]}) when name in @attributes,
    do: Macro.quoted_literal?(value)

  defp plain?(_form), do: false

  # not a special form (__DIR__, __ENV__, ...)
  defp variable?({name, _, context}) when is_atom(name) and is_atom(context),
    do: not String.starts_with?(Atom.to_string(name), "__")

  defp variable?(_arg), do: false

  defp top_level({:__block__, _, forms}), do: forms
  defp top_level(form), do: [form]

  # Compiled in the calling process, in a clean VM: the entry to keep, or nil.
  def build(form, before, context) do
    {:defprotocol, _, [{:__aliases__, _, parts}, _]} = form
    module = Module.concat(parts)

    if ready?(module, before, context) do
      [{^module, binary}] = Exforge.Sandbox.Tests.compile([form])
      {:ok, ^module, chunks} = :beam_lib.all_chunks(binary)
      {:ok, cwd} = :file.get_cwd()

      entry = %{
        module: module,
        chunks: chunks,
        map: Exforge.Sandbox.Tests.module_map(binary, module)
      }

      # the binary is its chunks, with the source this directory gives
      if ready?(module, before, context, [module]) and
           binary(entry, :filename.absname(@file_name, cwd)) == binary,
         do: entry
    end
  end

  def put(form, id, entry) do
    :ets.insert(@table, [{{:form, form}, id}, {{:id, id}, entry}])
  end

  # The program's forms, the first one loaded from a kept binary where it may be.
  def substitute([form | rest] = forms, before, context) do
    case kept(form, before, context) do
      nil -> forms
      id -> [loaded(form, elem(form, 1), id) | rest]
    end
  end

  def substitute([], _before, _context), do: []

  # The protocol the program's forms begin with, loaded now from a kept binary, and the
  # forms after it; else nil and the forms. (As a program compiled, but for the binary's
  # place among the file's modules.)
  def loading([form | rest] = forms, before, context) do
    with id when id != nil <- kept(form, before, context),
         {:module, module, _binary, _} <- load(id) do
      {module, rest}
    else
      _ -> {nil, forms}
    end
  end

  def loading([], _before, _context), do: {nil, []}

  # the id of the kept protocol `form` is, where it may be loaded
  defp kept(form, before, context) do
    with {:defprotocol, _, [{:__aliases__, _, parts}, _]} <- form,
         [{_, id}] <- :ets.lookup(@table, {:form, form}),
         true <- ready?(Module.concat(parts), before, context),
         do: id,
         else: (_ -> nil)
  end

  # Where loading it fails (it cannot, the VM checked as it is), the form compiles.
  defp loaded(form, meta, id) do
    call = {{:., meta, [__MODULE__, :load]}, meta, [id]}
    var = {:loaded, meta, __MODULE__}
    {:case, meta, [call, [do: [{:->, meta, [[nil], form]}, {:->, meta, [[var], var]}]]]}
  end

  # What compiling the protocol in this process would do (:elixir_module.compile/5) but
  # for its own work: the binary loaded, the undefined-function check told of it, the
  # binary among the file's modules; its value, as `defmodule`'s, but for the result of
  # the module body (unused: a top-level form's value is dropped).
  def load(id) do
    with [{_, entry}] <- :ets.lookup(@table, {:id, id}),
         %{module: module} = entry,
         false <- :erlang.module_loaded(module) or :erlang.check_old_code(module),
         nil <- Process.get(:elixir_compiler_dest),
         {:ok, cwd} <- :file.get_cwd(),
         binary = binary(entry, :filename.absname(@file_name, cwd)),
         {:module, ^module} <- :code.load_binary(module, ~c"", binary) do
      case Process.get(:elixir_checker_info) do
        nil -> :ok
        _ -> Module.ParallelChecker.spawn(Module.ParallelChecker.get(), module, entry.map)
      end

      case Process.get(:elixir_module_binaries) do
        current when is_list(current) ->
          Process.put(:elixir_module_binaries, [{module, binary} | current])

        _ ->
          :ok
      end

      {:module, module, binary, nil}
    else
      _ -> nil
    end
  end

  defp binary(entry, source) do
    chunks =
      Enum.map(entry.chunks, fn
        {~c"CInf", info} ->
          info = :erlang.binary_to_term(info)
          {~c"CInf", :erlang.term_to_binary(List.keyreplace(info, :source, 0, {:source, source}))}

        chunk ->
          chunk
      end)

    {:ok, binary} = :beam_lib.build_module(chunks)
    binary
  end

  # The VM as a clean one compiles the protocol in: compiler options (no tracers),
  # Elixir's configuration and the loaded modules as they were (others only Erlang's and
  # Elixir's own or without code), the protocol's module not among them (but for
  # `defined`) and in no object file of the code path.
  defp ready?(module, before, context, defined \\ []) do
    Exforge.Sandbox.Modules.configured?(before, [:elixir]) and
      Code.get_compiler_option(:tracers) == [] and
      (module in defined or not :erlang.module_loaded(module)) and
      not MapSet.member?(context.available, module) and
      Enum.all?(:erlang.loaded(), &(&1 in defined or unchanged?(&1, before.modules, context)))
  end

  defp unchanged?(module, modules, context) do
    # the top-level code's modules, deleted once run, keep old code only
    Exforge.Sandbox.Modules.unchanged?(module, modules, context.code_path, fn new ->
      Exforge.Sandbox.Modules.checksum(new) == :old_code_only
    end)
  end
end

defmodule Exforge.Sandbox.Server do
  @syntax_errors [SyntaxError, TokenMissingError, CompileError]
  # tests compiled once (Exforge.Sandbox.Tests), kept for this many distinct tests texts
  # at most (then all are dropped: a bound on memory, not a cache policy)
  @tests_kept 256
  # protocols kept (Exforge.Sandbox.Protocols), distinct forms seen at most (then all dropped)
  @protocols_kept 64
  # module names a candidate's check may have the server learn (Exforge.Sandbox.Checker)
  @checked_kept 256
  # candidates tried to build tests that need a candidate's modules, per VM and tests
  @build_tries 3
  @warm_up """
  defmodule WarmUpTest do
    use ExUnit.Case, async: true
    test "warm up", do: assert(Enum.sum([1]) == 1)
  end
  """

  def main([request_fd, reply_fd, timeout_ms, max_output, work_dir, own_pid_namespace, prelude]) do
    config = %{
      timeout_ms: String.to_integer(timeout_ms),
      max_output: String.to_integer(max_output),
      work_dir: work_dir,
      own_pid_namespace: own_pid_namespace == "1"
    }

    ExUnit.start(autorun: false)
    Exforge.Sandbox.Protocols.start()
    Exforge.Sandbox.Checker.start()
    Code.compile_string(Base.decode64!(prelude), "prelude.ex")
    config = Map.put(config, :bodies, Exforge.Sandbox.Bodies.probe())
    fds = {:fd, String.to_integer(request_fd), String.to_integer(reply_fd)}
    # :eof: the host closing its end (it exited, even by SIGKILL) ends this VM too.
    port = Port.open(fds, [:binary, {:packet, 4}, :eof])
    # Warm up the compiler and ExUnit so that their lazily started state is part of
    # the baseline every later candidate is compared with.
    config = Map.put(config, :available, available_modules())
    # ExUnit's configuration for every candidate, set once: part of the baseline, so a
    # candidate that leaves it otherwise leaves its VM dirty.
    ExUnit.configure(
      formatters: [ExUnit.CLIFormatter, Exforge.Sandbox.Collector],
      colors: [enabled: false],
      exforge_reply_to: self(),
      timeout: max(config.timeout_ms, 1),
      exclude: [],
      include: [],
      max_failures: :infinity,
      autorun: false
    )

    run_candidate({@warm_up, nil}, 0, config, snapshot(config))
    # The baseline every candidate is compared with: a clean candidate leaves the VM as
    # it found it, so this is also the state before each candidate; taken once, it also
    # catches what changes between candidates.
    baseline = snapshot(config)
    Port.command(port, "READY")
    serve(port, config, baseline, 1, {%{}, %{}})
  end

  defp serve(port, config, baseline, counter, {kept, protocols}) do
    receive do
      {^port, {:data, frame}} ->
        [size, rest] = :binary.split(frame, "\n")
        size = String.to_integer(size)
        code = binary_part(rest, 0, size)
        tests = binary_part(rest, size, byte_size(rest) - size)
        protocols = kept_protocol(code, config, baseline, protocols)
        {compiled, kept} = compiled_tests(tests, code, config, baseline, kept)
        Port.command(port, run_candidate({code <> tests, compiled}, counter, config, baseline))
        serve(port, config, baseline, counter + 1, {kept, protocols})

      {^port, :eof} ->
        System.halt(0)
    end
  end

  # The protocol the code begins with, kept on its second sight (as tests are), compiled
  # in a clean VM before the candidate; `seen`: each form's :seen, :kept or :not_kept.
  defp kept_protocol(code, config, before, seen) do
    with true <- String.contains?(code, "defprotocol"),
         form when form != nil <- Exforge.Sandbox.Protocols.key(parse(code)) do
      case seen do
        %{^form => :seen} ->
          entry = build_protocol(form, config, before)
          if entry, do: Exforge.Sandbox.Protocols.put(form, map_size(seen), entry)
          Map.put(seen, form, if(entry, do: :kept, else: :not_kept))

        %{^form => _kept_or_not} ->
          seen

        _ ->
          if map_size(seen) >= @protocols_kept do
            Exforge.Sandbox.Protocols.clear()
            %{form => :seen}
          else
            Map.put(seen, form, :seen)
          end
      end
    else
      _ -> seen
    end
  end

  defp parse(code) do
    Exforge.Sandbox.Tests.parse!(code, 1)
  rescue
    _ -> []
  end

  # nil where it printed anything or left anything running
  defp build_protocol(form, config, before) do
    context = %{available: config.available, code_path: :code.get_path()}
    out = Exforge.Sandbox.Sink.start(config.max_output)
    err = Exforge.Sandbox.Sink.start(config.max_output)
    built = in_process(out, err, fn -> Exforge.Sandbox.Protocols.build(form, before, context) end)
    quiet = Exforge.Sandbox.Sink.contents(out) == "" and Exforge.Sandbox.Sink.contents(err) == ""

    case {clean_up(before, [out, err]), built} do
      {false, {:ok, %{} = entry}} when quiet -> entry
      _ -> nil
    end
  end

  # The tests compiled once for this text and starting line, built in a clean VM (before
  # the candidate) and cleaned up like a candidate's modules; nil for no tests, tests that
  # cannot be kept, and tests seen for the first time: they are built on their second
  # sight, so a problem run once (pass@1) costs no more than compiling its whole program.
  defp compiled_tests("", _code, _config, _before, kept), do: {nil, kept}

  defp compiled_tests(tests, code, config, before, kept) do
    key = {tests, length(:binary.matches(code, "\n")) + 1}

    case kept do
      %{^key => {:seen, tries}} ->
        case build_tests(key, code, config, before) do
          # tests that need a candidate's structs: another candidate may define them
          nil when tries < @build_tries -> {nil, Map.put(kept, key, {:seen, tries + 1})}
          compiled -> {compiled, Map.put(kept, key, compiled)}
        end

      %{^key => compiled} ->
        {compiled, kept}

      _ ->
        kept = if(map_size(kept) >= @tests_kept, do: %{}, else: kept)
        {nil, Map.put(kept, key, {:seen, 1})}
    end
  end

  # Built alone; else, for tests that do not compile alone (those that expand a
  # candidate's struct), after the candidate's modules (its code, when that is nothing
  # but modules) in a directory of their own.
  defp build_tests({tests, line}, code, config, before) do
    context = %{available: config.available, code_path: :code.get_path()}

    with nil <- build_tests(tests, line, config, before, context, fn -> {:ok, %{}} end),
         [_ | _] = head <- candidate_modules(code) do
      dir = Path.join(config.work_dir, "build")
      File.mkdir_p!(dir)
      File.cd!(dir)

      compiled =
        build_tests(tests, line, config, before, context, fn ->
          compile_quietly(head, config, before, context)
        end)

      File.cd!(config.work_dir)
      File.rm_rf(dir)
      compiled
    else
      # built alone, or no candidate's modules to build them after
      built_or_nil -> if is_map(built_or_nil), do: built_or_nil
    end
  end

  defp build_tests(tests, line, config, before, context, candidate) do
    with {:ok, binaries} <- candidate.() do
      err = Exforge.Sandbox.Sink.start(config.max_output)

      compiled =
        in_process(err, err, fn ->
          Exforge.Sandbox.Tests.build(tests, line, before, context, binaries)
        end)

      warnings = Exforge.Sandbox.Sink.contents(err)
      clean_up(before, [err])

      case compiled do
        {:ok, %{} = compiled} -> %{compiled | warnings: warnings}
        _nil_or_exit -> nil
      end
    else
      _exit ->
        clean_up(before, [])
        nil
    end
  end

  defp candidate_modules(code) do
    forms = Exforge.Sandbox.Tests.parse!(code, 1)
    if Enum.all?(forms, &Exforge.Sandbox.Tests.module_form?/1), do: forms, else: []
  rescue
    _ -> []
  end

  # the candidate's modules compiled, their output and warnings dropped: {:ok, binaries}
  defp compile_quietly(head, config, before, context) do
    sink = Exforge.Sandbox.Sink.start(config.max_output)

    result =
      in_process(sink, sink, fn ->
        head
        |> Exforge.Sandbox.Protocols.substitute(before, context)
        |> Exforge.Sandbox.Tests.compile()
        |> Map.new()
      end)

    Process.exit(sink, :kill)
    result
  end

  # `fun` run in a fresh process whose group leader is `out` while `err` is the
  # registered :standard_error (where the compiler's warnings go): {:ok, its result}, or
  # {:exit, reason} where it died.
  defp in_process(out, err, fun) do
    standard_error = Process.whereis(:standard_error)
    swap_registered(:standard_error, err)

    {pid, ref} =
      spawn_monitor(fn ->
        Process.group_leader(self(), out)
        exit({:exforge_result, fun.()})
      end)

    result =
      receive do
        {:DOWN, ^ref, :process, ^pid, {:exforge_result, result}} -> {:ok, result}
        {:DOWN, ^ref, :process, ^pid, reason} -> {:exit, reason}
      end

    swap_registered(:standard_error, standard_error)
    result
  end

  # Every module an object file in the code path could load: a candidate that defines
  # one of them could change what the tests compile against.
  defp available_modules do
    for directory <- :code.get_path(),
        {:ok, files} <- [:file.list_dir(directory)],
        file <- files,
        :filename.extension(file) == ~c".beam",
        into: MapSet.new(),
        do: List.to_atom(:filename.rootname(file))
  end

  defp run_candidate(program, counter, config, before) do
    dir = Path.join(config.work_dir, "candidate-#{counter}")
    File.mkdir_p!(dir)
    File.cd!(dir)
    out = Exforge.Sandbox.Sink.start(config.max_output)
    err = Exforge.Sandbox.Sink.start(config.max_output)
    server = self()

    {status, detail} =
      case in_process(out, err, fn -> compile_and_test(program, config, before, server) end) do
        {:ok, result} -> result
        {:exit, reason} -> {:runtime_error, inspect(reason)}
      end

    tests = collect_tests([])
    File.cd!(config.work_dir)
    File.rm_rf(dir)
    warnings = err |> Exforge.Sandbox.Sink.contents() |> count_warnings()
    output = Exforge.Sandbox.Sink.contents(out) <> detail
    leftover = clean_up(before, [out, err])
    dirty = leftover or snapshot(config, before) != before
    checked = collect_checked([])
    if not dirty, do: Exforge.Sandbox.Checker.learn(checked, before)
    status = overall(status, tests)
    failures = Enum.count(tests, &(&1 != :passed and &1 != :skipped))

    header =
      Enum.join([status, length(tests), failures, warnings, if(dirty, do: 1, else: 0)], " ")

    [header, "\n", binary_part(output, 0, min(byte_size(output), config.max_output))]
  end

  defp compile_and_test({program, tests}, config, before, server) do
    context = %{available: config.available, code_path: :code.get_path(), bodies: config.bodies}

    try do
      # as Code.compile_string/2: one parse, every module compiled then checked together
      Exforge.Sandbox.Checker.verify(
        fn ->
          program
          |> Exforge.Sandbox.Tests.parse!(1)
          |> Exforge.Sandbox.Tests.compile_program(tests, before, context)
        end,
        server,
        before,
        context
      )

      ExUnit.Server.modules_loaded()
      ExUnit.run()
      {:ran, ""}
    rescue
      error in @syntax_errors -> {:syntax_error, Exception.message(error)}
      error -> {:runtime_error, Exception.format(:error, error, __STACKTRACE__)}
    catch
      kind, reason -> {:runtime_error, Exception.format(kind, reason, __STACKTRACE__)}
    end
  end

  # the modules the candidate's check cached (Exforge.Sandbox.Checker.verify/4), at most
  # @checked_kept of them: a candidate could send any
  defp collect_checked(acc) do
    receive do
      {Exforge.Sandbox.Checker, modules} when is_list(modules) -> collect_checked(modules ++ acc)
    after
      0 -> Enum.take(acc, @checked_kept)
    end
  end

  defp collect_tests(acc) do
    receive do
      {:exforge_test, kind} -> collect_tests([kind | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  # Passing needs at least one test that ran and passed, and no test that did not.
  defp overall(:ran, tests) do
    cond do
      kind = Enum.find([:timeout, :runtime_error, :failed], &(&1 in tests)) -> kind
      :passed in tests -> :passed
      true -> :failed
    end
  end

  defp overall(status, _tests), do: status

  defp count_warnings(text), do: length(Regex.scan(~r/^warning: /m, text))

  defp swap_registered(name, pid) do
    if Process.whereis(name), do: Process.unregister(name)
    Process.register(pid, name)
  end

  # Kill every process the candidate left behind, unload every module it defined and
  # drop test modules that never ran. True if anything had been left running.
  defp clean_up(before, sinks) do
    Enum.each(sinks, &Process.exit(&1, :kill))
    strays = Process.list() -- [self() | before.processes ++ sinks]
    Enum.each(strays, &Process.exit(&1, :kill))
    # the candidate's: compiled from a string, or left with old code only
    for module <- :erlang.loaded(),
        not Map.has_key?(before.modules, module),
        :code.is_loaded(module) in [{:file, []}, false],
        do: unload(module)

    drain_test_modules()
    await_exit(strays)
    strays != []
  end

  defp drain_test_modules do
    ExUnit.Server.modules_loaded()
    drain_async_modules()
    ExUnit.Server.take_sync_modules()
  end

  defp drain_async_modules do
    if ExUnit.Server.take_async_modules(1_000), do: drain_async_modules()
  end

  defp await_exit(pids) do
    Enum.each(pids, fn pid ->
      ref = Process.monitor(pid)

      receive do
        {:DOWN, ^ref, :process, ^pid, _} -> :ok
      end
    end)
  end

  defp unload(module) do
    :code.purge(module)
    :code.delete(module)
    :code.purge(module)
  end

  # Loaded modules with their checksums (a module redefined, from a string or a file, is
  # changed state): with `baseline` nil, every one; else those of the baseline and those
  # loaded since but for the ones from an object file in the code path (Erlang's and
  # Elixir's own, loaded on first use): a module compiled from a string or loaded from
  # anywhere else counts. ~25 µs for ~250 modules where `:code.all_loaded/0` takes ~0.8 ms.
  defp modules(baseline, code_path) do
    for module <- :erlang.loaded(),
        baseline == nil or Map.has_key?(baseline, module) or
          not Exforge.Sandbox.Modules.autoloaded?(module, code_path),
        into: %{},
        do: {module, Exforge.Sandbox.Modules.checksum(module)}
  end

  # a table deleted meanwhile has none
  defp ets_contents(table) do
    table |> :ets.tab2list() |> Enum.sort()
  rescue
    ArgumentError -> :deleted
  end

  # OS processes of this VM's PID namespace (none tracked without one of its own).
  defp os_processes(%{own_pid_namespace: false}), do: []

  defp os_processes(%{own_pid_namespace: true}) do
    "/proc" |> File.ls!() |> Enum.filter(&pid_name?/1) |> Enum.sort()
  end

  # all digits (a regex took ~1 µs a name, ~60 names a candidate)
  defp pid_name?(""), do: false
  defp pid_name?(name), do: for(<<c <- name>>, reduce: true, do: (ok -> ok and c in ?0..?9))

  # Global state a candidate could change to influence a later one; `baseline`: the
  # snapshot modules loaded since are judged against (nil for the baseline itself).
  defp snapshot(config, baseline \\ nil) do
    code_path = :code.get_path()

    %{
      os_processes: os_processes(config),
      home: config.work_dir |> File.ls!() |> Enum.sort(),
      processes: Process.list() |> Enum.sort(),
      modules: modules(baseline && baseline.modules, code_path),
      registered: Process.registered() |> Enum.sort(),
      ports: Port.list() |> Enum.sort(),
      ets: :ets.all() |> Enum.sort(),
      # what any process may write: the public tables' contents (~7 small ones, ~50 µs)
      public_ets:
        for(t <- :ets.all(), :ets.info(t, :protection) == :public, do: {t, ets_contents(t)}),
      os_env: System.get_env(),
      persistent_terms: :persistent_term.info().count,
      env:
        Enum.sort(
          for {app, _, _} <- Application.loaded_applications(),
              do: {app, Application.get_all_env(app)}
        ),
      cwd: File.cwd!(),
      code_path: code_path,
      compiler: Code.compiler_options()
    }
  end
end
